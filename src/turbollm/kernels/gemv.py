"""Matrix-vector product for batch-1 decode (y = x W^T, one row of x): Triton kernel, launcher,
torch reference.

At batch 1 a decode step is a stream of weight reads. On an H100, cuBLAS's M = 1 kernels for
the MLP and LM-head shapes of a 7B model stream ~2.5-2.7 TB/s; this kernel reaches ~2.9-3.0
TB/s on them and ~4 TB/s-equivalent on 4096 x 4096 (L2-resident between replays) — about
0.35 ms of a 5.5 ms Llama-2-7B step (bench/scripts/gpu_gemv.py, results in
docs/performance.md). For two or more rows cuBLAS is faster; callers use it there.

    program n: rows [n * BLOCK_N, (n + 1) * BLOCK_N) of W, K in BLOCK_K tiles, fp32 accumulator

A long K (>= 8192) is split over two programs per row tile; a second tiny kernel adds the
two fp32 halves and rounds once. The grid depends only on shapes, so launches can be
captured in CUDA graphs. Runs on CPU only under the interpreter.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]

HAS_TRITON = triton is not None
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_N = 16
_BLOCK_K = 512
_SPLIT_K_FROM = 8192  # K at which two programs share a row tile (down_proj's 11008)

if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, N, K, k_per_split, stride_wn, stride_os,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
        rmask = rows < N
        offs_k = tl.arange(0, BLOCK_K)
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros([BLOCK_N], tl.float32)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + offs_k  # [BLOCK_K]
            kmask = ks < k_hi
            w = tl.load(w_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)  # [BN, BK]
            x = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)  # [BLOCK_K]
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=rmask & (split == 0), other=0.0).to(tl.float32)
        tl.store(out_ptr + split * stride_os + rows, acc.to(out_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _sum2_kernel(part_ptr, out_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        s = tl.load(part_ptr + offs, mask=mask, other=0.0) + tl.load(part_ptr + N + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, s.to(out_ptr.dtype.element_ty), mask=mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias [N]) -> [1, N] in x's dtype, fp32 accumulation."""
    if triton is None:
        raise RuntimeError("gemv needs triton; use gemv_ref instead")
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} are not [1, K] and [N, K]")
    n, k = weight.shape
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x {x.dtype} and weight {weight.dtype} must share a float dtype")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight need a contiguous last dimension")
    if bias is not None and (bias.shape != (n,) or bias.stride(0) != 1):
        raise ValueError(f"bias shape {tuple(bias.shape)} is not a contiguous [{n}]")
    split = 2 if k >= _SPLIT_K_FROM else 1
    k_per_split = -(-(-(-k // split)) // _BLOCK_K) * _BLOCK_K
    out = torch.empty(1, n, device=x.device, dtype=x.dtype)  # [1, N]
    part = out if split == 1 else torch.empty(split, n, device=x.device, dtype=torch.float32)  # [S, N]
    stages = 4 if n * k <= 4096 * 4096 else 3
    _gemv_kernel[(triton.cdiv(n, _BLOCK_N), split)](
        x, weight, bias if bias is not None else x, part, n, k, k_per_split, weight.stride(0),
        part.stride(0) if split > 1 else 0,
        HAS_BIAS=bias is not None, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, num_warps=8, num_stages=stages,
    )
    if split > 1:
        _sum2_kernel[(triton.cdiv(n, 1024),)](part, out, n, BLOCK=1024, num_warps=4)
    return out


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product in fp32, rounded once to x's dtype."""
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
