"""HF 4-bit checkpoints (AutoAWQ GEMM, GPTQ) converted to our int4 runtime layout at load.

Both store, per linear (W is [N, K] = [out, in]; G the group size):
- AutoAWQ GEMM: qweight int32 [K, N / 8] (8 output columns per int32, nibble i holding
  column `AWQ_ORDER[i]` of its 8), qzeros int32 [K / G, N / 8] (same packing), scales
  [K / G, N]; W[n, k] = (q - z) * s of group k // G.
- GPTQ: qweight int32 [K / 8, N] (8 input rows per int32, nibble j = row 8i + j), qzeros
  int32 [K / G, N / 8] (nibble j = column 8i + j; the stored value is z - 1 in the original
  "gptq" format, z itself in "gptq_v2"), scales [K / G, N], g_idx int32 [K] (the group of
  each input column; a permutation of groups under act-order / desc_act).
Ours (QUANT_CONTRACT.md): qweight uint8 [N, K / 2], scales and zeros [N, K / G], and under
act-order a perm [K] with groups contiguous in stored column order. Conversion is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import torch

from turbollm.quant import grids
from turbollm.quant.methods import Int4Config

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble i of an AutoAWQ int32 holds output column AWQ_ORDER[i] of its group of 8."""
_AWQ_INVERSE = tuple(AWQ_ORDER.index(j) for j in range(8))  # column j sits in nibble _AWQ_INVERSE[j]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # [8]

Converter = Callable[[Iterable[tuple[str, torch.Tensor]]], Iterator[tuple[str, torch.Tensor]]]


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> [..., C, 8] nibble i = bits 4i..4i+3 (sign-safe)."""
    return (packed.to(torch.int32).unsqueeze(-1) >> _SHIFTS) & 0xF


def unpack_awq_cols(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ int32 [R, C / 8] -> int [R, C] in column order."""
    nib = _nibbles(packed)[..., list(_AWQ_INVERSE)]  # [R, C/8, 8] by column
    return nib.reshape(packed.shape[0], -1)


def pack_awq_cols(values: torch.Tensor) -> torch.Tensor:
    """int [R, C] (0..15) -> AutoAWQ int32 [R, C / 8] (the inverse of unpack_awq_cols)."""
    v = values.to(torch.int64).reshape(values.shape[0], -1, 8)[..., list(AWQ_ORDER)]  # nibble order
    return _pack_last(v)


def unpack_seq_cols(packed: torch.Tensor) -> torch.Tensor:
    """GPTQ qzeros int32 [R, C / 8] -> [R, C] (nibble j = column 8i + j)."""
    return _nibbles(packed).reshape(packed.shape[0], -1)


def pack_seq_cols(values: torch.Tensor) -> torch.Tensor:
    return _pack_last(values.to(torch.int64).reshape(values.shape[0], -1, 8))


