"""Step mode: a run that stops before each token and shows why the next one is what it is.

`generate` (engine/decoding.py) takes a *pause*: after the sampler has chosen a token and before
it is taken, the pause may yield events, wait, and return another token. Two pauses live here:

    step_pause    step mode. Show the StepPoint (the top candidates at every stage of the
                  sampling ladder) and the LogitLens (what each layer would predict), then wait
                  for a StepCommand: next (N tokens), force a token (a fork), run to the end,
                  or cancel.
    forced_pause  a request's forced tokens, taken without waiting: a fork made reproducible,
                  so a race can compare it with the unforced run (engine/session.py).

What a pause shows:

    step_point    sampling.shape: the model's softmax, the distribution after repetition
                  penalty and temperature, which tokens top-k / top-p / min-p cut, and what the
                  draw uses. The chosen token is the sampler's real draw (next_token), so with a
                  seed a stepped run takes exactly the tokens of an unstepped one.
    logit_lens    the "logit lens": the final norm and the LM head applied to each layer's
                  residual stream at the current position (Transformer.forward's `residuals`).
                  Early layers predict little; the answer forms through the depth and the last
                  layer's view *is* the model's prediction. For a lossy fast path (int8 or
                  16-bit weights) the exact model reads the same prefix beside it, and the event
                  says where their top choices part.

The residuals come from the very forward that made the step's logits (the step pause asks
`generate` for them), so the lens costs one batched readout of all layers, and its last layer
is the model's prediction (up to float rounding: one matmul for 30 rows, not one for 1). Where
there are none — a fast path's own decode step (the C
step) has no Python residuals, and the exact model beside a lossy one decodes nothing — the
lens runs a forward over the whole prefix instead (reference attention, no cache). Outside step
mode nothing is collected.

Waiting blocks on an *inbox* (anything with get()): in one process, the queue that
Session.step() and Session.cancel() put into; in the app's engine process, the app's command
queue itself (tui/engine_process.py). Cancel sets the run's flag and puts a wake-up into the
same inbox, so a paused run never polls and always hears it; a wake-up that finds the flag
clear is a stale one from an earlier run and is ignored. An inbox that answers None (the app
went away) stops the run.
"""

from __future__ import annotations

from typing import Callable, Generator, Iterable

import torch

from .attention import get_backend
from .config import ConfigError
from .decoding import CachedAttention, Pause, Run, seen_tokens
from .events import Candidate, Event, Forked, LensLayer, LogitLens, StepPoint
from .model import Transformer
from .requests import StepCommand
from .sampling import CUTS, shape

CANDIDATES = 10      # candidates a step point lists (digits 1…9, 0 pick them in the app)
LENS_TOP = 3         # predictions the lens keeps per layer


# --------------------------------------------------------------------------- what is shown
def step_point(run: Run, logits: torch.Tensor, chosen: int, n: int = CANDIDATES) -> StepPoint:
    """The top `n` candidates as the sampler ranks them, at each stage of the ladder."""
    shaped = shape(logits, run.cfg.sampling, seen_tokens(run))
    vocab = shaped.model.numel()
    # Ranked by the penalised, tempered distribution — the sampler's view — so a top-k cut is
    # a clean line under the k-th candidate; the model's own probability is shown beside it.
    order = torch.topk(shaped.tempered, min(n, vocab)).indices.tolist()
    if chosen not in order:
        order.append(chosen)          # a draw from the tail is still shown
    text = run.tokenizer.token_text
    candidates = tuple(Candidate(id=i, text=text(i), model=float(shaped.model[i]),
                                 tempered=float(shaped.tempered[i]),
                                 final=float(shaped.final[i]), cut=CUTS[int(shaped.cut[i])])
                       for i in order)
    return StepPoint(index=len(run.generated), position=len(run.seq), candidates=candidates,
                     chosen=chosen, kept=int((shaped.cut == 0).sum()), vocab=vocab)


@torch.inference_mode()
def read_lens(model: Transformer, residuals: list[torch.Tensor], text: Callable[[int], str],
              top: int = LENS_TOP) -> tuple[LensLayer, ...]:
    """Each layer's view of the next token: readout(its residual at the last position), the
    `top` most likely tokens. residuals: one (1, T, dim) tensor per layer."""
    stream = torch.stack([r[0, -1] for r in residuals])                       # (n_layers, dim)
    probs = torch.softmax(model.readout(stream), dim=-1)                      # (n_layers, vocab)
    p, ids = probs.topk(min(top, probs.shape[-1]), dim=-1)                    # (n_layers, top)
    return tuple(LensLayer(layer=layer, ids=tuple(ids[layer].tolist()),
                           texts=tuple(text(i) for i in ids[layer].tolist()),
                           probs=tuple(p[layer].tolist()))
                 for layer in range(len(residuals)))


