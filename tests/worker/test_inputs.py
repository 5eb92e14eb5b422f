"""The one-copy upload of a step's int lists (worker/inputs.py)."""

from __future__ import annotations

import pytest
import torch

from turbollm.core.plan import StepPlan
from turbollm.worker.cuda_graphs import BUCKETS
from turbollm.worker.inputs import _upload, build_step_inputs, logits_rows


def test_upload_values_and_alignment() -> None:
    lists = [[3, 1, 4], [], [1, 5, 9, 2, 6], [5], list(range(17))]
    out = _upload(lists, torch.device("cpu"))
    assert [t.tolist() for t in out] == lists
    for t in out:
        assert t.dtype == torch.int64 and t.is_contiguous()
        # Kernels are specialized on 16-byte pointer alignment: every part keeps it.
        assert t.data_ptr() % 16 == 0
    # One buffer behind every part.
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1


def test_logits_rows_are_few_shapes_covering_every_count() -> None:
    rows = [logits_rows(n) for n in range(1, 2049)]
    assert all(r >= n for n, r in zip(range(1, 2049), rows))
    assert rows == sorted(rows)  # more requests never fewer rows
    assert set(rows) <= set(BUCKETS) | {256 * i for i in range(1, 9)}
    assert [logits_rows(n) for n in (1, 3, 5, 500, 512, 513)] == [1, 4, 8, 512, 512, 768]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_step_pads_logits_rows_with_the_last_row() -> None:
    from turbollm.sample.sampler import SamplingState
    from turbollm.sampling_params import SamplingParams
    from turbollm.worker.inputs import RequestState

    states = {}
    for i in range(5):  # five decoding requests: the LM head runs on 8 rows
        toks = [7] * (3 + i)
        states[f"r{i}"] = RequestState(f"r{i}", toks, [i], len(toks) - 1,
                                       SamplingState(SamplingParams(), toks, [], frozenset(), None), len(toks))
    plan = StepPlan(num_scheduled_tokens={f"r{i}": 1 for i in range(5)})
    inp = build_step_inputs(plan, states, 16, torch.device("cuda"))
    assert len(inp.sampling_states) == 5
    assert inp.logits_indices.tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
