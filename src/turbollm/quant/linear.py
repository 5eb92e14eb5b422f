"""Runtime quantized linears: one LinearMethod per scheme (the handlers of quant/methods.py).

A method object is shared by every decoder linear of a model and holds no tensors; the
tensors live on the layer (its device). Two ways in:
- float checkpoint (prequantized=False): the layer gets a dense `weight`, filled by the
  loader, and `process_weights_after_loading` quantizes it and frees it (on-the-fly).
- quantized checkpoint (prequantized=True): the layer gets the runtime tensors of
  QUANT_CONTRACT.md directly and the loader fills them.
Matmuls: on a GPU the Triton kernels of kernels/quant_matmul.py when that module exists
(one row of int8 / int4 takes the batch-1 GEMV of kernels/gemv.py, like dense weights, so the
model's norm and SwiGLU prologues fuse into it), else the torch fallback of quant/grids.py
(dequantize, then one matmul). On CPU the
fallback dequantizes once after loading: `dense_weight` gives W_hat, which the layer keeps
oneDNN-prepacked (layers/cpu_gemm.py) beside the quantized tensors, so CPU runs have the
quantized model's numerics at the dense model's speed, not its memory savings.
FP8 on GPUs with FP8 (compute capability >= 8.9) runs kernels/fp8_matmul.fp8_linear: a
small-M Triton kernel that reads the FP8 weights directly (decode), else one fused per-token
quantization launch and torch._scaled_mm. After an RMSNorm or SwiGLU (the layers' forward_normed /
forward_activated) that kernel writes the e4m3 activations itself (`apply_normed`,
`apply_activated`: kernels/fp8_fused.py), so the separate quantization launch goes. On CPU it is simulated: weights and per-token
activations are rounded to e4m3 and the product is taken in float32, which gives FP8's
accuracy, not its speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from turbollm.layers.activation import SiluAndMul
from turbollm.layers.cpu_gemm import packed_linear
from turbollm.layers.linear import QuantizableLinear
from turbollm.layers.norm import RMSNorm
from turbollm.quant import grids

try:  # the qkernels helper's fused Triton matmuls (absent on CPU-only builds / until merged)
    from turbollm.kernels import quant_matmul as _kernels  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    _kernels = None
try:  # needs triton (absent on CPU-only torch builds)
    from turbollm.kernels import fp8_fused as _fp8_fused
    from turbollm.kernels import fp8_matmul as _fp8
    from turbollm.kernels import gemv as _gemv
except ImportError:  # pragma: no cover
    _fp8 = None  # type: ignore[assignment]
    _fp8_fused = None  # type: ignore[assignment]
    _gemv = None  # type: ignore[assignment]


def _fused_fp8_route(x: torch.Tensor) -> bool:
    """Whether the norm / SwiGLU before an FP8 linear writes its e4m3 activations itself
    (kernels/fp8_fused.py): on a GPU with triton. Tests patch this to run the route on CPU
    tensors through Triton's interpreter."""
    return _fp8_fused is not None and x.is_cuda


def _replace(layer: nn.Module, name: str, value: torch.Tensor, replicated: bool = False) -> None:
    """Swap a layer's parameter for a frozen one holding `value`."""
    if name in layer._parameters:
        delattr(layer, name)
    p = nn.Parameter(value, requires_grad=False)
    if replicated:
        p.replicated = True  # type: ignore[attr-defined]
    layer.register_parameter(name, p)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # [M, K]


