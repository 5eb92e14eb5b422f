"""FP8 e4m3 W8A8 matmul pieces: per-token activation quantization and a small-M matmul that
reads the FP8 weights directly (Triton kernels, launchers, torch references).

Numerics (one definition, shared by the kernels, the references and the CPU simulation of
quant/linear.py): for an activation row x [K],
    s = max(amax(|x|) * fp32(1 / 448), 1e-8)    (float32; an all-zero row gets the floor, not NaN)
    q = e4m3(clamp(x * (1 / s), -448, 448))    (round to nearest even, saturating)
and y[m, n] = (sum_k q[m, k] * wq[n, k]) * s[m] * ws[n] (+ bias[n]) with fp32 accumulation,
rounded once to x's dtype. Each step is one IEEE fp32 operation in the kernels too (`1 / s`
through tl.div_rn), so kernel and reference produce the same scales and fp8 values. (A
multiply by 1/448, not a division by 448: torch divides by a scalar as a multiply by its
reciprocal on CUDA and truly on CPU, so a division would make the reference device-dependent.)

Two kernels:
- `quantize_fp8_per_token`: one program per row; xq [M, K] float8_e4m3fn and scales [M, 1]
  float32 — the layout `torch._scaled_mm` takes with row-wise scaling (scale_a [M, 1]).
- `fp8_linear_small_m`: for decode batches. Program (n block, m block, k split) streams a
  [BLOCK_N, BLOCK_K] tile of FP8 weights and multiplies it on the tensor cores against the
  FP8 activation tile (swap-AB: acc [BLOCK_N, BLOCK_M] = W x^T, BLOCK_M >= 16 rows of which
  the ones past M are masked). Both operands are FP8, so there is no per-weight conversion
  work at all: unlike the int8 / int4 GEMVs the kernel is bound by the weight stream alone
  (1 byte a weight). x comes quantized by `quantize_fp8_per_token` (one launch before). An
  in-kernel quantization (a pre-pass over the program's rows for their scales) saved that
  launch at M = 1 (~1% of the layer's GEMM time in the H100 sweep) but failed its GPU test on
  inputs with an outlier channel (outputs dominated by the outlier off by 7-16%, as if the
  outlier had saturated; right under the interpreter), so it was removed (2026-11-27).
  SPLIT_K > 1 writes fp32 partials and the split-K reduce of kernels/_quant_matmul_kernels
  sums them in a fixed order (deterministic). Grids and allocations depend only on shapes,
  so launches can be captured in CUDA graphs.
On CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1 set before
import): there the e4m3 cast is emulated (see _interpreter.py) and the dot upcasts to fp32
(the interpreter multiplies fp8 dot operands as raw bits); the `_ref` functions run anywhere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]

from turbollm.kernels._interpreter import emulate_bf16_rounding, emulate_fp8_rounding
from turbollm.kernels.quant_matmul import check_x

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""
FP8_SCALE_MIN = 1e-8
"""Smallest per-token scale (an all-zero row quantizes to zeros, not NaN)."""
FP8 = torch.float8_e4m3fn
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REDUCE_BLOCK = 1024  # output columns per program of the split-K reduction

if triton is not None:
    from turbollm.kernels._interpreter import round_bf16, round_e4m3
    from turbollm.kernels._quant_matmul_kernels import splitk_reduce_kernel

    @triton.jit
    def _e4m3(v, ROUND_FP8: tl.constexpr):
        """fp32 -> float8e4nv, saturating at +-448 (ROUND_FP8: interpreter carry fix)."""
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)  # FP8_MAX
        if ROUND_FP8:
            v = round_e4m3(v)
        return v.to(tl.float8e4nv)

    @triton.jit
    def _scale_of(amax):
        """Per-row scale from the row's amax: amax * fp32(1 / 448), floored at FP8_SCALE_MIN."""
        return tl.maximum(amax * 0.002232142857142857, 1e-8)

    @triton.jit
    def _quant_kernel(
        x_ptr, q_ptr, s_ptr, K, stride_xm,
        BLOCK_K: tl.constexpr, ROUND_FP8: tl.constexpr,
    ):
        """Row m: amax pass, then the quantize pass (re-read from L2)."""
        m = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        amax = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + m * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        s = _scale_of(tl.max(amax, axis=0))
        inv = tl.div_rn(1.0, s)
        tl.store(s_ptr + m, s)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + offs < K
            x = tl.load(x_ptr + m * stride_xm + k0 + offs, mask=mask, other=0.0)
            tl.store(q_ptr + m * K + k0 + offs, _e4m3(x.to(tl.float32) * inv, ROUND_FP8), mask=mask)

    @triton.jit
    def _small_m_kernel(
        x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr,
        M, N, K, stride_xm, stride_om, k_per_split,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, ROUND_OUT: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """x: float8 [M, K] with scales xs [M]; acc [BN, BM] = W x^T on the tensor cores."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        offs_k = tl.arange(0, BLOCK_K)  # [BK]
        m_mask = offs_m < M
        n_mask = offs_n < N
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K  # [BN, 1]
        xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=1.0)  # [BM]
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + offs_k  # [BK]
            k_mask = ks < k_hi
            w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # [BN, BK] fp8
            xq = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK] fp8
            if UPCAST:  # interpreter: see the module docstring
                acc = tl.dot(w.to(tl.float32), tl.trans(xq.to(tl.float32)), acc, input_precision="ieee")
            else:
                # Hopper's FP8 MMA accumulates with ~14 mantissa bits; Triton's sm90 default
                # lets it run over all of K. Promote to the fp32 accumulator every 128.
                acc = tl.dot(w, tl.trans(xq), acc, max_num_imprecise_acc=128)  # [BN, BM]
        ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)  # [BN]
        acc = tl.trans(acc * ws[:, None]) * xs[:, None]  # [BM, BN]
        rows = offs_m.to(tl.int64)[:, None]
        mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if ROUND_OUT:
                acc = round_bf16(acc)
            tl.store(out_ptr + rows * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(part_ptr + (pid_k * M + rows) * N + offs_n[None, :], acc, mask=mask)


@dataclass(frozen=True)
class Fp8SmallMConfig:
    """Launch shape of `fp8_linear_small_m`.

    block_m: activation rows per program (>= 16: the tensor-core tile's narrow side).
    block_n, block_k: weight tile; split_k: programs sharing an output tile along K.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4

    def k_per_split(self, k: int) -> int:
        per = -(-k // self.split_k)
        return max(self.block_k, -(-per // self.block_k) * self.block_k)


def _check_runtime(x: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("the FP8 kernels need triton; use the *_ref functions instead")
    if x.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"x is on {x.device}: Triton kernels need CUDA, or TRITON_INTERPRET=1 set before import")


def _check_weights(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> tuple[int, int, int]:
    m, k = check_x(x)
    return m, _check_w(k, x.device, wq, w_scale, bias), k


def _check_w(k: int, device: torch.device, wq: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None) -> int:
    """N of the FP8 weight wq [N, k] with its scales and bias, all on `device`; ValueError otherwise."""
    if wq.dim() != 2 or wq.shape[1] != k or wq.dtype != FP8 or not wq.is_contiguous():
        raise ValueError(f"wq must be a contiguous float8_e4m3fn [N, {k}], got {wq.dtype} {tuple(wq.shape)}")
    n = wq.shape[0]
    if w_scale.shape != (n,) or w_scale.dtype != torch.float32 or not w_scale.is_contiguous():
        raise ValueError(f"w_scale must be a contiguous float32 [{n}], got {w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and (bias.shape != (n,) or bias.dtype not in _DTYPES or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] float tensor, got {bias.dtype} {tuple(bias.shape)}")
    for name, t in (("wq", wq), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, x is on {device}")
    return n


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] float8_e4m3fn contiguous, scales [M, 1] float32), one launch."""
    m, k = check_x(x)
    _check_runtime(x)
    xq = torch.empty(m, k, dtype=FP8, device=x.device)  # [M, K]
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)  # [M, 1]
    if m and k:
        block_k = min(triton.next_power_of_2(k), 4096)
        _quant_kernel[(m,)](x, xq, scales, k, x.stride(0), BLOCK_K=block_k,
                            ROUND_FP8=emulate_fp8_rounding(FP8), num_warps=4 if block_k <= 2048 else 8)
    return xq, scales


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pick_small_m(m: int, n: int, k: int, device: torch.device) -> Fp8SmallMConfig:
    """Default launch (fixed heuristic: shapes and the SM count only, never a benchmark, so
    graph capture and determinism hold). Tuned on an H100 with bench/scripts/gpu_fp8_kernels.py."""
    if device.type != "cuda":  # interpreter: few programs
        return Fp8SmallMConfig(block_m=16, block_n=16, block_k=64, num_stages=1)
    _, cfg, waves = next((b for b in SMALL_M_CONFIGS if m <= b[0]), SMALL_M_CONFIGS[-1])
    tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m)
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    while split < 8 and tiles * split < waves * sms and k // (2 * split * cfg.block_k) >= 2:
        split *= 2
    return Fp8SmallMConfig(cfg.block_m, cfg.block_n, cfg.block_k, split, cfg.num_warps, cfg.num_stages)


# (largest M, config, waves) bands of the small-M path; split-K brings the tiles up to
# waves x SMs programs. From the H100 sweep of bench/scripts/gpu_fp8_kernels.py (2026-11-27,
# Llama-2-7B shapes, total µs over qkv / o / gate_up / down, bench/results/
# fp8-kernels-h100-2026-11-27.json): M = 1 and 16: 106.3 / 108.8 µs; M = 64: 120.4 µs
# against 133.4 for quantize + _scaled_mm; M = 256: 196 µs against 147, so SMALL_M_MAX = 64.
SMALL_M_CONFIGS: tuple[tuple[int, Fp8SmallMConfig, float], ...] = (
    (16, Fp8SmallMConfig(block_m=16, block_n=64, block_k=256, num_stages=4), 2.0),
    (64, Fp8SmallMConfig(block_m=64, block_n=64, block_k=256, num_stages=3), 2.0),
)


def fp8_linear_small_m(
    x: torch.Tensor,  # [M, K] bf16 / fp16 / fp32, last dim contiguous
    wq: torch.Tensor,  # [N, K] float8_e4m3fn
    w_scale: torch.Tensor,  # [N] float32
    bias: torch.Tensor | None = None,  # [N]
    *,
    config: Fp8SmallMConfig | None = None,
) -> torch.Tensor:  # [M, N] in x's dtype
    """W8A8 product with per-token activation scales, FP8 weights read directly (Triton).

    `config` forces a launch shape (tests, tuning); by default `_pick_small_m` chooses.
    """
    m, n, k = _check_weights(x, wq, w_scale, bias)
    _check_runtime(x)
    cfg = config if config is not None else _pick_small_m(m, n, k, x.device)
    if cfg.block_m < 16 or cfg.block_n < 16 or cfg.block_k < 32 or cfg.split_k < 1:
        raise ValueError(f"config needs block_m, block_n >= 16, block_k >= 32 and split_k >= 1, got {cfg}")
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    xa, xs = quantize_fp8_per_token(x)  # [M, K] fp8, [M, 1]
    return _small_m_launch(xa, xs, wq, w_scale, bias, x.dtype, cfg)


def _small_m_launch(
    xa: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype, cfg: Fp8SmallMConfig,
) -> torch.Tensor:
    """The small-M kernel (and its split-K reduce) on quantized activations xa [M, K] fp8
    with scales xs [M, 1] -> [M, N] out_dtype. M, N >= 1; shapes checked by the caller."""
    (m, k), n = xa.shape, wq.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=xa.device)  # [M, N]
    part = out
    if cfg.split_k > 1:
        part = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=xa.device)  # [S, M, N]
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
    _small_m_kernel[grid](
        xa, xs, wq, w_scale, bias if bias is not None else w_scale, out, part,
        m, n, k, xa.stride(0), out.stride(0), cfg.k_per_split(k),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None and cfg.split_k == 1,
        ROUND_OUT=emulate_bf16_rounding(out_dtype), UPCAST=xa.device.type != "cuda",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.split_k > 1:
        splitk_reduce_kernel[(m, triton.cdiv(n, _REDUCE_BLOCK))](
            part, bias if bias is not None else part, out, m, n, out.stride(0),
            SPLIT_K=cfg.split_k, BLOCK_N=_REDUCE_BLOCK, HAS_BIAS=bias is not None,
            ROUND_OUT=emulate_bf16_rounding(out_dtype), num_warps=4, PDL=False,
        )
    return out


SMALL_M_MAX = 64
"""Largest M that `fp8_linear` sends to the small-M kernel; above it quantize + torch._scaled_mm."""
SCALED_MM_FAST_ACCUM = True
"""use_fast_accum of torch._scaled_mm (Hopper's FP8 accumulation without periodic promotion to
fp32): ~12% faster at M = 4096 on an H100; error against the fp32-accumulated reference
2.3e-3..3.7e-3 (relative norm, bf16 output) instead of 1.1e-3..1.8e-3, an order of magnitude
below FP8 W8A8's own quantization error (test_reference_is_w8a8)."""


def fp8_linear(
    x: torch.Tensor,  # [M, K] bf16 / fp16 / fp32, last dim contiguous
    wq: torch.Tensor,  # [N, K] float8_e4m3fn
    w_scale: torch.Tensor,  # [N] float32
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N] in x's dtype
    """The GPU W8A8 linear: the small-M kernel up to SMALL_M_MAX rows, else one fused
    quantization launch and torch._scaled_mm (`_scaled_mm`)."""
    if x.shape[0] <= SMALL_M_MAX:
        return fp8_linear_small_m(x, wq, w_scale, bias)
    _check_weights(x, wq, w_scale, bias)
    xq, xs = quantize_fp8_per_token(x)  # [M, K] fp8, [M, 1] fp32
    return _scaled_mm(xq, xs, wq, w_scale, bias, x.dtype)


def _scaled_mm(
    xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """torch._scaled_mm with row-wise scales (scale_a [M, 1], scale_b [1, N]; CUTLASS on
    Hopper), which outputs bf16 only: cast to out_dtype, then the bias."""
    y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=w_scale[None, :], out_dtype=torch.bfloat16,
                         use_fast_accum=SCALED_MM_FAST_ACCUM)  # [M, N]
    y = y.to(out_dtype)
    return y if bias is None else y + bias


def fp8_linear_quantized(
    xq: torch.Tensor,  # [M, K] float8_e4m3fn, contiguous (kernels/fp8_fused.py writes it)
    xs: torch.Tensor,  # [M, 1] float32 per-token scales
    wq: torch.Tensor,  # [N, K] float8_e4m3fn
    w_scale: torch.Tensor,  # [N] float32
    bias: torch.Tensor | None,  # [N]
    out_dtype: torch.dtype,
) -> torch.Tensor:  # [M, N] out_dtype
    """`fp8_linear` on activations quantized already: the same two routes, without the
    quantization launch. Equal to fp8_linear(x) when (xq, xs) = quantize_fp8_per_token(x)."""
    if xq.dim() != 2 or xq.dtype != FP8 or not xq.is_contiguous():
        raise ValueError(f"xq must be a contiguous float8_e4m3fn [M, K], got {xq.dtype} {tuple(xq.shape)}")
    m, k = xq.shape
    if xs.shape != (m, 1) or xs.dtype != torch.float32 or not xs.is_contiguous():
        raise ValueError(f"xs must be a contiguous float32 [{m}, 1], got {xs.dtype} {tuple(xs.shape)}")
    if out_dtype not in _DTYPES:
        raise ValueError(f"out_dtype {out_dtype} is not one of {_DTYPES}")
    n = _check_w(k, xq.device, wq, w_scale, bias)
    _check_runtime(xq)
    if m > SMALL_M_MAX:
        return _scaled_mm(xq, xs, wq, w_scale, bias, out_dtype)
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=out_dtype, device=xq.device)  # [M, N]
    return _small_m_launch(xq, xs, wq, w_scale, bias, out_dtype, _pick_small_m(m, n, k, xq.device))


# ---------------------------------------------------------------------------------------------
# References (pure torch, any device)


def quantize_fp8_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (xq [..., K] float8_e4m3fn, scales [..., 1] float32): the module's numerics."""
    xf = x.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) * (1.0 / FP8_MAX)).clamp_min(FP8_SCALE_MIN)  # [..., 1]
    return (xf * (1.0 / s)).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def fp8_linear_ref(
    x: torch.Tensor,  # [M, K]
    wq: torch.Tensor,  # [N, K] float8_e4m3fn
    w_scale: torch.Tensor,  # [N] float32
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N] in x's dtype
    """Reference W8A8: quantize x per token, fp32 product of the e4m3 values, both scales, bias,
    one rounding to x's dtype."""
    _check_weights(x, wq, w_scale, bias)
    xq, xs = quantize_fp8_per_token_ref(x)  # [M, K], [M, 1]
    out = (xq.float() @ wq.float().t()) * w_scale.float()[None, :] * xs  # [M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


__all__ = [
    "FP8_MAX", "FP8_SCALE_MIN", "Fp8SmallMConfig", "SMALL_M_CONFIGS", "SMALL_M_MAX", "fp8_linear",
    "fp8_linear_quantized", "fp8_linear_ref", "fp8_linear_small_m",
    "quantize_fp8_per_token", "quantize_fp8_per_token_ref",
]
