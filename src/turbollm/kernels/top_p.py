"""Nucleus (top-p) filter without sorting the vocabulary: Triton kernel and launcher. The torch
reference is sample.logits_processors.apply_top_p.

The reference (sample/logits_processors.apply_top_p) sorts each row stably, value descending
and then index ascending, and keeps a token when the probability mass of the tokens before
it is below p. Sorting 64 rows of a 128k vocabulary costs ~1.2 ms on an H100
(bench/results/top-p-h100-2026-11-27.txt).

The same set can be found with a search instead of the sort. One program takes a row.
- M(v) is the mass of the tokens whose value is strictly above v. It never grows as v grows.
  The kept tokens are every token above v*, the smallest value with M(v*) < p, plus the
  first n tokens tied at v*, in index order. Each tied token adds the same probability q, so
  n is ceil((p - M(v*)) / q). Tokens below v* are preceded by at least M(u) >= p.
- v* is found over the 32-bit keys of the float values, ordered like the values. Each pass
  over the row measures M at 7 probes and narrows the key range 8-fold, so 12 passes
  suffice. The softmax's max and normalizer take 2 passes before; M(v*) and the tied
  tokens' ranks take 2 more.
- Every pass rereads the row (from L2) and recomputes exp; nothing is sorted or written
  until the end. No host sync: the grid is one program a row.

The result is the reference's up to float rounding: M is summed in another order than the
reference's cumsum. Only a token whose preceding mass lies within rounding of p can land on
the other side; tests/kernels/test_top_p_kernel.py checks equality on every other token.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]

HAS_TRITON = triton is not None
_BLOCK = 2048  # elements of a row a loop step
_PASSES = 12  # 8-way narrowing passes: 8**12 > 2**32 keys

if triton is not None:

    @triton.jit
    def _key(x):
        """float32 -> int32 ordered like the floats (-inf lowest; -0.0 and 0.0 one key, as they
        compare equal)."""
        b = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
        return tl.where(b < 0, b ^ 0x7FFFFFFF, b)

    @triton.jit
    def _top_p_kernel(x_ptr, out_ptr, p_ptr, V, stride_x, stride_o, BLOCK: tl.constexpr, PASSES: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        xr = x_ptr + row * stride_x
        orow = out_ptr + row * stride_o
        p = tl.load(p_ptr + row)
        offs = tl.arange(0, BLOCK)
        m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
        for c in range(0, V, BLOCK):
            m_vec = tl.maximum(m_vec, tl.load(xr + c + offs, mask=c + offs < V, other=float("-inf")))
        m = tl.max(m_vec, 0)  # the row's max (finite for any row with a finite logit)
        z_vec = tl.zeros([BLOCK], tl.float32)
        for c in range(0, V, BLOCK):
            x = tl.load(xr + c + offs, mask=c + offs < V, other=float("-inf"))
            z_vec += tl.exp2((x - m) * 1.4426950408889634)
        inv_z = 1.0 / tl.sum(z_vec, 0)
        # Search the smallest key k with M(k) < p over [lo, hi]; M(key of the max) = 0 < p.
        lo = _key(tl.full([1], float("-inf"), tl.float32)).to(tl.int64)  # [1]
        hi = _key(tl.full([1], 0.0, tl.float32) + m).to(tl.int64)  # [1]
        j = tl.arange(0, 8)  # probe j = 1..7 at lo + (hi - lo) j / 8; j = 0 unused
        for _ in tl.static_range(PASSES):
            probes = lo + ((hi - lo) * j) // 8  # [8] int64
            p32 = probes.to(tl.int32)  # keys fit int32; the range's arithmetic needs int64
            mass = tl.zeros([8], tl.float32)
            for c in range(0, V, BLOCK):
                x = tl.load(xr + c + offs, mask=c + offs < V, other=float("-inf"))
                e = tl.exp2((x - m) * 1.4426950408889634) * inv_z  # [BLOCK] probabilities
                above = _key(x)[:, None] > p32[None, :]  # [BLOCK, 8]
                mass += tl.sum(tl.where(above, e[:, None], 0.0), 0)
            ok = (mass < p) & (j > 0)  # [8]
            first = tl.min(tl.where(ok, j, 8), 0)  # first probe with M < p (8: none, i.e. hi)
            new_hi = tl.sum(tl.where(j == first, probes, 0), 0) + tl.where(first == 8, hi, 0)
            prev = tl.sum(tl.where(j == first - 1, probes, 0), 0)
            new_lo = tl.where(first == 1, lo, prev + 1)
            lo, hi = new_lo, new_hi
        kstar = hi  # [1] the key of v*
        k32 = kstar.to(tl.int32)
        # M(v*), then keep every token above v* and the first n tied at v*, in index order.
        m_star = tl.zeros([BLOCK], tl.float32)
        for c in range(0, V, BLOCK):
            x = tl.load(xr + c + offs, mask=c + offs < V, other=float("-inf"))
            e = tl.exp2((x - m) * 1.4426950408889634) * inv_z
            m_star += tl.where(_key(x) > k32, e, 0.0)
        bits = k32
        vstar = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)  # [1]
        q = tl.exp2((vstar - m) * 1.4426950408889634) * inv_z  # [1] each tied token's probability
        n_keep = tl.ceil((p - tl.sum(m_star, 0)) / q)  # [1] tied tokens kept (>= 1 while M(v*) < p)
        seen = tl.zeros([1], tl.float32)  # tied tokens before this step
        for c in range(0, V, BLOCK):
            inb = c + offs < V
            x = tl.load(xr + c + offs, mask=inb, other=float("-inf"))
            k = _key(x)
            tie = (k == k32) & inb
            rank = tl.cumsum(tie.to(tl.float32), 0) - tie.to(tl.float32) + seen  # ties before it
            keep = (k > k32) | (tie & (rank < n_keep))
            tl.store(orow + c + offs, tl.where(keep, x, float("-inf")), mask=inb)
            seen += tl.sum(tie.to(tl.float32), 0)


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits float32 [n, vocab], top_p float32 [n] on the same device (0 < p < 1) -> the logits
    with every token outside each row's nucleus set to -inf (a new tensor)."""
    if triton is None:
        raise RuntimeError("top_p_filter needs triton; use sample.logits_processors.apply_top_p")
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"logits {tuple(logits.shape)} {logits.dtype} is not a float32 [n, vocab] with contiguous rows")
    if top_p.shape != (logits.shape[0],) or top_p.dtype != torch.float32 or top_p.device != logits.device:
        raise ValueError(f"top_p {tuple(top_p.shape)} {top_p.dtype} is not a float32 [{logits.shape[0]}] on {logits.device}")
    if logits.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"logits are on {logits.device}: Triton kernels need CUDA, or TRITON_INTERPRET=1 set before import")
    out = torch.empty_like(logits)
    if logits.shape[0]:
        _top_p_kernel[(logits.shape[0],)](logits, out, top_p, logits.shape[1], logits.stride(0), out.stride(0),
                                          BLOCK=_BLOCK, PASSES=_PASSES, num_warps=8)
    return out


__all__ = ["HAS_TRITON", "top_p_filter"]
