"""Helpers shared by the quantization tests."""

from __future__ import annotations

import torch
from torch import nn

from turbollm.compress.evaluate import window_hidden


def run_prefill(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of one sequence prefilled from position 0."""
    with torch.inference_mode():
        return model.compute_logits(window_hidden(model, ids))  # type: ignore[operator]
