"""Per-request worker state and the tensors of one step.

The model runner keeps one RequestState per live request (host memory) and updates it from
each StepPlan with only what changed. `build_step_inputs` turns the plan into flat tensors:
decodes first (one token each), then prompt chunks, as AttentionMetadata requires.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from turbollm.core.plan import StepPlan
from turbollm.layers.attention import AttentionMetadata
from turbollm.sample.sampler import SamplingState
from turbollm.worker.cuda_graphs import BUCKETS


@dataclass
class RequestState:
    """What the worker remembers about one request between steps (host side)."""

    request_id: str
    token_ids: list[int]
    """Prompt + outputs; the worker appends each token it samples."""
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingState
    num_prompt_tokens: int
    prompt_logprobs: int | None = None
    """Top alternatives per prompt logprob; None when not asked, or when a request resumed
    after preemption already had its prompt reported (its recompute reports nothing)."""
    last_sample_row: int = -1
    """Row of this request in the token tensor of the last step that sampled for it."""


@dataclass
class PromptLogprobsSpan:
    """One request's share of the step's prompt-logprob rows (host side)."""

    request_id: str
    num_rows: int
    """Positions of this chunk whose next token is still in the prompt."""
    k: int
    """Top alternatives asked for."""
    first: bool
    """The chunk starts at position 0: report None for prompt token 0 before the rows."""


@dataclass
class PromptLogprobsInputs:
    """The step's rows that score the next prompt token, for requests with prompt_logprobs."""

    rows: torch.Tensor  # [num_pl_rows] int64 row in the step's tokens of each scored position
    targets: torch.Tensor  # [num_pl_rows] int64 the prompt token that follows each position
    target_ids: list[int]
    """Host copy of targets, in the same order."""
    spans: list[PromptLogprobsSpan]
    """One per asking request, in row order."""
    max_k: int


@dataclass
class StepInputs:
    """Device tensors and host bookkeeping for one forward pass."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_logits] int64 row of each sampling request's last token
    """On CUDA padded with copies of the last row up to `logits_rows(len(sampling_states))`;
    the first len(sampling_states) rows are the sampling requests'."""
    sampling_states: list[RequestState]
    """Requests that sample a token this step, in logits_indices order."""
    prompt_logprobs: PromptLogprobsInputs | None = None
    """None unless a scheduled chunk belongs to a request asking for prompt logprobs."""
    placeholder_rows: torch.Tensor | None = None  # [P] int64 rows of input_ids still unknown
    placeholder_src: torch.Tensor | None = None  # [P] int64 their rows in the last step's tokens
    request_order: list[str] | None = None
    """The scheduled requests in row order (each one's tokens are consecutive rows)."""


_ALIGN = 2
"""int64 elements per 16 bytes: each uploaded tensor starts 16-byte aligned, as a separate
allocation would. Triton specializes kernels on pointer alignment, so a misaligned view of
the shared buffer would mean other kernel variants, compiled in the middle of serving."""


