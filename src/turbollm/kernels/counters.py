"""Arrival counters for kernels whose last program of a group finishes the group's reduction.

A kernel split over several programs (split-K GEMV, split-KV decode attention) can merge its
partial results without a second launch: each program stores its partial, then increments
its group's counter (acquire-release, GPU scope); the program that sees the count reach
`programs - 1` is the last, reads every partial (they are visible after the acquire), writes
the result in a fixed order (deterministic whichever program comes last) and sets the counter
back to zero. So the counters are zero between launches, and one buffer per device serves
every launch on a stream and every CUDA-graph replay.

The buffer only grows outside CUDA-graph capture (the engine's warm-up runs each captured
shape first); an outgrown buffer is kept alive because captured graphs may still point at it.
"""

from __future__ import annotations

import torch

_MIN_COUNTERS = 4096
_buffers: dict[tuple[str, int | None], torch.Tensor] = {}
_retired: list[torch.Tensor] = []


def counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n int32 counters on `device`, all zero between launches."""
    key = (device.type, device.index)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"kernel counters must grow to {n} before CUDA-graph capture (run the shape once first)")
        if buf is not None:
            _retired.append(buf)
        buf = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
        _buffers[key] = buf
    return buf