def _packed(layer: QuantizableLinear, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The CPU path: the prepacked W_hat (see the module docstring), or None if not packed."""
    packed = getattr(layer, "packed", None)
    return None if packed is None else packed_linear(x2, packed, bias)  # [M, N]


@dataclass(frozen=True)
class Int8LinearMethod:
    """int8 weight-only, symmetric per output channel: qweight int8 [N, K], scales [N]."""

    prequantized: bool = False

    def create_weights(self, layer: QuantizableLinear, out_features: int, in_features: int) -> None:
        if self.prequantized:
            layer.add_param("qweight", (out_features, in_features), torch.int8)  # [N, K]
            layer.add_param("scales", (out_features,))  # [N] activation dtype
        else:
            layer.add_param("weight", (out_features, in_features))  # [N, K], freed after loading

    def process_weights_after_loading(self, layer: QuantizableLinear) -> None:
        if self.prequantized:
            return
        w = layer.weight  # [N, K]
        q, s = grids.quantize_int8(w, scale_dtype=w.dtype)
        _replace(layer, "qweight", q)
        _replace(layer, "scales", s)
        delattr(layer, "weight")

    def dense_weight(self, layer: QuantizableLinear) -> torch.Tensor:
        """W_hat [N, K] in the scales' dtype."""
        return grids.dequantize_int8(layer.qweight, layer.scales, layer.scales.dtype)

    def gemv_weight(self, layer: QuantizableLinear) -> _gemv.QuantWeight:
        """The layer's weight for the batch-1 GEMV (kernels/gemv.py)."""
        return _gemv.QuantWeight(layer.qweight, layer.scales)

    def apply(self, layer: QuantizableLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = _flat(x)
        y = _packed(layer, x2, bias)
        if y is None and (w := layer.gemv_operand(x2)) is not None:
            y = _gemv.gemv(x2, w, bias)  # [1, N]
        elif y is None and x.is_cuda and _kernels is not None:
            y = _kernels.int8_weight_only_linear(x2, layer.qweight, layer.scales, bias)
        elif y is None:
            y = grids.int8_linear_ref(x2, layer.qweight, layer.scales, bias)
        return y.view(*x.shape[:-1], -1)  # [..., N]


@dataclass(frozen=True)
class Int4LinearMethod:
    """int4 weight-only, asymmetric groups of G input columns: qweight uint8 [N, K // 2],
    scales and zeros [N, K // G]; optional perm [K] (GPTQ act-order: x[:, perm] @ W^T)."""

    group_size: int = 128
    prequantized: bool = False
    has_perm: bool = False

    def create_weights(self, layer: QuantizableLinear, out_features: int, in_features: int) -> None:
        group = grids.group_size_for(in_features, self.group_size)
        if not self.prequantized:
            layer.add_param("weight", (out_features, in_features))  # [N, K], freed after loading
            return
        groups = in_features // group
        layer.add_param("qweight", (out_features, in_features // 2), torch.uint8)  # [N, K/2]
        layer.add_param("scales", (out_features, groups))  # [N, K/G]
        layer.add_param("zeros", (out_features, groups))  # [N, K/G]
        if self.has_perm:
            layer.add_param("perm", (in_features,), torch.int64, per_row=False)  # [K]

    def process_weights_after_loading(self, layer: QuantizableLinear) -> None:
        if self.prequantized:
            _note_integer_zeros(layer)
            return
        w = layer.weight  # [N, K]
        q, s, z = grids.quantize_int4(w, grids.group_size_for(w.shape[1], self.group_size), scale_dtype=w.dtype)
        set_int4_weights(layer, q, s, z)
        delattr(layer, "weight")

    def dense_weight(self, layer: QuantizableLinear) -> torch.Tensor:
        """W_hat [N, K] in the scales' dtype, columns in input order (perm undone)."""
        q = grids.unpack_int4(layer.qweight)  # [N, K] stored column order
        w = grids.dequantize_int4(q, layer.scales, layer.zeros, _group(layer), layer.scales.dtype)
        perm = getattr(layer, "perm", None)
        if perm is None:
            return w
        out = torch.empty_like(w)
        out[:, perm] = w  # x[:, perm] @ w^T == x @ out^T
        return out

    def gemv_weight(self, layer: QuantizableLinear) -> _gemv.QuantWeight | None:
        """The layer's weight for the batch-1 GEMV (kernels/gemv.py); None with an act-order
        permutation, which the GEMV's prologues cannot apply."""
        if getattr(layer, "perm", None) is not None:
            return None
        return _gemv.QuantWeight(layer.qweight, layer.scales, layer.zeros, _group(layer))

    def apply(self, layer: QuantizableLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = _flat(x)
        if (y := _packed(layer, x2, bias)) is not None:
            return y.view(*x.shape[:-1], -1)  # [..., N]
        if (w := layer.gemv_operand(x2)) is not None:
            return _gemv.gemv(x2, w, bias).view(*x.shape[:-1], -1)  # [..., N]
        perm = getattr(layer, "perm", None)
        if perm is not None:
            x2 = x2.index_select(1, perm)  # [M, K] in stored column order
        args = (x2, layer.qweight, layer.scales, layer.zeros, _group(layer), bias)
        if x.is_cuda and _kernels is not None:
            y = _kernels.int4_weight_only_linear(*args, integer_zeros=getattr(layer, "int4_integer_zeros", False))
        else:
            y = grids.int4_linear_ref(*args)
        return y.view(*x.shape[:-1], -1)  # [..., N]


def _group(layer: nn.Module) -> int:
    """The layer's int4 group size, from its shapes: K // (K / G) (see grids.group_size_for)."""
    return 2 * layer.qweight.shape[1] // layer.scales.shape[1]


def set_int4_weights(
    layer: nn.Module, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    perm: torch.Tensor | None = None,
) -> None:
    """Install int4 runtime tensors on a layer: q uint8 [N, K] (unpacked), scales/zeros [N, K/G]."""
    _replace(layer, "qweight", grids.pack_int4(q))
    _replace(layer, "scales", scales)
    _replace(layer, "zeros", zeros)
    if perm is not None:
        _replace(layer, "perm", perm.to(torch.int64), replicated=True)
    _note_integer_zeros(layer)


def _note_integer_zeros(layer: nn.Module) -> None:
    """Record whether the layer's int4 zeros are integers in 0..15 (RTN and HF checkpoints;
    calibrated float-zero ones are not), which lets the tensor-core path skip its correction
    for fractional zeros. Reads the zeros on the host: weight installation only."""
    layer.int4_integer_zeros = _kernels is not None and _kernels.zeros_are_integers(layer.zeros)


@dataclass(frozen=True)
class Fp8LinearMethod:
    """FP8 e4m3 W8A8: weight float8 [N, K], weight_scale float32 [N]; activations per token."""

    prequantized: bool = False

    def create_weights(self, layer: QuantizableLinear, out_features: int, in_features: int) -> None:
        if self.prequantized:
            layer.add_param("weight", (out_features, in_features), torch.float8_e4m3fn)  # [N, K]
            layer.add_param("weight_scale", (out_features,), torch.float32)  # [N]
        else:
            layer.add_param("weight", (out_features, in_features))  # [N, K], replaced after loading

    def process_weights_after_loading(self, layer: QuantizableLinear) -> None:
        if self.prequantized:
            return
        q, s = grids.quantize_fp8(layer.weight)
        _replace(layer, "weight", q)
        _replace(layer, "weight_scale", s)

    def dense_weight(self, layer: QuantizableLinear) -> torch.Tensor:
        """W_hat [N, K] float32 (the e4m3 weights times their scales)."""
        return layer.weight.float() * layer.weight_scale.float()[:, None]

    def apply_normed(
        self, layer: QuantizableLinear, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(layer(h), s) for (h, s) = norm(x, residual) with the RMSNorm writing this layer's
        e4m3 activations and scales in the same kernel (one launch and one bf16 round trip
        fewer; bit-equal to the unfused pair). None where that route does not apply: the
        caller runs the norm, then `apply`."""
        if not (_fused_fp8_route(x) and isinstance(norm, RMSNorm) and norm.weight.dtype == x.dtype
                and x.shape[-1] <= _fp8_fused.MAX_NORM_WIDTH and x.stride(-1) == 1
                and (residual is None or (residual.dtype == x.dtype and residual.stride(-1) == 1))):
            return None
        r2 = None if residual is None else _flat(residual)  # [M, K]
        xq, xs, new_residual = _fp8_fused.add_rmsnorm_quantize_fp8(_flat(x), r2, norm.weight, norm.eps)
        y = _fp8.fp8_linear_quantized(xq, xs, layer.weight, layer.weight_scale.float(), bias, x.dtype)  # [M, N]
        s = x if residual is None else new_residual.view(x.shape)
        return y.view(*x.shape[:-1], -1), s

    def apply_activated(self, layer: QuantizableLinear, gate_up: torch.Tensor, act: nn.Module) -> torch.Tensor | None:
        """layer(act(gate_up)) without bias, with SwiGLU writing the e4m3 activations and
        scales (as `apply_normed`); None where that route does not apply."""
        if not (_fused_fp8_route(gate_up) and isinstance(act, SiluAndMul) and gate_up.stride(-1) == 1):
            return None
        xq, xs = _fp8_fused.silu_mul_quantize_fp8(_flat(gate_up))  # [M, I] e4m3, [M, 1]
        y = _fp8.fp8_linear_quantized(xq, xs, layer.weight, layer.weight_scale.float(), None, gate_up.dtype)
        return y.view(*gate_up.shape[:-1], -1)  # [..., N]

    def apply(self, layer: QuantizableLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = _flat(x)
        if x.is_cuda:
            y = fp8_scaled_mm(x2, layer.weight, layer.weight_scale, bias)
        elif getattr(layer, "packed", None) is not None and x.dtype == torch.float32:
            xq, x_scale = grids.quantize_fp8_per_token(x2)  # simulated W8A8: activations rounded to e4m3
            y = packed_linear(xq.float() * x_scale, layer.packed, bias)
        else:
            y = fp8_linear_simulated(x2, layer.weight, layer.weight_scale, bias)
        return y.view(*x.shape[:-1], -1)  # [..., N]


def fp8_scaled_mm(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """GPU W8A8: x [M, K] quantized per token -> [M, N] (kernels/fp8_matmul.fp8_linear, or
    torch alone where triton is missing)."""
    if _fp8 is not None and x.is_cuda:
        return _fp8.fp8_linear(x.contiguous(), wq, w_scale.float(), bias)
    xq, x_scale = grids.quantize_fp8_per_token(x)  # [M, K], [M, 1]
    y = torch._scaled_mm(
        xq, wq.t(), scale_a=x_scale, scale_b=w_scale.float()[None, :],  # [M, 1], [1, N]
        out_dtype=torch.bfloat16,  # row-wise scaling supports bf16 output only
    )
    y = y.to(x.dtype)
    return y if bias is None else y + bias


def fp8_linear_simulated(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference / CPU: e4m3-rounded activations and weights, product in float32 -> [M, N]."""
    xq, x_scale = grids.quantize_fp8_per_token(x)  # [M, K], [M, 1]
    w = wq.float() * w_scale.float()[:, None]  # [N, K]
    y = torch.nn.functional.linear(xq.float() * x_scale, w).to(x.dtype)
    return y if bias is None else y + bias


def install_int4(layer: QuantizableLinear, method: Int4LinearMethod, result: dict[str, torch.Tensor]) -> None:
    """Turn a dense linear into an int4 one from a calibrated grid (AWQ / GPTQ output).

    result: "scales" and "zeros" [N, K/G]; "q" uint8 [N, K] or else the layer's current
    `weight` is taken as W_hat on that grid (re-quantizing it with the same s, z is
    lossless); optional "perm" [K] when the columns of q/W_hat are in act-order.
    """
    s = result["scales"].to(layer.weight.device, layer.weight.dtype)
    z = result["zeros"].to(layer.weight.device, layer.weight.dtype)
    q = result.get("q")
    if q is None:
        q, _, _ = grids.quantize_int4(layer.weight, method.group_size, scales=s, zeros=z)
    set_int4_weights(layer, q.to(layer.weight.device), s, z, result.get("perm"))
    delattr(layer, "weight")
    layer.packed = None
    layer.quant_method = method


def install_fp8(layer: QuantizableLinear, method: Fp8LinearMethod, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Turn a dense linear into an FP8 one from calibrated codes q float8_e4m3fn [N, K] and
    per-row scales [N] (compress/fp8_calib.py); a CPU layer that was prepacked packs W_hat."""
    if q.dtype != torch.float8_e4m3fn or q.shape != layer.weight.shape or scale.shape != (q.shape[0],):
        raise ValueError(f"FP8 codes must be float8_e4m3fn {tuple(layer.weight.shape)} with "
                         f"[{layer.weight.shape[0]}] scales; got {q.dtype} {tuple(q.shape)}, {tuple(scale.shape)}")
    was_packed = getattr(layer, "packed", None) is not None
    dev = layer.weight.device
    _replace(layer, "weight", q.to(dev))
    _replace(layer, "weight_scale", scale.to(dev, torch.float32))
    layer.quant_method = method
    layer.packed = None
    if was_packed:
        layer.prepack_cpu()
