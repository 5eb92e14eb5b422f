"""The proposer Protocol and its registry (worker side).

A proposer is built once per model runner. Each speculative step it gets one
ProposalRequest per speculating request and returns one Proposal each, with at most K tokens.
Proposers with device state (a draft model's KV cache) learn through `rollback` how many
positions of a request stay valid after verification, and through `drop` that a request's
worker state is gone (finished, aborted or preempted); they report each forward's tokens and
seconds in `forward_times`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from turbollm.config import SpeculativeConfig
from turbollm.sample.sampler import SamplingState

if TYPE_CHECKING:
    from turbollm.models.loader import ModelSource


@dataclass
class ProposalRequest:
    """One speculating request as the proposer sees it (host side)."""

    request_id: str
    token_ids: list[int]
    """Every known token (prompt + outputs); the drafts continue it."""
    num_spec_tokens: int
    """K: propose at most this many."""
    block_ids: list[int]
    """The request's KV blocks; they have slots for positions up to len(token_ids) + K - 1."""
    sampling: SamplingState
    state_key: object
    """Identity of the worker's state for the request: a new object means the request was
    (re)admitted, so state a proposer kept under the same id is stale."""


@dataclass
class Proposal:
    """Draft tokens for one request and how they were drawn."""

    token_ids: list[int]
    """At most K tokens; empty: no proposal (a plain decode)."""
    probs: torch.Tensor | None = None
    """[len(token_ids), vocab] float32 draft distribution q each token was sampled from, on
    the model's device; None for a deterministic proposal (q is one-hot at the token)."""


class Proposer(Protocol):
    """What every speculative method implements."""

    forward_times: list[tuple[int, float]]
    """(tokens, seconds) of each model forward the last `propose` ran (empty: no model);
    the scheduler's SpecPolicy learns draft costs from them."""

    def kv_bytes_per_block(self) -> int:
        """Bytes of proposer KV cache per target block (0: none)."""
        ...

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the proposer's cache with the target's block ids and block size."""
        ...

    def propose(self, requests: list[ProposalRequest]) -> list[Proposal]:
        """One Proposal per request, in order."""
        ...

    def rollback(self, request_id: str, num_valid: int) -> None:
        """Only the request's first `num_valid` positions hold accepted tokens now."""
        ...

    def drop(self, request_id: str) -> None:
        """Forget the request."""
        ...


@dataclass(frozen=True)
class ProposerContext:
    """What a proposer may need from the model runner to build itself."""

    config: SpeculativeConfig
    target: torch.nn.Module
    source: ModelSource
    block_size: int
    device: torch.device
    dtype: torch.dtype
    seed: int


PROPOSERS: dict[str, Callable[[ProposerContext], Proposer]] = {}
"""speculative_method -> factory. Methods register themselves on import (see build_proposer)."""


def build_proposer(ctx: ProposerContext) -> Proposer:
    """The proposer for ctx.config.speculative_method."""
    from turbollm.spec import draft_model, ngram  # noqa: F401  (register the methods)

    method = ctx.config.speculative_method
    if method not in PROPOSERS:
        raise ValueError(f"unknown speculative_method {method!r}; known: {', '.join(PROPOSERS)}")
    return PROPOSERS[method](ctx)
