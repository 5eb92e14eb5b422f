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
/ sqrt(D) (S the +-1 Sylvester matrix of size D / 2), the halves become
(r1 + r2) S / sqrt(D) and (r1 - r2) S / sqrt(D): two small tl.dot per program.

One program handles BLOCK_H heads of one token; the grid depends only on the token count,
so the launch can be captured in a CUDA graph. Runs on CPU only under the interpreter.
"""

from __future__ import annotations

import functools
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
_BLOCK_H = 16  # heads per program
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
        qkv_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, k_inv, v_inv, had_ptr,
        stride_tok, stride_cos, stride_sin, stride_plane, stride_slot,
        NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
        HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
        ROUND: tl.constexpr,  # interpreter only: see _interpreter.py
        CACHE_FP8: tl.constexpr, ROUND_FP8: tl.constexpr, ROTATE: tl.constexpr,
        PDL: tl.constexpr,  # programmatic dependent launch (kernels/_pdl.py)
    ):
        if PDL:
            gdc_wait()
        tok = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H] over q | k | v heads
        half: tl.constexpr = HEAD_DIM // 2
        d = tl.arange(0, HALF_PAD)  # [HALF_PAD]
        dmask = d < half
        total: tl.constexpr = NUM_HEADS + 2 * NUM_KV
        hmask = head < total
        mask = hmask[:, None] & dmask[None, :]  # [BLOCK_H, HALF_PAD]
        src = qkv_ptr + tok * stride_tok + head[:, None] * HEAD_DIM + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0)  # [BLOCK_H, HALF_PAD]
        x2 = tl.load(src + half, mask=mask, other=0.0)
        if PDL:
            gdc_launch_dependents()
        c = tl.load(cos_ptr + tok * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)  # [HALF_PAD]
        s = tl.load(sin_ptr + tok * stride_sin + d, mask=dmask, other=0.0).to(tl.float32)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        r1 = f1 * c[None, :] - f2 * s[None, :]
        r2 = f2 * c[None, :] + f1 * s[None, :]
        if ROTATE:  # q, k <- (q, k) H (module docstring); had_ptr: S / sqrt(D) [HALF, HALF]
            hmask = dmask[:, None] & dmask[None, :]
            m = tl.load(had_ptr + d[:, None] * half + d[None, :], mask=hmask, other=0.0)  # [HALF_PAD, HALF_PAD]
            a = r1 + r2
            b = r1 - r2
            r1 = tl.dot(a, m, input_precision="ieee")  # [BLOCK_H, HALF_PAD]
            r2 = tl.dot(b, m, input_precision="ieee")
        if ROUND:
            r1 = round_bf16(r1)
            r2 = round_bf16(r2)
        r1 = r1.to(x1.dtype)
        r2 = r2.to(x1.dtype)
        is_q = head < NUM_HEADS
        is_v = head >= NUM_HEADS + NUM_KV
        o1 = tl.where(is_v[:, None], x1, r1)
        o2 = tl.where(is_v[:, None], x2, r2)
        # q and k heads: back into the projection output, rotated (k for dense prefill
        # attention, which reads it from there rather than from the cache).
        qkmask = mask & (~is_v)[:, None]
        tl.store(src, o1, mask=qkmask)
        tl.store(src + half, o2, mask=qkmask)
        # k and v heads: into the cache at this token's slot (plane 0 = k, 1 = v).
        slot = tl.load(slot_ptr + tok)
        kv_head = tl.where(is_v, head - NUM_HEADS - NUM_KV, head - NUM_HEADS)
        plane = is_v.to(tl.int64)
        dst = (cache_ptr + plane[:, None] * stride_plane + slot * stride_slot
               + kv_head[:, None] * HEAD_DIM + d[None, :])
        kvmask = mask & (~is_q)[:, None]
        c1, c2 = o1, o2
        if CACHE_FP8:  # divide by the scale, saturate like torch's cast, then round to e4m3
            inv = tl.where(is_v, v_inv, k_inv)[:, None]  # [BLOCK_H, 1] 1 / scale
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
) -> None:
    """Rotate q and k in place inside `qkv`; store rotated k and v at each token's cache slot
    (an FP8 cache: k / k_scale and v / v_scale, see `check_kv_scales`). `rotate`: also
    multiply q and k by the Hadamard matrix (module docstring), in `qkv` and in the cache."""
    if triton is None:
        raise RuntimeError("rope_and_cache needs triton; use rope_and_cache_ref instead")
    _check(qkv, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads, head_dim, rotate)
    check_kv_scales(kv_cache, k_scale, v_scale)
    tokens = qkv.shape[0]
    if tokens == 0:
        return
    half = head_dim // 2
    had = _half_hadamard(head_dim, qkv.device) if rotate else qkv  # qkv: an unused pointer
    heads = num_heads + 2 * num_kv_heads
    grid = (tokens, triton.cdiv(heads, _BLOCK_H))
    _rope_cache_kernel[grid](
        qkv, cos, sin, kv_cache, slot_mapping, inverse_scale(k_scale), inverse_scale(v_scale), had,
        qkv.stride(0), cos.stride(0), sin.stride(0), kv_cache.stride(0), kv_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim,
        HALF_PAD=max(16, _next_pow2(half)), BLOCK_H=_BLOCK_H,
        ROUND=emulate_bf16_rounding(qkv.dtype), CACHE_FP8=kv_cache.dtype == torch.float8_e4m3fn,
        ROUND_FP8=emulate_fp8_rounding(kv_cache.dtype), ROTATE=rotate,
        num_warps=4, **pdl_kwargs(qkv.device),
    )


@functools.cache
def _half_hadamard(head_dim: int, device: torch.device) -> torch.Tensor:
    """S / sqrt(D) [D / 2, D / 2] float32 (S: the +-1 Sylvester matrix of size D / 2), cached."""
    return (hadamard(head_dim // 2) * math.sqrt(0.5)).to(device).contiguous()


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
