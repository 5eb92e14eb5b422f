"""Resolve what quantization a model gets, as a QuantPlan that models/build.py consumes.

A QuantPlan bundles the method config, the LinearMethod that every decoder linear receives
and a converter from the checkpoint's tensors to that method's layout (identity for float
checkpoints and our own quantized ones; AutoAWQ / GPTQ repacking for HF 4-bit ones; ggml
Q4_0 / Q4_1 blocks for a GGUF file kept in its quantized form, quant/gguf_formats.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from turbollm.errors import ModelLoadError
from turbollm.layers.linear import LinearMethod
from turbollm.quant import gguf_formats, hf_formats
from turbollm.quant.methods import (
    CHECKPOINT_TAG,
    QuantConfig,
    check_device_support,
    config_from_checkpoint_dict,
    make_config,
)

WeightStream = Iterable[tuple[str, torch.Tensor]]

KEEP_GGUF = "gguf"
"""The `quantization` value that keeps a GGUF file's Q4_0/Q4_1 linears as they are (int4 g32)."""


def _identity(weights: WeightStream) -> Iterator[tuple[str, torch.Tensor]]:
    yield from weights


@dataclass(frozen=True)
class QuantPlan:
    """How to build one quantized model (satisfies models.build.ModelQuantization)."""

    config: QuantConfig
    prequantized: bool
    """True: the checkpoint holds quantized tensors; False: quantize float weights at load."""
    converter: Callable[[WeightStream], Iterator[tuple[str, torch.Tensor]]] = field(default=_identity)
    raw_gguf_types: frozenset[str] = frozenset()
    """GGML types whose decoder-linear weights the loader hands over as blocks (models/gguf.py)."""
    label: str | None = None
    """What `describe` says, when the method and group size alone would not tell (gguf)."""
    keep_dense: tuple[str, ...] = ()
    """Glob patterns of decoder-linear module names that stay dense (quantize-at-load only)."""
    lm_head: bool = False
    """Also quantize the LM head at load with the same method (quantize_lm_head)."""

    @property
    def linear_method(self) -> LinearMethod:
        return self.config.linear_method(self.prequantized)

    @property
    def lm_head_method(self) -> LinearMethod | None:
        """The quantize-at-load method of the LM head, or None to keep it dense. Checkpoints
        (ours, HF, GGUF) store the head dense, so it is always quantized from float (RTN)."""
        return self.config.linear_method(False) if self.lm_head else None

    def convert_weights(self, weights: WeightStream) -> Iterator[tuple[str, torch.Tensor]]:
        return self.converter(weights)

    def describe(self) -> str:
        if self.label is not None:
            return self.label
        text = f"{self.config.name}" + (f" g{self.config.group_size}" if hasattr(self.config, "group_size") else "")
        text += " + LM head" if self.lm_head else ""
        return text + (f" (dense: {','.join(self.keep_dense)})" if self.keep_dense else "")


def _hf_plan(config: QuantConfig, converter: Callable[[WeightStream], Iterator[tuple[str, torch.Tensor]]]) -> QuantPlan:
    return QuantPlan(config, prequantized=True, converter=converter)


_CHECKPOINT_FORMATS: dict[str, Callable[[dict[str, Any]], QuantPlan]] = {
    CHECKPOINT_TAG: lambda d: QuantPlan(config_from_checkpoint_dict(d), prequantized=True,
                                        keep_dense=tuple(d.get("keep_dense", ()))),
    "awq": lambda d: _hf_plan(*hf_formats.awq_plan_parts(d)),
    "gptq": lambda d: _hf_plan(*hf_formats.gptq_plan_parts(d)),
}
"""quantization_config["quant_method"] -> how to build a plan for such a checkpoint."""


def plan_from_checkpoint(qcfg: dict[str, Any], where: str = "checkpoint") -> QuantPlan:
    """The plan for a checkpoint's quantization_config; ModelLoadError if unsupported."""
    tag = qcfg.get("quant_method")
    maker = _CHECKPOINT_FORMATS.get(str(tag))
    if maker is None:
        raise ModelLoadError(
            f"{where}: quantization_config quant_method {tag!r} is not supported; "
            f"supported: {', '.join(_CHECKPOINT_FORMATS)}"
        )
    try:
        return maker(qcfg)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{where}: bad quantization_config: {e}") from e


def resolve_quantization(
    quantization: str | None,
    group_size: int,
    checkpoint_config: dict[str, Any] | None,
    device: torch.device,
    where: str = "checkpoint",
    gguf_linear_types: dict[str, str] | None = None,
    ignore: str | None = None,
    lm_head: bool = False,
) -> QuantPlan | None:
    """The plan for the user's option and the checkpoint, or None for a dense model.

    quantization None (or 'none' for a float checkpoint) keeps a float checkpoint dense and
    a quantized one as it is; a method name quantizes a float checkpoint at load. Asking
    for a different method than a quantized checkpoint has is a ValueError. 'gguf' keeps a
    GGUF file's Q4_0/Q4_1 linears in int4 (gguf_linear_types: the file's decoder-linear
    types, ModelSource.gguf_linear_types()); a GGUF file is dequantized at load by default.
    `ignore` (comma-separated glob patterns over module names) keeps those decoder linears
    dense when quantizing at load; a quantized checkpoint or kept GGUF file decides for itself.
    """
    keep_dense = tuple(p.strip() for p in (ignore or "").split(",") if p.strip())
    if keep_dense and (quantization in (None, "none", KEEP_GGUF) or checkpoint_config is not None):
        raise ValueError(
            f"quantization_ignore={ignore!r} applies when quantizing a float checkpoint at load "
            f"(int8, int4, fp8); {where} with quantization={quantization!r} has no such layers to leave out"
        )
    if quantization == KEEP_GGUF:
        if checkpoint_config is not None:
            raise ValueError(f"quantization='gguf' keeps a GGUF file's Q4_0/Q4_1 weights; {where} is "
                             "a quantized safetensors checkpoint (leave quantization unset)")
        config, kept, label = gguf_formats.gguf_plan_parts(gguf_linear_types, where)
        plan = QuantPlan(config, prequantized=True, converter=gguf_formats.convert_gguf,
                         raw_gguf_types=kept, label=label)
    elif checkpoint_config is not None:
        plan = plan_from_checkpoint(checkpoint_config, where)
        if quantization is not None and quantization != plan.config.name:
            raise ValueError(
                f"{where} is already quantized ({plan.config.name}); quantization={quantization!r} "
                f"cannot apply: leave it unset or pass {plan.config.name!r}"
            )
    elif quantization in (None, "none"):
        if lm_head:
            raise ValueError(f"quantize_lm_head quantizes the LM head like the decoder linears; {where} is "
                             "not quantized: pass a quantization method (int8, int4, fp8) too")
        return None
    else:
        plan = QuantPlan(make_config(quantization, group_size), prequantized=False, keep_dense=keep_dense)
    check_device_support(plan.config, device)
    return dataclasses.replace(plan, lm_head=True) if lm_head else plan
