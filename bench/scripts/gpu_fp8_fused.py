"""The FP8 recipe's fused norm / SwiGLU quantization (kernels/fp8_fused.py) against the unfused
pairs, and the SwiGLU kernel's one-pass / two-pass choice, on one GPU, in one process.

Usage: PYTHONPATH=src python3 bench/scripts/gpu_fp8_fused.py [--json PATH]
Rows M = 1, 64, 512, 4096, 16384 (decode batches and prompt chunks); Llama-3-8B widths (hidden
4096, intermediate 14336) and Llama-2-7B's intermediate 11008. Variants:
  norm:  unfused = fused_add_rmsnorm + quantize_fp8_per_token; fused = add_rmsnorm_quantize_fp8
  silu:  unfused = silu_and_mul + quantize_fp8_per_token; fused two passes (_SINGLE_MAX 8192,
         the eleventh session's setting); fused one pass (the shipped _SINGLE_MAX 16384 since the
         twelfth session, 16 or 32 warps: the whole row in registers; sm_90 SASS on the CPU:
         123 / 54 registers, no spills)
Each variant is compared with the unfused pair first (a difference is printed with the row, not
fatal), then timed as the median of
CUDA-graph replays (20 calls a graph) after an L2 flush. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

from turbollm.kernels import activation, fp8_fused, fp8_matmul, rmsnorm

ROWS = (1, 64, 512, 4096, 16384)


def timed(fn: Callable[[], object], calls: int = 20, reps: int = 15) -> float:
    """Median µs a call over CUDA-graph replays, L2 flushed before each replay."""
    flush = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(2):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def mismatch(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> str:
    """'' when the outputs are equal, else how many elements of each output differ and by how
    much (codes, scales, residual): the variant is still timed, its row keeps the note."""
    notes = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        d = (x.float() - y.float()).abs()
        if d.max().item() > 0:
            notes.append(f"out{i}: {int((d > 0).sum())} of {d.numel()} differ (max {d.max().item():.3g}, "
                         f"rows {sorted(set(torch.nonzero(d > 0)[:, 0].tolist()))[:4]})")
    return "; ".join(notes)


def silu_variant(single_max: int, warps: int | None) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """silu_mul_quantize_fp8 with _SINGLE_MAX (and the wide one-pass rows' warps) set for this call."""
    def run(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old_max, old_warps = fp8_fused._SINGLE_MAX, fp8_fused._WIDE_WARPS
        fp8_fused._SINGLE_MAX = single_max
        fp8_fused._WIDE_WARPS = warps or old_warps
        try:
            return fp8_fused.silu_mul_quantize_fp8(gate_up)
        finally:
            fp8_fused._SINGLE_MAX, fp8_fused._WIDE_WARPS = old_max, old_warps
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows_out = []
    w = (1 + 0.1 * torch.randn(4096, device="cuda")).to(torch.bfloat16)
    for m in ROWS:
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        res = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)

        def norm_unfused() -> tuple[torch.Tensor, ...]:
            h, s = rmsnorm.fused_add_rmsnorm(x, res, w, 1e-5)
            return (*fp8_matmul.quantize_fp8_per_token(h), s)

        def norm_fused() -> tuple[torch.Tensor, ...]:
            return fp8_fused.add_rmsnorm_quantize_fp8(x, res, w, 1e-5)

        note = mismatch(norm_unfused(), norm_fused())
        rows_out.append({"op": "norm 4096", "rows": m, "unfused_us": timed(norm_unfused), "fused_us": timed(norm_fused),
                         **({"mismatch": {"fused": note}} if note else {})})
        for inter in (14336, 11008):
            gate_up = torch.randn(m, 2 * inter, device="cuda", dtype=torch.bfloat16)
            variants: dict[str, Callable[[], tuple[torch.Tensor, ...]]] = {
                "unfused": lambda: fp8_matmul.quantize_fp8_per_token(activation.silu_and_mul(gate_up)),
                "two-pass": lambda: silu_variant(8192, None)(gate_up),
                "one-pass 16w": lambda: silu_variant(16384, 16)(gate_up),
                "one-pass 32w": lambda: silu_variant(16384, 32)(gate_up),
            }
            want = variants["unfused"]()
            row = {"op": f"silu {inter}", "rows": m}
            for name, fn in variants.items():
                note = mismatch(fn(), want)
                if note:
                    row.setdefault("mismatch", {})[name] = note
                row[f"{name}_us"] = timed(fn)
            rows_out.append(row)
    for r in rows_out:  # µs a call
        print(f"{r['op']:11s} {r['rows']:6d}  " + "  ".join(f"{k[:-3]} {v:7.1f}" for k, v in r.items() if k.endswith("_us"))
              + (f"  MISMATCH {r['mismatch']}" if "mismatch" in r else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
