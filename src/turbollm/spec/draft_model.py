"""Draft-model proposer: a smaller model with the target's tokenizer drafts K tokens.

The draft has its own paged KV cache (one tensor per draft layer, on the target's device)
indexed by the *target's* block ids: the scheduler allocates a request's blocks once and both
caches use them, so rollback and freeing need no extra bookkeeping beyond how many of a
request's positions hold valid draft KV (`_valid`, host side). Before drafting, a request's
draft cache catches up on the tokens it has not seen (its whole prompt the first time, then
the one or two tokens the last verification added); then K - 1 single-token forwards,
batched over every speculating request, draw the remaining drafts. All draft KV slots lie
within what the scheduler allocated for the step's 1 + K target tokens.

`--draft-model layers:N` builds an untrained draft from the target's first N decoder layers,
its final norm and its LM head, sharing the target's weights (no extra weight memory); any
other value loads a model like --model does, which must have the target's vocabulary.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import torch
from torch import nn

from turbollm.distributed.parallel import SINGLE
from turbollm.errors import ModelLoadError
from turbollm.layers.attention import AttentionMetadata
from turbollm.layers.cpu_gemm import prepack_cpu_linears
from turbollm.models.arch import ModelArch
from turbollm.models.loader import resolve_model
from turbollm.models.registry import get_model_class
from turbollm.sample.sampler import Sampler, sampling_probs
from turbollm.spec.proposer import PROPOSERS, Proposal, ProposalRequest, ProposerContext
from turbollm.spec.verification import SALT_DRAFT, row_states

LAYERS_PREFIX = "layers:"


class LayerPrefixDraft(nn.Module):
    """The target's first N decoder layers + its final norm and LM head (shared weights)."""

    def __init__(self, target: nn.Module, num_layers: int) -> None:
        super().__init__()
        total = target.arch.num_hidden_layers  # type: ignore[union-attr]
        if not 1 <= num_layers <= total:
            raise ValueError(f"draft_model layers:{num_layers}: the target has {total} layers; "
                             f"N must be in [1, {total}]")
        self._target = [target]  # a list keeps the target out of this module's children
        self.num_layers = num_layers
        self.arch: ModelArch = replace(target.arch, num_hidden_layers=num_layers)  # type: ignore[arg-type]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        m = self._target[0].model
        x = m.embed_tokens(input_ids)  # [T, hidden]
        rope = m.rotary.cos_sin(positions, x.dtype)
        residual = None
        for layer, cache in zip(m.layers[: self.num_layers], kv_caches, strict=True):
            x, residual = layer(rope, x, residual, cache, meta)
        return m.norm(x, residual)[0]  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._target[0].compute_logits(hidden)  # [n, vocab]


def build_draft_model(ctx: ProposerContext) -> nn.Module:
    """The draft named by ctx.config.draft_model (see the module docstring)."""
    name = ctx.config.draft_model
    assert name is not None
    target_arch: ModelArch = ctx.target.arch  # type: ignore[assignment]
    if name.startswith(LAYERS_PREFIX):
        try:
            n = int(name[len(LAYERS_PREFIX):])
        except ValueError:
            raise ValueError(f"draft_model {name!r}: expected layers:N with an integer N") from None
        return LayerPrefixDraft(ctx.target, n)
    source = resolve_model(name, "auto")
    if source.arch.vocab_size != target_arch.vocab_size:
        raise ValueError(f"draft_model {name!r} has a vocabulary of {source.arch.vocab_size} "
                         f"tokens, the target {target_arch.vocab_size}: they must share a tokenizer")
    old = torch.get_default_dtype()
    torch.set_default_dtype(ctx.dtype)
    try:
        with torch.device(ctx.device):
            model = get_model_class(source.arch.architecture)(source.arch, SINGLE)
    finally:
        torch.set_default_dtype(old)
    if source.kind == "dummy":
        model.init_dummy_weights(ctx.seed + 1)
    else:
        try:
            model.load_weights(source.iter_weights())
        except (KeyError, ValueError) as e:
            raise ModelLoadError(f"{source.path}: draft weights do not fit the model: {e}") from e
    if ctx.device.type == "cpu":
        prepack_cpu_linears(model)
    return model.eval()