@torch.inference_mode()
def lens_of_prefix(model: Transformer, tokens: list[int], text: Callable[[int], str],
                   top: int = LENS_TOP) -> tuple[LensLayer, ...]:
    """The lens after `tokens` from a forward of its own over all of them (no cache)."""
    x = torch.tensor([tokens], dtype=torch.long, device=model.device)         # (1, T)
    residuals: list[torch.Tensor] = []
    model(x, 0, CachedAttention(get_backend("naive")), last_only=True, residuals=residuals)
    return read_lens(model, residuals, text, top)


def logit_lens(run: Run, exact: Transformer) -> LogitLens:
    """The lens of the run's model at this step — and, when the run decodes with lossy weights
    (a transformed copy of `exact`), the exact model's on the same prefix."""
    text = run.tokenizer.token_text
    layers = (read_lens(run.model, run.residuals, text) if run.residuals
              else lens_of_prefix(run.model, run.seq, text))
    lossy = run.cfg.fast.weights != "same"       # int8, 16-bit: the tokens may differ
    return LogitLens(index=len(run.generated), position=len(run.seq), layers=layers,
                     exact=lens_of_prefix(exact, run.seq, text) if lossy else (),
                     fast=run.cfg.fast.spec() if lossy else "")


# --------------------------------------------------------------------------- forcing
def fork(index: int, position: int, token: int, chosen: int, text: Callable[[int], str],
         vocab: int) -> Generator[Event, None, int]:
    """Take `token` where the sampler chose `chosen`: a Forked event, unless they are the same
    (forcing the sampler's own choice changes nothing)."""
    if token == chosen:
        return chosen
    if not 0 <= token < vocab:
        raise ConfigError(f"cannot force token id {token}: the vocabulary has {vocab} tokens")
    yield Forked(index=index, position=position, token=token, text=text(token),
                 instead=chosen, instead_text=text(chosen))
    return token


def forced_pause(forces: Iterable[tuple[int, int]]) -> Pause:
    """Take the given (index, token id) pairs whatever the sampler chooses; never wait."""
    table = dict(forces)

    def pause(run: Run, logits: torch.Tensor, token: int):
        index = len(run.generated)
        if index not in table:
            return token
        return (yield from fork(index, len(run.seq), table[index], token,
                                run.tokenizer.token_text, logits.shape[-1]))
    return pause


# --------------------------------------------------------------------------- waiting
class Stepper:
    """One step-mode run's side of the conversation: when to stop, and what it was told.

    `pause(...)` is independent of the model (the app's fake engine uses it too): `shown()`
    makes the events to show, `text(id)` spells a token, `vocab` bounds a forced id.
    """

    def __init__(self, run_id: int, inbox, cancel):
        self.run_id, self.inbox, self.cancel = run_id, inbox, cancel
        self.ahead = 0              # tokens still to take without stopping ("next", count > 1)
        self.free = False           # "run": no more stops

    def pause(self, index: int, position: int, chosen: int,
              shown: Callable[[], Iterable[Event]], text: Callable[[int], str],
              vocab: int) -> Generator[Event, None, int | None]:
        if self.free:
            return chosen
        if self.ahead:
            self.ahead -= 1
            return chosen
        yield from shown()
        command = self.wait()
        if command is None:
            return None
        if command.action == "run":
            self.free = True
        elif command.action == "next":
            self.ahead = command.count - 1
        elif command.action == "force":
            return (yield from fork(index, position, command.token, chosen, text, vocab))
        return chosen

    def wait(self) -> StepCommand | None:
        """Block until a command for this run arrives; None when the run is to stop."""
        while not self.cancel.is_set():
            command = self.inbox.get()
            if command is None:                       # the inbox closed: nobody will answer
                return None
            if command.run_id != self.run_id:
                continue     # a wake-up (the flag decides, above) or an earlier run's command
            return None if command.action == "cancel" else command
        return None


def step_pause(stepper: Stepper, exact: Transformer) -> Pause:
    """Step mode on a real model: show the step point and the logit lens, then wait."""
    def pause(run: Run, logits: torch.Tensor, token: int):
        return (yield from stepper.pause(
            len(run.generated), len(run.seq), token,
            lambda: (step_point(run, logits, token), logit_lens(run, exact)),
            run.tokenizer.token_text, logits.shape[-1]))
    pause.residuals = True              # generate() collects each forward's residuals for it
    return pause
