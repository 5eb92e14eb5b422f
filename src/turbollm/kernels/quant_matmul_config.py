"""Launch configurations of the weight-only quantized matmuls (kernels/quant_matmul.py).

`pick_config` is a fixed heuristic, not an autotuner: the choice depends only on the shape
and the device's multiprocessor count, so it never benchmarks (which would break CUDA-graph
capture) and the same shape always runs the same kernel (deterministic results). The GPU
table (`_BANDS`) was tuned on an H100 SXM with bench/scripts/gpu_quant_kernels.py --sweep on
the Llama-2-7B shapes; under the interpreter a small fixed config keeps CPU tests fast.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch

PATHS = ("gemv", "dot", "dequant")
# How packed integers become floats (see _quant_matmul_kernels.py): int->float conversion
# instructions, fp32 bit tricks, or (int4 tensor-core path) bit tricks in the activation dtype.
DEQUANT_MODES = {"cvt": 0, "magic": 1, "magic_act": 2}
GEMV_MAX_M = 1  # largest M that takes the GEMV path by default (see _BANDS)
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


@dataclass(frozen=True)
class _Band:
    """Launch shape for M up to max_m; split-K brings the tiles up to `waves` x SMs programs."""

    max_m: int
    cfg: QuantMatmulConfig
    waves: float = 0.0
    max_split: int = 1


_C = QuantMatmulConfig
_INF = 1 << 62
# From the H100 sweep of bench/scripts/gpu_quant_kernels.py (2026-11-27, Llama-2-7B shapes,
# results in bench/results/issue5_quant_kernels_h100.json): the best config per (kind, M) of
# M = 1, 16, 64, 256, 4096 by total time over the qkv / o / gate_up / down shapes; the bands
# between those sizes are judgement. "dequant" allocates a [N, K] W_hat workspace per call,
# so it starts at M = 512 (prefill), above the decode batch sizes. The GEMV loses to the tensor-core tiles from M = 8 on
# (the GEMV does the per-weight work once per row), so it only takes M = 1.
_BANDS: dict[str, tuple[_Band, ...]] = {
    "int4": (
        _Band(1, _C("gemv", 1, 8, 1024, dequant="cvt"), waves=2, max_split=8),
        _Band(16, _C("dot", 16, 64, 128, dequant="magic_act", swap_ab=True), waves=3, max_split=8),
        _Band(64, _C("dot", 64, 64, 128, dequant="magic_act", swap_ab=True), waves=4, max_split=4),
        # At M = 256 the dequant path measured 492 µs and this one 498 µs (sum over the four
        # shapes): this one needs no [N, K] workspace, which matters inside decode CUDA graphs.
        _Band(511, _C("dot", 128, 128, 64, num_warps=8, dequant="cvt"), waves=3, max_split=2),
        _Band(_INF, _C("dequant", 1, 8, 1024)),
    ),
    "int8": (
        _Band(1, _C("gemv", 1, 2, 2048, dequant="magic"), waves=2, max_split=8),
        _Band(16, _C("dot", 16, 64, 128, num_stages=4, dequant="cvt"), waves=4, max_split=4),
        _Band(64, _C("dot", 64, 64, 128, dequant="cvt", swap_ab=True), waves=3, max_split=4),
        _Band(511, _C("dot", 64, 128, 64, num_stages=4, dequant="cvt")),
        _Band(_INF, _C("dequant", 1, 16, 1024, num_warps=8)),
    ),
}


def _split_for(tiles: int, k: int, block_k: int, waves: float, max_split: int, sms: int) -> int:
    """Powers of two splitting K until tiles x splits reach `waves` x SMs programs (at most
    max_split, each split keeping >= 2 loop steps)."""
    split = 1
    while split < max_split and tiles * split < waves * sms and k // (2 * split * block_k) >= 2:
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
    if kind not in _BANDS:
        raise ValueError(f"kind {kind!r} is not one of {tuple(_BANDS)}")
    band = next(b for b in _BANDS[kind] if m <= b.max_m)
    cfg = band.cfg
    if cfg.path == "dot" and group_size is not None and group_size < cfg.block_k:
        cfg = replace(cfg, block_k=group_size)  # one scale / zero per row and tile
    if cfg.path == "dot" and group_size is None and k % cfg.block_k:
        # int8 with a narrow K (small models): the widest power-of-two tile dividing K, else
        # the dequantize-then-cuBLAS path, which takes any K.
        bk = cfg.block_k
        while bk > 16 and k % bk:
            bk //= 2
        cfg = replace(cfg, block_k=bk) if k % bk == 0 else _BANDS[kind][-1].cfg
    if band.max_split > 1:
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        if cfg.path == "gemv":
            tiles = -(-n // cfg.block_n)
        else:
            tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
        cfg = replace(cfg, split_k=_split_for(tiles, k, cfg.block_k, band.waves, band.max_split, sms))
    return cfg


__all__ = ["DEQUANT_MODES", "GEMV_MAX_M", "PATHS", "QuantMatmulConfig", "check_config", "pick_config"]
