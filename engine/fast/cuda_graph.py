"""CUDA graphs: record the decode step's ~400 kernel launches once, replay them with one call.

On a GPU a small model's decode step is launch-bound: each of its few hundred kernels runs for
microseconds, and the CPU spends about as long telling the GPU to start it. A CUDA graph records
the whole sequence of launches — with their arguments, i.e. the *addresses* of every tensor —
and `replay()` submits it in one go.

What that demands, and how we meet it:
  * fixed shapes and fixed addresses: the step runs through StaticAttention (static_step.py);
    the new token and the position are written *into* tensors the graph already reads
    (`tokens.fill_`, `pos.fill_`), the logits come back in a tensor the graph always writes;
  * one capture per cache: the graph bakes in that cache's buffers, so it is recorded once when
    a run's cache exists (its size fixed) and replayed for every step of that run;
  * a warm-up on a side stream before capture, so lazy initialisation (cuBLAS workspaces,
    autotuning) happens outside the recording.

CUDA only; on the CPU nothing here runs (the caller checks), and the static step it wraps is
tested on the CPU.
"""

from __future__ import annotations

import torch

from .static_step import StaticDecoder


def capture_decoder(decoder: StaticDecoder, pos: int, warmup: int = 2) -> StaticDecoder:
    """Record the decoder's step as a CUDA graph, with slot `pos` (the next one) as scratch."""
    if decoder.model.device.type != "cuda":
        raise RuntimeError("CUDA graphs need the model on a CUDA device")
    decoder.prime(pos)                        # warm-up and capture write slot `pos`; the first
    run = decoder._run                        # real step overwrites it with the right K/V
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        logits = run()                        # static output buffer, rewritten by each replay
    torch.cuda.synchronize()

    def replay() -> torch.Tensor:
        graph.replay()
        return logits

    decoder._graph = graph                    # keep the graph (and its memory pool) alive
    decoder._run = replay
    return decoder
