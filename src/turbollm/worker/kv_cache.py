"""Sizing and allocating the paged KV cache (tensors on the model's device).

One tensor per layer, [2, num_blocks, block_size, num_kv_heads, head_dim], owned by the
model runner for the engine's lifetime. The scheduler only ever sees block ids.
"""

from __future__ import annotations

import torch

from turbollm.config import CacheConfig
from turbollm.models.arch import ModelArch


def bytes_per_block(arch: ModelArch, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes one block takes over all layers (k and v) on one rank."""
    kv_heads = arch.num_key_value_heads // tp_size
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_hidden_layers * block_size * kv_heads * arch.head_dim * elem


def num_blocks_for_budget(budget_bytes: int, per_block: int, cache: CacheConfig) -> int:
    """How many blocks fit in a byte budget (or the configured override)."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    return max(0, budget_bytes // per_block)


def allocate_kv_caches(
    arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Zeroed caches, one per layer: [2, num_blocks, block_size, KV, D]."""
    shape = (2, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_hidden_layers)]
