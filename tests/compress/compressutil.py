"""Helpers shared by the compress/ tests (imported as a rootdir module, like serverutil)."""

from __future__ import annotations

from dataclasses import replace

import torch

from turbollm.distributed.parallel import SINGLE
from turbollm.models.arch import PRESETS
from turbollm.models.registry import get_model_class


def tiny_model(preset: str = "tiny-llama", seed: int = 0, **arch_changes: object) -> torch.nn.Module:
    """A float32 tiny preset (fields replaced by `arch_changes`) with random weights,
    random (non-unit) norm weights and random biases."""
    arch = replace(PRESETS[preset], **arch_changes)
    model = get_model_class(arch.architecture)(arch, SINGLE)
    model.init_dummy_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.rand(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                p.mul_(5.0)  # std 0.1: activations of a useful size
    return model.eval()


def random_windows(vocab: int, n: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen) for _ in range(n)]


def correlated_inputs(k: int, t: int, seed: int) -> torch.Tensor:
    """[t, k] inputs with correlated channels and a few large ('salient') ones."""
    gen = torch.Generator().manual_seed(1234)  # the same distribution for every seed
    mix = 0.5 * torch.eye(k) + torch.randn(k, k, generator=gen) / k**0.5
    chan = torch.exp(torch.randn(k, generator=gen))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, k, generator=g) @ mix) * chan
