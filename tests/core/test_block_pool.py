"""BlockPool and KVCacheManager: ref counts, free-queue order, prefix-cache hashing and hits."""

from __future__ import annotations

import os
from collections.abc import Callable
import subprocess
import sys

import pytest

from turbollm.core.block_pool import BlockPool, KVCacheManager, hash_block
from turbollm.core.request import Request

MakeRequest = Callable[..., Request]

BS = 4


def admit(kv: KVCacheManager, req: Request, num_new: int | None = None) -> list[int] | None:
    """What the scheduler does for a waiting request, then mark the chunk computed."""
    hits, num_hit = kv.get_computed_blocks(req)
    num_new = req.num_tokens - num_hit if num_new is None else num_new
    new_ids = kv.allocate_slots(req, num_new, hits)
    if new_ids is not None:
        req.num_computed_tokens = num_hit + num_new
        kv.cache_full_blocks(req, req.num_computed_tokens)
    return new_ids


def test_hash_chain_depends_on_parent_and_tokens() -> None:
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert a != hash_block(None, [1, 2, 3, 5])
    # Same block tokens after a different prefix: a different key.
    b1 = hash_block(hash_block(None, [9, 9, 9, 9]), [5, 6, 7, 8])
    b2 = hash_block(hash_block(None, [9, 9, 9, 8]), [5, 6, 7, 8])
    assert b1 != b2
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])


def test_hash_is_stable_across_processes() -> None:
    code = (
        "from turbollm.core.block_pool import hash_block; "
        "print(hash_block(hash_block(None, [1, 2]), [3, 4]))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outs == {str(hash_block(hash_block(None, [1, 2]), [3, 4]))}


def test_allocate_and_free_keep_ref_counts() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 1 and pool.usage == 0.75
    pool.touch(blocks[:1])
    pool.free(blocks)
    assert blocks[0].ref_cnt == 1 and pool.num_free_blocks == 3
    pool.free(blocks[:1])
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    with pytest.raises(RuntimeError):
        pool.allocate(5)


def test_allocate_slots_fails_without_side_effects(make_request: MakeRequest) -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", 8)
    assert admit(kv, a) == [0, 1]
    b = make_request("b", 9)  # needs 3 blocks, 1 free
    assert kv.allocate_slots(b, 9, []) is None
    assert kv.num_free_blocks == 1 and kv.block_ids("b") == []
    assert kv.prefix_cache_queries == 8  # the failed admission is not counted
    kv.free(a)
    assert kv.num_free_blocks == 3


def test_allocate_slots_grows_by_whole_blocks(make_request: MakeRequest) -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = make_request("r", 5)
    assert len(admit(kv, r) or []) == 2
    r.append_output_token(1)  # 6 tokens, 5 computed: still fits in 2 blocks
    assert kv.allocate_slots(r, 1) == []
    r.num_computed_tokens = 6
    for _ in range(3):
        r.append_output_token(1)
    assert kv.allocate_slots(r, 2) == []  # tokens up to index 7: still two blocks
    assert kv.allocate_slots(r, 3) == [2]  # token 8 needs a third block
    assert kv.block_ids("r") == [0, 1, 2]
    assert kv.allocate_slots(r, 3) == [] and kv.block_ids("r") == [0, 1, 2]  # already held: no-op


def test_prefix_hit_reuses_full_blocks_only(make_request: MakeRequest) -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    shared = list(range(100, 108))  # two full blocks
    a = make_request("a", shared + [1, 2])  # 10 tokens: 2 full blocks + a partial one
    admit(kv, a)
    cached = [b for b in kv.pool.blocks if b.block_hash is not None]
    assert len(cached) == 2, "the partial third block must not be cached"
    b = make_request("b", shared + [1, 2, 3, 4, 5])
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8 and [h.block_id for h in hits] == kv.block_ids("a")[:2]
    admit(kv, b)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert [kv.pool.blocks[i].ref_cnt for i in kv.block_ids("b")] == [2, 2, 1, 1]
    assert kv.prefix_cache_hits == 8 and kv.prefix_cache_queries == 10 + 13
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 16


def test_prompt_logprobs_requests_get_no_prefix_hits(make_request: MakeRequest) -> None:
    """The worker needs every prompt position's logits, so nothing may be skipped; the
    request's own full blocks are still cached for others."""
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(100, 110))
    admit(kv, make_request("a", prompt))
    asks = make_request("b", prompt, prompt_logprobs=1)
    assert kv.get_computed_blocks(asks) == ([], 0)
    admit(kv, asks)
    assert kv.get_computed_blocks(make_request("c", prompt))[1] == 8