def make_metadata(
    chunks: list[tuple[int, int, list[int]]], block_size: int, device: torch.device
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Attention metadata for chunks (start position, length, block ids), single-token chunks
    first (the caller orders them), and the positions [T] of their tokens."""
    slots: list[int] = []
    positions: list[int] = []
    for start, n, blocks in chunks:
        pos = range(start, start + n)
        positions += pos
        slots += [blocks[p // block_size] * block_size + p % block_size for p in pos]
    width = max(len(b) for _, _, b in chunks)
    tables = [b + [0] * (width - len(b)) for _, _, b in chunks]
    lens = [n for _, n, _ in chunks]
    seq_lens = [s + n for s, n, _ in chunks]

    def dev(x: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64).to(device, non_blocking=True)

    meta = AttentionMetadata(
        slot_mapping=dev(slots), block_tables=dev(tables), seq_lens=dev(seq_lens),
        query_start_loc=dev([0, *itertools.accumulate(lens)]), query_lens_cpu=lens,
        seq_lens_cpu=seq_lens, num_decodes=sum(1 for n in lens if n == 1),
    )
    return meta, dev(positions)


class DraftModelProposer:
    """Drafts with a small model over its own paged KV cache (see the module docstring)."""

    def __init__(self, ctx: ProposerContext) -> None:
        self.model = build_draft_model(ctx)
        self.arch: ModelArch = self.model.arch  # type: ignore[assignment]
        self.block_size = ctx.block_size
        self.device, self.dtype = ctx.device, ctx.dtype
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self._valid: dict[str, tuple[object, int]] = {}
        """request_id -> (worker state identity, positions with valid draft KV)."""
        self.forward_times: list[tuple[int, float]] = []

    def kv_bytes_per_block(self) -> int:
        a = self.arch
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * a.num_hidden_layers * self.block_size * a.num_key_value_heads * a.head_dim * elem

    def init_kv_cache(self, num_blocks: int) -> None:
        a = self.arch
        shape = (2, num_blocks, self.block_size, a.num_key_value_heads, a.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(a.num_hidden_layers)]

    def rollback(self, request_id: str, num_valid: int) -> None:
        entry = self._valid.get(request_id)
        if entry is not None:
            self._valid[request_id] = (entry[0], min(entry[1], num_valid))

    def drop(self, request_id: str) -> None:
        self._valid.pop(request_id, None)

    @torch.inference_mode()
    def propose(self, requests: list[ProposalRequest]) -> list[Proposal]:
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        self.forward_times = []
        # Forward 1 catches each request's draft cache up to its last known token.
        chunks = []
        for r in requests:
            key, valid = self._valid.get(r.request_id, (None, 0))
            start = valid if key is r.state_key else 0
            chunks.append((start, len(r.token_ids) - start, r.block_ids))
        order = sorted(range(len(requests)), key=lambda i: chunks[i][1] != 1)
        ids = list(itertools.chain.from_iterable(
            requests[i].token_ids[chunks[i][0]:] for i in order))
        self._step([requests[i] for i in order], [chunks[i] for i in order], ids, order, drafts, probs)
        for depth in range(1, max(r.num_spec_tokens for r in requests)):
            live = [i for i, r in enumerate(requests) if r.num_spec_tokens > depth]
            step_chunks = [(len(requests[i].token_ids) + depth - 1, 1, requests[i].block_ids)
                           for i in live]
            self._step([requests[i] for i in live], step_chunks, [drafts[i][-1] for i in live],
                       live, drafts, probs)
        for r, d in zip(requests, drafts, strict=True):
            # Draft KV is written for every drafted token but the last.
            self._valid[r.request_id] = (r.state_key, len(r.token_ids) + len(d) - 1)
        return [Proposal(d, torch.stack(q) if q else None)
                for d, q in zip(drafts, probs, strict=True)]

    def _step(self, reqs: list[ProposalRequest], chunks: list[tuple[int, int, list[int]]],
              input_ids: list[int], where: list[int], drafts: list[list[int]],
              probs: list[list[torch.Tensor]]) -> None:
        """One draft forward; appends a draft token (and its q for sampled requests) to each
        request it ran (`where` maps rows to request indices). Records its tokens and wall
        time (up to its host sync) in forward_times."""
        t0 = time.perf_counter()
        meta, positions = make_metadata(chunks, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        hidden = self.model(ids, positions, self.kv_caches, meta)  # [T, hidden]
        last = torch.tensor(list(itertools.accumulate(n for _, n, _ in chunks)), device=self.device) - 1
        logits = self.model.compute_logits(hidden[last])  # [num_reqs, vocab]
        states = [row_states(r.sampling, drafts[i], len(drafts[i]) + 1)[-1]
                  for r, i in zip(reqs, where, strict=True)]
        q = sampling_probs(logits, states)  # [num_reqs, vocab]; one-hot for greedy rows
        noise = self.sampler._exponentials(q, states, salt=SALT_DRAFT)
        tokens = (q / noise).argmax(dim=-1).tolist()  # this forward's host sync
        self.forward_times.append((len(input_ids), time.perf_counter() - t0))
        for row, (r, i) in enumerate(zip(reqs, where, strict=True)):
            drafts[i].append(tokens[row])
            if not r.sampling.params.greedy:
                probs[i].append(q[row])


PROPOSERS["draft"] = DraftModelProposer
