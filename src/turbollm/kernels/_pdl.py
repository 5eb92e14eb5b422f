"""Programmatic dependent launch (PDL) for the short kernels of a decode step, Hopper and later.

At batch 1 a decode step is ~230 kernels back to back, each a few microseconds. Launched with
PDL, a kernel may start while the one before it finishes: its programs are placed on the
multiprocessors early and wait in `gdc_wait` (griddepcontrol.wait) until the previous kernel
has completed and its writes are visible. A kernel lets its successor launch with
`gdc_launch_dependents` once it has issued its main reads. The contract for every kernel that
takes PDL: call `gdc_wait` before touching memory that the kernel just before may write, and
trigger only after the wait. Then a kernel two back has finished when a kernel starts, so data
written before that may be read before the wait, overlapping the previous kernel's tail: the
batch-1 GEMV loads its first weight tile so (kernels/gemv.py). Decode attention and the rotary
/ KV-write kernel doing the same with the step's inputs, cos / sin and old keys gained nothing
(H100, docs/performance.md), so they wait first.
Kernels without it (cuBLAS, torch ops) keep plain stream order on both sides.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]


@functools.lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_kwargs(device: torch.device) -> dict[str, bool]:
    """Launch keywords: the kernel's PDL constexpr and, where supported, launch_pdl."""
    if triton is None or device.type != "cuda" or triton.knobs.runtime.interpret:
        return {"PDL": False}
    on = _supported(device.index if device.index is not None else torch.cuda.current_device())
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
