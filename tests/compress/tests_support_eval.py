"""Helpers for the evaluation tests."""

from __future__ import annotations

import torch
from torch import nn

from turbollm.layers.attention import AttentionMetadata


def logits_of(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits [L, vocab] of one sequence, with a KV cache of one block per token (block 1)."""
    arch = model.arch  # type: ignore[union-attr]
    n = len(ids)
    caches = [torch.zeros(2, n, 1, arch.num_key_value_heads, arch.head_dim) for _ in range(arch.num_hidden_layers)]
    table = list(reversed(range(n)))  # scattered blocks, unlike evaluate.window_hidden
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(table), block_tables=torch.tensor([table]), seq_lens=torch.tensor([n]),
        query_start_loc=torch.tensor([0, n]), query_lens_cpu=[n], seq_lens_cpu=[n], num_decodes=0,
    )
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), caches, meta))  # type: ignore[operator]
