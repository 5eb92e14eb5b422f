"""N-gram prompt lookup: draft the continuation of the latest earlier occurrence of the
request's last n tokens (n from ngram_max down to ngram_min) in its prompt and output.

No model and no device state; proposals are deterministic (q is one-hot). Host side.
"""

from __future__ import annotations

from turbollm.spec.proposer import PROPOSERS, Proposal, ProposalRequest, ProposerContext


def ngram_lookup(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens following the most recent earlier match of the longest suffix n-gram.

    Tries n = n_max .. n_min; for each, scans back from the end for the latest position where
    the last n tokens occurred before, and returns what followed it (possibly overlapping
    the suffix itself, which continues a repeating pattern). [] when nothing matches.
    """
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = tokens[size - n :]
        first = suffix[0]
        # Candidate starts i with tokens[i : i + n] == suffix and i + n < size.
        i = size - n - 1
        while i >= 0:
            if tokens[i] == first and tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + k]
            i -= 1
    return []


class NgramProposer:
    """Prompt-lookup proposer (see the module docstring)."""

    def __init__(self, ctx: ProposerContext) -> None:
        self.n_min = ctx.config.ngram_min
        self.n_max = ctx.config.ngram_max
        self.forward_times: list[tuple[int, float]] = []

    def kv_bytes_per_block(self) -> int:
        return 0

    def init_kv_cache(self, num_blocks: int) -> None:
        pass

    def propose(self, requests: list[ProposalRequest]) -> list[Proposal]:
        return [Proposal(ngram_lookup(r.token_ids, r.num_spec_tokens, self.n_min, self.n_max))
                for r in requests]

    def rollback(self, request_id: str, num_valid: int) -> None:
        pass

    def drop(self, request_id: str) -> None:
        pass


PROPOSERS["ngram"] = NgramProposer
