"""Weight-only int8 / int4 matmuls with fused dequantization: Triton kernels, launchers,
torch references, int4 packing.

Storage (docs: /work/brief/QUANT_CONTRACT.md, "Runtime storage"). W is [N, K] as in nn.Linear.
- int8: `qweight` int8 [N, K], `scales` [N]; W_hat[n, k] = qweight[n, k] * scales[n].
- int4: `qweight` uint8 [N, K // 2] (column k even -> low nibble, k odd -> high nibble),
  `scales`, `zeros` [N, K // G] (zeros hold the zero point as a float: an integer on
  AutoAWQ / GPTQ grids, any value on a free-offset grid);
  W_hat[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G].
Every launcher computes `x @ W_hat.T + bias` with fp32 accumulation and returns x's dtype.

Three paths per format, picked by `QuantMatmulConfig.path` (defaults: `pick_config`, tuned on
an H100; kernels in _quant_matmul_kernels.py):
- "gemv" (decode, M = 1 by default): no tensor cores. Program (n block, m block, k split)
  streams a [BLOCK_N, BLOCK_K] slab of packed weights with 16-byte row-contiguous loads,
  converts it in registers and reduces it against each of its BLOCK_M rows of x in fp32.
  int4 folds the group affine into the reduction: sum_k (q - z) s x = s (sum_k q x - z sum_k x)
  per group, so the per-element work is one multiply-add.
- "dot" (2 <= M < 512): a tiled tl.dot. The [BLOCK_N, BLOCK_K] weight tile is dequantized to
  the activation dtype in registers (int4: one scale / zero per row, since BLOCK_K divides G)
  and multiplied on the tensor cores; fp32 x uses IEEE fp32 (no tf32). `swap_ab` computes
  the transposed tile W x^T so the weights are the register operand (better for M <= 64).
- "dequant" (M >= 512): a Triton pass writes W_hat in x's dtype to an [N, K] workspace, then
  one dense matmul (cuBLAS); the workspace round trip costs less than dequantizing every
  weight tile once per row block of a long prefill.
"gemv" and "dot" may split K over SPLIT_K programs: each writes an fp32 partial
[SPLIT_K, M, N] and a second kernel sums the splits in a fixed order (deterministic, no
atomics), adds the bias and casts. Grids and allocations depend only on shapes, never on
device values, so every launch can be captured in a CUDA graph (the partial buffer and the
"dequant" workspace then come from the graph's pool).
On CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1 set before
import); the `_ref` functions run anywhere.
"""

from __future__ import annotations

import torch

try:
    import triton
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]

from turbollm.kernels._interpreter import emulate_bf16_rounding
from turbollm.kernels._pdl import pdl_kwargs
from turbollm.kernels.quant_matmul_config import DEQUANT_MODES, QuantMatmulConfig, check_config, pick_config

if triton is not None:
    from turbollm.kernels import _quant_matmul_kernels as _k

HAS_TRITON = triton is not None
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REDUCE_BLOCK = 1024  # output columns per program of the split-K reduction

# ---------------------------------------------------------------------------------------------
# Argument checks (shared by the kernels and the references)


