"""Fused rotary embedding + KV-cache write: Triton kernel, launcher, torch reference.

A decode step of a 7B model spends about as long in the ~14 small torch kernels of rotary
(chunk, mul, sub, cat for q and for k) and the two `index_copy_` cache writes as in
attention itself. This kernel does all of it in one launch per layer, reading q, k and v once:

    q, k <- rope(q), rope(k)   in place, inside the qkv projection's output
    cache[0][slot] <- rope(k)  at each token's flat slot
    cache[1][slot] <- v

Semantics are those of `layers/rotary.py` (rotate-half layout) and
`layers/attention.write_kv_cache`, with one difference: the rotation
`x1 * cos - x2 * sin` is computed in fp32 and rounded once, where torch rounds after each
op in bf16/fp16 (so half-precision results differ from the torch code by about one ulp,
and are closer to the exact value). cos and sin come in the activations' dtype, as
transformers casts them.

FP8 caches may also rotate q and k (`rotate=True`): after rotary, q <- q H and k <- k H with
H the orthonormal Sylvester-Hadamard matrix of size head_dim (a power of two). Attention
needs no change, since (q H) . (k H) = q . k; the point is the rounding. e4m3 keeps 3
mantissa bits, so each stored k value carries a relative error (~2.6% RMS), and the error
of a score q . k is dominated by the few rotary channels where both q and k are large;
H spreads those channels over all D, so the score errors average out. On the embedded
SmolLM2 this halves the FP8 cache's perplexity cost (docs/performance.md, issue 5). v is
not rotated (measured: it made things worse). In the kernel, with H_D = [[S, S], [S, -S]]
/ sqrt(D) (S the +-1 Sylvester matrix of size D / 2, made in registers), the halves become
(r1 + r2) S / sqrt(D) and (r1 - r2) S / sqrt(D): two small dots per program.

Two program shapes; both grids depend only on the token count T, so either launch can be
captured in a CUDA graph:
  narrow: one program for _BLOCK_H heads of one token, grid (T, heads / _BLOCK_H); cos, sin
    and the slot are the token's, loaded once. The rotation's dots are fp32 FMAs ("ieee").
  wide (with the rotation, from _WIDE_FROM = T * (H + 2 KV) rows: prompt chunks, large decode
    batches): the (token, head) pairs flattened into rows of D values, row r = token
    r // (H + 2 KV), head r % (H + 2 KV); one program for _BLOCK_R = 64 consecutive rows,
    gathering cos, sin and the slot by row. 64 rows fill one wgmma tile of 4 warps, so the
    dots run on the tensor cores at fp32 accuracy ("bf16_split3"): S is exact in bf16, and
    each fp32 row splits exactly into three bf16 terms (`_split3_bf16`), so three bf16 dots
    with fp32 accumulation give the fp32 product up to the order and rounding of the fp32
    sums (a bf16 / fp16 result differs only at rounding ties; an fp32 one by an ulp or so).
Measured on an H100 (bench/scripts/gpu_rope_rotate.py, Llama-3-8B heads, docs/performance.md,
eleventh session), per layer: FP8 cache with rotation at 16,384 tokens 702 us narrow / fp32
FMAs, 339 us wide / bf16_split3 (Triton's "tf32x3", which splits S too although its low part
is zero, 1,061 us: it spills at 64 rows); at 1 and 64 tokens the narrow shape with fp32 FMAs
is fastest (3.2 / 4.6 us). Without rotation (no dots) the narrow shape streams at ~2.7 TB/s
and the wide one was 4-11% slower, so it is used with the rotation only.
Both wait for the kernel before (PDL) before their first load and release the next after
their q, k, v loads. Runs on CPU only under the interpreter.
"""

from __future__ import annotations

import dataclasses
import math
import struct

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]

from turbollm.kernels._interpreter import emulate_bf16_rounding, emulate_fp8_rounding
from turbollm.kernels._pdl import pdl_kwargs

if triton is not None:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    from turbollm.kernels._interpreter import round_bf16, round_e4m3

