"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous slice of the vocabulary rows (on the model's device). Lookups
outside the slice give zeros and are summed over ranks; the head gathers logit slices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turbollm.distributed.parallel import SINGLE, ParallelContext
from turbollm.layers.cpu_gemm import packed_linear, prepack
from turbollm.layers.linear import ColumnParallelLinear, LinearMethod, _param, dense_linear


class VocabParallelEmbedding(nn.Module):
    """Token id -> hidden vector, vocabulary split over ranks."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // ctx.tp_size)
        self.start = ctx.tp_rank * self.per_rank
        self.end = min(self.start + self.per_rank, vocab_size)
        self.weight = _param((self.per_rank, hidden_size), self.weight_loader)  # [vocab / tp, hidden]

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(f"embedding has {loaded.shape[0]} rows, expected {self.vocab_size}")
        rows = loaded[self.start : self.end]
        param.data[: rows.shape[0]].copy_(rows)
        param.data[rows.shape[0] :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(input_ids, self.weight)  # [num_tokens, hidden]
        outside = (input_ids < self.start) | (input_ids >= self.end)
        local = (input_ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return self.ctx.all_reduce(out)  # [num_tokens, hidden]


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the full vocabulary; may share the embedding's weight.

    `quantize` makes it run through a LinearMethod instead (quantize_lm_head): the head then
    owns a quantized copy of this rank's rows, and its dense weight is kept only when the
    embedding shares it."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext) -> None:
        super().__init__(vocab_size, hidden_size, ctx)
        self.packed: torch.Tensor | None = None
        """oneDNN-packed copy of the weight on CPU (the dense one stays for tied embeddings)."""
        self.quantized: ColumnParallelLinear | None = None
        """This rank's rows as a quantized linear, after `quantize`."""

    @torch.no_grad()
    def quantize(self, method: LinearMethod, tied: bool) -> None:
        """Quantize the loaded weight with `method` (a quantize-at-load LinearMethod); with
        tied False the dense weight is freed (the embedding has its own)."""
        weight = self.weight  # [vocab / tp, hidden]
        with torch.device("meta"):  # the float weight it would register is replaced just below
            # The rows are this rank's already: the linear itself is not split again.
            layer = ColumnParallelLinear(weight.shape[1], [weight.shape[0]], False, SINGLE, method)
        layer.weight = nn.Parameter(weight.detach(), requires_grad=False)  # the method quantizes and drops it
        method.process_weights_after_loading(layer)
        self.quantized = layer
        if not tied:
            self.weight = nn.Parameter(weight.new_empty(0, weight.shape[1]), requires_grad=False)  # freed

    def prepack_cpu(self) -> None:
        if self.quantized is None:  # a quantized head packs its own dequantized weight
            self.packed = prepack(self.weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            local = self.quantized(hidden)  # [n, vocab / tp]
        elif self.packed is not None:
            local = packed_linear(hidden, self.packed)  # [n, vocab / tp]
        else:
            local = dense_linear(hidden, self.weight)  # [n, vocab / tp]
        full = self.ctx.all_gather(local, dim=-1)  # [n, per_rank * tp]
        return full[..., : self.vocab_size]  # [n, vocab]
