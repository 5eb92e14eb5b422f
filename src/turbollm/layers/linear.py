"""Tensor-parallel linear layers and their weight loaders.

Weights live on the model's device. Each parameter carries a `weight_loader(param, tensor,
shard_id)` that copies this rank's slice of a full checkpoint tensor into place, so the
model's `load_weights` never needs to know the parallel layout.

Quantization enters from outside: a `LinearMethod` handed to the constructor (built by
quant/, never imported here) creates the layer's weight tensors, converts them once after
loading and runs the matmul. Without one (None) a layer keeps its dense `weight` and the
code path below, unchanged: F.linear, or the oneDNN-packed weight on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from turbollm.distributed.parallel import ParallelContext
from turbollm.layers.activation import SiluAndMul
from turbollm.layers.cpu_gemm import packed_linear, prepack

try:  # the Triton kernels need triton, which CPU-only torch builds lack
    from turbollm.kernels import gemv as gemv_kernels
except ImportError:  # pragma: no cover
    gemv_kernels = None


def _param(shape: tuple[int, ...], loader: object, dtype: torch.dtype | None = None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias): one row on a GPU takes the Triton GEMV (faster
    than cuBLAS for batch-1 decode, kernels/gemv.py), everything else F.linear."""
    if x.is_cuda and x.shape[0] == 1 and x.stride(1) == 1 and gemv_kernels is not None:
        return gemv_kernels.gemv(x, weight, bias)  # [1, N]
    return F.linear(x, weight, bias)  # [M, N]


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Copy a full (unsharded) tensor into a parameter of the same shape."""
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape {tuple(loaded.shape)} != expected {tuple(param.shape)}")
    param.data.copy_(loaded)


def replicated_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
    """A tensor every part of a merged linear ships whole (e.g. an input permutation): the
    first part to arrive copies it, later parts must agree."""
    if param.shape != loaded.shape:
        raise ValueError(f"tensor shape {tuple(loaded.shape)} != expected {tuple(param.shape)}")
    if not getattr(param, "filled", False):
        param.data.copy_(loaded)
        param.filled = True  # type: ignore[attr-defined]
    elif not torch.equal(param.data, loaded.to(param.device)):
        raise ValueError("the parts of a merged linear disagree on a tensor they must share")


class LinearMethod(Protocol):
    """How a linear layer stores its weight and multiplies by it (quant/ implements these).

    `create_weights` registers the tensors a checkpoint provides (through `layer.add_param`);
    `process_weights_after_loading` converts them once (e.g. quantizes a float weight);
    `apply` computes x [T, in] @ W^T (+ bias) -> [T, out]. One object serves every layer.
    Optional, looked up with getattr: `gemv_weight` (the batch-1 GEMV's operand),
    `apply_normed` / `apply_activated` (the norm or SwiGLU before the layer fused into its
    input preparation; None where not applicable), see quant/linear.py.
    """

    def create_weights(self, layer: QuantizableLinear, out_features: int, in_features: int) -> None: ...

    def process_weights_after_loading(self, layer: QuantizableLinear) -> None: ...

    def apply(self, layer: QuantizableLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


class QuantizableLinear(nn.Module):
    """Shared plumbing of the parallel linears: parameter creation for a LinearMethod."""

    quant_method: LinearMethod | None
    num_parts: int

    def row_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        """Loader for a tensor whose dim 0 is this layer's output rows."""
        raise NotImplementedError

    def add_param(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None, per_row: bool = True
    ) -> nn.Parameter:
        """Register a frozen parameter the checkpoint fills: per_row tensors are split over
        output rows like the weight (merged parts by shard id); others are shared whole."""
        p = _param(shape, self.row_loader if per_row else replicated_weight_loader, dtype)
        if self.num_parts > 1:
            p.shard_ids = tuple(range(self.num_parts))  # type: ignore[attr-defined]
        if not per_row:
            p.replicated = True  # type: ignore[attr-defined]
        self.register_parameter(name, p)
        return p

    def gemv_operand(self, x: torch.Tensor) -> gemv_kernels.Weight | None:
        """The weight as the Triton GEMV takes it when x @ W^T runs there (kernels/gemv.py,
        which can also compute x itself: a norm or SwiGLU prologue): one row on a GPU and a
        dense weight of x's dtype or a quantized one the GEMV reads; else None."""
        if not (x.is_cuda and x.shape[0] == 1 and x.stride(-1) == 1 and gemv_kernels is not None
                and self.packed is None):
            return None
        if self.quant_method is not None:
            gemv_weight = getattr(self.quant_method, "gemv_weight", None)
            return None if gemv_weight is None else gemv_weight(self)
        return self.weight if x.dtype == self.weight.dtype else None

    weight_shape: tuple[int, int]
    """Shape of this rank's dense weight [out, in]."""

    def make_dense(self) -> None:
        """Drop the LinearMethod's tensors and give this layer a dense weight to load instead
        (a module a quantized model keeps in full precision, QuantPlan.keep_dense). Call before
        the weights are loaded."""
        for name in [n for n in self._parameters if n != "bias"]:
            delattr(self, name)
        self.quant_method = None
        self.weight = _param(self.weight_shape, self.weight_loader)  # [out, in]
        if self.num_parts > 1:
            self.weight.shard_ids = tuple(range(self.num_parts))  # type: ignore[attr-defined]

    def prepack_cpu(self) -> None:
        """Use a oneDNN-packed copy of the dense weight from now on (CPU, after loading).

        A quantized layer packs its dequantized weight W_hat when its method offers
        `dense_weight` (the CPU fallback: dequantize once, then the fast dense matmul).
        """
        if self.quant_method is None:
            self.packed = prepack(self.weight)
        elif hasattr(self.quant_method, "dense_weight"):
            self.packed = prepack(self.quant_method.dense_weight(self))


class ColumnParallelLinear(QuantizableLinear):
    """y = x W^T + b with W split by output rows over ranks.

    Several logical outputs can be merged into one matmul (q/k/v, gate/up): `output_sizes`
    lists them and checkpoint tensors are loaded into their slice by shard index.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool,
        ctx: ParallelContext,
        quant_method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.quant_method = quant_method
        self.num_parts = len(output_sizes)
        self.local_sizes = [ctx.shard(s, "output size") for s in output_sizes]
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(self.local_sizes))]
        out = sum(self.local_sizes)
        self.weight_shape = (out, input_size)
        if quant_method is None:
            self.weight = _param((out, input_size), self.weight_loader)  # [out / tp, in]
        else:
            quant_method.create_weights(self, out, input_size)
        self.bias = _param((out,), self.weight_loader) if bias else None  # [out / tp]
        self.packed: torch.Tensor | None = None
        """oneDNN-packed weight on CPU (see layers/cpu_gemm.py), else None."""
        if len(output_sizes) > 1:
            # load_weights checks every part of a merged parameter arrived.
            for p in (getattr(self, "weight", None), self.bias):
                if p is not None:
                    p.shard_ids = tuple(range(len(output_sizes)))  # type: ignore[attr-defined]

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        idx = 0 if shard_id is None else shard_id
        size, offset = self.local_sizes[idx], self.offsets[idx]
        if shard_id is None and len(self.local_sizes) > 1:
            raise ValueError("a merged linear needs a shard id for each part")
        if loaded.shape[0] != size * self.ctx.tp_size:
            raise ValueError(
                f"checkpoint tensor has {loaded.shape[0]} output rows, expected {size * self.ctx.tp_size}"
            )
        part = loaded.narrow(0, self.ctx.tp_rank * size, size)
        param.data.narrow(0, offset, size).copy_(part)

    row_loader = weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, self.bias)  # [num_tokens, out / tp]
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)  # [num_tokens, out / tp]
        return dense_linear(x, self.weight, self.bias)  # [num_tokens, out / tp]

    def forward_normed(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(h), s) for (h, s) = norm(x, residual), an RMSNorm (layers/norm.py): at batch 1
        on a GPU one kernel does the add, the norm and the GEMV (no launch, no round trip)."""
        w = self.gemv_operand(x)
        if w is not None and norm.weight.dtype == x.dtype and (residual is None or residual.stride(-1) == 1):
            return gemv_kernels.gemv_rmsnorm(x, residual, norm.weight, norm.eps, w, self.bias)
        fused = getattr(self.quant_method, "apply_normed", None)
        out = None if fused is None else fused(self, x, residual, norm, self.bias)
        if out is not None:
            return out
        h, residual = norm(x, residual)  # [num_tokens, in], [num_tokens, in]
        return self(h), residual


class RowParallelLinear(QuantizableLinear):
    """y = x W^T + b with W split by input columns; partial sums are all-reduced."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, ctx: ParallelContext,
        quant_method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.quant_method = quant_method
        self.num_parts = 1
        self.local_in = ctx.shard(input_size, "input size")
        self.weight_shape = (output_size, self.local_in)
        if quant_method is None:
            self.weight = _param((output_size, self.local_in), self.weight_loader)  # [out, in / tp]
        else:
            if ctx.tp_size != 1:
                raise ValueError("quantized row-parallel linears need tensor-parallel size 1 for now")
            quant_method.create_weights(self, output_size, self.local_in)
        self.bias = _param((output_size,), default_weight_loader) if bias else None
        self.packed: torch.Tensor | None = None
        """oneDNN-packed weight on CPU (see layers/cpu_gemm.py), else None."""

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.shape[1] != self.local_in * self.ctx.tp_size:
            raise ValueError(
                f"checkpoint tensor has {loaded.shape[1]} input columns, "
                f"expected {self.local_in * self.ctx.tp_size}"
            )
        param.data.copy_(loaded.narrow(1, self.ctx.tp_rank * self.local_in, self.local_in))

    def row_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded)  # tensor-parallel size 1: rows are whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            partial = self.quant_method.apply(self, x, None)  # [num_tokens, out]
            y = self.ctx.all_reduce(partial)
            return y if self.bias is None else y + self.bias
        partial = dense_linear(x, self.weight) if self.packed is None else packed_linear(x, self.packed)
        y = self.ctx.all_reduce(partial)  # [num_tokens, out]
        return y if self.bias is None else y + self.bias

    def forward_activated(self, gate_up: torch.Tensor, act: nn.Module) -> torch.Tensor:
        """self(act(gate_up)): at batch 1 on a GPU a SiluAndMul runs inside the GEMV."""
        w = self.gemv_operand(gate_up) if isinstance(act, SiluAndMul) else None
        if w is not None:
            y = self.ctx.all_reduce(gemv_kernels.gemv_silu_mul(gate_up, w))  # [1, out]
            return y if self.bias is None else y + self.bias
        fused = getattr(self.quant_method, "apply_activated", None)
        partial = None if fused is None else fused(self, gate_up, act)  # [num_tokens, out]
        if partial is not None:
            y = self.ctx.all_reduce(partial)
            return y if self.bias is None else y + self.bias
        return self(act(gate_up))  # [num_tokens, out]
