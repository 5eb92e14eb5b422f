"""Fixtures shared by the sampling tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each test once on CPU and once on CUDA (the GPU run skips without one)."""
    torch.manual_seed(0)
    return torch.device(request.param)

