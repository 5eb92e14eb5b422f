"""Speculative steps in the worker: propose, verify in one target forward, roll back.

Owned by the ModelRunner (one per runner when speculative decoding is on) and run instead of
its plain `execute` for a plan with speculating requests (`plan.num_spec_tokens`). Steps are
eager (no CUDA graph) for now. Per step:

1. apply the plan (the runner's own bookkeeping);
2. the proposer drafts up to K tokens per speculating request (host lists; a draft model
   runs on the device with its own paged cache);
3. the drafts are appended to the requests' tokens and the step's inputs are built as for
   any step, with each speculating request computing 1 + k tokens (k <= K drafted: a
   proposer may propose fewer, e.g. an n-gram with no match, and then the step computes
   fewer);
4. one target forward; requests without drafts sample as usual, speculating ones are
   verified (spec/verification.py) from their 1 + k rows;
5. the drafts leave the token lists, the emitted tokens join them, num_computed_tokens moves
   back to the last token + accepted drafts, block ids past the known tokens are dropped
   (the scheduler frees the same ones), and the proposer rolls its cache back.

Host syncs: the proposer's (one per draft forward), then one for the plain sampler (only if
such rows exist) and one for verification.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from turbollm.core.plan import StepPlan, StepResult
from turbollm.spec import ProposalRequest, VerifyRequest, build_proposer, verify
from turbollm.spec.proposer import Proposal, ProposerContext
from turbollm.worker.inputs import build_step_inputs

if TYPE_CHECKING:
    from turbollm.models.loader import ModelSource
    from turbollm.worker.inputs import RequestState, StepInputs
    from turbollm.worker.model_runner import ModelRunner


class SpecDecoder:
    """The speculative step of one model runner (see the module docstring)."""

    def __init__(self, runner: ModelRunner, source: ModelSource) -> None:
        self.runner = runner
        cfg = runner.config
        self.proposer = build_proposer(ProposerContext(
            config=cfg.speculative, target=runner.model, source=source,
            block_size=runner.block_size, device=runner.device, dtype=runner.dtype,
            seed=cfg.model.seed,
        ))
        self._known: set[str] = set()

    def kv_bytes_per_block(self) -> int:
        return self.proposer.kv_bytes_per_block()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.proposer.init_kv_cache(num_blocks)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        r = self.runner
        r._apply_plan(plan)
        self._forget_dropped()
        spec = [r.states[rid] for rid in plan.num_spec_tokens]
        proposals = self.proposer.propose([
            ProposalRequest(st.request_id, st.token_ids, plan.num_spec_tokens[st.request_id],
                            st.block_ids, st.sampling, st) for st in spec
        ])
        draft_seconds = time.perf_counter() - t0
        self._known.update(st.request_id for st in spec)
        scheduled = dict(plan.num_scheduled_tokens)
        starts = {}
        for st, prop in zip(spec, proposals, strict=True):
            starts[st.request_id] = st.num_computed_tokens
            scheduled[st.request_id] = 1 + len(prop.token_ids)
            st.token_ids.extend(prop.token_ids)
        inp = build_step_inputs(StepPlan(num_scheduled_tokens=scheduled), r.states, r.block_size,
                                r.device)
        hidden = r._forward(inp)  # [T, hidden]
        result = StepResult(draft_seconds=draft_seconds,
                            draft_forwards=list(self.proposer.forward_times))
        self._sample_plain(hidden, inp, set(starts), result)
        self._verify(hidden, inp, scheduled, spec, proposals, starts, result)
        result.step_seconds = time.perf_counter() - t0
        return result

    def _forget_dropped(self) -> None:
        """Tell the proposer about requests whose worker state is gone."""
        for rid in [rid for rid in self._known if rid not in self.runner.states]:
            self.proposer.drop(rid)
            self._known.discard(rid)

    def _sample_plain(self, hidden: torch.Tensor, inp: StepInputs, spec_ids: set[str],
                      result: StepResult) -> None:
        """Sampling and prompt logprobs for the step's requests that do not speculate."""
        r = self.runner
        pl = inp.prompt_logprobs
        packed = r._score_prompt(hidden, pl) if pl is not None and pl.target_ids else None
        rows = [i for i, st in enumerate(inp.sampling_states) if st.request_id not in spec_ids]
        if not rows:
            if pl is not None:
                from turbollm.worker.model_runner import _unpack_prompt

                result.prompt_logprobs = _unpack_prompt(pl, packed.tolist() if packed is not None else [])
            return
        states = [inp.sampling_states[i] for i in rows]
        index = inp.logits_indices[torch.tensor(rows, device=inp.logits_indices.device)]
        logits = r.model.compute_logits(hidden[index])  # [num_plain, vocab]
        out = r.sampler(logits, [s.sampling for s in states], extra=packed)
        for st, tok, lp in zip(states, out.token_ids, out.logprobs, strict=True):
            st.token_ids.append(tok)
            st.sampling.output_token_ids.append(tok)
            result.sampled_token_ids[st.request_id] = [tok]
            if lp is not None:
                result.logprobs[st.request_id] = [lp]
        if pl is not None:
            from turbollm.worker.model_runner import _unpack_prompt

            result.prompt_logprobs = _unpack_prompt(pl, out.extra)

    def _verify(self, hidden: torch.Tensor, inp: StepInputs, scheduled: dict[str, int],
                spec: list[RequestState], proposals: list[Proposal], starts: dict[str, int],
                result: StepResult) -> None:
        """Verify every speculating request's 1 + k rows, then roll its state back."""
        r = self.runner
        assert inp.request_order is not None
        first_row, row = {}, 0
        for rid in inp.request_order:
            first_row[rid] = row
            row += scheduled[rid]
        rows = [first_row[st.request_id] + j for st in spec for j in range(scheduled[st.request_id])]
        logits = r.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])
        reqs = [VerifyRequest(st.sampling, p.token_ids, p.probs) for st, p in zip(spec, proposals, strict=True)]
        emitted, logprobs = verify(r.sampler, logits, reqs)
        bs = r.block_size
        for st, prop, toks, lps in zip(spec, proposals, emitted, logprobs, strict=True):
            rid = st.request_id
            del st.token_ids[len(st.token_ids) - len(prop.token_ids):]
            st.token_ids.extend(toks)
            st.sampling.output_token_ids.extend(toks)
            st.num_computed_tokens = starts[rid] + len(toks)
            del st.block_ids[-(-len(st.token_ids) // bs):]
            self.proposer.rollback(rid, st.num_computed_tokens)
            result.sampled_token_ids[rid] = toks
            result.num_draft_tokens[rid] = len(prop.token_ids)
            if lps is not None:
                result.logprobs[rid] = lps
