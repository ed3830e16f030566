"""The tool people would otherwise use: Hugging Face transformers `generate()`, on the same
weights (the loaded model's Hugging Face-format folder), dtype and device, in the same process.

Its per-step times come from engine/timing.py's StepClock, a logits processor that only notes
the clock: `generate()` calls the processors once per new token, right after the forward pass,
so the gaps between calls are the same per-step latencies our engine reports, and
`engine.metrics.compute_metrics` turns them into TTFT/TPOT/tokens per second with the same
definitions as every other row.
"""

from __future__ import annotations

import torch

from .memory import PeakMemory
from .runs import Outcome, Sample
from ..metrics import compute_metrics
from ..timing import StepClock


class BaselineUnavailable(RuntimeError):
    """No transformers, or no Hugging Face-format folder behind the loaded model."""


class HFBaseline:
    def __init__(self, lm):
        if not lm.hf_folder:
            raise BaselineUnavailable("the loaded model has no Hugging Face-format folder")
        try:
            import transformers
            from transformers import AutoModelForCausalLM, LogitsProcessorList
        except ImportError as exc:
            raise BaselineUnavailable(f"transformers is not installed ({exc})") from None
        self.version = transformers.__version__
        self._processors = LogitsProcessorList
        self.device, self.dtype = lm.model.device, lm.model.dtype
        self.kv_bytes_per_token = lm.config.kv_bytes_per_token(
            torch.finfo(self.dtype).bits // 8)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()          # its weight-loading bar would cut ours
        self.model = AutoModelForCausalLM.from_pretrained(
            lm.hf_folder, dtype=self.dtype, trust_remote_code=False).to(self.device).eval()
        # Exactly max_new_tokens every time, like our rows: no stopping at end-of-sequence.
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0

    def runner(self, ids: list[int], max_new_tokens: int, use_cache: bool):
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        mask = torch.ones_like(x)

        def run(keep_logits: bool) -> Outcome:
            clock = StepClock(self.device)
            with PeakMemory(self.device) as pm, torch.inference_mode():
                clock.start()
                out = self.model.generate(
                    x, attention_mask=mask, max_new_tokens=max_new_tokens,
                    min_new_tokens=None, do_sample=False, use_cache=use_cache,
                    logits_processor=self._processors([clock]),
                    return_dict_in_generate=True, output_logits=keep_logits)
            latencies = clock.latencies()
            n_new = out.sequences.shape[1] - len(ids)
            # Its DynamicCache holds K/V for every position but the last generated one.
            kv = self.kv_bytes_per_token * (len(ids) + n_new - 1) if use_cache else 0
            m = compute_metrics(len(ids), latencies[0] if latencies else 0.0, latencies,
                                self.device, kv)
            logits = [s[0].detach().float().cpu() for s in out.logits] if keep_logits else None
            return Outcome(tokens=tuple(out.sequences[0, len(ids):].tolist()), logits=logits,
                           sample=Sample.of(m, pm))
        return run
