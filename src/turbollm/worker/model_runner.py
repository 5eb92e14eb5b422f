"""ModelRunner: builds the model on its device, owns the KV cache, runs one step.

Lives in the worker process; everything it holds (weights, KV cache, per-request state)
is on the model's device except the RequestState bookkeeping (host). One documented host
sync per step, in `PendingStep.result()`: a wait on the event recorded after the sampler's
packed tokens / logprobs / prompt logprobs were copied (non-blocking) to pinned memory.
`execute_async` returns before it, so the engine can launch the next step first.
"""

from __future__ import annotations

import itertools

import torch

from turbollm.config import EngineConfig
from turbollm.core.plan import StepPlan, StepResult, TokenLogprobs
from turbollm.distributed.parallel import SINGLE, ParallelContext
from turbollm.layers.attention import AttentionMetadata, check_kv_cache_device
from turbollm.models.build import build_model, resolve_device, resolve_dtype
from turbollm.models.loader import ModelSource
from turbollm.quant.plan import resolve_quantization
from turbollm.sample.sampler import (
    Sampler,
    SamplerDraft,
    SamplingState,
    gather_logprobs,
    needs_host_tokens,
    unpack_logprobs,
)
from turbollm.worker.inputs import PromptLogprobsInputs, RequestState, StepInputs, build_step_inputs, logits_rows
from turbollm.worker.cuda_graphs import DecodeGraphs
from turbollm.worker.kv_cache import allocate_kv_caches, bytes_per_block, num_blocks_for_budget
from turbollm.worker.spec_decode import SpecDecoder

