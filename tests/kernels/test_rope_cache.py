"""rope_and_cache vs its torch reference and vs the layers' unfused torch path (CPU: Triton
interpreter, small shapes; GPU-marked: real shapes)."""

from __future__ import annotations

import pytest
import torch

from turbollm.kernels.rope_cache import rope_and_cache, rope_and_cache_ref
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