def unpack_gptq_rows(packed: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight int32 [K / 8, N] -> [K, N] (nibble j of row i = input row 8i + j)."""
    nib = _nibbles(packed.t().contiguous())  # [N, K/8, 8]
    return nib.reshape(packed.shape[1], -1).t()  # [K, N]


def pack_gptq_rows(values: torch.Tensor) -> torch.Tensor:
    """int [K, N] -> GPTQ int32 [K / 8, N]."""
    return _pack_last(values.t().to(torch.int64).reshape(values.shape[1], -1, 8)).t().contiguous()


def _pack_last(v: torch.Tensor) -> torch.Tensor:
    """[..., C, 8] values 0..15 -> int32 [..., C], nibble i from v[..., i] (wraps to signed)."""
    word = (v << _SHIFTS.to(torch.int64)).sum(-1)  # [..., C] in 0..2^32-1
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _runtime(prefix: str, q_nk: torch.Tensor, s_nk: torch.Tensor, z_nk: torch.Tensor,
             perm: torch.Tensor | None) -> Iterator[tuple[str, torch.Tensor]]:
    yield f"{prefix}.qweight", grids.pack_int4(q_nk.to(torch.uint8))
    yield f"{prefix}.scales", s_nk.contiguous()
    yield f"{prefix}.zeros", z_nk.contiguous()
    if perm is not None:
        yield f"{prefix}.perm", perm


def _convert_awq(t: dict[str, torch.Tensor], group_size: int) -> tuple[Any, ...]:
    q = unpack_awq_cols(t["qweight"]).t()  # [N, K]
    z = unpack_awq_cols(t["qzeros"]).t().float()  # [N, K/G]
    s = t["scales"].t().float()  # [N, K/G]
    if s.shape[1] * group_size != q.shape[1]:
        raise ValueError(f"AWQ scales {tuple(t['scales'].shape)} do not fit group size {group_size}")
    return q, s, z, None


def _convert_gptq(t: dict[str, torch.Tensor], group_size: int, zero_offset: int, act_order: bool) -> tuple[Any, ...]:
    q = unpack_gptq_rows(t["qweight"]).t()  # [N, K]
    # "gptq" stored (z - 1) & 0xF; adding 1 back mod 16 undoes it (z = 0 was stored as 15).
    z = ((unpack_seq_cols(t["qzeros"]) + zero_offset) % 16).t().float()  # [N, K/G]
    s = t["scales"].t().float()  # [N, K/G]
    k = q.shape[1]
    if s.shape[1] * group_size != k:
        raise ValueError(f"GPTQ scales {tuple(t['scales'].shape)} do not fit group size {group_size}")
    sequential = torch.arange(k) // group_size
    g_idx = t.get("g_idx", sequential).to(torch.int64)
    if not act_order:
        if not torch.equal(g_idx, sequential):
            raise ValueError("g_idx is not sequential but desc_act is false")
        return q, s, z, None
    perm = torch.argsort(g_idx, stable=True)  # [K] stored column j <- input column perm[j]
    if not torch.equal(g_idx[perm], sequential):
        raise ValueError(f"g_idx does not give every group exactly {group_size} columns")
    return q[:, perm], s, z, perm


def _buffered(
    weights: Iterable[tuple[str, torch.Tensor]], needed: tuple[str, ...],
    convert: Callable[[dict[str, torch.Tensor]], tuple[Any, ...]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Collect each linear's packed tensors, emit our runtime tensors once all arrived."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, leaf = name.rpartition(".")
        if leaf not in (*needed, "g_idx"):
            yield name, tensor
            continue
        parts = pending.setdefault(prefix, {})
        parts[leaf] = tensor
        if all(n in parts for n in needed) and ("g_idx" in parts or "g_idx" not in needed):
            yield from _runtime(prefix, *convert(pending.pop(prefix)))
    if pending:
        prefix, parts = next(iter(pending.items()))
        raise ValueError(f"{prefix}: incomplete quantized linear (has {', '.join(sorted(parts))})")


def _check_bits(d: dict[str, Any], what: str) -> int:
    bits, group = d.get("bits", d.get("w_bit")), d.get("group_size", d.get("q_group_size"))
    if bits != 4:
        raise ValueError(f"{what} checkpoints load with bits=4 only; got bits={bits}")
    if not isinstance(group, int) or group not in grids.INT4_GROUP_SIZES:
        raise ValueError(f"{what} group_size must be one of {grids.INT4_GROUP_SIZES}; got {group!r}")
    return group


def awq_plan_parts(d: dict[str, Any]) -> tuple[Int4Config, Converter]:
    """(config, weight converter) for an AutoAWQ GEMM quantization_config."""
    group = _check_bits(d, "AWQ")
    version = str(d.get("version", "gemm")).lower()
    if version != "gemm" or d.get("zero_point", True) is not True:
        raise ValueError(f"AWQ: only version 'gemm' with zero_point=true loads; got version={version!r}")
    conv = partial(_buffered, needed=("qweight", "qzeros", "scales"),
                   convert=partial(_convert_awq, group_size=group))
    return Int4Config(group, act_order=False, calibration="hf-awq"), conv


def gptq_plan_parts(d: dict[str, Any]) -> tuple[Int4Config, Converter]:
    """(config, weight converter) for a GPTQ quantization_config (gptq or gptq_v2 format)."""
    group = _check_bits(d, "GPTQ")
    fmt = d.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format must be gptq or gptq_v2; got {fmt!r}")
    act_order = bool(d.get("desc_act", False))
    conv = partial(_buffered, needed=("qweight", "qzeros", "scales", "g_idx"),
                   convert=partial(_convert_gptq, group_size=group, zero_offset=1 if fmt == "gptq" else 0,
                                   act_order=act_order))
    return Int4Config(group, act_order=act_order, calibration="hf-gptq"), conv
