"""CUDA graphs for decode steps: the one module that captures graphs.

A decode step at small batch is bound by launching ~1,000 small kernels from Python, not by
the GPU. The model's forward for a batch of single-token requests is captured once per
batch-size bucket and replayed: one launch per step. Inputs live in static device buffers
(owned here, on the model's device); a batch is padded up to its bucket with rows of
seq_len 0 (the decode kernel gives them a zero output) whose KV writes land in a scratch
block that the scheduler never hands out. The decode kernel sizes its splits from the
static context bound (max_model_len), so one graph serves every context length.
"""

from __future__ import annotations

import torch
from torch import nn

from turbollm.layers.attention import AttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    """Captured decode forwards for each bucket up to max_batch; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        max_batch: int,
        max_model_len: int,
        block_size: int,
        scratch_block: int,
    ) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.max_model_len, self.block_size = max_model_len, block_size
        self.scratch_slot = scratch_block * block_size
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        dev = kv_caches[0].device
        n, max_blocks = self.buckets[-1], -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)  # [n]
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)  # [n]
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=dev)  # [n]
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int64, device=dev)  # [n, max_blocks]
        self.seq_lens = torch.zeros(n, dtype=torch.int64, device=dev)  # [n]
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int64, device=dev)  # [n + 1]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> [bucket, hidden] static output

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            query_lens_cpu=[1] * bs,
            seq_lens_cpu=[self.max_model_len] * bs,  # the static bound the kernel plans with
            num_decodes=bs,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket, largest first, sharing one memory pool."""
        pool = None
        for bs in reversed(self.buckets):
            meta = self._meta(bs)
            args = (self.input_ids[:bs], self.positions[:bs], self.kv_caches, meta)
            for _ in range(2):  # compiles Triton kernels and sets up cuBLAS outside the capture
                self.model(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def bucket_for(self, num_reqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_reqs), None)

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, bucket: int
    ) -> torch.Tensor:
        """Replay the bucket's graph on this step's decode batch -> hidden [num_reqs, hidden]."""
        bs = meta.num_reqs
        self.input_ids[:bs].copy_(input_ids, non_blocking=True)
        self.positions[:bs].copy_(positions, non_blocking=True)
        self.slot_mapping[:bs].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:bs].copy_(meta.seq_lens, non_blocking=True)
        width = meta.block_tables.shape[1]
        self.block_tables[:bs, :width].copy_(meta.block_tables, non_blocking=True)
        if bucket > bs:  # padding rows: no context, KV written to the scratch slot
            self.seq_lens[bs:bucket].zero_()
            self.slot_mapping[bs:bucket].fill_(self.scratch_slot)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:bs]
