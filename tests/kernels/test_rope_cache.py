"""rope_and_cache vs its torch reference and vs the layers' unfused torch path (CPU: Triton
interpreter, small shapes; GPU-marked: real shapes)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from turbollm.kernels import rope_cache as rc
from turbollm.kernels.rope_cache import _LaunchConfig, hadamard, rope_and_cache, rope_and_cache_ref
from turbollm.layers.attention import write_kv_cache
from turbollm.layers.rotary import RotaryEmbedding

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# fp32 rotation rounded once vs once: the same up to fp32 op order; half precision: 1 ulp.
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def make(tokens: int, heads: int, kv: int, dim: int, dtype: torch.dtype, block_size: int = 16,
         seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = -(-tokens // block_size) + 3
    qkv = torch.randn(tokens, (heads + 2 * kv) * dim, generator=g).to(dtype).to(DEVICE)
    rot = RotaryEmbedding(dim, 4096, 10000.0, None).to(DEVICE)
    positions = torch.randint(0, 4096, (tokens,), generator=g).to(DEVICE)
    cos, sin = (t[:, 0] for t in rot.cos_sin(positions, dtype))  # [T, D / 2] each
    cache = torch.randn(2, num_blocks, block_size, kv, dim, generator=g).to(dtype).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens].to(DEVICE)
    return qkv, cos.contiguous(), sin.contiguous(), cache, slots, rot, positions


def run_both(tokens: int, heads: int, kv: int, dim: int, dtype: torch.dtype):
    qkv, cos, sin, cache, slots, rot, positions = make(tokens, heads, kv, dim, dtype)
    q1, c1 = qkv.clone(), cache.clone()
    rope_and_cache(q1, cos, sin, c1, slots, heads, kv, dim)
    q2, c2 = qkv.clone(), cache.clone()
    rope_and_cache_ref(q2, cos, sin, c2, slots, heads, kv, dim)
    return (q1, c1), (q2, c2), (qkv, cache, slots, rot, positions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tokens,heads,kv,dim", [(1, 4, 4, 64), (5, 8, 2, 64), (3, 9, 3, 32), (7, 4, 1, 128)])
def test_matches_reference(tokens: int, heads: int, kv: int, dim: int, dtype: torch.dtype) -> None:
    (q1, c1), (q2, c2), (qkv, cache, slots, *_rest) = run_both(tokens, heads, kv, dim, dtype)
    tol = TOL[dtype]
    torch.testing.assert_close(q1.float(), q2.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(c1.float(), c2.float(), atol=tol, rtol=tol)
    # k is rotated in place and equals what the cache holds; v is read, never written;
    # untouched cache slots keep their values.
    qsize, kvsize = heads * dim, kv * dim
    assert torch.equal(q1[:, qsize + kvsize :], qkv[:, qsize + kvsize :])
    if cache.dtype == qkv.dtype:
        assert torch.equal(c1.view(2, -1, kv, dim)[0, slots], q1[:, qsize : qsize + kvsize].view(tokens, kv, dim))
    untouched = torch.ones(c1.shape[1] * c1.shape[2], dtype=torch.bool, device=c1.device)
    untouched[slots] = False
    flat1, flat0 = c1.view(2, -1, kv, dim), cache.view(2, -1, kv, dim)
    assert torch.equal(flat1[:, untouched], flat0[:, untouched])
    # v is copied exactly.
    assert torch.equal(flat1[1, slots], qkv[:, qsize + kv * dim :].view(tokens, kv, dim))


def test_matches_unfused_layers_fp32() -> None:
    """Same result as RotaryEmbedding + write_kv_cache (the CPU path) in fp32."""
    heads, kv, dim, tokens = 6, 2, 64, 5
    (q1, c1), _, (qkv, cache, slots, rot, positions) = run_both(tokens, heads, kv, dim, torch.float32)
    q, k, v = qkv.split([heads * dim, kv * dim, kv * dim], dim=-1)
    qr, kr = rot(q, k, rot.cos_sin(positions, torch.float32))
    ref_cache = cache.clone()
    write_kv_cache(ref_cache, kr, v, slots)
    torch.testing.assert_close(q1[:, : heads * dim], qr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c1, ref_cache, atol=1e-5, rtol=1e-5)


def test_bad_shapes() -> None:
    qkv, cos, sin, cache, slots, *_ = make(3, 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="qkv"):
        rope_and_cache(qkv[:, :-1], cos, sin, cache, slots, 4, 2, 32)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_and_cache(qkv, cos, sin, cache, slots[:2], 4, 2, 32)
    with pytest.raises(ValueError, match="kv_cache"):
        rope_and_cache(qkv, cos, sin, cache[:, :, :, :1], slots, 4, 2, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 64, 4097])
def test_gpu_real_shapes(tokens: int) -> None:
    (q1, c1), (q2, c2), _ = run_both(tokens, 32, 8, 128, torch.bfloat16)
    torch.testing.assert_close(q1.float(), q2.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(c1.float(), c2.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_cache_matches_reference(dtype: torch.dtype) -> None:
    """An FP8 cache stores rope(k) and v saturated at +-448 and rounded to e4m3."""
    qkv, cos, sin, cache, slots, *_ = make(5, 4, 2, 32, dtype)
    qkv[0, -5:] = 1000.0  # beyond FP8's range: saturates
    cache8 = cache.to(torch.float8_e4m3fn)
    q1, c1 = qkv.clone(), cache8.clone()
    rope_and_cache(q1, cos, sin, c1, slots, 4, 2, 32)
    q2, c2 = qkv.clone(), cache8.clone()
    rope_and_cache_ref(q2, cos, sin, c2, slots, 4, 2, 32)
    torch.testing.assert_close(q1.float(), q2.float(), atol=TOL[dtype], rtol=TOL[dtype])
    a, b = c1.float(), c2.float()
    assert torch.equal(a, b)  # both round to nearest even, from the same values
    assert a.abs().max().item() == 448.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k_scale,v_scale,size", [(0.03, 0.005, 0.01), (4.0, 0.7, 30.0)])
def test_fp8_cache_scales_match_reference(dtype: torch.dtype, k_scale: float, v_scale: float,
                                          size: float) -> None:
    """With per-layer scales the cache holds e4m3(rope(k) / k_scale) and e4m3(v / v_scale):
    kernel and reference agree bit for bit, and dequantizing gives v back within e4m3's
    relative precision (size 0.01: values that scale 1 would leave subnormal)."""
    tokens, heads, kv, dim = 6, 4, 2, 32
    qkv, cos, sin, cache, slots, *_ = make(tokens, heads, kv, dim, dtype, seed=3)
    qkv = (qkv.float() * size).to(dtype)
    cache8 = cache.to(torch.float8_e4m3fn)
    q1, c1 = qkv.clone(), cache8.clone()
    rope_and_cache(q1, cos, sin, c1, slots, heads, kv, dim, k_scale, v_scale)
    q2, c2 = qkv.clone(), cache8.clone()
    rope_and_cache_ref(q2, cos, sin, c2, slots, heads, kv, dim, k_scale, v_scale)
    assert torch.equal(c1.float(), c2.float())
    torch.testing.assert_close(q1.float(), q2.float(), atol=TOL[dtype], rtol=TOL[dtype])
    # Dequantized v = stored * v_scale is v within e4m3's relative error (2^-4) where v is normal.
    v = qkv[:, (heads + kv) * dim :].float().view(tokens, kv, dim)
    got = c1.view(2, -1, kv, dim)[1, slots].float() * v_scale
    normal = (v / v_scale).abs() >= 2**-6
    assert normal.float().mean() > 0.9
    rel = ((got - v).abs() / v.abs())[normal]
    assert rel.max().item() <= 2**-4 + 1e-6
    # The scales were applied: scale 1 stores different bytes.
    c3 = cache8.clone()
    rope_and_cache(qkv.clone(), cos, sin, c3, slots, heads, kv, dim)
    assert not torch.equal(c1.float(), c3.float())


def test_kv_scales_checked() -> None:
    qkv, cos, sin, cache, slots, *_ = make(3, 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="float8_e4m3fn cache only"):
        rope_and_cache(qkv, cos, sin, cache, slots, 4, 2, 32, 0.5, 1.0)
    with pytest.raises(ValueError, match="float8_e4m3fn cache only"):
        write_kv_cache(cache, qkv[:, :64], qkv[:, :64], slots, 1.0, 2.0)
    cache8 = cache.to(torch.float8_e4m3fn)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="k_scale must be a finite float > 0"):
            rope_and_cache(qkv, cos, sin, cache8, slots, 4, 2, 32, bad, 1.0)
        with pytest.raises(ValueError, match="v_scale must be a finite float > 0"):
            write_kv_cache(cache8, qkv[:, :64], qkv[:, :64], slots, 1.0, bad)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 4097])
def test_gpu_fp8_scales_real_shapes(tokens: int) -> None:
    qkv, cos, sin, cache, slots, *_ = make(tokens, 32, 8, 128, torch.bfloat16)
    cache8 = cache.to(torch.float8_e4m3fn)
    q1, c1 = qkv.clone(), cache8.clone()
    rope_and_cache(q1, cos, sin, c1, slots, 32, 8, 128, 0.02, 0.004)
    q2, c2 = qkv.clone(), cache8.clone()
    rope_and_cache_ref(q2, cos, sin, c2, slots, 32, 8, 128, 0.02, 0.004)
    torch.testing.assert_close(q1.float(), q2.float(), atol=1e-2, rtol=1e-2)
    # One e4m3 step apart at most (the GPU's fp32 rotation may differ from torch's in the last bit).
    a, b = c1.float(), c2.float()
    assert ((a - b).abs() <= b.abs() / 8 + 2**-9).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens,heads,kv,dim", [(5, 8, 2, 64), (3, 4, 4, 32), (2, 4, 1, 16)])
def test_rotate_matches_reference_and_keeps_scores(tokens: int, heads: int, kv: int, dim: int,
                                                   dtype: torch.dtype) -> None:
    """rotate=True stores (rope(k) H) and leaves (rope(q) H) in qkv: the kernel matches the
    reference; every score q . k equals the unrotated one; v is stored unrotated."""
    qkv, cos, sin, cache, slots, *_ = make(tokens, heads, kv, dim, dtype, seed=4)
    q1, c1 = qkv.clone(), cache.clone()
    rope_and_cache(q1, cos, sin, c1, slots, heads, kv, dim, rotate=True)
    q2, c2 = qkv.clone(), cache.clone()
    rope_and_cache_ref(q2, cos, sin, c2, slots, heads, kv, dim, rotate=True)
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(q1.float(), q2.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(c1.float(), c2.float(), atol=tol, rtol=tol)
    q0, c0 = qkv.clone(), cache.clone()
    rope_and_cache_ref(q0, cos, sin, c0, slots, heads, kv, dim)  # no rotation
    qsize, group = heads * dim, heads // kv

    def scores(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # [T, H, T]
        k = c.view(2, -1, kv, dim)[0, slots].float().repeat_interleave(group, dim=1)  # [T, H, D]
        return torch.einsum("thd,shd->ths", q[:, :qsize].float().view(tokens, heads, dim), k)

    s0, s1 = scores(q0, c0), scores(q1, c1)
    torch.testing.assert_close(s1, s0, atol=50 * tol, rtol=50 * tol)
    assert not torch.allclose(c1.view(2, -1, kv, dim)[0, slots].float(), c0.view(2, -1, kv, dim)[0, slots].float())
    assert torch.equal(c1.view(2, -1, kv, dim)[1, slots], c0.view(2, -1, kv, dim)[1, slots])


def test_rotate_fp8_cache_matches_reference() -> None:
    """The FP8 path with rotation and scales: kernel and reference agree to one e4m3 step (the
    fp32 Hadamard sums may round differently), nearly all values exactly."""
    qkv, cos, sin, cache, slots, *_ = make(6, 8, 2, 64, torch.float32, seed=5)
    cache8 = cache.to(torch.float8_e4m3fn)
    q1, c1 = qkv.clone(), cache8.clone()
    rope_and_cache(q1, cos, sin, c1, slots, 8, 2, 64, 0.02, 0.01, rotate=True)
    q2, c2 = qkv.clone(), cache8.clone()
    rope_and_cache_ref(q2, cos, sin, c2, slots, 8, 2, 64, 0.02, 0.01, rotate=True)
    torch.testing.assert_close(q1, q2, atol=1e-5, rtol=1e-5)
    a, b = c1.float(), c2.float()
    assert ((a - b).abs() <= b.abs() / 8 + 2**-9).all()
    assert (a == b).float().mean().item() > 0.99


def test_rotate_needs_power_of_two_head_dim() -> None:
    qkv, cos, sin, cache, slots, *_ = make(2, 2, 1, 48, torch.float32)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        rope_and_cache(qkv, cos, sin, cache, slots, 2, 1, 48, rotate=True)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        rope_and_cache_ref(qkv, cos, sin, cache, slots, 2, 1, 48, rotate=True)


def test_hadamard_is_orthonormal() -> None:
    for n in (1, 2, 16, 64, 128):
        h = hadamard(n)
        torch.testing.assert_close(h @ h.T, torch.eye(n), atol=1e-6, rtol=0)
        assert torch.equal(h.abs(), torch.full((n, n), n**-0.5))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 4097])
def test_gpu_fp8_rotate_real_shapes(tokens: int) -> None:
    qkv, cos, sin, cache, slots, *_ = make(tokens, 32, 8, 128, torch.bfloat16)
    cache8 = cache.to(torch.float8_e4m3fn)
    q1, c1 = qkv.clone(), cache8.clone()
    rope_and_cache(q1, cos, sin, c1, slots, 32, 8, 128, 0.02, 0.004, rotate=True)
    q2, c2 = qkv.clone(), cache8.clone()
    rope_and_cache_ref(q2, cos, sin, c2, slots, 32, 8, 128, 0.02, 0.004, rotate=True)
    torch.testing.assert_close(q1.float(), q2.float(), atol=2e-2, rtol=2e-2)
    a, b = c1.float(), c2.float()
    assert ((a - b).abs() <= b.abs() / 8 + 2**-9).all()


# The wide program shape (rows of many tokens), forced on small shapes: rows not a multiple of
# _BLOCK_R (and fewer than one block), odd head counts, GQA groups 1 to 5, head_dim 16 (padded).
WIDE_SHAPES = [(37, 5, 1, 64), (37, 6, 3, 32), (13, 4, 4, 128), (11, 3, 1, 16)]


def check_against_reference(tokens: int, heads: int, kv: int, dim: int, dtype: torch.dtype, fp8: bool,
                            rotate: bool, config: _LaunchConfig | None, seed: int = 6) -> None:
    """rope_and_cache (with `config`) against rope_and_cache_ref at the tolerances of the tests
    above; v stored exactly, untouched cache slots kept."""
    qkv, cos, sin, cache, slots, *_ = make(tokens, heads, kv, dim, dtype, seed=seed)
    scales = (0.02, 0.01) if fp8 else (1.0, 1.0)
    if fp8:
        cache = cache.to(torch.float8_e4m3fn)
    q1, c1 = qkv.clone(), cache.clone()
    rope_and_cache(q1, cos, sin, c1, slots, heads, kv, dim, *scales, rotate=rotate, _config=config)
    q2, c2 = qkv.clone(), cache.clone()
    rope_and_cache_ref(q2, cos, sin, c2, slots, heads, kv, dim, *scales, rotate=rotate)
    tol = 1e-5 if rotate and dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(q1.float(), q2.float(), atol=tol, rtol=tol)
    a, b = c1.float(), c2.float()
    if not fp8:
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    elif rotate or CUDA:
        # One e4m3 step where the fp32 sums round differently: the Hadamard's, or on the GPU the
        # rotary's (fused multiply-adds; test_gpu_fp8_scales_real_shapes).
        assert ((a - b).abs() <= b.abs() / 8 + 2**-9).all()
        assert (a == b).float().mean().item() > 0.99
    else:  # the interpreter computes the rotary as torch does: the same bytes
        assert torch.equal(a, b)
    flat1, flat0 = c1.view(2, -1, kv, dim), cache.view(2, -1, kv, dim)
    v = qkv[:, (heads + kv) * dim :].view(tokens, kv, dim)  # [T, KV, D]
    if not fp8:
        assert torch.equal(flat1[1, slots], v)
    assert torch.equal(q1[:, (heads + kv) * dim :], qkv[:, (heads + kv) * dim :])
    untouched = torch.ones(flat1.shape[1], dtype=torch.bool, device=c1.device)
    untouched[slots] = False
    assert torch.equal(flat1[:, untouched].float(), flat0[:, untouched].float())


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotate"])
@pytest.mark.parametrize("fp8", [False, True], ids=["same_cache", "fp8_cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tokens,heads,kv,dim", WIDE_SHAPES)
def test_wide_matches_reference(tokens: int, heads: int, kv: int, dim: int, dtype: torch.dtype, fp8: bool,
                                rotate: bool) -> None:
    check_against_reference(tokens, heads, kv, dim, dtype, fp8, rotate, _LaunchConfig(wide=True))


def test_wide_shape_from_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher picks the wide shape for rotating launches from _WIDE_FROM rows on (here
    lowered), never without rotation, and both shapes it picks match the reference."""
    assert not rc._use_wide(rc._WIDE_FROM - 1, True, _LaunchConfig())
    assert rc._use_wide(rc._WIDE_FROM, True, _LaunchConfig())
    assert not rc._use_wide(10**9, False, _LaunchConfig())
    assert rc._use_wide(1, False, _LaunchConfig(wide=True)) and not rc._use_wide(10**9, True, _LaunchConfig(wide=False))
    assert rc._rotate_precision(torch.device("cpu"), True) == "ieee"  # the interpreter's fp32 dots
    picked: list[bool] = []
    use_wide = rc._use_wide

    def spy(rows: int, rotate: bool, config: _LaunchConfig) -> bool:
        picked.append(use_wide(rows, rotate, config))
        return picked[-1]

    monkeypatch.setattr(rc, "_WIDE_FROM", 100)
    monkeypatch.setattr(rc, "_use_wide", spy)
    for tokens in (14, 15):  # 14 * 7 = 98 rows: narrow; 15 * 7 = 105: wide
        check_against_reference(tokens, 5, 1, 32, torch.bfloat16, True, True, None)
    check_against_reference(15, 5, 1, 32, torch.bfloat16, True, False, None)  # no rotation: narrow
    assert picked == [False, True, False]


