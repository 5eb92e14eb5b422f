"""Tensor-parallel linear layers and their weight loaders.

Weights live on the model's device. Each parameter carries a `weight_loader(param, tensor,
shard_id)` that copies this rank's slice of a full checkpoint tensor into place, so the
model's `load_weights` never needs to know the parallel layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from turbollm.distributed.parallel import ParallelContext
from turbollm.layers.cpu_gemm import packed_linear, prepack

try:  # the Triton kernels need triton, which CPU-only torch builds lack
    from turbollm.kernels import gemv as gemv_kernels
except ImportError:  # pragma: no cover
    gemv_kernels = None


def _param(shape: tuple[int, ...], loader: object) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape), requires_grad=False)
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


class ColumnParallelLinear(nn.Module):
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
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.local_sizes = [ctx.shard(s, "output size") for s in output_sizes]
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(self.local_sizes))]
        out = sum(self.local_sizes)
        self.weight = _param((out, input_size), self.weight_loader)  # [out / tp, in]
        self.bias = _param((out,), self.weight_loader) if bias else None  # [out / tp]
        self.packed: torch.Tensor | None = None
        """oneDNN-packed weight on CPU (see layers/cpu_gemm.py), else None."""
        if len(output_sizes) > 1:
            # load_weights checks every part of a merged parameter arrived.
            for p in (self.weight, self.bias):
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

    def prepack_cpu(self) -> None:
        """Use a oneDNN-packed copy of the weight from now on (CPU only, after loading)."""
        self.packed = prepack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)  # [num_tokens, out / tp]
        return dense_linear(x, self.weight, self.bias)  # [num_tokens, out / tp]


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.local_in = ctx.shard(input_size, "input size")
        self.weight = _param((output_size, self.local_in), self.weight_loader)  # [out, in / tp]
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

    def prepack_cpu(self) -> None:
        """Use a oneDNN-packed copy of the weight from now on (CPU only, after loading)."""
        self.packed = prepack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = dense_linear(x, self.weight) if self.packed is None else packed_linear(x, self.packed)
        y = self.ctx.all_reduce(partial)  # [num_tokens, out]
        return y if self.bias is None else y + self.bias