def _check_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
                  device: torch.device, contiguous: bool = True) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} is not {list(shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} dtype {t.dtype} is not one of {dtypes}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x is on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def check_x(x: torch.Tensor) -> tuple[int, int]:
    """(M, K) of an activation matrix x [M, K] in a float dtype with a contiguous last dim
    (also the FP8 kernels' check); ValueError naming the problem otherwise."""
    if x.dim() != 2:
        raise ValueError(f"x shape {tuple(x.shape)} is not [M, K]")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {_DTYPES}")
    if x.numel() and x.stride(-1) != 1:
        raise ValueError(f"x needs a contiguous last dimension, got strides {x.stride()}")
    return x.shape[0], x.shape[1]


def _check_bias(bias: torch.Tensor | None, n: int, device: torch.device) -> None:
    if bias is not None:
        _check_tensor("bias", bias, (n,), _DTYPES, device)


def check_int8_weight(qweight: torch.Tensor, scales: torch.Tensor, k: int, device: torch.device) -> int:
    """N of an int8 weight for K = k input columns on `device`; ValueError naming the problem."""
    if qweight.dim() != 2:
        raise ValueError(f"qweight shape {tuple(qweight.shape)} is not [N, K]")
    n = qweight.shape[0]
    _check_tensor("qweight", qweight, (n, k), (torch.int8,), device)
    _check_tensor("scales", scales, (n,), _DTYPES, device)
    return n


def check_int4_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      k: int, device: torch.device) -> int:
    """N of an int4 weight for K = k input columns on `device`; ValueError naming the problem."""
    if not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide K = {k}")
    if qweight.dim() != 2:
        raise ValueError(f"qweight shape {tuple(qweight.shape)} is not [N, K // 2]")
    n = qweight.shape[0]
    _check_tensor("qweight", qweight, (n, k // 2), (torch.uint8,), device)
    _check_tensor("scales", scales, (n, k // group_size), _DTYPES, device)
    _check_tensor("zeros", zeros, (n, k // group_size), _DTYPES, device)
    return n


def _check_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[int, int, int]:
    m, k = check_x(x)
    n = check_int8_weight(qweight, scales, k, x.device)
    _check_bias(bias, n, x.device)
    return m, n, k


def _check_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, bias: torch.Tensor | None) -> tuple[int, int, int]:
    m, k = check_x(x)
    n = check_int4_weight(qweight, scales, zeros, group_size, k, x.device)
    _check_bias(bias, n, x.device)
    return m, n, k


def _check_runtime(x: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("the quantized matmul kernels need triton; use the *_ref functions instead")
    if x.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"x is on {x.device}: Triton kernels need CUDA, or TRITON_INTERPRET=1 set before import")


# ---------------------------------------------------------------------------------------------
# Launchers


def _finish(part: torch.Tensor | None, out: torch.Tensor, bias: torch.Tensor | None, split_k: int) -> None:
    """Second pass of a split-K launch: sum the fp32 partials, add the bias, cast."""
    if part is None:
        return
    m, n = out.shape
    _k.splitk_reduce_kernel[(m, triton.cdiv(n, _REDUCE_BLOCK))](
        part, bias if bias is not None else part, out, m, n, out.stride(0),
        SPLIT_K=split_k, BLOCK_N=_REDUCE_BLOCK, HAS_BIAS=bias is not None,
        ROUND_OUT=emulate_bf16_rounding(out.dtype), num_warps=4, **pdl_kwargs(out.device),
    )


def _dense(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Second pass of the "dequant" path: the dense matmul (cuBLAS on the GPU, fp32 accumulation)."""
    return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)  # [M, N]


def _outputs(x: torch.Tensor, n: int, split_k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)  # [M, N]
    part = None
    if split_k > 1:
        part = torch.empty(split_k, x.shape[0], n, dtype=torch.float32, device=x.device)  # [S, M, N]
    return out, part


def _common_kwargs(cfg: QuantMatmulConfig, x: torch.Tensor, bias: torch.Tensor | None) -> dict[str, object]:
    return dict(SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None and cfg.split_k == 1,
                ROUND_OUT=emulate_bf16_rounding(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **pdl_kwargs(x.device))


def _upcast(x: torch.Tensor) -> bool:
    """The interpreter multiplies bf16 dot operands as their raw uint16 bits (Triton 3.6):
    there, and only there, the dot kernels upcast both operands to fp32 (see paged_attention)."""
    return emulate_bf16_rounding(x.dtype)


def _dot_kwargs(x: torch.Tensor) -> dict[str, object]:
    # fp32 activations must not silently drop to tf32 (the references are exact fp32).
    exact = x.dtype == torch.float32 or _upcast(x)
    return dict(DOT_PREC="ieee" if exact else "tf32", UPCAST=_upcast(x))


# "magic_act" bit patterns: OR-ing q < 16 into them gives base + q in the activation dtype.
_MAGIC_ACT = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


def _int4_dot_dequant(cfg: QuantMatmulConfig, x: torch.Tensor, integer_zeros: bool) -> dict[str, object]:
    deq = DEQUANT_MODES[cfg.dequant]
    if deq == 2 and (x.dtype not in _MAGIC_ACT or _upcast(x)):
        deq = 1  # the tile is dequantized in fp32 anyway
    bits, base = _MAGIC_ACT[x.dtype] if deq == 2 else (0, 0.0)
    return dict(DEQ=deq, MAGIC_BITS=bits, MAGIC_BASE=base, ROUND_W=emulate_bf16_rounding(x.dtype),
                FRAC_Z=not integer_zeros)


def _int8_launch(cfg: QuantMatmulConfig, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    deq = min(DEQUANT_MODES[cfg.dequant], 1)  # int8 has no activation-dtype trick
    if cfg.path == "dequant":
        w = torch.empty(n, k, dtype=x.dtype, device=x.device)  # [N, K] W_hat
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k))
        _k.int8_dequant_kernel[grid](qweight, scales, w, n, k, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DEQ=deq,
                                     ROUND_W=emulate_bf16_rounding(x.dtype), num_warps=cfg.num_warps)
        return _dense(x, w, bias)
    out, part = _outputs(x, n, cfg.split_k)
    b = bias if bias is not None else scales  # unused pointer when HAS_BIAS is False
    args = (x, qweight, scales, b, out, part if part is not None else out, m, n, k, x.stride(0), out.stride(0),
            cfg.k_per_split(k))
    if cfg.path == "gemv":
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
        _k.int8_gemv_kernel[grid](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                  DEQ=deq, PREFETCH=cfg.prefetch, **_common_kwargs(cfg, x, bias))
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
        _k.int8_dot_kernel[grid](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                 GROUP_M=cfg.group_m, DEQ=deq, SWAP=cfg.swap_ab, **_dot_kwargs(x),
                                 **_common_kwargs(cfg, x, bias))
    _finish(part, out, bias, cfg.split_k)
    return out


def _int4_launch(cfg: QuantMatmulConfig, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None, integer_zeros: bool) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    if cfg.path == "dequant":
        w = torch.empty(n, k, dtype=x.dtype, device=x.device)  # [N, K] W_hat
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k))
        _k.int4_dequant_kernel[grid](qweight, scales, zeros, w, n, k, GROUP=group_size, BLOCK_N=cfg.block_n,
                                     BLOCK_K=cfg.block_k, DEQ=min(DEQUANT_MODES[cfg.dequant], 1),
                                     ROUND_W=emulate_bf16_rounding(x.dtype), num_warps=cfg.num_warps)
        return _dense(x, w, bias)
    k_per_split = cfg.k_per_split(k, group_size)
    out, part = _outputs(x, n, cfg.split_k)
    b = bias if bias is not None else scales  # unused pointer when HAS_BIAS is False
    head = (x, qweight, scales, zeros, b, out, part if part is not None else out, m, n, k, x.stride(0), out.stride(0))
    if cfg.path == "gemv":
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
        _k.int4_gemv_kernel[grid](*head, k_per_split // group_size, GROUP=group_size, BLOCK_M=cfg.block_m,
                                  BLOCK_N=cfg.block_n, GROUPS_PER_TILE=max(1, cfg.block_k // group_size),
                                  DEQ=min(DEQUANT_MODES[cfg.dequant], 1), SPLIT_X=cfg.split_x,
                                  PREFETCH=cfg.prefetch, **_common_kwargs(cfg, x, bias))
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
        _k.int4_dot_kernel[grid](*head, k_per_split, GROUP=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                 BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_X=cfg.split_x, SWAP=cfg.swap_ab,
                                 **_int4_dot_dequant(cfg, x, integer_zeros), **_dot_kwargs(x),
                                 **_common_kwargs(cfg, x, bias))
    _finish(part, out, bias, cfg.split_k)
    return out


def int8_weight_only_linear(
    x: torch.Tensor,  # [M, K] bf16 / fp16 / fp32, last dim contiguous
    qweight: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N]
    bias: torch.Tensor | None = None,  # [N]
    *,
    config: QuantMatmulConfig | None = None,
) -> torch.Tensor:  # [M, N] in x's dtype
    """x @ (qweight * scales[:, None]).T + bias with fp32 accumulation (Triton).

    `config` forces a kernel configuration (tests, tuning); by default `pick_config` chooses
    the GEMV path for small M and the tiled tensor-core path otherwise.
    """
    m, n, k = _check_int8(x, qweight, scales, bias)
    _check_runtime(x)
    cfg = config if config is not None else pick_config("int8", m, n, k, None, x.device)
    check_config(cfg, k, None)
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    return _int8_launch(cfg, x, qweight, scales, bias)


def int4_weight_only_linear(
    x: torch.Tensor,  # [M, K] bf16 / fp16 / fp32, last dim contiguous
    qweight: torch.Tensor,  # [N, K // 2] uint8, two columns per byte (even k: low nibble)
    scales: torch.Tensor,  # [N, K // G]
    zeros: torch.Tensor,  # [N, K // G], zero points stored as floats (fractional allowed)
    group_size: int,  # G
    bias: torch.Tensor | None = None,  # [N]
    *,
    config: QuantMatmulConfig | None = None,
    integer_zeros: bool = False,
) -> torch.Tensor:  # [M, N] in x's dtype
    """x @ W_hat.T + bias, W_hat = (q - zeros) * scales per group of G columns (Triton).

    `config` forces a kernel configuration (tests, tuning); by default `pick_config` chooses.
    `integer_zeros` promises every zero is an integer in 0..15 (`zeros_are_integers`), which
    spares the tensor-core path its correction for fractional zeros.
    """
    m, n, k = _check_int4(x, qweight, scales, zeros, group_size, bias)
    _check_runtime(x)
    cfg = config if config is not None else pick_config("int4", m, n, k, group_size, x.device)
    check_config(cfg, k, group_size)
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    return _int4_launch(cfg, x, qweight, scales, zeros, group_size, bias, integer_zeros)


def zeros_are_integers(zeros: torch.Tensor) -> bool:
    """Whether int4 zero points are all integers in 0..15 (`int4_weight_only_linear`'s
    integer_zeros). Reads the tensor on the host: call it once when the weights load."""
    return bool(((zeros == zeros.round()) & (zeros >= 0) & (zeros <= 15)).all())


# ---------------------------------------------------------------------------------------------
# References and packing (pure torch, any device)


def pack_int4(q: torch.Tensor) -> torch.Tensor:  # [N, K] values 0..15 -> [N, K // 2] uint8
    """Two 4-bit values per byte: column k even -> low nibble, k odd -> high nibble.

    Checks the value range, which reads q on the host (an offline step, never the hot path).
    """
    if q.dim() != 2:
        raise ValueError(f"q shape {tuple(q.shape)} is not [N, K]")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"q dtype {q.dtype} is not an integer dtype")
    if q.shape[1] % 2:
        raise ValueError(f"q has an odd number of columns ({q.shape[1]}); int4 packing needs K even")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"q values must lie in 0..15, got range [{int(q.min())}, {int(q.max())}]")
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()  # [N, K // 2]


def unpack_int4(p: torch.Tensor) -> torch.Tensor:  # [N, K // 2] uint8 -> [N, K] uint8
    """Inverse of `pack_int4`."""
    if p.dim() != 2:
        raise ValueError(f"p shape {tuple(p.shape)} is not [N, K // 2]")
    if p.dtype != torch.uint8:
        raise ValueError(f"p dtype {p.dtype} is not torch.uint8")
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], 2 * p.shape[1])  # [N, K]


def _linear_fp32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.float() @ w.t()  # [M, N] fp32
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def int8_linear_ref(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N] in x's dtype
    """Reference for `int8_weight_only_linear`: dequantize to fp32, fp32 matmul, cast once."""
    _check_int8(x, qweight, scales, bias)
    w = qweight.float() * scales.float()[:, None]  # [N, K]
    return _linear_fp32(x, w, bias)


def int4_linear_ref(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [N, K // 2] uint8
    scales: torch.Tensor,  # [N, K // G]
    zeros: torch.Tensor,  # [N, K // G]
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N] in x's dtype
    """Reference for `int4_weight_only_linear`: dequantize to fp32, fp32 matmul, cast once."""
    _check_int4(x, qweight, scales, zeros, group_size, bias)
    q = unpack_int4(qweight).float()  # [N, K]
    n, k = q.shape
    q = q.view(n, k // group_size, group_size)  # [N, K / G, G]
    w = ((q - zeros.float()[..., None]) * scales.float()[..., None]).view(n, k)  # [N, K]
    return _linear_fp32(x, w, bias)


__all__ = [
    "HAS_TRITON", "QuantMatmulConfig", "int4_linear_ref", "int4_weight_only_linear", "int8_linear_ref",
    "int8_weight_only_linear", "pack_int4", "pick_config", "unpack_int4",
]
