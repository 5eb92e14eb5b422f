"""Rotary + KV-cache write (kernels/rope_cache.py) on one GPU: the program shapes and the
Hadamard rotation's precision, A/B in one process, with a correctness check of each.

Imports turbollm.kernels.rope_cache and turbollm.bench.kernels (carried wheels installed), so run it as
    export PYTHONPATH=src && python3 bench/scripts/gpu_rope_rotate.py [--json PATH] [--baseline OLD.py]
Llama-3-8B shapes (32 q heads, 8 kv heads, head_dim 128, bf16 activations) at T = 1, 64, 4096
and 16384 tokens, with (a) a bf16 cache and (b) an FP8 cache with rotate=True (k_scale 0.02,
v_scale 0.004). Variants (`_LaunchConfig`):
  old     the narrow shape with fp32 dots ("ieee"): the kernel before, except that it loaded S
          from memory (--baseline OLD.py times that file's rope_and_cache as it is, e.g.
          `git show REV:src/turbollm/kernels/rope_cache.py > /tmp/old.py`, REV the commit before);
  new     the launcher's own choice (_WIDE_FROM, _rotate_precision);
  narrow / wide                  each shape with the default precision;
  narrow tf32x3 / wide tf32x3    Triton's tf32x3 split instead of bf16_split3.
Each is timed as the median of CUDA-event-timed graph replays (10 calls a graph; qkv and the
cache are updated in place each call, which is harmless: rotations keep the norms). GB/s counts
qkv read, q and k written back, k and v written to the cache, cos, sin and slots read.
Each variant is first checked against rope_and_cache_ref on fresh inputs at the tolerances of
tests/kernels/test_rope_cache.py, and, with rotation, also with fp32 activations at 1e-5 (the
rotation's fp32 accuracy). Prints a table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Callable

import torch

from turbollm.bench.kernels import _graph_time_ms

from turbollm.kernels import rope_cache as rc

HEADS, KV, DIM = 32, 8, 128
TOKENS = (1, 64, 4096, 16384)
SCALES = (0.02, 0.004)  # k_scale, v_scale of the FP8 cache
VARIANTS: dict[str, rc._LaunchConfig | None] = {
    "old": rc._LaunchConfig(wide=False, precision="ieee"),
    "new": None,
    "narrow": rc._LaunchConfig(wide=False),
    "wide": rc._LaunchConfig(wide=True),
    "narrow tf32x3": rc._LaunchConfig(wide=False, precision="tf32x3"),
    "wide tf32x3": rc._LaunchConfig(wide=True, precision="tf32x3"),
}
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make(tokens: int, dtype: torch.dtype, fp8: bool, seed: int = 0) -> Inputs:
    """qkv [T, (H + 2 KV) * D], cos, sin [T, D / 2], cache [2, blocks, 16, KV, D], slots [T]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(tokens, (HEADS + 2 * KV) * DIM, device="cuda", generator=g).to(dtype)
    positions = torch.randint(0, 8192, (tokens,), device="cuda", generator=g).float()  # [T]
    inv_freq = 500000.0 ** (-torch.arange(0, DIM, 2, device="cuda").float() / DIM)  # [D / 2]
    angles = positions[:, None] * inv_freq[None, :]  # [T, D / 2]
    blocks = -(-tokens // 16) + 8
    cache = torch.randn(2, blocks, 16, KV, DIM, device="cuda", generator=g).to(dtype)
    if fp8:
        cache = cache.to(torch.float8_e4m3fn)
    slots = torch.randperm(blocks * 16, device="cuda", generator=g)[:tokens]  # [T] int64
    return qkv, angles.cos().to(dtype), angles.sin().to(dtype), cache, slots


def launcher(config: rc._LaunchConfig | None, baseline: object | None) -> Callable[..., None]:
    if baseline is not None:
        return baseline.rope_and_cache  # type: ignore[attr-defined]
    return lambda *args, **kw: rc.rope_and_cache(*args, **kw, _config=config)


def check(fn: Callable[..., None], tokens: int, fp8: bool, dtype: torch.dtype) -> tuple[float, float]:
    """Max |kernel - reference| of qkv and of the cache (as floats); asserts the tests' tolerances."""
    qkv, cos, sin, cache, slots = make(tokens, dtype, fp8, seed=1)
    scales = SCALES if fp8 else (1.0, 1.0)
    q1, c1 = qkv.clone(), cache.clone()
    fn(q1, cos, sin, c1, slots, HEADS, KV, DIM, *scales, rotate=fp8)
    q2, c2 = qkv.clone(), cache.clone()
    rc.rope_and_cache_ref(q2, cos, sin, c2, slots, HEADS, KV, DIM, *scales, rotate=fp8)
    a, b = c1.float(), c2.float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2 if fp8 else 1e-2
    torch.testing.assert_close(q1.float(), q2.float(), atol=tol, rtol=tol)
    if fp8:  # one e4m3 step where the fp32 Hadamard sums round differently
        assert ((a - b).abs() <= b.abs() / 8 + 2**-9).all(), "FP8 cache off by more than one e4m3 step"
    else:
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    return (q1.float() - q2.float()).abs().max().item(), (a - b).abs().max().item()


def graph_ms(fn: Callable[[], object]) -> float:
    """ms per call over CUDA-event-timed replays of a graph of 10 calls (turbollm.bench.kernels)."""
    return _graph_time_ms(fn, iters=20, warmup=2)


def moved_bytes(tokens: int, fp8: bool) -> int:
    """qkv read, q and k written back, k and v to the cache, cos and sin (bf16), slots (int64)."""
    act = 2 * DIM * tokens
    return act * (HEADS + 2 * KV) + act * (HEADS + KV) + 2 * KV * DIM * tokens * (1 if fp8 else 2) + act + 8 * tokens


def run_case(name: str, fn: Callable[..., None], tokens: int, fp8: bool) -> dict:
    dq, dc = check(fn, tokens, fp8, torch.bfloat16)
    dq32 = check(fn, tokens, fp8, torch.float32)[0] if fp8 else None
    qkv, cos, sin, cache, slots = make(tokens, torch.bfloat16, fp8)
    scales = SCALES if fp8 else (1.0, 1.0)
    ms = graph_ms(lambda: fn(qkv, cos, sin, cache, slots, HEADS, KV, DIM, *scales, rotate=fp8))
    return dict(cache="fp8+rotate" if fp8 else "bf16", tokens=tokens, variant=name, ms=ms,
                gbs=moved_bytes(tokens, fp8) / (ms * 1e-3) / 1e9, max_dq=dq, max_dcache=dc, max_dq_fp32=dq32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None, help="write the rows there")
    ap.add_argument("--baseline", default=None, help="another copy of rope_cache.py to time as 'baseline'")
    ap.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    args = ap.parse_args()
    variants: dict[str, Callable[..., None]] = {k: launcher(v, None) for k, v in VARIANTS.items()}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("rope_cache_baseline", args.baseline)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        variants = {"baseline": launcher(None, module), **variants}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {rc.triton.__version__}, "
          f"H={HEADS} KV={KV} D={DIM}, _WIDE_FROM={rc._WIDE_FROM} rows")
    rows = []
    for fp8 in (False, True):
        for tokens in args.tokens:
            for name, fn in variants.items():
                if not fp8 and "tf32x3" in name:
                    continue  # no rotation: the precision does not matter
                rows.append(run_case(name, fn, tokens, fp8))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def print_table(rows: list[dict]) -> None:
    old = {(r["cache"], r["tokens"]): r["ms"] for r in rows if r["variant"] == "old"}
    print(f"{'cache':11} {'T':>6} {'variant':14} {'us':>9} {'GB/s':>6} {'vs old':>6} "
          f"{'max|dq|':>9} {'max|dc|':>9} {'fp32 |dq|':>9}")
    for r in rows:
        fp32 = "" if r["max_dq_fp32"] is None else f"{r['max_dq_fp32']:.1e}"
        print(f"{r['cache']:11} {r['tokens']:>6} {r['variant']:14} {r['ms'] * 1e3:9.1f} {r['gbs']:6.0f} "
              f"{old[(r['cache'], r['tokens'])] / r['ms']:5.2f}x {r['max_dq']:9.1e} {r['max_dcache']:9.1e} {fp32:>9}")


if __name__ == "__main__":
    main()