class ModelRunner:
    """One rank's model, KV cache and request state."""

    def __init__(
        self, config: EngineConfig, source: ModelSource, max_model_len: int, ctx: ParallelContext = SINGLE
    ) -> None:
        self.config = config
        self.arch = source.arch
        self.max_model_len = max_model_len
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.block_size = config.cache.block_size
        self.kv_dtype = torch.float8_e4m3fn if config.cache.kv_cache_dtype == "fp8" else self.dtype
        check_kv_cache_device(self.kv_dtype, self.device)
        self.ctx = ctx
        # Unseeded requests draw from torch's default generators: seed them for repeatable runs.
        torch.manual_seed(config.model.seed)
        self.model = self._build_model(source)
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: DecodeGraphs | None = None
        self.states: dict[str, RequestState] = {}
        self._inflight: PendingStep | None = None
        """The last step queued; its result may not have reached the host yet."""
        self._last_tokens: torch.Tensor | None = None  # [num_sampled] int64 of the last step
        # Speculative decoding: its steps (plans with num_spec_tokens) run in SpecDecoder.
        self.spec = SpecDecoder(self, source) if config.speculative.enabled else None

    def _build_model(self, source: ModelSource) -> torch.nn.Module:
        q = self.config.quantization
        plan = resolve_quantization(q.quantization, q.group_size, source.quantization_config,
                                    self.device, where=str(source.path or "the preset model"),
                                    gguf_linear_types=source.gguf_linear_types(), ignore=q.quantization_ignore,
                                    lm_head=q.quantize_lm_head)
        return build_model(source, self.device, self.dtype, self.config.model.seed, plan, self.ctx)

    # ---- KV cache ------------------------------------------------------------------------
    def determine_num_blocks(self) -> int:
        """Blocks that fit the memory budget (GPU: after weights and a profiled forward)."""
        per_block = bytes_per_block(self.arch, self.block_size, self.kv_dtype, self.ctx.tp_size)
        if self.spec is not None:  # the draft's cache shares the target's block ids
            per_block += self.spec.kv_bytes_per_block()
        if self.device.type != "cuda":
            return num_blocks_for_budget(self.config.cache.cpu_kv_cache_bytes, per_block, self.config.cache)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_forward()
        peak = torch.cuda.max_memory_allocated(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = int(total * self.config.cache.gpu_memory_utilization) - peak
        return num_blocks_for_budget(budget, per_block, self.config.cache)

    @torch.inference_mode()
    def _profile_forward(self) -> None:
        """A forward over a full token budget and logits for max_num_seqs rows, for peak memory."""
        sched = self.config.scheduler
        total = min(sched.max_num_batched_tokens, self.max_model_len * sched.max_num_seqs)
        lens = [min(self.max_model_len, total - i) for i in range(0, total, self.max_model_len)]
        nblocks = sum(-(-n // self.block_size) for n in lens)
        caches = allocate_kv_caches(self.arch, nblocks, self.block_size, self.kv_dtype, self.device)
        hidden = self._synthetic_forward(lens, lens, caches)
        rows = min(logits_rows(sched.max_num_seqs), total)  # the LM head's padded rows
        torch.log_softmax(self.model.compute_logits(hidden[:rows]).float(), dim=-1)  # type: ignore[operator]
        torch.cuda.synchronize(self.device)

    def _synthetic_forward(
        self, query_lens: list[int], seq_lens: list[int], caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """One eager forward of random tokens: request i computes its last query_lens[i] of
        seq_lens[i] positions (decodes first), its blocks laid out from block 0 on."""
        nblocks = [-(-n // self.block_size) for n in seq_lens]
        tables, first = [], 0
        for nb in nblocks:
            tables.append(list(range(first, first + nb)) + [0] * (max(nblocks) - nb))
            first += nb
        positions = [p for q, n in zip(query_lens, seq_lens, strict=True) for p in range(n - q, n)]
        req = [i for i, (q, n) in enumerate(zip(query_lens, seq_lens, strict=True)) for _ in range(q)]
        slots = [tables[i][p // self.block_size] * self.block_size + p % self.block_size
                 for i, p in zip(req, positions, strict=True)]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev),
            block_tables=torch.tensor(tables, device=dev),
            seq_lens=torch.tensor(seq_lens, device=dev),
            query_start_loc=torch.tensor([0, *itertools.accumulate(query_lens)], device=dev),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            num_decodes=sum(1 for q in query_lens if q == 1),
        )
        ids = torch.randint(0, self.arch.vocab_size, (len(positions),), device=dev)
        return self.model(ids, torch.tensor(positions, device=dev), caches, meta)  # [T, hidden]

    @torch.inference_mode()
    def _warm_up_kernels(self, num_blocks: int) -> None:
        """Compile, before serving, the Triton variants that chunk sizes select (the prefill
        kernel picks its tiling from the chunk length), so no request waits on a JIT compile.
        Writes only into blocks no request holds yet."""
        budget = self.config.scheduler.max_num_batched_tokens
        # (chunk, context) pairs; capped lengths collapse to one run each.
        shapes = {(min(qlen, budget, n), n) for qlen in (1, 8, 16, 17, 64, 100, 256, 512, 1024, 2048, 4096)
                  for n in (min(p + qlen, self.max_model_len) for p in (0, 37))}
        for q, n in sorted(shapes):
            if 2 * -(-n // self.block_size) <= num_blocks:
                self._synthetic_forward([1, q], [n, n], self.kv_caches)  # a decode beside the chunk
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _warm_up_lm_head(self) -> None:
        """Run the LM head and the greedy argmax once at every row count `logits_rows` can
        give, so that serving meets no new matmul shape (see inputs.logits_rows); then
        compile the sampler's top-p kernel for the logits' width."""
        counts = {logits_rows(n) for n in range(1, self.config.scheduler.max_num_seqs + 1)}
        hidden = torch.zeros(max(counts), self.arch.hidden_size, dtype=self.dtype,
                             device=self.device)  # [max rows, hidden]
        for rows in sorted(counts):
            logits = self.model.compute_logits(hidden[:rows])  # type: ignore[operator]  # [rows, vocab]
            logits.argmax(dim=-1)
        self.sampler.warm_up(logits.shape[-1], self.device)
        torch.cuda.synchronize(self.device)

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the cache; on a GPU also capture the decode graphs (one extra scratch block)."""
        use_graphs = self.device.type == "cuda" and not self.config.model.enforce_eager
        total = num_blocks + 1 if use_graphs else num_blocks
        self.kv_caches = allocate_kv_caches(self.arch, total, self.block_size, self.kv_dtype, self.device)
        if self.device.type == "cuda":
            self._warm_up_kernels(num_blocks)
        if self.spec is not None:
            self.spec.init_kv_cache(total)
        if self.device.type == "cuda":
            self._warm_up_lm_head()
        if use_graphs:
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.config.scheduler.max_num_seqs,
                                       self.max_model_len, self.block_size, scratch_block=num_blocks)
            self.graphs.capture()

    # ---- one step ------------------------------------------------------------------------
    def _apply_plan(self, plan: StepPlan) -> None:
        for rid in plan.finished_request_ids:
            self.states.pop(rid, None)
        for new in plan.new_requests:
            sp = new.sampling_params
            self.states[new.request_id] = RequestState(
                request_id=new.request_id,
                token_ids=list(new.token_ids),
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                sampling=SamplingState(
                    params=sp,
                    prompt_token_ids=new.token_ids[: new.num_prompt_tokens],
                    output_token_ids=new.token_ids[new.num_prompt_tokens :],
                    eos_token_ids=frozenset(self.arch.eos_token_ids),
                    seed=sp.seed,
                ),
                num_prompt_tokens=new.num_prompt_tokens,
                # Output tokens exist only after the whole prompt was reported once.
                prompt_logprobs=(sp.prompt_logprobs
                                 if len(new.token_ids) == new.num_prompt_tokens else None),
            )
        for cached in plan.cached_requests:
            st = self.states[cached.request_id]
            st.block_ids.extend(cached.new_block_ids)
            assert st.num_computed_tokens == cached.num_computed_tokens, (
                f"{cached.request_id}: worker and scheduler disagree on computed tokens"
            )

    def execute(self, plan: StepPlan) -> StepResult:
        """Run the plan's tokens through the model and sample where a request is caught up."""
        if plan.num_spec_tokens and self.spec is not None:
            return self.spec.execute(plan)
        return self.execute_async(plan).result()

    @torch.inference_mode()
    def execute_async(self, plan: StepPlan) -> PendingStep:
        """Queue the step on the device and return before its host sync (see PendingStep).

        A plan made by an overlapped scheduler may schedule positions whose tokens the
        previous step is still sampling; their input ids are copied from that step's token
        tensor on the device. Steps that need every token on the host (penalties read the
        output ids) first wait for the previous step.
        """
        self._apply_plan(plan)
        if plan.is_empty:
            return PendingStep.done(StepResult())
        if self._inflight is not None and any(
            needs_host_tokens(self.states[rid].sampling.params) for rid in plan.num_scheduled_tokens
        ):
            self._inflight.result()
        inp = build_step_inputs(plan, self.states, self.block_size, self.device)
        if inp.placeholder_rows is not None:
            assert self._last_tokens is not None, "a placeholder without a previous step"
            # [num_placeholders]: each one's token from the previous step's samples.
            inp.input_ids.index_copy_(0, inp.placeholder_rows,
                                      self._last_tokens.index_select(0, inp.placeholder_src))
        hidden = self._forward(inp)  # [T, hidden]
        pl = inp.prompt_logprobs
        # Before the sampler's logits, so its slices reuse memory the profile run accounted for.
        packed = self._score_prompt(hidden, pl) if pl is not None and pl.target_ids else None
        states = inp.sampling_states
        if states:
            # [num_sampling, vocab]; the LM head runs on the padded rows (see logits_rows)
            logits = self.model.compute_logits(hidden[inp.logits_indices])[: len(states)]
            draft = self.sampler.sample(logits, [s.sampling for s in states], extra=packed)
            for row, st in enumerate(states):
                st.sampling.num_pending += 1
                st.last_sample_row = row
            self._last_tokens = draft.token_ids
        elif packed is not None:  # nobody samples: only prompt logprobs come back
            draft = SamplerDraft(inp.logits_indices, packed, [], [], 0, packed.numel())
        else:
            return PendingStep.done(StepResult())
        pending = PendingStep(draft, states, pl)
        self._inflight = pending
        return pending

    def _forward(self, inp: StepInputs) -> torch.Tensor:
        """Replay a captured graph for a batch of single-token requests, else run eagerly."""
        meta = inp.meta
        if self.graphs is not None and meta.num_decodes == meta.num_reqs:
            bucket = self.graphs.bucket_for(meta.num_reqs)
            if bucket is not None:
                return self.graphs.run(inp.input_ids, inp.positions, meta, bucket)  # [B, hidden]
        return self.model(inp.input_ids, inp.positions, self.kv_caches, meta)  # [T, hidden]

    def _score_prompt(self, hidden: torch.Tensor, pl: PromptLogprobsInputs) -> torch.Tensor:
        """Logprob, rank and top-k of each next prompt token: [num_pl_rows * (2 + 2 * max_k)]
        float64 on the device. Only the asking requests' rows reach the LM head, in slices of
        max_num_seqs rows: the logits size the profile run measured, so a long chunk fits."""
        step = max(1, self.config.scheduler.max_num_seqs)
        parts = []
        for i in range(0, pl.rows.numel(), step):
            logits = self.model.compute_logits(hidden[pl.rows[i : i + step]])  # [rows, vocab]
            # [rows, 2 + 2 * max_k]
            parts.append(gather_logprobs(logits, pl.targets[i : i + step], None, pl.max_k))
        return torch.cat(parts).flatten()


def _unpack_prompt(pl: PromptLogprobsInputs, host: list[float]) -> dict[str, list[TokenLogprobs | None]]:
    """Per-request prompt logprobs from the host copy of `_score_prompt`'s output."""
    width = 2 + 2 * pl.max_k
    out: dict[str, list[TokenLogprobs | None]] = {}
    row = 0
    for span in pl.spans:
        entries: list[TokenLogprobs | None] = [None] if span.first else []
        for r in range(row, row + span.num_rows):
            entries.append(unpack_logprobs(host[r * width : (r + 1) * width], pl.target_ids[r],
                                           span.k, pl.max_k))
        row += span.num_rows
        out[span.request_id] = entries
    return out


class PendingStep:
    """A queued step whose sampled tokens (and logprobs) are on their way to the host.

    Its one host sync is in `result()`: a wait on the event recorded after a non-blocking
    copy of the sampler's packed tensor into pinned memory. Until then the host is free to
    plan and launch the next step. `result()` appends the tokens to the states it sampled
    for (held by reference: a state dropped since, by preemption, is simply garbage).
    """

    def __init__(self, draft: SamplerDraft, states: list[RequestState], pl: PromptLogprobsInputs | None) -> None:
        self.draft, self.states, self.pl = draft, states, pl
        self._result: StepResult | None = None
        packed = draft.packed
        self.event: torch.cuda.Event | None = None
        self.host = packed
        if packed.is_cuda:
            self.host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self.host.copy_(packed, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    @staticmethod
    def done(result: StepResult) -> PendingStep:
        """A step with nothing to bring back (empty, or nobody samples or scores)."""
        empty = torch.empty(0, dtype=torch.float64)
        step = PendingStep(SamplerDraft(empty.long(), empty, [], [], 0, 0), [], None)
        step._result = result
        return step

    def result(self) -> StepResult:
        if self._result is not None:
            return self._result
        if self.event is not None:
            self.event.synchronize()  # the step's one host sync
        host = self.host.tolist()
        result = StepResult()
        if self.states:
            out = self.draft.unpack(host)
            for st, tok, lp in zip(self.states, out.token_ids, out.logprobs, strict=True):
                st.token_ids.append(tok)
                st.sampling.output_token_ids.append(tok)
                st.sampling.num_pending -= 1
                result.sampled_token_ids[st.request_id] = [tok]
                if lp is not None:
                    result.logprobs[st.request_id] = [lp]
            host = out.extra
        if self.pl is not None:
            result.prompt_logprobs = _unpack_prompt(self.pl, host)
        self._result = result
        return result
