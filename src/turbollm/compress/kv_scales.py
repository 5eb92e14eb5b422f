"""Per-layer FP8 KV-cache scales calibrated on text (offline; compress/).

An FP8 cache stores e4m3(k / k_scale) and e4m3(v / v_scale) per attention layer
(layers/attention.py). Calibration pushes windows of the calibration part of the
Shakespeare corpus (never the held-out part) through the float model with a float cache,
reads back what each layer wrote (k after rotary, and after the Hadamard rotation where the
layer applies it to an FP8 cache; v) and takes the largest magnitude:
scale = amax * margin / FP8_MAX, so the largest calibration value lands at 448 / margin
and a held-out value up to `margin` times larger still does not saturate. e4m3 is a float
format: below the top, a scale only moves where the subnormal range (|x / scale| < 2^-6)
begins, so a margin costs little.

`KVScales` (host floats, one pair per layer) is what calibration returns, what
`apply_kv_scales` installs into a built model, and what `turbollm quantize
--kv-cache-scales` writes into a checkpoint (as `model.layers.N.self_attn.k_scale` /
`v_scale`, the names vLLM and llm-compressor use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from turbollm.compress.evaluate import BLOCK_SIZE, single_sequence_meta
from turbollm.kernels.rope_cache import FP8_MAX, rotate_heads
from turbollm.layers.attention import attention_layers

DEFAULT_MARGIN = 2.0
"""Headroom over the calibration amax (one binade: costs one binade of subnormals at the bottom)."""
DEFAULT_CALIB = (16, 512)
"""(windows, tokens per window) of the calibration split."""


@dataclass(frozen=True)
class KVScales:
    """Per-layer FP8 KV-cache dequantization scales (host floats, layer order)."""

    k: tuple[float, ...]
    v: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.k) != len(self.v):
            raise ValueError(f"{len(self.k)} k scales but {len(self.v)} v scales")


@torch.inference_mode()
def kv_amax(model: nn.Module, windows: list[list[int]] | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest |k| and |v| each layer writes to its cache over the windows, per kv head:
    (k_amax, v_amax), each [layers, KV] float32 on the CPU. The cache is the model's dtype;
    k is measured as an FP8 cache would store it (times the Hadamard matrix where the layer
    rotates q and k)."""
    arch = model.arch  # type: ignore[union-attr]
    dev = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    layers, kv_heads, head_dim = arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim
    amax = torch.zeros(2, layers, kv_heads)  # [k | v, layers, KV]
    attns = attention_layers(model)
    for ids in windows:
        ids_t = torch.as_tensor(ids, device=dev)  # [n]
        n = ids_t.numel()
        nblocks = -(-n // BLOCK_SIZE)
        caches = [torch.zeros(2, nblocks, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype, device=dev)
                  for _ in range(layers)]
        model(ids_t, torch.arange(n, device=dev), caches, single_sequence_meta(n, dev))
        for i, (c, attn) in enumerate(zip(caches, attns, strict=True)):
            written = c.view(2, nblocks * BLOCK_SIZE, kv_heads, head_dim)[:, :n].float()  # [2, n, KV, D]
            k = rotate_heads(written[0], head_dim) if attn.rotate_qk else written[0]  # as an FP8 cache stores it
            amax[0, i] = torch.maximum(amax[0, i], k.abs().amax(dim=(0, 2)).cpu())
            amax[1, i] = torch.maximum(amax[1, i], written[1].abs().amax(dim=(0, 2)).cpu())
    return amax[0], amax[1]


def scales_from_amax(k_amax: torch.Tensor, v_amax: torch.Tensor, margin: float = DEFAULT_MARGIN) -> KVScales:
    """Per-layer scales amax * margin / FP8_MAX from [layers] or [layers, KV] amax (max over heads)."""
    if margin < 1.0:
        raise ValueError(f"margin must be >= 1 (values above the calibration amax saturate), got {margin}")

    def per_layer(a: torch.Tensor) -> tuple[float, ...]:
        a = a.reshape(a.shape[0], -1).amax(dim=1)  # [layers]
        # A layer that wrote only zeros keeps scale 1 (any scale stores zeros exactly). fp32
        # values: a checkpoint stores them as float32 tensors, so they reload unchanged.
        s = torch.where(a > 0, a * margin / FP8_MAX, torch.ones_like(a)).float()
        return tuple(s.tolist())

    return KVScales(per_layer(k_amax), per_layer(v_amax))


def calibrate_kv_scales(
    model: nn.Module, windows: list[list[int]] | list[torch.Tensor], margin: float = DEFAULT_MARGIN,
) -> KVScales:
    """Per-layer FP8 KV-cache scales from the amax over `windows` (see the module docstring)."""
    if not windows:
        raise ValueError("calibrating KV scales needs at least one window")
    return scales_from_amax(*kv_amax(model, windows), margin=margin)


def apply_kv_scales(model: nn.Module, scales: KVScales) -> None:
    """Install per-layer scales into the model's attention layers (used with an FP8 cache)."""
    layers = attention_layers(model)
    if len(layers) != len(scales.k):
        raise ValueError(f"{len(scales.k)} layer scales for a model of {len(layers)} attention layers")
    for attn, k, v in zip(layers, scales.k, scales.v, strict=True):
        attn.set_kv_scales(k, v)


def model_kv_scales(model: nn.Module) -> KVScales:
    """The scales a model's attention layers hold now."""
    layers = attention_layers(model)
    return KVScales(tuple(a.k_scale for a in layers), tuple(a.v_scale for a in layers))
