"""The one-copy upload of a step's int lists (worker/inputs.py)."""

from __future__ import annotations

import torch

from turbollm.worker.inputs import _upload


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
