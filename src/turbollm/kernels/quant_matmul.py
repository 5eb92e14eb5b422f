"""Weight-only int8 / int4 matmuls with fused dequantization: Triton kernels, launchers,
torch references, int4 packing.

Storage (docs: /work/brief/QUANT_CONTRACT.md, "Runtime storage"). W is [N, K] as in nn.Linear.
- int8: `qweight` int8 [N, K], `scales` [N]; W_hat[n, k] = qweight[n, k] * scales[n].
- int4: `qweight` uint8 [N, K // 2] (column k even -> low nibble, k odd -> high nibble),
  `scales`, `zeros` [N, K // G] (zeros hold the integer zero point as a float);
  W_hat[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G].
Every launcher computes `x @ W_hat.T + bias` with fp32 accumulation and returns x's dtype.

Two kernel shapes per format, picked by `QuantMatmulConfig.path` (see `pick_config`):
- "gemv" (decode, M <= ~8): no tensor cores. Program (n block, m block, k split) streams a
  [BLOCK_N, BLOCK_K] slab of packed weights with 16-byte row-contiguous loads, converts it
  in registers and reduces it against each of its BLOCK_M rows of x in fp32. int4 folds the
  group affine into the reduction: sum_k (q - z) s x = s (sum_k q x - z sum_k x) per group,
  so the per-element work is one multiply-add. Parallelism comes from small BLOCK_N (many
  programs), so no split-K is needed on Llama shapes.
- "dot" (prefill / large batch): a tiled tl.dot. The [BLOCK_N, BLOCK_K] weight tile is
  dequantized to the activation dtype in registers (int4: one scale / zero per row, since
  BLOCK_K divides G) and multiplied on the tensor cores; fp32 x uses IEEE fp32 (no tf32).
Either may split K over SPLIT_K programs: each writes an fp32 partial [SPLIT_K, M, N] and a
second kernel sums the splits in a fixed order (deterministic, no atomics), adds the bias and
casts. Grids and allocations depend only on shapes, never on device values, so every launch
can be captured in a CUDA graph (the partial buffer then comes from the graph's pool).
On CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1 set before
import); the `_ref` functions run anywhere.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None  # type: ignore[assignment]

from turbollm.kernels._interpreter import emulate_bf16_rounding
from turbollm.kernels.quant_matmul_config import QuantMatmulConfig, check_config, pick_config

if triton is not None:
    from turbollm.kernels._interpreter import round_bf16

HAS_TRITON = triton is not None
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REDUCE_BLOCK = 1024  # output columns per program of the split-K reduction

if triton is not None:

    @triton.jit
    def _epilogue(
        acc, offs_m, offs_n, M, N, b_ptr, out_ptr, part_ptr, stride_om, pid_k,
        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_OUT: tl.constexpr,
    ):
        """acc [BM, BN] fp32 -> out (+ bias, cast) or, when split, the fp32 partial."""
        rows = offs_m.to(tl.int64)[:, None]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            if ROUND_OUT:
                acc = round_bf16(acc)
            tl.store(out_ptr + rows * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(part_ptr + (pid_k * M + rows) * N + offs_n[None, :], acc, mask=mask)

    @triton.jit
    def _splitk_reduce_kernel(
        part_ptr, b_ptr, out_ptr, M, N, stride_om,
        SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_OUT: tl.constexpr,
    ):
        """out[m, n] = sum_s part[s, m, n] (+ bias[n]), summed in split order."""
        m = tl.program_id(0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs_n < N
        acc = tl.zeros([BLOCK_N], tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + (s * M + m) * N + offs_n, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
        if ROUND_OUT:
            acc = round_bf16(acc)
        tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _int8_gemv_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, part_ptr,
        M, N, K, stride_xm, stride_om, k_per_split,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_OUT: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_k = tl.arange(0, BLOCK_K)  # [BK]
        n_mask = offs_n < N
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K  # [BN, 1]
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        row_ids = tl.arange(0, BLOCK_M)[:, None]  # [BM, 1]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < k_hi
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)  # [BN, BK]
            w = w.to(tl.float32)
            for i in tl.static_range(BLOCK_M):  # every row of x reuses the slab in registers
                m = pid_m * BLOCK_M + i
                xv = tl.load(x_ptr + m.to(tl.int64) * stride_xm + k, mask=k_mask & (m < M), other=0.0)
                c = tl.sum(w * xv.to(tl.float32)[None, :], axis=1)  # [BN]
                acc += tl.where(row_ids == i, c[None, :], 0.0)
        scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
        acc = acc * scale[None, :]
        _epilogue(acc, offs_m, offs_n, M, N, b_ptr, out_ptr, part_ptr, stride_om, pid_k,
                  SPLIT_K, HAS_BIAS, ROUND_OUT)

    @triton.jit
    def _int4_gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr,
        M, N, K, stride_xm, stride_om, groups_per_split,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_PER_TILE: tl.constexpr,
        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_OUT: tl.constexpr,
    ):
        HALF: tl.constexpr = GROUP // 2  # packed bytes per group
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        n_groups = K // GROUP
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_t = tl.arange(0, GROUPS_PER_TILE)  # [GT]
        offs_j = tl.arange(0, HALF)  # [HALF]
        offs_c = tl.arange(0, GROUP)  # [G]
        n_mask = offs_n < N
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * (K // 2)  # [BN, 1, 1]
        sz_rows = offs_n[:, None] * n_groups  # [BN, 1]
        g_lo = pid_k * groups_per_split
        g_hi = tl.minimum(g_lo + groups_per_split, n_groups)
        row_ids = tl.arange(0, BLOCK_M)[:, None]  # [BM, 1]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for g0 in range(g_lo, g_hi, GROUPS_PER_TILE):
            g = g0 + offs_t  # [GT]
            g_mask = g < g_hi
            p = tl.load(w_rows + (g * HALF)[None, :, None] + offs_j[None, None, :],
                        mask=n_mask[:, None, None] & g_mask[None, :, None], other=0)  # [BN, GT, HALF] uint8
            q = tl.interleave(p & 0xF, p >> 4).to(tl.float32)  # [BN, GT, G], column c = k - g * G
            sz_mask = n_mask[:, None] & g_mask[None, :]
            s = tl.load(s_ptr + sz_rows + g[None, :], mask=sz_mask, other=0.0).to(tl.float32)  # [BN, GT]
            z = tl.load(z_ptr + sz_rows + g[None, :], mask=sz_mask, other=0.0).to(tl.float32)  # [BN, GT]
            for i in tl.static_range(BLOCK_M):
                m = pid_m * BLOCK_M + i
                xv = tl.load(x_ptr + m.to(tl.int64) * stride_xm + (g * GROUP)[:, None] + offs_c[None, :],
                             mask=g_mask[:, None] & (m < M), other=0.0).to(tl.float32)  # [GT, G]
                d = tl.sum(q * xv[None, :, :], axis=2)  # [BN, GT]  sum_k q x per group
                xs = tl.sum(xv, axis=1)  # [GT]  sum_k x per group
                c = tl.sum(s * (d - z * xs[None, :]), axis=1)  # [BN]
                acc += tl.where(row_ids == i, c[None, :], 0.0)
        _epilogue(acc, offs_m, offs_n, M, N, b_ptr, out_ptr, part_ptr, stride_om, pid_k,
                  SPLIT_K, HAS_BIAS, ROUND_OUT)

    @triton.jit
    def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Grouped tile order: GROUP_M row blocks share each weight column block in L2."""
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        return pid_m, pid_n

    @triton.jit
    def _int8_dot_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, part_ptr,
        M, N, K, stride_xm, stride_om, k_per_split,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_OUT: tl.constexpr, DOT_PREC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        offs_k = tl.arange(0, BLOCK_K)  # [BK]
        m_mask = offs_m < M
        n_mask = offs_n < N
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
        w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]  # [BN, BK]
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):  # K % BLOCK_K == 0 (checked by the launcher)
            xt = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)  # [BM, BK]
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0)  # [BN, BK] int8
            # |q| <= 127 is exact in every activation dtype: the scale is applied after the dot.
            if UPCAST:
                xt = xt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(w.to(xt.dtype)), acc, input_precision=DOT_PREC)
        scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
        acc = acc * scale[None, :]
        _epilogue(acc, offs_m, offs_n, M, N, b_ptr, out_ptr, part_ptr, stride_om, pid_k,
                  SPLIT_K, HAS_BIAS, ROUND_OUT)

    @triton.jit
    def _int4_dot_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr,
        M, N, K, stride_xm, stride_om, k_per_split,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        ROUND_W: tl.constexpr, ROUND_OUT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        HALF_K: tl.constexpr = BLOCK_K // 2
        pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        pid_k = tl.program_id(1)
        n_groups = K // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        offs_k = tl.arange(0, BLOCK_K)  # [BK]
        offs_kh = tl.arange(0, HALF_K)  # [BK / 2]
        m_mask = offs_m < M
        n_mask = offs_n < N
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
        w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * (K // 2) + offs_kh[None, :]  # [BN, BK / 2]
        sz_ptrs = offs_n * n_groups  # [BN]
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):  # BLOCK_K divides GROUP: one group per tile
            xt = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)  # [BM, BK]
            p = tl.load(w_ptrs + k0 // 2, mask=n_mask[:, None], other=0)  # [BN, BK / 2] uint8
            g = k0 // GROUP
            s = tl.load(s_ptr + sz_ptrs + g, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
            z = tl.load(z_ptr + sz_ptrs + g, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
            q = tl.interleave(p & 0xF, p >> 4).to(tl.float32)  # [BN, BK]
            w = (q - z[:, None]) * s[:, None]  # [BN, BK]
            if ROUND_W:
                w = round_bf16(w)  # now exact in bf16: UPCAST keeps it fp32
            if UPCAST:
                xt = xt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(w.to(xt.dtype)), acc, input_precision=DOT_PREC)
        _epilogue(acc, offs_m, offs_n, M, N, b_ptr, out_ptr, part_ptr, stride_om, pid_k,
                  SPLIT_K, HAS_BIAS, ROUND_OUT)


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


def _check_x(x: torch.Tensor) -> tuple[int, int]:
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


def _check_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[int, int, int]:
    m, k = _check_x(x)
    if qweight.dim() != 2:
        raise ValueError(f"qweight shape {tuple(qweight.shape)} is not [N, K]")
    n = qweight.shape[0]
    _check_tensor("qweight", qweight, (n, k), (torch.int8,), x.device)
    _check_tensor("scales", scales, (n,), _DTYPES, x.device)
    _check_bias(bias, n, x.device)
    return m, n, k


def _check_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, bias: torch.Tensor | None) -> tuple[int, int, int]:
    m, k = _check_x(x)
    if not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide K = {k} (x shape {tuple(x.shape)})")
    if qweight.dim() != 2:
        raise ValueError(f"qweight shape {tuple(qweight.shape)} is not [N, K // 2]")
    n = qweight.shape[0]
    _check_tensor("qweight", qweight, (n, k // 2), (torch.uint8,), x.device)
    _check_tensor("scales", scales, (n, k // group_size), _DTYPES, x.device)
    _check_tensor("zeros", zeros, (n, k // group_size), _DTYPES, x.device)
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
    _splitk_reduce_kernel[(m, triton.cdiv(n, _REDUCE_BLOCK))](
        part, bias if bias is not None else part, out, m, n, out.stride(0),
        SPLIT_K=split_k, BLOCK_N=_REDUCE_BLOCK, HAS_BIAS=bias is not None,
        ROUND_OUT=emulate_bf16_rounding(out.dtype), num_warps=4,
    )


def _outputs(x: torch.Tensor, n: int, split_k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)  # [M, N]
    part = None
    if split_k > 1:
        part = torch.empty(split_k, x.shape[0], n, dtype=torch.float32, device=x.device)  # [S, M, N]
    return out, part


def _common_kwargs(cfg: QuantMatmulConfig, x: torch.Tensor, bias: torch.Tensor | None) -> dict[str, object]:
    return dict(SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None and cfg.split_k == 1,
                ROUND_OUT=emulate_bf16_rounding(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _upcast(x: torch.Tensor) -> bool:
    """The interpreter multiplies bf16 dot operands as their raw uint16 bits (Triton 3.6):
    there, and only there, the dot kernels upcast both operands to fp32 (see paged_attention)."""
    return emulate_bf16_rounding(x.dtype)


def _dot_kwargs(x: torch.Tensor) -> dict[str, object]:
    # fp32 activations must not silently drop to tf32 (the references are exact fp32).
    exact = x.dtype == torch.float32 or _upcast(x)
    return dict(DOT_PREC="ieee" if exact else "tf32", UPCAST=_upcast(x))


def _int8_launch(cfg: QuantMatmulConfig, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    k_per_split = cfg.k_per_split(k)
    out, part = _outputs(x, n, cfg.split_k)
    b = bias if bias is not None else scales  # unused pointer when HAS_BIAS is False
    args = (x, qweight, scales, b, out, part if part is not None else out, m, n, k, x.stride(0), out.stride(0), k_per_split)
    if cfg.path == "gemv":
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
        _int8_gemv_kernel[grid](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                **_common_kwargs(cfg, x, bias))
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
        _int8_dot_kernel[grid](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                               GROUP_M=cfg.group_m, **_dot_kwargs(x), **_common_kwargs(cfg, x, bias))
    _finish(part, out, bias, cfg.split_k)
    return out


def _int4_launch(cfg: QuantMatmulConfig, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    k_per_split = cfg.k_per_split(k, group_size)
    out, part = _outputs(x, n, cfg.split_k)
    b = bias if bias is not None else scales
    head = (x, qweight, scales, zeros, b, out, part if part is not None else out, m, n, k, x.stride(0), out.stride(0))
    if cfg.path == "gemv":
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
        _int4_gemv_kernel[grid](*head, k_per_split // group_size, GROUP=group_size, BLOCK_M=cfg.block_m,
                                BLOCK_N=cfg.block_n, GROUPS_PER_TILE=max(1, cfg.block_k // group_size),
                                **_common_kwargs(cfg, x, bias))
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
        _int4_dot_kernel[grid](*head, k_per_split, GROUP=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                               BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, ROUND_W=emulate_bf16_rounding(x.dtype),
                               **_dot_kwargs(x), **_common_kwargs(cfg, x, bias))
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
    zeros: torch.Tensor,  # [N, K // G], integer zero points stored as floats
    group_size: int,  # G
    bias: torch.Tensor | None = None,  # [N]
    *,
    config: QuantMatmulConfig | None = None,
) -> torch.Tensor:  # [M, N] in x's dtype
    """x @ W_hat.T + bias, W_hat = (q - zeros) * scales per group of G columns (Triton).

    `config` forces a kernel configuration (tests, tuning); by default `pick_config` chooses.
    """
    m, n, k = _check_int4(x, qweight, scales, zeros, group_size, bias)
    _check_runtime(x)
    cfg = config if config is not None else pick_config("int4", m, n, k, group_size, x.device)
    check_config(cfg, k, group_size)
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    return _int4_launch(cfg, x, qweight, scales, zeros, group_size, bias)


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
