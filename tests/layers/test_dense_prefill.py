"""Attention's dense prefill route (torch SDPA per whole prompt, layers/attention.py): when it
is taken, and that it computes what the paged path computes."""

from __future__ import annotations

import pytest
import torch

from turbollm.layers import attention as attn_mod
from turbollm.layers.attention import Attention, AttentionMetadata

BLOCK = 16


def _meta(
    query_lens: list[int], seq_lens: list[int], num_decodes: int, device: str
) -> tuple[AttentionMetadata, int]:
    """(metadata, blocks used): each request owns consecutive blocks; new tokens end each sequence."""
    blocks = [-(-s // BLOCK) for s in seq_lens]
    width = max(blocks)
    table, slots, first = [], [], 0
    for q, s, nb in zip(query_lens, seq_lens, blocks, strict=True):
        row = list(range(first, first + nb))
        table.append(row + [0] * (width - nb))
        slots += [row[p // BLOCK] * BLOCK + p % BLOCK for p in range(s - q, s)]
        first += nb
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    return AttentionMetadata(t(slots), t(table), t(seq_lens), t(starts), list(query_lens), list(seq_lens),
                             num_decodes), first


def test_dense_route_taken_only_for_long_whole_prompts() -> None:
    layer = Attention(8, 2, 16)
    q = torch.zeros(1, 8, 16)
    cache = torch.zeros(2, 4, BLOCK, 2, 16)
    n = attn_mod.DENSE_PREFILL_MIN_TOKENS
    pays = lambda ql, sl, nd=0, c=cache: layer._dense_prefill_pays(q, c, _meta(ql, sl, nd, "cpu")[0])  # noqa: E731
    assert pays([n, 5], [n, 5])
    assert pays([1, n], [40, n], nd=1)  # decodes first are not prompt chunks
    assert not pays([n - 1], [n - 1])  # short: the paged kernel batches them
    assert not pays([n, 5], [n, 9])  # a chunk after a cached prefix
    assert not pays([n], [n], c=cache.to(torch.float8_e4m3fn))  # the kernels read the FP8 values
    assert not Attention(8, 2, 16, sliding_window=n // 2)._dense_prefill_pays(q, cache, _meta([n], [n], 0, "cpu")[0])


def test_dense_prefill_matches_paged_path_cpu() -> None:
    """Same outputs as the torch paged path (the kernels' reference semantics), GQA 4:1."""
    g = torch.Generator().manual_seed(0)
    layer = Attention(8, 2, 16)
    qlens = [37, 5, 64]
    meta, nblocks = _meta(qlens, qlens, 0, "cpu")
    tokens = sum(qlens)
    q, k, v = (torch.randn(tokens, h * 16, generator=g) for h in (8, 2, 2))
    cache = torch.zeros(2, nblocks, BLOCK, 2, 16)
    want = layer.forward(q, k, v, cache, meta)  # [T, H * D]
    got = layer._dense_prefill(q.view(tokens, 8, 16), k.view(tokens, 2, 16), v.view(tokens, 2, 16), meta)
    torch.testing.assert_close(got.view(tokens, -1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_dense_route_matches_paged_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode plus a long whole prompt through forward_qkv: dense route vs paged kernel."""
    g = torch.Generator(device="cuda").manual_seed(0)
    heads, kv, d = 32, 8, 128
    layer = Attention(heads, kv, d)
    n = attn_mod.DENSE_PREFILL_MIN_TOKENS + 77
    meta, nblocks = _meta([1, n], [300, n], 1, "cuda")
    qkv = torch.randn(n + 1, (heads + 2 * kv) * d, device="cuda", dtype=torch.bfloat16, generator=g)
    pos = torch.cat([torch.tensor([299], device="cuda"), torch.arange(n, device="cuda")])
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    ang = pos.float()[:, None] * inv[None]
    rope = (ang.cos().to(torch.bfloat16)[:, None], ang.sin().to(torch.bfloat16)[:, None])  # [T, 1, D / 2]
    cache = torch.randn(2, nblocks, BLOCK, kv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    cache2 = cache.clone()
    assert layer._dense_prefill_pays(qkv.view(n + 1, -1, d)[:, :heads], cache, meta)
    dense = layer.forward_qkv(qkv.clone(), rope, cache, meta)
    monkeypatch.setattr(attn_mod, "DENSE_PREFILL_MIN_TOKENS", 10**9)
    paged = layer.forward_qkv(qkv.clone(), rope, cache2, meta)
    torch.testing.assert_close(dense.float(), paged.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(cache, cache2)
