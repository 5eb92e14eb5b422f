"""Paged-attention kernels vs their torch references (CPU: Triton interpreter, small shapes;
GPU-marked tests: real shapes) and vs the engine's torch attention layer."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from turbollm.kernels import paged_attention as PA
from turbollm.kernels.paged_attention import (
    _DecodeConfig,
    choose_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from turbollm.kernels.prefill_attention import (
    PrefillConfig,
    _launch_prefill,
    choose_prefill_config,
    paged_prefill_attention,
    paged_prefill_attention_ref,
)
from turbollm.layers.attention import Attention, AttentionMetadata, write_kv_cache

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}

HEADS = [(4, 4), (8, 4), (8, 2), (8, 1)]  # GQA group sizes 1, 2, 4, 8


def make_cache(
    seq_lens: list[int], kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
    index_dtype: torch.dtype = torch.int32, spare_blocks: int = 3, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache with shuffled, non-contiguous block tables padded with random ids."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(max(need), 1) + 1
    num_blocks = sum(need) + spare_blocks
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=g)  # padding
    used = 0
    for r, n in enumerate(need):
        tables[r, :n] = perm[used : used + n]
        used += n
    return kv_cache.to(DEVICE), tables.to(index_dtype).to(DEVICE)


def check_decode(
    seq_lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype = torch.float32, window: int | None = None, num_splits: int | None = None,
    index_dtype: torch.dtype = torch.int32, max_seq_len: int | None = None, fp8_cache: bool = False,
    kv_scales: tuple[float, float] = (1.0, 1.0), q_first: float | None = None,
    config: _DecodeConfig | None = None,
) -> None:
    """q_first: every head's first q element set to this value (checked finite). config: the
    launch's private `_config` (a variant)."""
    kv_cache, tables = make_cache(seq_lens, kv_heads, head_dim, block_size, dtype, index_dtype)
    if fp8_cache:
        kv_cache = kv_cache.to(torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=g)  # [B, H, D]
    if q_first is not None:
        q[..., 0] = q_first
    q = q.to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=index_dtype, device=DEVICE)  # [B]
    scale = head_dim**-0.5
    args = (q, kv_cache, tables, lens, scale, max_seq_len or max(seq_lens), window, num_splits)
    ks, vs = kv_scales
    out = paged_decode_attention(*args, k_scale=ks, v_scale=vs, _config=config)
    ref = paged_decode_attention_ref(*args, k_scale=ks, v_scale=vs)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


# Lengths: 1, odd, exactly at 16/32-token block boundaries, one past them, several blocks.
EDGE_LENS = [1, 16, 17, 31, 32, 33, 64, 97]


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_gqa_blocks_window(heads: int, kv_heads: int, block_size: int, window: int | None) -> None:
    check_decode(EDGE_LENS, heads, kv_heads, 32, block_size, window=window)


