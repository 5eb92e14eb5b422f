"""Quantization methods: a config class per method plus its registered handler.

A method config (frozen dataclass) says what a quantized model is: `int8`, `int4` (group
size, act-order) or `fp8`. Its handler is the LinearMethod class of quant/linear.py that
stores and multiplies the weights; `METHODS` maps the user-facing name to the config class
and `HANDLERS` maps each config class to its handler. Adding a method = one config class +
one handler + one line in each registry.

Configs also (de)serialize the `quantization_config` that quantized checkpoints carry in
config.json: ours ("quant_method": "turbollm"); HF AutoAWQ / GPTQ ones are read by
quant/hf_formats.py into an Int4Config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from turbollm.layers.linear import LinearMethod
from turbollm.quant import grids
from turbollm.quant.linear import Fp8LinearMethod, Int4LinearMethod, Int8LinearMethod

CHECKPOINT_TAG = "turbollm"
"""quantization_config["quant_method"] of checkpoints written by `turbollm quantize`."""


@dataclass(frozen=True)
class Int8Config:
    """Weight-only int8, symmetric, one scale per output channel."""

    name: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8

    def linear_method(self, prequantized: bool) -> LinearMethod:
        return Int8LinearMethod(prequantized=prequantized)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "bits": self.bits}


@dataclass(frozen=True)
class Int4Config:
    """Weight-only int4, asymmetric, one scale and zero point per group of input columns."""

    group_size: int = 128
    act_order: bool = False
    """Stored columns are permuted (GPTQ activation order): the layers carry a `perm`."""
    calibration: str = "rtn"
    """How the grid was chosen (rtn | awq | gptq | hf-awq | hf-gptq | gguf); informational."""
    name: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4

    def __post_init__(self) -> None:
        if self.group_size not in grids.INT4_GROUP_SIZES:
            raise ValueError(
                f"group_size must be one of {', '.join(map(str, grids.INT4_GROUP_SIZES))}; got {self.group_size}"
            )

    def linear_method(self, prequantized: bool) -> LinearMethod:
        return Int4LinearMethod(self.group_size, prequantized, has_perm=prequantized and self.act_order)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "bits": self.bits, "group_size": self.group_size,
                "act_order": self.act_order, "calibration": self.calibration}


@dataclass(frozen=True)
class Fp8Config:
    """FP8 e4m3 W8A8: per-channel weight scales, dynamic per-token activation scales."""

    calibration: str = "rtn"
    """How the weights were chosen (rtn: amax / 448 and rounding; or what compress/fp8_calib.py
    did, e.g. 'gptq+search'); informational, the runtime is the same."""
    name: ClassVar[str] = "fp8"
    bits: ClassVar[int] = 8

    def linear_method(self, prequantized: bool) -> LinearMethod:
        return Fp8LinearMethod(prequantized=prequantized)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "bits": self.bits, "activations": "per-token dynamic",
                "calibration": self.calibration}


QuantConfig = Int8Config | Int4Config | Fp8Config

METHODS: dict[str, type[QuantConfig]] = {"int8": Int8Config, "int4": Int4Config, "fp8": Fp8Config}
"""User-facing method name -> config class."""
HANDLERS: dict[type[QuantConfig], type] = {
    Int8Config: Int8LinearMethod, Int4Config: Int4LinearMethod, Fp8Config: Fp8LinearMethod,
}
"""Config class -> the LinearMethod class that runs it (what `linear_method` builds)."""


def make_config(method: str, group_size: int = 128, **extra: Any) -> QuantConfig:
    """The config of a named method; ValueError naming the bad value otherwise."""
    cls = METHODS.get(method)
    if cls is None:
        raise ValueError(f"quantization must be one of none, {', '.join(METHODS)}; got {method!r}")
    if cls is Int4Config:
        return Int4Config(group_size=group_size, **extra)
    return cls()


def config_from_checkpoint_dict(d: dict[str, Any]) -> QuantConfig:
    """Our own quantization_config (as `to_dict` + quant_method wrote it) -> config."""
    method = d.get("method")
    if method == "int4":
        return Int4Config(int(d.get("group_size", 128)), bool(d.get("act_order", False)),
                          str(d.get("calibration", "rtn")))
    if method == "fp8":
        return Fp8Config(str(d.get("calibration", "rtn")))
    return make_config(str(method))


def check_device_support(config: QuantConfig, device: torch.device) -> None:
    """ValueError when the device cannot run the method (FP8 needs compute capability 8.9+)."""
    if isinstance(config, Fp8Config) and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            name = torch.cuda.get_device_name(device)
            raise ValueError(
                f"quantization 'fp8' needs a GPU with FP8 support (compute capability >= 8.9, e.g. "
                f"Ada or Hopper); {name} has {cap[0]}.{cap[1]}"
            )


def method_for_cli(method: str, bits: int, group_size: int) -> QuantConfig:
    """`turbollm quantize --method M --bits B --group-size G` -> the config it produces."""
    allowed = {"rtn": (4, 8), "awq": (4,), "gptq": (4,), "fp8": (8,)}
    if method not in allowed:
        raise ValueError(f"--method must be one of {', '.join(allowed)}; got {method!r}")
    if bits not in allowed[method]:
        raise ValueError(
            f"--bits {bits} is not supported by --method {method}; use {' or '.join(map(str, allowed[method]))}"
        )
    if method == "fp8":
        return Fp8Config()
    if bits == 8:
        return Int8Config()
    return Int4Config(group_size=group_size, calibration=method)