def test_lookup_stops_at_first_miss(make_request: MakeRequest) -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    admit(kv, make_request("a", list(range(12)) + [99]))  # 3 full blocks cached
    # First block differs: the second and third blocks' tokens match but their chain does not.
    b = make_request("b", [7] + list(range(1, 12)) + [99])
    assert kv.get_computed_blocks(b)[1] == 0
    c = make_request("c", list(range(4)) + [7] + list(range(5, 12)) + [99])
    assert kv.get_computed_blocks(c)[1] == 4


def test_full_prompt_hit_leaves_one_token(make_request: MakeRequest) -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(8))
    a = make_request("a", prompt)
    admit(kv, a)
    kv.free(a)
    hits, num_hit = kv.get_computed_blocks(make_request("b", prompt))
    assert num_hit == 4 and len(hits) == 1  # 7 would be the cap; block aligned gives 4
    hits, num_hit = kv.get_computed_blocks(make_request("c", prompt + [5]))
    assert num_hit == 8


def test_free_is_tail_first_and_evicts_lru(make_request: MakeRequest) -> None:
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(12)) + [50])  # blocks 0,1,2 cached, 3 partial
    admit(kv, a)
    b = make_request("b", list(range(20, 28)))  # blocks 4,5 cached
    admit(kv, b)
    kv.free(a)  # queue: 3 (hashless, front), 2, 1, 0
    kv.free(b)  # then 5, 4
    assert list(kv.pool._free) == [3, 2, 1, 0, 5, 4]
    c = make_request("c", 8, max_tokens=1)
    assert admit(kv, c) == [3, 2]  # evicts a's tail block first
    # a's prefix: first two blocks still cached, the third was evicted.
    assert kv.get_computed_blocks(make_request("a2", list(range(12)) + [50]))[1] == 8
    # b was freed later, so it is still fully cached.
    assert kv.get_computed_blocks(make_request("b2", list(range(20, 28)) + [1]))[1] == 8
    kv.free(c)  # c's blocks were full, so they are cached too and go to the back
    assert list(kv.pool._free) == [1, 0, 5, 4, 2, 3]
    d = make_request("d", 16)
    assert admit(kv, d) == [1, 0, 5, 4]  # least recently freed first: a's, then b's
    assert kv.get_computed_blocks(make_request("a3", list(range(12)) + [50]))[1] == 0
    assert kv.get_computed_blocks(make_request("b3", list(range(20, 28)) + [1]))[1] == 0
    assert kv.get_computed_blocks(make_request("c", c.prompt_token_ids + [1]))[1] == 8


def test_hit_on_free_block_counts_against_free_supply(make_request: MakeRequest) -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(8)) + [1])
    admit(kv, a)
    kv.free(a)  # all 3 free; blocks 0 and 1 still cached
    b = make_request("b", list(range(8)) + list(range(50, 58)))  # 2 hits + 2 new = 4 > 3
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    assert kv.allocate_slots(b, 8, hits) is None
    assert kv.num_free_blocks == 3 and all(h.ref_cnt == 0 for h in hits)
    assert kv.allocate_slots(b, 4, hits) == [2]  # a smaller chunk fits; hits not evicted
    assert kv.block_ids("b") == [0, 1, 2]


def test_duplicate_hash_keeps_first_mapping(make_request: MakeRequest) -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(8)) + [1]
    a, b = make_request("a", prompt), make_request("b", prompt)
    # Both admitted before either caches (same step): no hits, separate blocks.
    for r in (a, b):
        hits, _ = kv.get_computed_blocks(r)
        assert hits == [] and kv.allocate_slots(r, 9, hits) is not None
    for r in (a, b):
        r.num_computed_tokens = 9
        kv.cache_full_blocks(r, 9)
    first = kv.pool.get_cached_block(hash_block(None, list(range(4))))
    assert first is not None and first.block_id == kv.block_ids("a")[0]
    assert [kv.pool.blocks[i].block_hash for i in kv.block_ids("b")] == [None, None, None]
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 8
    assert kv.get_computed_blocks(make_request("c", prompt))[1] == 8
    # Reallocating everything evicts the cache cleanly.
    kv.allocate_slots(make_request("d", 32), 32, [])
    assert kv.pool._cached == {}


def test_prefix_caching_disabled(make_request: MakeRequest) -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(9))
    a = make_request("a", prompt)
    admit(kv, a)
    assert all(b.block_hash is None for b in kv.pool.blocks)
    assert kv.get_computed_blocks(make_request("b", prompt)) == ([], 0)
    assert kv.prefix_cache_hit_rate == 0.0
