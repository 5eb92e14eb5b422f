"""Build a model on a device from a ModelSource: construct, load (or dummy-init), convert.

The one place a model comes to life, shared by the worker (serving) and compress/ (offline
evaluation and quantization). Quantization is passed in as a `ModelQuantization`, an object
quant/ builds: models/ never imports quant/ (DESIGN.md layers), it only calls the protocol.
The returned model lives on `device` in eval mode; its weights are the only copy (the
checkpoint is streamed tensor by tensor).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
from torch import nn

from turbollm.distributed.parallel import SINGLE, ParallelContext
from turbollm.errors import ModelLoadError
from turbollm.layers.cpu_gemm import prepack_cpu_linears
from turbollm.layers.embedding import ParallelLMHead
from turbollm.layers.linear import LinearMethod, QuantizableLinear
from turbollm.models.loader import ModelSource
from turbollm.models.registry import get_model_class


class ModelQuantization(Protocol):
    """What building a quantized model needs from quant/ (see quant/plan.py)."""

    linear_method: LinearMethod
    raw_gguf_types: frozenset[str]
    """GGML types (e.g. 'Q4_1') whose decoder-linear weights `convert_weights` takes as ggml
    blocks from a GGUF file (ModelSource.iter_weights); empty: everything dequantized."""
    keep_dense: tuple[str, ...]
    """Glob patterns of decoder-linear module names built dense instead (keep_dense_linears)."""
    lm_head_method: LinearMethod | None
    """Quantizes the LM head after loading (ParallelLMHead.quantize), or None: it stays dense."""

    def convert_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors -> tensors in the layout `linear_method` registered."""
        ...


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; a named cuda device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA GPU is available")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on GPU, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily make `dtype` torch's default floating dtype (new parameters take it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    quantization: ModelQuantization | None = None,
    ctx: ParallelContext = SINGLE,
    prepack_cpu: bool = True,
) -> nn.Module:
    """The source's model on `device` in `dtype`, weights loaded (dummy: seeded random),
    quantized layers converted, dense CPU linears oneDNN-prepacked; in eval mode.

    Raises ModelLoadError when the checkpoint's tensors do not fit the model.
    """
    cls = get_model_class(source.arch.architecture)
    qm = quantization.linear_method if quantization is not None else None
    with default_dtype(dtype), torch.device(device):
        model = cls(source.arch, ctx, qm) if qm is not None else cls(source.arch, ctx)
        if quantization is not None and quantization.keep_dense:
            keep_dense_linears(model, quantization.keep_dense)
    if source.kind == "dummy":
        model.init_dummy_weights(seed)  # type: ignore[operator]
    else:
        raw = quantization.raw_gguf_types if quantization is not None else frozenset()
        weights: Iterable[tuple[str, torch.Tensor]] = source.iter_weights(raw)
        if quantization is not None:
            weights = quantization.convert_weights(weights)
        try:
            model.load_weights(weights)  # type: ignore[operator]
        except (KeyError, ValueError) as e:
            raise ModelLoadError(f"{source.path}: weights do not fit the model: {e}") from e
    process_weights_after_loading(model)
    head_method = quantization.lm_head_method if quantization is not None else None
    if head_method is not None:
        head = getattr(model, "lm_head", None)
        if not isinstance(head, ParallelLMHead):
            raise ValueError(f"{type(model).__name__} has no LM head to quantize (quantize_lm_head)")
        head.quantize(head_method, tied=source.arch.tie_word_embeddings)
    if device.type == "cpu" and prepack_cpu:
        prepack_cpu_linears(model)
    return model.eval()


def keep_dense_linears(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Turn the quantized linears whose module names match a glob pattern back into dense
    ones (before loading); returns their names. ValueError for a pattern matching none."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantizableLinear) and m.quant_method is not None}
    kept = []
    for pattern in patterns:
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            example = next(iter(linears), "model.layers.0.self_attn.qkv_proj")
            raise ValueError(f"quantization_ignore pattern {pattern!r} matches no quantized linear "
                             f"(names look like {example!r}; q/k/v and gate/up are merged)")
        kept += hits
    for name in dict.fromkeys(kept):
        linears[name].make_dense()
    return list(dict.fromkeys(kept))


@torch.no_grad()
def process_weights_after_loading(model: nn.Module) -> int:
    """Let each quantized linear's method convert its loaded weights; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, QuantizableLinear) and m.quant_method is not None]
    for m in layers:
        m.quant_method.process_weights_after_loading(m)  # type: ignore[union-attr]
    return len(layers)