HAS_TRITON = triton is not None
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_H = 16  # narrow shape: heads of one token per program
_BLOCK_R = 64  # wide shape: flattened (token, head) rows per program (the wgmma M tile of 4 warps)
_WIDE_FROM = 4096  # rows (T * (H + 2 KV)) from which a rotating launch takes the wide shape
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value: an FP8 cache stores k / k_scale and v / v_scale clamped to it."""


def check_kv_scales(kv_cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """ValueError unless both scales are finite and > 0, and 1.0 for a cache that is not FP8.

    An FP8 cache holds e4m3(k / k_scale) and e4m3(v / v_scale) (per-layer dequantization
    scales, as in vLLM); other caches hold k and v as they are."""
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
            raise ValueError(f"{name} must be a finite float > 0, got {s!r}")
    if kv_cache.dtype != torch.float8_e4m3fn and (k_scale != 1.0 or v_scale != 1.0):
        raise ValueError(
            f"k_scale / v_scale ({k_scale}, {v_scale}) apply to a float8_e4m3fn cache only; "
            f"this cache is {kv_cache.dtype}"
        )


def hadamard(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix [n, n] float32 (n a power of two; symmetric)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(n)).to(device)


def rotate_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x [T, N * D] or [T, N, D] -> fp32 [T, N, D] with each head's vector times `hadamard(D)`."""
    x = x.reshape(x.shape[0], -1, head_dim).float()  # [T, N, D]
    return x @ hadamard(head_dim, x.device)


def inverse_scale(scale: float) -> float:
    """1 / scale rounded to fp32: the kernel and the torch writer multiply by the same number."""
    return struct.unpack("f", struct.pack("f", 1.0 / scale))[0]

