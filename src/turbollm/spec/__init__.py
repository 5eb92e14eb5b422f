"""Speculative decoding: proposers (one Protocol, a registry by method name) and verification.

Lives in the worker process. A proposer turns each speculating request's known tokens into up
to K draft tokens (and, when it samples them, the draft distribution q); `verify` scores them
against the target's distribution p with exact rejection sampling (greedy requests: exact
argmax matching), so outputs follow the target model's distribution exactly.
"""

from turbollm.spec.proposer import PROPOSERS, Proposal, ProposalRequest, Proposer, build_proposer
from turbollm.spec.verification import VerifyRequest, verify

__all__ = [
    "PROPOSERS", "Proposal", "ProposalRequest", "Proposer", "VerifyRequest", "build_proposer", "verify",
]