@pytest.mark.parametrize("num_splits", [1, 2, 3, None])
@pytest.mark.parametrize("window", [None, 40])
def test_decode_splits(num_splits: int | None, window: int | None) -> None:
    # max_seq_len above every length: trailing splits are empty for all requests.
    check_decode([5, 70, 129, 200], 8, 2, 64, 16, window=window, num_splits=num_splits, max_seq_len=260)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_fp8_cache(dtype: torch.dtype) -> None:
    """An FP8 cache is widened to q's dtype inside the kernel; the reference reads it exactly."""
    check_decode([1, 17, 64, 97], 8, 2, 32, 16, dtype=dtype, num_splits=2, fp8_cache=True)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_fp8_cache_q_beyond_fp16(kind: str) -> None:
    """Decode multiplies a bf16 q over an FP8 cache in fp16 (paged_attention._f16_dot), clamped
    to fp16's range: a q element past 65504 must not turn into inf (NaN scores). It dominates
    the scores either way, so the output still matches the reference's. (Prefill keeps bf16
    dots; checked the same way so a change to fp16 there cannot drop the clamp.)"""
    if kind == "decode":
        check_decode([17, 64, 97], 8, 2, 32, 16, dtype=torch.bfloat16, num_splits=2, fp8_cache=True, q_first=2e5)
    else:
        check_prefill([5, 40], [5, 77], 8, 2, 32, 16, dtype=torch.bfloat16, fp8_cache=True, q_first=2e5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_fp8_cache(dtype: torch.dtype) -> None:
    check_prefill([5, 40], [5, 77], 8, 2, 32, 16, dtype=dtype, fp8_cache=True)


# Scales that matter: k_scale 0.4 sharpens / flattens the softmax visibly, v_scale 2.5 the output.
FP8_SCALES = [(0.4, 2.5), (1.7, 0.3)]


@pytest.mark.parametrize("kv_scales", FP8_SCALES)
@pytest.mark.parametrize("num_splits,window", [(1, None), (3, None), (2, 20)])
def test_decode_fp8_cache_scales(kv_scales: tuple[float, float], num_splits: int, window: int | None) -> None:
    """The kernel folds k_scale into the softmax scale and v_scale into the (split) outputs;
    the reference dequantizes the cache (cache * scale)."""
    check_decode([1, 17, 64, 97], 8, 2, 32, 16, num_splits=num_splits, window=window, fp8_cache=True,
                 kv_scales=kv_scales)


@pytest.mark.parametrize("kv_scales", FP8_SCALES)
@pytest.mark.parametrize("heads,kv_heads,window", [(8, 2, None), (4, 4, 12)])
def test_prefill_fp8_cache_scales(kv_scales: tuple[float, float], heads: int, kv_heads: int,
                                  window: int | None) -> None:
    check_prefill([5, 40, 1], [5, 77, 33], heads, kv_heads, 32, 16, window=window, fp8_cache=True,
                  kv_scales=kv_scales)


def test_fp8_scales_change_the_output() -> None:
    """Guards the scale tests: the scales are not ignored (nor applied twice) by the reference."""
    kv_cache, tables = make_cache([40], 2, 32, 16, torch.float32)
    kv_cache = kv_cache.to(torch.float8_e4m3fn)
    q = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    lens = torch.tensor([40], device=DEVICE)
    plain = paged_decode_attention(q, kv_cache, tables, lens, 0.2, 40)
    v_only = paged_decode_attention(q, kv_cache, tables, lens, 0.2, 40, v_scale=2.0)
    torch.testing.assert_close(v_only, 2.0 * plain, atol=1e-5, rtol=1e-5)
    k_only = paged_decode_attention(q, kv_cache, tables, lens, 0.2, 40, k_scale=2.0)
    torch.testing.assert_close(k_only, paged_decode_attention(q, kv_cache, tables, lens, 0.4, 40),
                               atol=1e-5, rtol=1e-5)
    assert (k_only - plain).abs().max().item() > 1e-2


def test_kv_scales_rejected() -> None:
    kv_cache, tables = make_cache([20], 2, 32, 16, torch.float32)
    q = torch.randn(1, 4, 32, device=DEVICE)
    lens = torch.tensor([20], device=DEVICE)
    starts = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="float8_e4m3fn cache only"):
        paged_decode_attention(q, kv_cache, tables, lens, 0.2, 20, k_scale=0.5)
    with pytest.raises(ValueError, match="float8_e4m3fn cache only"):
        paged_prefill_attention(q, kv_cache, tables, starts, lens, 0.2, 1, v_scale=0.5)
    fp8 = kv_cache.to(torch.float8_e4m3fn)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="k_scale must be a finite float > 0"):
            paged_decode_attention(q, fp8, tables, lens, 0.2, 20, k_scale=bad)
        with pytest.raises(ValueError, match="v_scale must be a finite float > 0"):
            paged_prefill_attention(q, fp8, tables, starts, lens, 0.2, 1, v_scale=bad)


def test_decode_auto_splits_long_context() -> None:
    assert choose_num_splits(2, 1, 700) == 3  # 2 programs, 3 partitions of >= 256 keys
    check_decode([700, 333], 4, 1, 32, 32, num_splits=None)


