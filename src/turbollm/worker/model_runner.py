"""ModelRunner: builds the model on its device, owns the KV cache, runs one step.

Lives in the worker process; everything it holds (weights, KV cache, per-request state)
is on the model's device except the RequestState bookkeeping (host). One documented host
sync per step: the sampler's final `.tolist()`, which also carries the prompt logprobs of
requests that ask (in a step where nobody samples, their own `.tolist()` is that sync).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch

from turbollm.config import EngineConfig
from turbollm.core.plan import StepPlan, StepResult, TokenLogprobs
from turbollm.distributed.parallel import SINGLE, ParallelContext
from turbollm.errors import ModelLoadError
from turbollm.layers.attention import AttentionMetadata
from turbollm.layers.cpu_gemm import prepack_cpu_linears
from turbollm.models.loader import ModelSource
from turbollm.models.registry import get_model_class
from turbollm.sample.sampler import Sampler, SamplingState, gather_logprobs, unpack_logprobs
from turbollm.worker.inputs import PromptLogprobsInputs, RequestState, StepInputs, build_step_inputs
from turbollm.worker.cuda_graphs import DecodeGraphs
from turbollm.worker.kv_cache import allocate_kv_caches, bytes_per_block, num_blocks_for_budget
from turbollm.worker.spec_decode import SpecDecoder

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; a named cuda device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA GPU is available")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on GPU, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


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
        self.ctx = ctx
        # Unseeded requests draw from torch's default generators: seed them for repeatable runs.
        torch.manual_seed(config.model.seed)
        self.model = self._build_model(source)
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: DecodeGraphs | None = None
        self.states: dict[str, RequestState] = {}
        # Speculative decoding: its steps (plans with num_spec_tokens) run in SpecDecoder.
        self.spec = SpecDecoder(self, source) if config.speculative.enabled else None

    def _build_model(self, source: ModelSource) -> torch.nn.Module:
        cls = get_model_class(self.arch.architecture)
        with _default_dtype(self.dtype), torch.device(self.device):
            model = cls(self.arch, self.ctx)
        if source.kind == "dummy":
            model.init_dummy_weights(self.config.model.seed)  # type: ignore[operator]
        else:
            try:
                model.load_weights(source.iter_weights())  # type: ignore[operator]
            except (KeyError, ValueError) as e:
                raise ModelLoadError(f"{source.path}: weights do not fit the model: {e}") from e
        if self.device.type == "cpu":
            prepack_cpu_linears(model)
        return model.eval()

    # ---- KV cache ------------------------------------------------------------------------
    def determine_num_blocks(self) -> int:
        """Blocks that fit the memory budget (GPU: after weights and a profiled forward)."""
        per_block = bytes_per_block(self.arch, self.block_size, self.dtype, self.ctx.tp_size)
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
        nblocks = [-(-n // self.block_size) for n in lens]
        caches = allocate_kv_caches(self.arch, sum(nblocks), self.block_size, self.dtype, self.device)
        tables, first = [], 0
        for nb in nblocks:
            tables.append(list(range(first, first + nb)) + [0] * (max(nblocks) - nb))
            first += nb
        slots = [tables[i][p // self.block_size] * self.block_size + p % self.block_size
                 for i, n in enumerate(lens) for p in range(n)]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev),
            block_tables=torch.tensor(tables, device=dev),
            seq_lens=torch.tensor(lens, device=dev),
            query_start_loc=torch.tensor([0, *itertools.accumulate(lens)], device=dev),
            query_lens_cpu=lens,
            seq_lens_cpu=lens,
            num_decodes=sum(1 for n in lens if n == 1),
        )
        ids = torch.randint(0, self.arch.vocab_size, (total,), device=dev)
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])
        hidden = self.model(ids, positions, caches, meta)
        rows = min(sched.max_num_seqs, total)
        torch.log_softmax(self.model.compute_logits(hidden[:rows]).float(), dim=-1)  # type: ignore[operator]
        torch.cuda.synchronize(dev)

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the cache; on a GPU also capture the decode graphs (one extra scratch block)."""
        use_graphs = self.device.type == "cuda" and not self.config.model.enforce_eager
        total = num_blocks + 1 if use_graphs else num_blocks
        self.kv_caches = allocate_kv_caches(self.arch, total, self.block_size, self.dtype, self.device)
        if self.spec is not None:
            self.spec.init_kv_cache(total)
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

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Run the plan's tokens through the model and sample where a request is caught up."""
        if plan.num_spec_tokens and self.spec is not None:
            return self.spec.execute(plan)
        self._apply_plan(plan)
        result = StepResult()
        if plan.is_empty:
            return result
        inp = build_step_inputs(plan, self.states, self.block_size, self.device)
        hidden = self._forward(inp)  # [T, hidden]
        pl = inp.prompt_logprobs
        # Before the sampler's logits, so its slices reuse memory the profile run accounted for.
        packed = self._score_prompt(hidden, pl) if pl is not None and pl.target_ids else None
        if not inp.sampling_states:
            if pl is not None:
                # Nobody samples this step: this is its one host sync.
                host = packed.tolist() if packed is not None else []
                result.prompt_logprobs = _unpack_prompt(pl, host)
            return result
        logits = self.model.compute_logits(hidden[inp.logits_indices])  # [num_sampling, vocab]
        out = self.sampler(logits, [s.sampling for s in inp.sampling_states], extra=packed)
        for st, tok, lp in zip(inp.sampling_states, out.token_ids, out.logprobs, strict=True):
            st.token_ids.append(tok)
            st.sampling.output_token_ids.append(tok)
            result.sampled_token_ids[st.request_id] = [tok]
            if lp is not None:
                result.logprobs[st.request_id] = [lp]
        if pl is not None:
            result.prompt_logprobs = _unpack_prompt(pl, out.extra)
        return result

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