def _upload(lists: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """The lists as int64 tensors on `device`, in one copy: at batch 1 a decode step is ~5 ms
    and each separate small host-to-device copy costs a few microseconds of it. On CUDA the
    copy is staged in pinned memory and does not wait for the stream. Each list starts at a
    16-byte boundary of the buffer (padded with zeros). The host buffer is filled through
    numpy: converting a Python list there is ~3x faster than torch.tensor(list), which
    matters for the block tables of a few hundred sequences."""
    padded = [-(-len(x) // _ALIGN) * _ALIGN or _ALIGN for x in lists]
    buf = np.zeros(sum(padded), dtype=np.int64)  # [sum of padded lengths]
    offset = 0
    for x, n in zip(lists, padded, strict=True):
        if x:
            buf[offset : offset + len(x)] = x
        offset += n
    flat = torch.from_numpy(buf)
    if device.type == "cuda":
        flat = flat.pin_memory()
    parts = flat.to(device, non_blocking=True).split(padded)
    return [p[: len(x)] for p, x in zip(parts, lists, strict=True)]


def logits_rows(num_sampling: int) -> int:
    """Rows the LM head runs on for `num_sampling` sampling requests on a GPU: the next CUDA-graph
    bucket (multiples of 256 above the largest). A new matmul shape can make cuBLAS load a
    kernel module, which waits for the device: a shape per batch size stalled the host for
    tens of ms a step while the batch drained at the end of an offline run. With a few
    shapes, all met at start-up (ModelRunner warms them), the padding rows cost less."""
    bucket = next((b for b in BUCKETS if b >= num_sampling), None)
    return bucket if bucket is not None else -(-num_sampling // 256) * 256


def build_step_inputs(
    plan: StepPlan, states: dict[str, RequestState], block_size: int, device: torch.device
) -> StepInputs:
    """Flatten the plan's scheduled tokens and advance each state's num_computed_tokens."""
    order = sorted(plan.num_scheduled_tokens, key=lambda r: plan.num_scheduled_tokens[r] != 1)
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    logits_idx: list[int] = []
    sampling: list[RequestState] = []
    pl_rows: list[int] = []
    pl_targets: list[int] = []
    pl_spans: list[PromptLogprobsSpan] = []
    ph_rows: list[int] = []
    ph_src: list[int] = []
    for rid in order:
        st, n = states[rid], plan.num_scheduled_tokens[rid]
        start, end = st.num_computed_tokens, st.num_computed_tokens + n
        known = len(st.token_ids)
        if end > known:
            # Overlapped scheduling: the last position's token is still being sampled on the
            # device by the previous step; the runner copies it in there.
            assert end == known + 1 and st.sampling.num_pending == 1, f"{rid}: bad placeholder"
            ph_rows.append(len(input_ids) + n - 1)
            ph_src.append(st.last_sample_row)
        if st.prompt_logprobs is not None and start < st.num_prompt_tokens:
            # Position p scores prompt token p + 1: positions [start, last) of this chunk.
            last = min(end, st.num_prompt_tokens - 1)
            row0 = len(input_ids)
            pl_rows += range(row0, row0 + max(0, last - start))
            pl_targets += st.token_ids[start + 1 : last + 1]
            pl_spans.append(PromptLogprobsSpan(rid, max(0, last - start), st.prompt_logprobs,
                                               start == 0))
        input_ids += st.token_ids[start:end]
        if end > known:
            input_ids.append(0)
        positions += range(start, end)
        blocks = st.block_ids
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]
        query_lens.append(n)
        seq_lens.append(end)
        tables.append(blocks)
        st.num_computed_tokens = end
        if end == known + st.sampling.num_pending:  # the chunk reaches the end: sample next
            logits_idx.append(len(input_ids) - 1)
            sampling.append(st)
    width = max(len(t) for t in tables)
    padded: list[int] = []  # [num_reqs * width] block tables, rows padded with block 0
    for t in tables:
        padded += t
        if len(t) < width:
            padded += [0] * (width - len(t))
    num_decodes = sum(1 for q in query_lens if q == 1)
    if device.type == "cuda" and logits_idx:
        logits_idx += [logits_idx[-1]] * (logits_rows(len(logits_idx)) - len(logits_idx))
    lists = [slots, padded, seq_lens, [0, *itertools.accumulate(query_lens)], input_ids, positions,
             logits_idx, pl_rows, pl_targets, ph_rows, ph_src]
    (slot_t, table_t, seq_t, qsl_t, ids_t, pos_t, logits_t, pl_rows_t, pl_targets_t, ph_rows_t,
     ph_src_t) = _upload(lists, device)
    meta = AttentionMetadata(
        slot_mapping=slot_t,
        block_tables=table_t.view(len(tables), width),
        seq_lens=seq_t,
        query_start_loc=qsl_t,
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        num_decodes=num_decodes,
    )
    prompt_lp = None
    if pl_spans:
        prompt_lp = PromptLogprobsInputs(pl_rows_t, pl_targets_t, pl_targets, pl_spans,
                                         max_k=max(sp.k for sp in pl_spans))
    inputs = StepInputs(ids_t, pos_t, meta, logits_t, sampling, prompt_lp, request_order=order)
    if ph_rows:
        inputs.placeholder_rows, inputs.placeholder_src = ph_rows_t, ph_src_t
    return inputs