if triton is not None:

    @triton.jit
    def _rope_cache_kernel(
        qkv_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, k_inv, v_inv, n_rows,
        stride_tok, stride_cos, stride_sin, stride_plane, stride_slot,
        NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
        HALF_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
        WIDE: tl.constexpr,  # program shape (module docstring): rows of many tokens, else one token
        ROUND: tl.constexpr,  # interpreter only: see _interpreter.py
        CACHE_FP8: tl.constexpr, ROUND_FP8: tl.constexpr, ROTATE: tl.constexpr,
        PRECISION: tl.constexpr,  # how the rotation's dots run (_dot_pm1, _rotate_precision)
        PDL: tl.constexpr,  # programmatic dependent launch (kernels/_pdl.py)
    ):
        if PDL:
            gdc_wait()
        half: tl.constexpr = HEAD_DIM // 2
        total: tl.constexpr = NUM_HEADS + 2 * NUM_KV
        d = tl.arange(0, HALF_PAD)  # [HALF_PAD]
        dmask = d < half
        if WIDE:  # BLOCK_R consecutive rows of the flattened [T * total] (token, head) pairs
            row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]; n_rows < 2^31
            tok = row // total  # [BLOCK_R]
            head = row % total
            rmask = row < n_rows
            tok_off = tok.to(tl.int64) * stride_tok  # [BLOCK_R]
        else:  # BLOCK_R heads of one token
            tok = tl.program_id(0)
            head = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] over q | k | v heads
            rmask = head < total
            tok_off = tok.to(tl.int64) * stride_tok
        mask = rmask[:, None] & dmask[None, :]  # [BLOCK_R, HALF_PAD]
        src = qkv_ptr + (tok_off + head * HEAD_DIM)[:, None] + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0)  # [BLOCK_R, HALF_PAD]
        x2 = tl.load(src + half, mask=mask, other=0.0)
        if PDL:
            gdc_launch_dependents()
        c, s, slot = _cos_sin_slot(cos_ptr, sin_ptr, slot_ptr, tok, stride_cos, stride_sin, d, dmask, rmask, WIDE)
        r1, r2 = _rope(x1, x2, c, s, HALF_PAD, HEAD_DIM, ROTATE, PRECISION)
        if ROUND:
            r1 = round_bf16(r1)
            r2 = round_bf16(r2)
        r1 = r1.to(x1.dtype)
        r2 = r2.to(x1.dtype)
        is_v = head >= NUM_HEADS + NUM_KV  # [BLOCK_R]
        o1 = tl.where(is_v[:, None], x1, r1)
        o2 = tl.where(is_v[:, None], x2, r2)
        # q and k heads: back into the projection output, rotated (k for dense prefill
        # attention, which reads it from there rather than from the cache).
        qkmask = mask & (~is_v)[:, None]
        tl.store(src, o1, mask=qkmask)
        tl.store(src + half, o2, mask=qkmask)
        _store_kv(cache_ptr, o1, o2, slot, head, is_v, mask, d, k_inv, v_inv, stride_plane, stride_slot,
                  NUM_HEADS, NUM_KV, HEAD_DIM, CACHE_FP8, ROUND_FP8)

    @triton.jit
    def _cos_sin_slot(cos_ptr, sin_ptr, slot_ptr, tok, stride_cos, stride_sin, d, dmask, rmask,
                      WIDE: tl.constexpr):
        """fp32 cos, sin ([BLOCK_R, HALF_PAD] gathered by row if WIDE, else [1, HALF_PAD] of the
        program's token) and the int64 cache slot ([BLOCK_R] or the token's scalar)."""
        if WIDE:
            t64 = tok.to(tl.int64)[:, None]  # [BLOCK_R, 1]
            m = rmask[:, None] & dmask[None, :]
            c = tl.load(cos_ptr + t64 * stride_cos + d[None, :], mask=m, other=0.0)  # [BLOCK_R, HALF_PAD]
            s = tl.load(sin_ptr + t64 * stride_sin + d[None, :], mask=m, other=0.0)
            slot = tl.load(slot_ptr + tok, mask=rmask, other=0)  # [BLOCK_R]
        else:
            t64 = tok.to(tl.int64)
            c = tl.load(cos_ptr + t64 * stride_cos + d, mask=dmask, other=0.0)[None, :]  # [1, HALF_PAD]
            s = tl.load(sin_ptr + t64 * stride_sin + d, mask=dmask, other=0.0)[None, :]
            slot = tl.load(slot_ptr + t64)
        return c.to(tl.float32), s.to(tl.float32), slot.to(tl.int64)

    @triton.jit
    def _rope(x1, x2, c, s, HALF_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, ROTATE: tl.constexpr,
              PRECISION: tl.constexpr):
        """Rotary on the halves x1, x2 [BLOCK_R, HALF_PAD] in fp32 and, with ROTATE, times the
        Hadamard matrix: (r1 + r2) S / sqrt(D) and (r1 - r2) S / sqrt(D) (module docstring)."""
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        r1 = f1 * c - f2 * s
        r2 = f2 * c + f1 * s
        if ROTATE:
            # The padding rows of S meet zero columns of r1, r2 (the x loads give 0 there), and
            # padding columns are masked at the store.
            m = _sylvester(HALF_PAD)  # [HALF_PAD, HALF_PAD] +-1
            scale: tl.constexpr = 1.0 / (HEAD_DIM**0.5)
            a = r1 + r2
            b = r1 - r2
            r1 = _dot_pm1(a, m, PRECISION) * scale  # [BLOCK_R, HALF_PAD]
            r2 = _dot_pm1(b, m, PRECISION) * scale
        return r1, r2

    @triton.jit
    def _sylvester(N: tl.constexpr):
        """The +-1 Sylvester matrix [N, N] fp32 (N a power of two < 2^16), made in registers
        rather than loaded: S[i, j] = (-1)^popcount(i & j)."""
        p = tl.arange(0, N)[:, None] & tl.arange(0, N)[None, :]  # [N, N]
        p = p ^ (p >> 8)
        p = p ^ (p >> 4)
        p = p ^ (p >> 2)
        p = p ^ (p >> 1)
        return 1.0 - 2.0 * (p & 1).to(tl.float32)

    @triton.jit
    def _dot_pm1(a, m, PRECISION: tl.constexpr):
        """a [BLOCK_R, K] fp32 times m [K, N], a +-1 matrix, in fp32 [BLOCK_R, N]. "bf16_split3":
        a = hi + mid + lo exactly (`_split3_bf16`), three bf16 tensor-core dots against m, which
        bf16 holds exactly: products exact, fp32 accumulation. Other values: tl.dot's
        input_precision ("ieee": fp32 FMAs; "tf32x3": triton's split of a and m)."""
        if PRECISION == "bf16_split3":
            hi, mid, lo = _split3_bf16(a)
            mb = m.to(tl.bfloat16)
            acc = tl.dot(lo, mb)
            acc = tl.dot(mid, mb, acc)
            acc = tl.dot(hi, mb, acc)
        else:
            acc = tl.dot(a, m, input_precision=PRECISION)
        return acc

    @triton.jit
    def _split3_bf16(a):
        """fp32 a -> bf16 (hi, mid, lo) with hi + mid + lo == a exactly (a finite, 0 or of
        magnitude >= 2^-100): each remainder is exact in fp32 and has at most 16, then 8,
        significant bits, with round-to-nearest or (the interpreter's) truncating casts alike."""
        hi = a.to(tl.bfloat16)
        rest = a - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        return hi, mid, lo

    @triton.jit
    def _store_kv(cache_ptr, o1, o2, slot, head, is_v, mask, d, k_inv, v_inv, stride_plane, stride_slot,
                  NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                  CACHE_FP8: tl.constexpr, ROUND_FP8: tl.constexpr):
        """k and v rows (o1, o2: [BLOCK_R, HALF_PAD] halves in q's dtype) into the cache at their
        token's slot (plane 0 = k, 1 = v); an FP8 cache gets them scaled, saturated, rounded."""
        half: tl.constexpr = HEAD_DIM // 2
        kv_head = tl.where(is_v, head - NUM_HEADS - NUM_KV, head - NUM_HEADS)  # [BLOCK_R]
        row_off = is_v.to(tl.int64) * stride_plane + slot * stride_slot + kv_head * HEAD_DIM  # [BLOCK_R]
        dst = cache_ptr + row_off[:, None] + d[None, :]
        kvmask = mask & (head >= NUM_HEADS)[:, None]
        c1, c2 = o1, o2
        if CACHE_FP8:  # divide by the scale, saturate like torch's cast, then round to e4m3
            inv = tl.where(is_v, v_inv, k_inv)[:, None]  # [BLOCK_R, 1] 1 / scale
            c1 = tl.minimum(tl.maximum(o1.to(tl.float32) * inv, -448.0), 448.0)  # FP8_MAX
            c2 = tl.minimum(tl.maximum(o2.to(tl.float32) * inv, -448.0), 448.0)
            if ROUND_FP8:
                c1 = round_e4m3(c1)
                c2 = round_e4m3(c2)
        tl.store(dst, c1.to(cache_ptr.dtype.element_ty), mask=kvmask)
        tl.store(dst + half, c2.to(cache_ptr.dtype.element_ty), mask=kvmask)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _check(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, rotate: bool = False,
) -> None:
    if qkv.dtype not in _DTYPES:
        raise ValueError(f"qkv dtype {qkv.dtype} is not one of {_DTYPES}")
    tokens = qkv.shape[0]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not [T, {width}] with unit column stride")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if rotate and head_dim & (head_dim - 1):
        raise ValueError(f"rotate (Hadamard) needs a power-of-two head_dim, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape != (tokens, head_dim // 2) or t.stride(1) != 1:
            raise ValueError(f"{name} {tuple(t.shape)} is not [{tokens}, {head_dim // 2}] row-major")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"kv_cache {tuple(kv_cache.shape)} is not [2, blocks, block_size, {num_kv_heads}, {head_dim}]"
        )
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    if kv_cache.dtype not in (qkv.dtype, torch.float8_e4m3fn):
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} is neither qkv's ({qkv.dtype}) nor float8_e4m3fn")
    if slot_mapping.shape != (tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} {slot_mapping.dtype} is not [{tokens}] int")
    for name, t in (("cos", cos), ("sin", sin), ("kv_cache", kv_cache), ("slot_mapping", slot_mapping)):
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device}, qkv is on {qkv.device}")


