"""Paged KV-cache accounting: blocks, reference counts and prefix caching (plain Python, CPU).

The KV cache itself is a tensor owned by the worker; this module only decides which block ids
hold which request's tokens. Token i of a request lives in block `block_ids[i // block_size]`,
slot `i % block_size`. `BlockPool` owns every `KVBlock` for the engine's lifetime;
`KVCacheManager` (owned by the scheduler) maps requests to their blocks.

Prefix caching: once a block is full and its tokens are computed, it is keyed by a hash chain,
`hash_block(parent_hash, block_tokens)`, so a block's key names its whole prefix. A block whose
reference count drops to zero joins the free queue but keeps its key, so a later request with
the same prefix can take it back, until allocation evicts it (least recently freed first).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from turbollm.core.request import Request

BlockHash = int
"""128-bit key of a full block and its whole prefix (see `hash_block`)."""

_ROOT_PARENT = hashlib.sha256(b"turbollm-prefix-root").digest()[:16]


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Key of a full block: sha256 over (parent key, token ids), truncated to 128 bits.

    Deterministic across processes and Python versions (no `hash()`, no pickle); with 128 bits
    a collision between distinct prefixes is negligible. `parent` is None for a first block.
    """
    head = _ROOT_PARENT if parent is None else parent.to_bytes(16, "little")
    body = struct.pack(f"<{len(token_ids)}q", *token_ids)
    return int.from_bytes(hashlib.sha256(head + body).digest()[:16], "little")


@dataclass(slots=True)
class KVBlock:
    """One block of `block_size` token slots in the worker's KV cache."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    """Set while this block is the prefix cache's entry for that key (even when free)."""


class BlockPool:
    """Every KV block, a free queue in eviction order, and the prefix-cache map.

    Invariants: a block is in the free queue iff its ref_cnt is 0; a block has a hash iff the
    cache map points that hash at it.
    """

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Front = evicted first. OrderedDict gives O(1) removal when a cached block is hit.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner (some may still hold a cached prefix until evicted)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by some request, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, n: int) -> list[KVBlock]:
        """Take n blocks from the front of the free queue (ref_cnt 1), evicting their hashes."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, only {len(self._free)} free")
        out = []
        for _ in range(n):
            block = self.blocks[self._free.popitem(last=False)[0]]
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Sequence[KVBlock]) -> None:
        """Take one more reference to each block (prefix hits), reviving free ones."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference to each block; those reaching 0 join the free queue in order.

        Hashless blocks go to the front (nothing to keep); cached ones to the back, so the
        least recently freed cached block is evicted first.
        """
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a full, computed block under its key; the first mapping for a key wins.

        Two requests computing the same prefix in one step both reach here; the second
        block stays hashless and is simply freed when its request ends.
        """
        if not self.enable_prefix_caching or block.block_hash is not None:
            return
        if block_hash not in self._cached:
            self._cached[block_hash] = block
            block.block_hash = block_hash


class KVCacheManager:
    """Maps requests to KV blocks for the scheduler: lookups, allocation, caching, freeing."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self._req_blocks: dict[str, list[KVBlock]] = {}
        self._req_hashes: dict[str, list[BlockHash]] = {}
        self._num_cached: dict[str, int] = {}
        """request_id -> how many of its leading blocks are registered in the prefix cache."""
        self.prefix_cache_queries = 0
        """Tokens of admitted requests looked up in the prefix cache."""
        self.prefix_cache_hits = 0
        """Of those, tokens found (their KV was reused)."""

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        queries = self.prefix_cache_queries
        return self.prefix_cache_hits / queries if queries else 0.0

    def block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block ids, in token order."""
        return [b.block_id for b in self._req_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of the request's tokens: (blocks, number of hit tokens).

        Walks full blocks from the start and stops at the first miss. At least one token is
        left to compute (the step must produce logits), so the hit is capped at
        `num_tokens - 1`, rounded down to whole blocks. Takes no references; pass the blocks
        to `allocate_slots`. Meant for a request that holds no blocks.

        A request asking for prompt logprobs gets no hits: the worker needs the logits of
        every prompt position, so none may be skipped.
        """
        wants_prompt_logprobs = request.sampling_params.prompt_logprobs is not None
        if not self.pool.enable_prefix_caching or wants_prompt_logprobs:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in self._hashes(request, max_blocks)[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVBlock] | None = None,
    ) -> list[int] | None:
        """Make room for tokens [0, num_computed + hits + num_new_tokens) of the request.

        `new_computed_blocks` are prefix hits from `get_computed_blocks`; pass them (even
        empty) exactly when admitting a request that holds no blocks: the prefix-cache
        counters are updated then. Returns the ids of the blocks added after the hits (often
        empty), or None, with nothing changed, when too few blocks are free.
        """
        held = self._req_blocks.get(request.request_id, [])
        if new_computed_blocks is None and held:  # a running request: most steps need no block
            num_tokens = request.num_computed_tokens + num_new_tokens
            if num_tokens <= len(held) * self.block_size:
                return []
        hits = list(new_computed_blocks or ())
        if hits and held:
            raise ValueError(f"request {request.request_id!r} already holds blocks")
        num_tokens = request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        num_needed = max(0, -(-num_tokens // self.block_size) - len(held) - len(hits))
        # A hit on a free block takes it out of the free queue, so it counts against supply.
        num_revived = sum(1 for b in hits if b.ref_cnt == 0)
        if num_needed + num_revived > self.pool.num_free_blocks:
            return None
        self.pool.touch(hits)
        new_blocks = self.pool.allocate(num_needed)
        self._req_blocks[request.request_id] = held + hits + new_blocks
        if new_computed_blocks is not None:
            self._num_cached[request.request_id] = len(hits)
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(hits) * self.block_size
        return [b.block_id for b in new_blocks]

    def cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the request's blocks made full by its first `num_tokens` tokens.

        Call with tokens that are known and whose KV is (or, by the end of the step being
        planned, will be) computed; a partial block is never cached.
        """
        if not self.pool.enable_prefix_caching:
            return
        rid = request.request_id
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self._num_cached.get(rid, 0)
        if num_full <= start:
            return
        blocks = self._req_blocks[rid]
        hashes = self._hashes(request, num_full)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_cached[rid] = num_full

    def trim(self, request: Request, num_tokens: int) -> None:
        """Free the request's blocks past those holding its first `num_tokens` tokens (the
        slots of rejected speculative tokens). Such blocks are never in the prefix cache:
        only blocks full of known tokens are registered."""
        blocks = self._req_blocks.get(request.request_id)
        if blocks is None:
            return
        keep = -(-num_tokens // self.block_size)
        if len(blocks) > keep:
            assert keep >= self._num_cached.get(request.request_id, 0), "trimming a cached block"
            self.pool.free(blocks[keep:][::-1])
            del blocks[keep:]

    def free(self, request: Request) -> None:
        """Release every block of the request, tail first (tail blocks get evicted first)."""
        rid = request.request_id
        self.pool.free(self._req_blocks.pop(rid, [])[::-1])
        self._req_hashes.pop(rid, None)
        self._num_cached.pop(rid, None)

    def _hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """Keys of the request's first `num_blocks` full blocks, extended incrementally."""
        hashes = self._req_hashes.setdefault(request.request_id, [])
        tokens, bs = request.all_token_ids, self.block_size
        for i in range(len(hashes), num_blocks):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tokens[i * bs : (i + 1) * bs]))
        return hashes