@pytest.fixture
def interpreter_bf16_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton 3.6's interpreter multiplies bf16 dot operands as their uint16 storage; widen
    them to fp32 first (exact), so that the GPU's "bf16_split3" rotation runs on CPU too."""
    if not triton.knobs.runtime.interpret:
        return
    import numpy as np
    from triton.runtime import interpreter as interp

    create_dot = interp.InterpreterBuilder.create_dot

    def widen(h):  # type: ignore[no-untyped-def]
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", dot)


@pytest.mark.parametrize("wide", [False, True], ids=["narrow", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fp8", [False, True], ids=["same_cache", "fp8_cache"])
def test_rotate_bf16_split3_matches_reference(interpreter_bf16_dot: None, wide: bool, dtype: torch.dtype,
                                              fp8: bool) -> None:
    """The GPU's rotation (three bf16 dots of the exact split) at fp32 accuracy, in both shapes."""
    check_against_reference(37, 6, 2, 64, dtype, fp8, True, _LaunchConfig(wide=wide, precision="bf16_split3"))


def test_split3_bf16_is_exact() -> None:
    """hi + mid + lo == a exactly, with the GPU's round-to-nearest casts (torch's) and with the
    interpreter's truncating ones (the kernel helper), while hi + mid alone is not."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(64, 64, generator=g) * torch.exp2(torch.randint(-90, 90, (64, 64), generator=g).float())
    hi = a.bfloat16()
    rest = a - hi.float()
    mid = rest.bfloat16()
    lo = (rest - mid.float()).bfloat16()
    assert torch.equal(hi.double() + mid.double() + lo.double(), a.double())
    assert not torch.equal(hi.double() + mid.double(), a.double())
    out = torch.empty(3, 64, 64)
    _split3_kernel[(1,)](a, out, N=64)
    assert torch.equal(out.double().sum(0), a.double())
    assert torch.equal(out.bfloat16().float(), out)  # each term is a bf16 value
    assert not torch.equal(out[:2].double().sum(0), a.double())


@triton.jit
def _split3_kernel(a_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]  # [N, N]
    hi, mid, lo = rc._split3_bf16(tl.load(a_ptr + offs))
    tl.store(out_ptr + offs, hi.to(tl.float32))
    tl.store(out_ptr + N * N + offs, mid.to(tl.float32))
    tl.store(out_ptr + 2 * N * N + offs, lo.to(tl.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16_split3", "tf32x3", "ieee"])
@pytest.mark.parametrize("wide", [False, True], ids=["narrow", "wide"])
@pytest.mark.parametrize("tokens", [4096, 4099])
def test_gpu_wide_real_shapes(tokens: int, wide: bool, precision: str) -> None:
    """Llama-3-8B shapes at prompt-chunk sizes, each shape and rotation precision: the bf16
    cache, the FP8 cache with rotation and scales, and fp32 q with rotation (tolerance 1e-5:
    fp32 accuracy; a single tf32 pass would be off by ~1e-3)."""
    config = _LaunchConfig(wide=wide, precision=precision)
    check_against_reference(tokens, 32, 8, 128, torch.bfloat16, False, False, config)
    check_against_reference(tokens, 32, 8, 128, torch.bfloat16, True, True, config)
    check_against_reference(tokens, 32, 8, 128, torch.float32, False, True, config)
