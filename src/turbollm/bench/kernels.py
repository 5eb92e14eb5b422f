"""Kernel micro-benchmarks for a GPU visit: `python -m turbollm.bench.kernels`.

Each line times a kernel with CUDA events (median of many CUDA-graph replays after warm-up,
so host launch overhead is excluded, as in the engine's captured decode) and puts it
beside two numbers measured in the same run: the achieved fraction of a large
device-to-device copy's bandwidth (BENCHMARKS.md's roofline) and the engine's torch path
(layers.attention: gather_kv + SDPA). `--fused` adds the fused RMSNorm and SiLU-and-mul kernels
against the torch code they replace. GPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from typing import Any

import torch

from turbollm.kernels.activation import silu_and_mul, silu_and_mul_ref
from turbollm.kernels.paged_attention import choose_num_splits, paged_decode_attention
from turbollm.kernels.rmsnorm import fused_add_rmsnorm, fused_add_rmsnorm_ref
from turbollm.layers.attention import Attention, AttentionMetadata


def time_ms(fn: Callable[[], object], iters: int, warmup: int, inner: int = 1) -> float:
    """Median milliseconds per fn call over iters CUDA-event-timed rounds of `inner` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def _graph_time_ms(fn: Callable[[], object], iters: int, warmup: int, inner: int = 10) -> float:
    """Like time_ms, but fn is captured `inner` times into one CUDA graph and replayed, so
    host launch overhead (larger than a small kernel) stays out of the number, as in the
    engine's graph-captured decode."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # compile before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return time_ms(graph.replay, iters, warmup) / inner


def copy_bandwidth_gbs(num_bytes: int = 1 << 30, iters: int = 50) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    src = torch.randn(num_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters, warmup=5)
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def bench_decode_attention(
    batch: int = 64, context: int = 2048, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
    block_size: int = 16, dtype: torch.dtype = torch.bfloat16, num_splits: int | None = None,
    iters: int = 200, warmup: int = 20, copy_gbs: float | None = None,
) -> dict[str, Any]:
    """Time paged_decode_attention (every request at `context` tokens, shuffled blocks).

    Bytes counted: the KV of every request (k and v) + q read + out written. Prints one line
    and returns the numbers as a dict.
    """
    torch.manual_seed(0)
    blocks_per_req = -(-context // block_size)
    num_blocks = batch * blocks_per_req
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype)
    tables = torch.randperm(num_blocks, device="cuda").view(batch, blocks_per_req)  # [B, blocks]
    tables = tables.to(torch.int32)
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)  # [B]
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype)  # [B, H, D]
    scale = head_dim**-0.5

    kernel_ms = _graph_time_ms(
        lambda: paged_decode_attention(q, kv_cache, tables, seq_lens, scale, context, num_splits=num_splits),
        iters, warmup,
    )
    layer = Attention(heads, kv_heads, head_dim)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64, device="cuda"), block_tables=tables.long(),
        seq_lens=seq_lens.long(), query_start_loc=torch.arange(batch + 1, device="cuda"),
        query_lens_cpu=[1] * batch, seq_lens_cpu=[context] * batch,
        num_decodes=batch,
    )
    torch_ms = time_ms(lambda: layer._decode(q, kv_cache, meta), max(10, iters // 10), warmup=3, inner=5)

    elem = kv_cache.element_size()
    num_bytes = batch * context * kv_heads * head_dim * 2 * elem + 2 * q.numel() * elem
    gbs = num_bytes / (kernel_ms * 1e-3) / 1e9
    copy_gbs = copy_gbs if copy_gbs is not None else copy_bandwidth_gbs()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = num_splits or choose_num_splits(batch, kv_heads, context, sms)
    result = {
        "what": "paged_decode_attention", "device": torch.cuda.get_device_name(), "batch": batch,
        "context": context, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
        "block_size": block_size, "dtype": str(dtype), "num_splits": splits, "kernel_us": kernel_ms * 1e3,
        "torch_path_us": torch_ms * 1e3, "bytes": num_bytes, "achieved_gbs": gbs, "copy_gbs": copy_gbs,
        "fraction_of_copy": gbs / copy_gbs, "speedup_vs_torch": torch_ms / kernel_ms,
    }
    print(
        f"decode attn B={batch} ctx={context} H={heads}/{kv_heads} D={head_dim} bs={block_size} "
        f"splits={splits}: {kernel_ms * 1e3:.1f} us, {gbs:.0f} GB/s = {gbs / copy_gbs:.0%} of copy "
        f"({copy_gbs:.0f} GB/s); torch path {torch_ms * 1e3:.1f} us ({torch_ms / kernel_ms:.1f}x)"
    )
    return result


def bench_fused(
    tokens: tuple[int, ...] = (1, 64, 4096), hidden: int = 4096, dtype: torch.dtype = torch.bfloat16,
    iters: int = 200, warmup: int = 20,
) -> list[dict[str, Any]]:
    """Time fused_add_rmsnorm and silu_and_mul (intermediate = hidden) against the torch code
    they replace (layers/norm.py, layers/activation.py), both CUDA-graph replayed.

    Bytes counted: rmsnorm reads x, residual, weight and writes out, new residual; silu_and_mul
    reads [T, 2I] and writes [T, I]. Prints one line per kernel and size.
    """
    torch.manual_seed(0)
    elem = torch.empty((), dtype=dtype).element_size()
    weight = 1 + 0.1 * torch.randn(hidden, device="cuda", dtype=dtype)  # [N]
    results = []
    for t in tokens:
        x = torch.randn(t, hidden, device="cuda", dtype=dtype)  # [T, N]
        res = torch.randn(t, hidden, device="cuda", dtype=dtype)  # [T, N]
        gate_up = torch.randn(t, 2 * hidden, device="cuda", dtype=dtype)  # [T, 2I]
        cases = (
            ("fused_add_rmsnorm", lambda: fused_add_rmsnorm(x, res, weight, 1e-6),
             lambda: fused_add_rmsnorm_ref(x, res, weight, 1e-6), (4 * t + 1) * hidden * elem),
            ("silu_and_mul", lambda: silu_and_mul(gate_up),
             lambda: silu_and_mul_ref(gate_up), 3 * t * hidden * elem),
        )
        for name, kernel, torch_fn, num_bytes in cases:
            kernel_ms = _graph_time_ms(kernel, iters, warmup)
            torch_ms = _graph_time_ms(torch_fn, iters, warmup)
            gbs = num_bytes / (kernel_ms * 1e-3) / 1e9
            results.append({
                "what": name, "device": torch.cuda.get_device_name(), "tokens": t, "hidden": hidden,
                "dtype": str(dtype), "kernel_us": kernel_ms * 1e3, "torch_us": torch_ms * 1e3,
                "bytes": num_bytes, "achieved_gbs": gbs, "speedup_vs_torch": torch_ms / kernel_ms,
            })
            print(
                f"{name} T={t} N={hidden} {dtype}: {kernel_ms * 1e3:.1f} us ({gbs:.0f} GB/s); "
                f"torch {torch_ms * 1e3:.1f} us ({torch_ms / kernel_ms:.1f}x)"
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--sweep", action="store_true", help="also other shapes and split counts")
    parser.add_argument("--fused", action="store_true", help="also fused RMSNorm and SiLU-and-mul")
    args = parser.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    results = [bench_decode_attention(copy_gbs=copy_gbs)]
    if args.fused:
        results.extend(bench_fused())
    if args.sweep:
        for batch, context in ((1, 32768), (8, 8192), (256, 1024)):
            results.append(bench_decode_attention(batch, context, copy_gbs=copy_gbs))
        for batch, context, splits in ((64, 2048, 2), (64, 2048, 4), (1, 32768, 8), (1, 32768, 64)):
            results.append(bench_decode_attention(batch, context, num_splits=splits, copy_gbs=copy_gbs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