@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_decode_head_dims(head_dim: int) -> None:
    check_decode([3, 48, 50], 8, 2, head_dim, 16, num_splits=2)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_decode_index_dtypes(index_dtype: torch.dtype) -> None:
    check_decode([9, 40], 4, 2, 32, 16, index_dtype=index_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_half_precision(dtype: torch.dtype, num_splits: int) -> None:
    check_decode([1, 33, 100], 8, 2, 64, 16, dtype=dtype, num_splits=num_splits, window=None)


@pytest.mark.parametrize("cache,block_size,splits", [("fp32", 16, 1), ("fp32", 128, 2), ("fp8-words", 16, 2),
                                                     ("fp8-plain", 32, 1)])
def test_decode_paged_tiles_equal_per_key_loop(cache: str, block_size: int, splits: int) -> None:
    """Tiles addressed a block at a time (PAGED) give the per-key loop's output bit for bit:
    lengths below, at and past whole tiles of 64 (fp32) / 128 (FP8) keys, a zero length, a split
    that starts past its request's end, and a block of 128 tokens over 64-key tiles (where the
    kernel falls back to the per-key loop). Both match the reference."""
    lens = [0, 1, 63, 64, 65, 128, 129, 200, 257]
    fp8 = cache.startswith("fp8")
    kv_cache, tables = make_cache(lens, 2, 32, block_size, torch.float32)
    kv_cache = kv_cache.to(torch.float8_e4m3fn) if fp8 else kv_cache
    q = torch.randn(len(lens), 8, 32, generator=torch.Generator().manual_seed(1))
    q = q.to(torch.bfloat16 if fp8 else torch.float32).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    args = (q, kv_cache, tables, seq_lens, 32**-0.5, 320, None, splits)
    words = None if not fp8 else cache == "fp8-words"
    scales = dict(k_scale=0.7, v_scale=1.3) if fp8 else {}
    outs = [paged_decode_attention(*args, **scales, _config=_DecodeConfig(fp8_words=words, paged=p))
            for p in (True, False)]
    assert torch.equal(outs[0], outs[1])
    ref = paged_decode_attention_ref(*args, **scales)
    tol = TOL[q.dtype]
    torch.testing.assert_close(outs[0].float(), ref.float(), atol=tol, rtol=tol)


def test_decode_paged_tiles_chosen_for_fp8_gqa() -> None:
    """By default tiles are addressed a block at a time over an FP8 cache with GQA only (faster
    there on an H200; slower for MHA and for a bf16 cache); a config forces either loop."""
    fp8, bf16 = torch.float8_e4m3fn, torch.bfloat16
    assert PA._paged(fp8, 4) and not PA._paged(fp8, 1) and not PA._paged(bf16, 4)
    for paged in (True, False):
        const = PA._split_kernel(bf16, bf16, 1, 128, 16, 64, True, False, _DecodeConfig(paged=paged), False,
                                 False)[1]
        assert const["PAGED"] is paged


def test_decode_zero_length_request_gives_zeros() -> None:
    kv_cache, tables = make_cache([20, 0], 2, 32, 16, torch.float32)
    q = torch.randn(2, 4, 32, device=DEVICE)
    lens = torch.tensor([20, 0], device=DEVICE)
    for splits in (1, 2):
        out = paged_decode_attention(q, kv_cache, tables, lens, 0.2, 20, num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        ref = paged_decode_attention_ref(q, kv_cache, tables, lens, 0.2)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# The two decode loops over an FP8 cache (paged_attention._use_words picks by the grid): plain,
# and v read as 32-bit words. Under the interpreter _fp8_rows_f16 widens the words with Triton's
# e4m3 cast instead of cvt.rn.f16x2.e4m3x2; the GPU tests below cover the PTX.

FP8_VARIANTS = {
    "plain": _DecodeConfig(fp8_words=False),
    "words": _DecodeConfig(fp8_words=True),
    "words-64": _DecodeConfig(fp8_words=True, block_n=64),
}


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size,window", [(16, None), (32, 7)])
def test_decode_fp8_words(heads: int, kv_heads: int, block_size: int, window: int | None) -> None:
    """bf16 q over an FP8 cache with scales: GQA groups 1 / 4 / 8, lengths at and one past block
    boundaries, a sliding window."""
    check_decode(EDGE_LENS, heads, kv_heads, 32, block_size, dtype=torch.bfloat16, window=window,
                 fp8_cache=True, kv_scales=(0.4, 2.5), config=FP8_VARIANTS["words"])


@pytest.mark.parametrize("variant", ["words", "words-64"])
@pytest.mark.parametrize("num_splits,window", [(1, None), (3, None), (2, 40)])
def test_decode_fp8_words_splits(variant: str, num_splits: int, window: int | None) -> None:
    """Several tiles a split (up to 300 keys), a zero-length request, empty trailing splits
    (max_seq_len above every length)."""
    check_decode([0, 5, 70, 129, 300], 8, 2, 64, 16, dtype=torch.bfloat16, window=window, num_splits=num_splits,
                 max_seq_len=320, fp8_cache=True, kv_scales=(1.7, 0.3), config=FP8_VARIANTS[variant])


@pytest.mark.parametrize("head_dim", [128, 80])
def test_decode_fp8_words_head_dims(head_dim: int) -> None:
    """Llama's head_dim, and 80 (padded to 128: masked words)."""
    check_decode([3, 48, 150], 8, 2, head_dim, 16, dtype=torch.bfloat16, num_splits=2, fp8_cache=True,
                 config=FP8_VARIANTS["words"])


def test_decode_fp8_words_large_q() -> None:
    """As test_fp8_cache_q_beyond_fp16: the words loop keeps the fp16 clamp."""
    check_decode([17, 64, 97], 8, 2, 32, 16, dtype=torch.bfloat16, num_splits=2, fp8_cache=True, q_first=2e5,
                 config=FP8_VARIANTS["words"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_decode_fp8_words_other_q_dtypes(dtype: torch.dtype) -> None:
    """fp8_words with fp32 q (fp32 dots) and fp16 q: the words widen to fp16, then to q's dtype."""
    check_decode([1, 17, 64, 97], 8, 2, 32, 16, dtype=dtype, num_splits=2, fp8_cache=True,
                 config=FP8_VARIANTS["words"])


def test_decode_fp8_words_chosen_by_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default the words loop runs from _WORDS_MIN_PROGRAMS programs (request x kv head x
    split) on, over an FP8 cache whose rows are 4-byte aligned; a config forces either loop."""
    kv_cache, tables = make_cache([300, 9], 2, 32, 16, torch.float32)
    fp8 = kv_cache.to(torch.float8_e4m3fn)
    auto, n = _DecodeConfig(), PA._WORDS_MIN_PROGRAMS
    assert PA._use_words(auto, fp8, n) and not PA._use_words(auto, fp8, n - 1)
    assert not PA._use_words(auto, kv_cache, n) and not PA._use_words(auto, fp8[..., :30], n)
    assert PA._use_words(FP8_VARIANTS["words"], fp8, 1) and not PA._use_words(FP8_VARIANTS["plain"], fp8, n)
    # The launcher counts the grid's programs: 2 requests x 2 kv heads x 3 (then 2) splits of 128 keys.
    seen = []
    monkeypatch.setattr(PA, "_WORDS_MIN_PROGRAMS", 12)
    monkeypatch.setattr(PA, "_launch_split", lambda *a: seen.append(a[-1]))
    q = torch.randn(2, 4, 32, device=DEVICE)
    lens = torch.tensor([300, 9], device=DEVICE)
    for splits in (3, 2):
        paged_decode_attention(q, fp8, tables, lens, 0.2, 300, num_splits=splits)
    assert seen == [True, False]


def test_decode_fp8_words_rejected() -> None:
    kv_cache, tables = make_cache([20], 2, 32, 16, torch.float32)
    q = torch.randn(1, 4, 32, device=DEVICE)
    lens = torch.tensor([20], device=DEVICE)
    fp8 = kv_cache.to(torch.float8_e4m3fn)
    cases = [
        (q, kv_cache, _DecodeConfig(fp8_words=True), "float8_e4m3fn cache"),
        (q, fp8, _DecodeConfig(block_n=24), "power of two"),
        (q[..., :30], fp8[..., :30], _DecodeConfig(fp8_words=True), "32-bit words"),  # rows of 30 bytes
    ]
    for qq, cache, config, msg in cases:
        with pytest.raises(ValueError, match=msg):
            paged_decode_attention(qq, cache, tables, lens, 0.2, 20, _config=config)


def realistic_fp8_case(heads: int, kv_heads: int, lens: list[int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q with outlier channels (bf16), an e4m3 cache of k (outlier channels too) and v at per-layer
    scales amax / 448, shuffled block tables: (q, cache, tables, seq_lens, k_scale, v_scale)."""
    kv, tables = make_cache(lens, kv_heads, 128, 16, torch.float32, seed=seed)
    kv[0, ..., [3, 67]] *= 6.0
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(lens), heads, 128, generator=g) * 2.0  # [B, H, D]
    q[..., [3, 67]] *= 12.0
    k_scale, v_scale = (kv[i].abs().amax().item() / 448.0 for i in (0, 1))
    cache = torch.stack([kv[0] / k_scale, kv[1] / v_scale]).to(torch.float8_e4m3fn)
    lens_t = torch.tensor(lens, device=DEVICE, dtype=torch.int32)
    return q.to(torch.bfloat16).to(DEVICE), cache, tables, lens_t, torch.tensor(k_scale), torch.tensor(v_scale)


def check_fp8_variant_accuracy(variant: str, lens: list[int]) -> None:
    """A loop is not materially less accurate than the plain one: on realistic data its max / RMS
    error against the fp32 reference stay within 1.5x / 1.1x the plain loop's (both round the
    output to bf16). Prints both (pytest -s)."""
    q, cache, tables, seq_lens, ks, vs = realistic_fp8_case(32, 8, lens)
    args = (q, cache, tables, seq_lens, 128**-0.5, max(lens))
    ref = paged_decode_attention_ref(q.float(), *args[1:], k_scale=ks.item(), v_scale=vs.item())  # fp32
    errs = {}
    for name, config in (("plain", FP8_VARIANTS["plain"]), (variant, FP8_VARIANTS[variant])):
        out = paged_decode_attention(*args, k_scale=ks.item(), v_scale=vs.item(), _config=config)
        e = out.float() - ref
        errs[name] = (e.abs().max().item(), e.pow(2).mean().sqrt().item())
    print(f"\nfp8 decode error vs fp32 reference (max, rms): {errs}")
    assert errs[variant][0] <= 1.5 * errs["plain"][0] and errs[variant][1] <= 1.1 * errs["plain"][1]


def test_fp8_words_accuracy() -> None:
    check_fp8_variant_accuracy("words", [300, 129, 33])


def check_prefill(
    query_lens: list[int], seq_lens: list[int], heads: int, kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype = torch.float32, window: int | None = None,
    config: PrefillConfig | None = None, scale: float | None = None, fp8_cache: bool = False,
    kv_scales: tuple[float, float] = (1.0, 1.0), q_first: float | None = None,
) -> None:
    """q_first: as in check_decode."""
    kv_cache, tables = make_cache(seq_lens, kv_heads, head_dim, block_size, dtype)
    if fp8_cache:
        kv_cache = kv_cache.to(torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g)  # [T, H, D]
    if q_first is not None:
        q[..., 0] = q_first
    q = q.to(dtype).to(DEVICE)
    starts = torch.tensor([0, *query_lens], device=DEVICE).cumsum(0)  # [R + 1]
    lens = torch.tensor(seq_lens, device=DEVICE)  # [R]
    scale = head_dim**-0.5 if scale is None else scale
    args = (q, kv_cache, tables, starts, lens, scale, max(query_lens), window)
    ks, vs = kv_scales
    out = (paged_prefill_attention(*args, k_scale=ks, v_scale=vs) if config is None
           else _launch_prefill(*args, config, k_scale=ks, v_scale=vs))
    ref = paged_prefill_attention_ref(*args, k_scale=ks, v_scale=vs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


# A whole prompt, a chunk after a cached prefix, one token, a chunk over several query blocks.
PREFILL_QLENS = [17, 9, 1, 40]
PREFILL_SEQLENS = [17, 41, 32, 64]


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("window", [None, 12])
def test_prefill_gqa_window(heads: int, kv_heads: int, window: int | None) -> None:
    check_prefill(PREFILL_QLENS, PREFILL_SEQLENS, heads, kv_heads, 32, 16, window=window)


@pytest.mark.parametrize("block_size,head_dim", [(32, 64), (16, 128)])
def test_prefill_shapes(block_size: int, head_dim: int) -> None:
    check_prefill([33, 5], [33, 70], 4, 2, head_dim, block_size)


def test_prefill_bf16() -> None:
    check_prefill(PREFILL_QLENS, PREFILL_SEQLENS, 8, 2, 64, 16, dtype=torch.bfloat16, window=20)


# Explicit tilings: every stage of the key loop (window edge, unmasked, diagonal) with a cached
# prefix, chunks that are not multiples of the query block, GQA packs 1..8, both grid orders.
# Requests: fresh 37-token prompt; 3 tokens after 47 cached; 20 after 41; 50 after 50.
CONFIG_QLENS, CONFIG_SEQLENS = [37, 3, 20, 50], [37, 50, 61, 100]


@pytest.mark.parametrize(
    "config,block_size,window",
    [
        (PrefillConfig(32, 32, 4, 1, pack=1), 16, None),
        (PrefillConfig(32, 16, 4, 1, pack=2, m_fastest=True), 8, 40),
        (PrefillConfig(32, 32, 4, 1, pack=4, loop_stages=True), 16, 9),
        (PrefillConfig(64, 16, 4, 1, pack=8, m_fastest=True), 32, 40),
        (PrefillConfig(16, 32, 4, 1, pack=2, loop_stages=True), 8, 25),
    ],
)
def test_prefill_explicit_configs(config: PrefillConfig, block_size: int, window: int | None) -> None:
    check_prefill(CONFIG_QLENS, CONFIG_SEQLENS, 8, 1, 32, block_size, window=window, config=config)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_prefill_nonpositive_scale(scale: float) -> None:
    check_prefill([20, 6], [20, 30], 4, 2, 32, 16, window=11, scale=scale)


def test_choose_prefill_config() -> None:
    for group in (1, 2, 3, 4, 7, 8, 16):
        for max_qlen in (1, 5, 16, 17, 64, 65, 300, 8192):
            for dtype, head_dim in ((torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 256)):
                for on_gpu in (True, False):
                    c = choose_prefill_config(dtype, head_dim, group, max_qlen, on_gpu=on_gpu)
                    assert group % c.pack == 0 and c.block_m % c.pack == 0
                    for v in (c.block_m, c.block_n, c.pack):
                        assert v & (v - 1) == 0
    # Decode-like chunks pack the whole GQA group; longer ones at most 2 heads (compute-bound).
    assert choose_prefill_config(torch.bfloat16, 128, 8, 8).pack == 8
    assert choose_prefill_config(torch.bfloat16, 128, 7, 8).pack == 1
    assert choose_prefill_config(torch.bfloat16, 128, 8, 8192).pack == 2
    assert choose_prefill_config(torch.bfloat16, 128, 8, 512).pack == 1
    with pytest.raises(ValueError, match="group"):
        check_prefill([4], [4], 4, 2, 32, 16, config=PrefillConfig(16, 16, 4, 1, pack=4))


@pytest.mark.parametrize("window", [None, 10])
def test_matches_engine_attention_layer(window: int | None) -> None:
    """The kernels reproduce layers.attention's torch path (the engine's semantics): the layer
    writes this step's k/v into the cache and attends with gather_kv + SDPA; the kernels read
    that cache. The torch methods are called directly: on a GPU forward() runs the kernels."""
    heads, kv_heads, head_dim, block_size = 8, 2, 32, 16
    query_lens, seq_lens = [1, 1, 12, 30], [23, 40, 12, 45]  # 2 decodes, then 2 prefill chunks
    kv_cache, tables = make_cache(seq_lens, kv_heads, head_dim, block_size, torch.float32,
                                  index_dtype=torch.int64)
    slots = []
    for r, (ql, sl) in enumerate(zip(query_lens, seq_lens)):
        pos = torch.arange(sl - ql, sl)
        slots.append(tables[r].cpu()[pos // block_size] * block_size + pos % block_size)
    starts = torch.tensor([0, *query_lens], device=DEVICE).cumsum(0)  # [R + 1]
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(DEVICE), block_tables=tables,
        seq_lens=torch.tensor(seq_lens, device=DEVICE), query_start_loc=starts,
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens, num_decodes=2,
    )
    T = sum(query_lens)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(T, n * head_dim, generator=g).to(DEVICE) for n in (heads, kv_heads, kv_heads))
    layer = Attention(heads, kv_heads, head_dim, sliding_window=window)
    write_kv_cache(kv_cache, k, v, meta.slot_mapping)
    qh = q.view(T, heads, head_dim)  # [T, H, D]
    expected = [layer._decode(qh[:2], kv_cache, meta)]
    expected += [layer._prefill(qh[2:14], kv_cache, meta, 2), layer._prefill(qh[14:], kv_cache, meta, 3)]
    expected_t = torch.cat(expected)  # [T, H, D]

    dec = paged_decode_attention(qh[:2], kv_cache, tables[:2], meta.seq_lens[:2], layer.scale,
                                 max_seq_len=64, sliding_window=window, num_splits=2)
    pre = paged_prefill_attention(qh[2:], kv_cache, tables[2:], starts[2:] - 2, meta.seq_lens[2:],
                                  layer.scale, max_query_len=30, sliding_window=window)
    torch.testing.assert_close(dec, expected_t[:2], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(pre, expected_t[2:], atol=2e-5, rtol=2e-5)
    # And forward() end to end (torch path on CPU, the kernels on a GPU).
    layer_out = layer(q, k, v, kv_cache, meta).view(T, heads, head_dim)
    torch.testing.assert_close(layer_out, expected_t, atol=2e-5, rtol=2e-5)
    # The layer's kernel route (the interpreter on CPU): decodes and chunks write their rows of
    # one output.
    torch.testing.assert_close(layer._forward_triton(qh, kv_cache, meta), expected_t, atol=2e-5, rtol=2e-5)


def test_out_argument_writes_rows_of_a_larger_tensor() -> None:
    """`out=`: both kernels write exactly their rows of a given tensor and return it."""
    seq_lens = [9, 20]
    kv_cache, tables = make_cache(seq_lens, 2, 32, 16, torch.float32)
    q = torch.randn(3, 4, 32, device=DEVICE)  # 2 decodes, then a 1-token chunk
    lens = torch.tensor(seq_lens, device=DEVICE)
    big = torch.full((5, 4, 32), 7.0, device=DEVICE)
    got = paged_decode_attention(q[:2], kv_cache, tables, lens, 0.2, 20, out=big[1:3])
    assert got.data_ptr() == big[1:3].data_ptr()
    torch.testing.assert_close(big[1:3], paged_decode_attention(q[:2], kv_cache, tables, lens, 0.2, 20))
    starts = torch.tensor([0, 1], device=DEVICE)
    pre = paged_prefill_attention(q[2:], kv_cache, tables[1:], starts, lens[1:], 0.2, 1, out=big[3:4])
    torch.testing.assert_close(pre, paged_prefill_attention(q[2:], kv_cache, tables[1:], starts, lens[1:], 0.2, 1))
    assert (big[0] == 7.0).all() and (big[4] == 7.0).all()  # untouched rows
    for bad in (torch.empty(2, 4, 16, device=DEVICE), torch.empty(2, 4, 32, device=DEVICE, dtype=torch.float64),
                torch.empty(2, 32, 4, device=DEVICE).transpose(1, 2)):
        with pytest.raises(ValueError, match="out"):
            paged_decode_attention(q[:2], kv_cache, tables, lens, 0.2, 20, out=bad)


def test_launcher_rejects_bad_inputs() -> None:
    kv_cache, tables = make_cache([5, 9], 2, 32, 16, torch.float32)
    q = torch.randn(2, 4, 32, device=DEVICE)
    lens = torch.tensor([5, 9], device=DEVICE)
    bad = [
        ((q.half(), kv_cache, tables, lens), "dtype"),
        ((q.long(), kv_cache.long(), tables, lens), "dtype"),
        ((torch.randn(2, 3, 32, device=DEVICE), kv_cache, tables, lens), "multiple"),
        ((torch.randn(2, 4, 16, device=DEVICE), kv_cache, tables, lens), "head_dim"),
        ((q, kv_cache[0], tables, lens), "kv_cache shape"),
        ((q, kv_cache, tables[:1], lens), "block_tables shape"),
        ((q, kv_cache, tables.float(), lens), "block_tables dtype"),
        ((q, kv_cache, tables, lens[:1]), "seq_lens shape"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            paged_decode_attention(*args, scale=0.2, max_seq_len=9)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(q, kv_cache, tables, lens, 0.2, 9, num_splits=0)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention(q, kv_cache, tables, lens, 0.2, 9, sliding_window=0)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill_attention(q, kv_cache, tables, torch.tensor([0, 1], device=DEVICE), lens, 0.2, 1)


# ---------------------------------------------------------------------------------------------
# GPU: real shapes (the lead runs these on an H100).


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_gpu_decode_real_shapes(num_splits: int | None) -> None:
    lens = torch.randint(1, 2049, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    lens[0] = 2048
    check_decode(lens, 32, 8, 128, 16, dtype=torch.bfloat16, num_splits=num_splits, max_seq_len=2048)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 4096])
def test_gpu_decode_long_context_small_batch(window: int | None) -> None:
    check_decode([32768, 17000], 32, 8, 128, 16, dtype=torch.bfloat16, window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (32, 32)])
def test_gpu_decode_fp8_cache_real_shapes(heads: int, kv_heads: int) -> None:
    """bf16 q over an FP8 cache (the fp16 multiply of paged_attention._f16_dot) at Llama-3-8B /
    Llama-2-7B head counts, with per-layer scales; prefill (bf16 dots) over the same kind of cache."""
    lens = torch.randint(1, 1025, (48,), generator=torch.Generator().manual_seed(6)).tolist()
    check_decode(lens, heads, kv_heads, 128, 16, dtype=torch.bfloat16, max_seq_len=1024, fp8_cache=True,
                 kv_scales=(0.4, 2.5))
    check_prefill([512, 300, 1], [512, 900, 700], heads, kv_heads, 128, 16, dtype=torch.bfloat16, fp8_cache=True,
                  kv_scales=(0.4, 2.5))


@pytest.mark.gpu
def test_gpu_decode_fp32_and_fp16() -> None:
    check_decode([1, 513, 2048, 1000], 32, 8, 128, 32, dtype=torch.float32)
    check_decode([1, 513, 2048, 1000], 32, 4, 64, 16, dtype=torch.float16, num_splits=3)


@pytest.mark.gpu
def test_gpu_prefill_real_shapes() -> None:
    check_prefill([1024, 512, 1, 700], [1024, 2048, 300, 1500], 32, 8, 128, 16, dtype=torch.bfloat16)
    check_prefill([1024, 333], [1024, 3000], 32, 8, 128, 16, dtype=torch.bfloat16, window=512)
    check_prefill([8, 3, 16], [2000, 3, 700], 32, 8, 128, 16, dtype=torch.bfloat16, window=512)
    check_prefill([64, 40], [4000, 40], 32, 8, 64, 16, dtype=torch.float16)
    check_prefill([300, 7], [300, 900], 8, 2, 128, 16, dtype=torch.float32, window=100)
    # Long chunks (the long tiling, GQA pack 2) and head dim 256 on every tiling.
    check_prefill([2500, 100], [2500, 3000], 32, 8, 128, 16, dtype=torch.bfloat16)
    check_prefill([2100, 300, 9], [2100, 700, 500], 8, 4, 256, 16, dtype=torch.bfloat16, window=600)
    check_prefill([5, 200], [900, 200], 8, 4, 256, 16, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    [
        PrefillConfig(128, 128, 8, 3, m_fastest=True),
        PrefillConfig(128, 64, 8, 3, m_fastest=True, loop_stages=True),
        PrefillConfig(64, 64, 4, 3, pack=4),
        PrefillConfig(32, 128, 4, 2, pack=4, loop_stages=True),
        PrefillConfig(128, 128, 8, 3, pack=2, m_fastest=True),
    ],
)
def test_gpu_prefill_configs(config: PrefillConfig) -> None:
    check_prefill([777, 1, 300, 64], [777, 1000, 1300, 64], 32, 8, 128, 16, dtype=torch.bfloat16,
                  config=config)
    check_prefill([500, 20], [900, 20], 32, 8, 128, 16, dtype=torch.bfloat16, window=256, config=config)


@pytest.mark.gpu
def test_gpu_decode_cuda_graph_capture() -> None:
    """The launch is capturable: replay with new seq_lens/q written in place is still exact."""
    kv_cache, tables = make_cache([2048] * 8, 8, 128, 16, torch.bfloat16)
    q = torch.randn(8, 32, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((8,), 100, device="cuda", dtype=torch.int32)
    run = lambda: paged_decode_attention(q, kv_cache, tables, lens, 128**-0.5, 2048)  # noqa: E731
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()  # compile outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    lens.copy_(torch.tensor([1, 17, 2048, 500, 1999, 64, 65, 1024]))
    q.copy_(torch.randn_like(q))
    graph.replay()
    ref = paged_decode_attention_ref(q, kv_cache, tables, lens, 128**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_fp8_cache_real_shapes() -> None:
    """The FP8-cache paths of both kernels on real shapes (bf16 q, e4m3 cache)."""
    check_decode([1, 300, 2048, 777], 32, 8, 128, 16, dtype=torch.bfloat16, fp8_cache=True)
    check_prefill([512, 37], [1024, 600], 32, 8, 128, 16, dtype=torch.bfloat16, fp8_cache=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_scales", [(0.04, 0.01), (0.4, 2.5)])
def test_gpu_fp8_cache_scales_real_shapes(kv_scales: tuple[float, float]) -> None:
    """Per-layer FP8 scales on real shapes: every decode split count, the long prefill tiling."""
    for splits in (None, 1, 4):
        check_decode([1, 300, 2048, 777], 32, 8, 128, 16, dtype=torch.bfloat16, fp8_cache=True,
                     num_splits=splits, kv_scales=kv_scales)
    check_prefill([512, 37], [1024, 600], 32, 8, 128, 16, dtype=torch.bfloat16, fp8_cache=True,
                  kv_scales=kv_scales)
    check_prefill([2500, 8], [2500, 700], 32, 8, 128, 16, dtype=torch.bfloat16, fp8_cache=True,
                  kv_scales=kv_scales, window=512)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", FP8_VARIANTS)
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (32, 32)])
def test_gpu_decode_fp8_variants_real_shapes(variant: str, heads: int, kv_heads: int) -> None:
    """Both loops at Llama-3-8B / Llama-2-7B head counts, D 128, block 16: the PTX widening the
    interpreter cannot run; every split count, both scale ranges, and (GQA) a window over long
    contexts."""
    config = FP8_VARIANTS[variant]
    lens = torch.randint(1, 1025, (48,), generator=torch.Generator().manual_seed(6)).tolist()
    check_decode(lens, heads, kv_heads, 128, 16, dtype=torch.bfloat16, max_seq_len=1024, fp8_cache=True,
                 kv_scales=(0.4, 2.5), config=config)
    for splits in (None, 1, 4):
        check_decode([1, 300, 2048, 777], heads, kv_heads, 128, 16, dtype=torch.bfloat16, fp8_cache=True,
                     num_splits=splits, kv_scales=(0.04, 0.01), config=config)
    if kv_heads == 8:  # (the MHA cache of 49k tokens would take seconds to build on the host)
        check_decode([32768, 17000], heads, kv_heads, 128, 16, dtype=torch.bfloat16, window=4096, fp8_cache=True,
                     config=config)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["words", "words-64"])
def test_gpu_fp8_variants_accuracy(variant: str) -> None:
    check_fp8_variant_accuracy(variant, [4096, 2500, 700, 33])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache", ["bf16", "fp8-words", "fp8-plain"])
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (32, 32)])
def test_gpu_decode_paged_tiles_equal_per_key_loop(cache: str, heads: int, kv_heads: int) -> None:
    """As test_decode_paged_tiles_equal_per_key_loop at Llama-3-8B / Llama-2-7B head counts, D 128,
    block 16, lengths up to 1,024, one split and four."""
    lens = torch.randint(1, 1025, (40,), generator=torch.Generator().manual_seed(9)).tolist()
    fp8 = cache != "bf16"
    kv_cache, tables = make_cache(lens, kv_heads, 128, 16, torch.bfloat16)
    kv_cache = kv_cache.to(torch.float8_e4m3fn) if fp8 else kv_cache
    q = torch.randn(len(lens), heads, 128, device=DEVICE, dtype=torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scales = dict(k_scale=0.4, v_scale=2.5) if fp8 else {}
    words = None if not fp8 else cache == "fp8-words"
    for splits in (1, 4):
        args = (q, kv_cache, tables, seq_lens, 128**-0.5, 1024, None, splits)
        a, b = (paged_decode_attention(*args, **scales, _config=_DecodeConfig(fp8_words=words, paged=p))
                for p in (True, False))
        assert torch.equal(a, b), f"max abs difference {(a.float() - b.float()).abs().max().item():.3g}"