@dataclasses.dataclass(frozen=True)
class _LaunchConfig:
    """Private overrides for tests and A/B benchmarks (None: the launcher's own choice)."""

    wide: bool | None = None  # program shape; None: wide from _WIDE_FROM rows
    precision: str | None = None  # how the rotation's dots run (_dot_pm1); None: _rotate_precision


def _rotate_precision(device: torch.device, wide: bool) -> str:
    """How the Hadamard dots run (`_dot_pm1`): "bf16_split3" in the wide shape on the GPU
    (tensor cores, fp32 accuracy: module docstring); "ieee" (fp32 FMAs) in the narrow shape,
    and under the interpreter, which computes fp32 dots in fp32 and cannot run bf16 ones (it
    multiplies their uint16 storage)."""
    interpret = triton is not None and bool(triton.knobs.runtime.interpret)
    return "bf16_split3" if wide and device.type == "cuda" and not interpret else "ieee"


def _use_wide(rows: int, rotate: bool, config: _LaunchConfig) -> bool:
    """The wide program shape for a rotating launch of `rows` = T * (H + 2 KV) flattened rows,
    unless overridden (module docstring: without rotation the narrow shape is faster)."""
    return rotate and rows >= _WIDE_FROM if config.wide is None else config.wide


def _num_warps(wide: bool, rotate: bool) -> int:
    """4, except 8 for the wide shape without rotation (sm_90, cpu_rope_sass.py): the rotation's
    64-row dots are one wgmma tile of 4 warps, and without them 8 warps hold a 64-row program
    in 80 registers a thread rather than 205."""
    return 8 if wide and not rotate else 4


