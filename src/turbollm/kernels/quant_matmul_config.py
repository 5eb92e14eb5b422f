"""Launch configurations of the weight-only quantized matmuls (kernels/quant_matmul.py).

`pick_config` is a fixed heuristic, not an autotuner: the choice depends only on the shape
and the device's multiprocessor count, so it never benchmarks (which would break CUDA-graph
capture) and the same shape always runs the same kernel (deterministic results). The GPU
table was tuned on an H100 SXM with bench/scripts/gpu_quant_kernels.py --sweep on the
Llama-2-7B shapes; under the interpreter a small fixed config keeps CPU tests fast.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

PATHS = ("gemv", "dot", "dequant")
# How packed integers become floats (see _quant_matmul_kernels.py): int->float conversion
# instructions, fp32 bit tricks, or (int4 tensor-core path) bit tricks in the activation dtype.
DEQUANT_MODES = {"cvt": 0, "magic": 1, "magic_act": 2}
GEMV_MAX_M = 8  # largest M that takes the GEMV path by default
_INTERPRET_GEMV_MAX_M = 4


@dataclass(frozen=True)
class QuantMatmulConfig:
    """One kernel launch shape.

    path: "gemv" (CUDA cores, per-row reductions; small M), "dot" (tensor-core tiles with the
    weights dequantized in registers) or "dequant" (W_hat written to a [N, K] workspace in
    the activation dtype by a Triton pass, then one dense matmul: for M so large that the
    workspace round trip costs less than dequantizing every tile once per row block).
    block_k: columns of K per loop step. int4 GEMV rounds it to whole groups; int4 "dot"
    needs it to divide the group size (one scale/zero per row per tile).
    split_k: programs sharing one output tile along K; > 1 adds a deterministic reduce pass.
    group_m: row blocks that walk the column blocks together ("dot" only; L2 reuse).
    dequant: a key of DEQUANT_MODES ("magic_act" acts as "magic" where it does not apply).
    split_x: int4 only: multiply the low / high nibbles by the even / odd columns of x instead
    of interleaving the nibbles back into column order (dot: BLOCK_K >= 32).
    prefetch: GEMV only: load the next weight slab before reducing the current one.
    swap_ab: dot only: compute W x^T, so the dequantized weights feed the tensor cores from
    registers (operand A) and x^T is the shared-memory operand.
    """

    path: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    dequant: str = "magic"
    split_x: bool = False
    prefetch: bool = False
    swap_ab: bool = False

    def k_per_split(self, k: int, group_size: int | None = None) -> int:
        """Columns each split covers: a whole number of loop steps (int4 GEMV: of tiles of groups)."""
        step = self.block_k
        if group_size is not None and self.path == "gemv":
            step = max(1, self.block_k // group_size) * group_size
        per = -(-k // self.split_k)
        return max(step, -(-per // step) * step)


def _pow2(v: int) -> bool:
    return v >= 1 and not v & (v - 1)


def check_config(cfg: QuantMatmulConfig, k: int, group_size: int | None) -> None:
    """Raise ValueError when `cfg` cannot run on K columns (int4: groups of `group_size`)."""
    if cfg.path not in PATHS:
        raise ValueError(f"config path {cfg.path!r} is not one of {PATHS}")
    for name in ("block_m", "block_n", "block_k", "num_warps"):
        if not _pow2(getattr(cfg, name)):
            raise ValueError(f"config {name} must be a power of two, got {getattr(cfg, name)}")
    if cfg.dequant not in DEQUANT_MODES:
        raise ValueError(f"config dequant {cfg.dequant!r} is not one of {tuple(DEQUANT_MODES)}")
    if cfg.split_k < 1 or cfg.group_m < 1 or cfg.num_stages < 1:
        raise ValueError(f"config split_k, group_m and num_stages must be >= 1, got {cfg}")
    if cfg.path != "dot":
        return
    if min(cfg.block_m, cfg.block_n, cfg.block_k) < 16:
        raise ValueError(f"dot path needs block_m, block_n, block_k >= 16 (tl.dot), got {cfg}")
    if group_size is not None and cfg.split_x and cfg.block_k < 32:
        raise ValueError(f"dot path split_x needs block_k >= 32, got {cfg.block_k}")
    if group_size is not None and group_size % cfg.block_k:
        raise ValueError(f"dot path block_k {cfg.block_k} must divide group_size {group_size}")
    if group_size is None and k % cfg.block_k:
        raise ValueError(f"dot path block_k {cfg.block_k} must divide K = {k} (int8)")


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _interpreting(device: torch.device) -> bool:
    return device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _split_for(tiles: int, k: int, block_k: int, sms: int) -> int:
    """Splits of K that bring `tiles` programs up to about two waves, keeping >= 4 steps each."""
    split = 1
    while tiles * split < 2 * sms and k // (2 * split * block_k) >= 4:
        split *= 2
    return split


def pick_config(kind: str, m: int, n: int, k: int, group_size: int | None,
                device: torch.device) -> QuantMatmulConfig:
    """Default launch for a [m, k] x [n, k]^T weight-only matmul of `kind` ("int8" / "int4")."""
    m_pow2 = 1 << max(0, (m - 1).bit_length())
    if _interpreting(device):  # few, wide programs: the interpreter pays per program
        if m <= _INTERPRET_GEMV_MAX_M:
            return QuantMatmulConfig("gemv", m_pow2, 32, 256)
        block_k = min(group_size or 64, 64)
        return QuantMatmulConfig("dot", min(max(m_pow2, 16), 64), 32, block_k)
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if m <= GEMV_MAX_M:
        block_k = 1024 if kind == "int4" else 512
        block_n = 4
        tiles = -(-n // block_n)
        return QuantMatmulConfig("gemv", m_pow2, block_n, block_k,
                                 split_k=_split_for(tiles, k, block_k, sms), num_warps=4)
    if m <= 64:
        block_m = max(16, m_pow2)
        block_n, warps, stages = 64, 4, 4
    else:
        block_m = 128 if m > 128 else 64
        block_n, warps, stages = 128, 8, 3
    block_k = 64 if kind == "int8" else min(group_size or 64, 64)
    tiles = -(-m // block_m) * -(-n // block_n)
    return QuantMatmulConfig("dot", block_m, block_n, block_k, split_k=_split_for(tiles, k, block_k, sms),
                             num_warps=warps, num_stages=stages)


__all__ = ["DEQUANT_MODES", "GEMV_MAX_M", "PATHS", "QuantMatmulConfig", "check_config", "pick_config"]
