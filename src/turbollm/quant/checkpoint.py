"""Write a quantized model as an HF-style checkpoint directory that `LLM(model=DIR)` loads.

Layout: model.safetensors (HF parameter names; quantized linears hold their runtime
tensors, e.g. `model.layers.0.self_attn.q_proj.qweight`), config.json (the architecture's
HF config plus `quantization_config` = {"quant_method": "turbollm", ...the method's
fields}), generation_config.json and the tokenizer files. Loading reads the tensors into
layers built for the same method (prequantized), so logits are identical to the model that
was saved when the dtype is the same.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from turbollm.layers.linear import QuantizableLinear
from turbollm.quant.methods import CHECKPOINT_TAG, QuantConfig


def quantization_config_dict(config: QuantConfig, keep_dense: list[str] | None = None) -> dict[str, Any]:
    """The `quantization_config` entry written to config.json; keep_dense: the decoder
    linears saved dense (quantization_ignore), by module name."""
    extra = {"keep_dense": keep_dense} if keep_dense else {}
    return {"quant_method": CHECKPOINT_TAG, **config.to_dict(), **extra}


def save_quantized(
    model: nn.Module, config: QuantConfig | None, out_dir: str, hf_config: dict[str, Any],
    generation: dict[str, Any] | None = None, tokenizer: Any = None,
) -> list[str]:
    """Write the checkpoint; returns the files written. `model` must have `hf_state_dict`.
    config None: a dense checkpoint (no quantization_config; e.g. only FP8 KV-cache scales)."""
    os.makedirs(out_dir, exist_ok=True)
    # clone: split views of merged parameters share storage, which safetensors refuses.
    tensors = {name: t.detach().to("cpu").contiguous().clone()
               for name, t in model.hf_state_dict()}  # type: ignore[operator]
    dtype = next((t.dtype for n, t in tensors.items() if n.endswith("norm.weight")), torch.float32)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = {**hf_config, "torch_dtype": str(dtype).removeprefix("torch.")}
    if config is not None:
        dense = [n for n, m in model.named_modules() if isinstance(m, QuantizableLinear) and m.quant_method is None]
        cfg["quantization_config"] = quantization_config_dict(config, dense)
    written = ["model.safetensors", "config.json"]
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    if generation:
        with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation, f, indent=2)
        written.append("generation_config.json")
    if tokenizer is not None:
        written += [os.path.basename(p) for p in tokenizer.save_pretrained(out_dir)]
    return written