def rope_and_cache(
    qkv: torch.Tensor,  # [T, (H + 2 KV) * D]: q | k | v, each head's D values contiguous
    cos: torch.Tensor,  # [T, D / 2]
    sin: torch.Tensor,  # [T, D / 2]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KV, D]
    slot_mapping: torch.Tensor,  # [T] flat slot of each token
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    rotate: bool = False,
    *,
    _config: _LaunchConfig | None = None,
) -> None:
    """Rotate q and k in place inside `qkv`; store rotated k and v at each token's cache slot
    (an FP8 cache: k / k_scale and v / v_scale, see `check_kv_scales`). `rotate`: also
    multiply q and k by the Hadamard matrix (module docstring), in `qkv` and in the cache.
    `_config`: private launch overrides (tests, benchmarks)."""
    if triton is None:
        raise RuntimeError("rope_and_cache needs triton; use rope_and_cache_ref instead")
    _check(qkv, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads, head_dim, rotate)
    check_kv_scales(kv_cache, k_scale, v_scale)
    tokens = qkv.shape[0]
    if tokens == 0:
        return
    config = _config or _LaunchConfig()
    heads = num_heads + 2 * num_kv_heads
    rows = tokens * heads
    # Both grids depend on the token count only, so either launch can be captured in a graph.
    if wide := _use_wide(rows, rotate, config):
        grid, block = (triton.cdiv(rows, _BLOCK_R),), _BLOCK_R
    else:
        grid, block = (tokens, triton.cdiv(heads, _BLOCK_H)), _BLOCK_H
    _rope_cache_kernel[grid](
        qkv, cos, sin, kv_cache, slot_mapping, inverse_scale(k_scale), inverse_scale(v_scale), rows,
        qkv.stride(0), cos.stride(0), sin.stride(0), kv_cache.stride(0), kv_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim,
        HALF_PAD=max(16, _next_pow2(head_dim // 2)), BLOCK_R=block, WIDE=wide,
        ROUND=emulate_bf16_rounding(qkv.dtype), CACHE_FP8=kv_cache.dtype == torch.float8_e4m3fn,
        ROUND_FP8=emulate_fp8_rounding(kv_cache.dtype), ROTATE=rotate,
        PRECISION=config.precision or _rotate_precision(qkv.device, wide),
        num_warps=_num_warps(wide, rotate), **pdl_kwargs(qkv.device),
    )


def rope_and_cache_ref(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    k_scale: float = 1.0, v_scale: float = 1.0, rotate: bool = False,
) -> None:
    """The kernel's semantics in torch (fp32 rotation, one rounding), same in-place effects.

    An FP8 cache gets k / k_scale and v / v_scale clamped to +-448 and rounded once more
    (from q's dtype)."""
    _check(qkv, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads, head_dim, rotate)
    tokens = qkv.shape[0]
    x = qkv.view(tokens, num_heads + 2 * num_kv_heads, head_dim)  # [T, H + 2 KV, D]
    rot = x[:, : num_heads + num_kv_heads].float()  # [T, H + KV, D]
    x1, x2 = rot.chunk(2, dim=-1)  # [T, H + KV, D / 2] each
    c, s = cos.float()[:, None, :], sin.float()[:, None, :]  # [T, 1, D / 2]
    rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)  # [T, H + KV, D] fp32
    if rotate:
        rotated = rotate_heads(rotated, head_dim)
    rotated = rotated.to(qkv.dtype)
    x[:, : num_heads + num_kv_heads] = rotated
    store_kv(kv_cache, rotated[:, num_heads:], x[:, num_heads + num_kv_heads :], slot_mapping.long(),
             k_scale, v_scale)


def store_kv(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Store k, v ([T, KV * D] or [T, KV, D]) at their flat slots in the cache, in place, in
    torch. An FP8 cache gets k * (1 / k_scale) and v * (1 / v_scale) in fp32 (`inverse_scale`),
    saturated at +-FP8_MAX and rounded once; index_copy_ has no FP8 kernels, so the bytes
    are copied."""
    check_kv_scales(kv_cache, k_scale, v_scale)
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)  # [2, slots, KV, D]
    k, v = k.reshape(-1, kv_heads, head_dim), v.reshape(-1, kv_heads, head_dim)  # [T, KV, D] each
    if kv_cache.dtype == torch.float8_e4m3fn:
        k, v = ((t.float() * inverse_scale(s)).clamp(-FP8_MAX, FP8_MAX).to(kv_cache.dtype).view(torch.uint8)
                for t, s in ((k, k_scale), (v, v_scale)))
        flat = flat.view(torch.uint8)
    elif k.dtype != kv_cache.dtype:
        k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)
