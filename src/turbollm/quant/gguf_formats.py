"""GGUF Q4_0 / Q4_1 linears kept in their quantized form: ggml blocks -> our int4 g32 layout.

`quantization='gguf'` (`--quantization gguf`) asks for it. A ggml 4-bit block holds 32
consecutive input columns of one output row: an fp16 scale d (Q4_1: then an fp16 minimum m)
and 16 bytes of 4-bit codes q, byte j holding column j in its low nibble and column j + 16
in its high nibble. Values: Q4_0 w = d * (q - 8); Q4_1 w = d * q + m. Both are exactly our
int4 grid with group 32 (QUANT_CONTRACT.md: W_hat = (q - zeros) * scales, zeros a float):
- Q4_0: scales d, zeros 8 (exact);
- Q4_1: scales d, zeros -m / d (W_hat = d*q + m up to the float rounding of -m / d and of
  the product); a block with d == 0 is the constant m, stored exactly as q = 0, scale m,
  zero -1.
The loader (models/gguf.py) yields such weights as `<prefix>.ggml_q4_0|ggml_q4_1` uint8
[N, row bytes] in HF row order; `convert_gguf` turns them into `<prefix>.qweight / scales /
zeros` like any prequantized int4 checkpoint, so merged q/k/v and gate/up get their parts
through the usual shard loaders. Scales and zeros are stored in the activation dtype (the
contract's int4 layout): float32 (CPU) keeps them to float rounding; bf16 rounds d and -m/d
to 8 significant bits, and since |-m/d| can be large the error of -m/d (|m| * 2^-9 on a
weight) dominates: on the embedded model the bf16 kept weights are 0.44% (relative RMS)
from the fp32 dequantized ones, against 0.13% for the dequantized weights rounded to bf16.

Q8_0 (32 int8 with an fp16 scale per block) is *not* kept: the int8 runtime (and its Triton
kernels) has one scale per output row, and re-quantizing to that would change the weights.
A file whose decoder linears are Q8_0 (or any type but Q4_0 / Q4_1) runs dequantized;
asking for `gguf` with it is a ValueError naming the tensors. Every decoder linear must be
kept for the model to be built with one int4 method; there is no per-layer mix.

Why it is opt-in (the default stays dequantize-at-load): on CPU, quantized linears run by
dequantizing once and keeping W_hat prepacked beside the int4 tensors (quant/linear.py), so
the block form costs memory there and brings no speed; on the GPU it saves weight memory
(int4 + group-32 scales) and the int4 kernels decode faster at batch 1 than bf16 but not at
large batches (docs/performance.md), and the g32 GGUF path has not been measured there yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from turbollm.quant import grids
from turbollm.quant.methods import Int4Config

GGUF_GROUP = 32
"""Columns per ggml Q4_0 / Q4_1 block: the int4 group size of a kept GGUF linear."""
KEPT_TYPES: dict[str, int] = {"Q4_0": 18, "Q4_1": 20}
"""GGML type name -> bytes per block, for the types kept in block form."""
_LEAVES = {"ggml_" + t.lower(): t for t in KEPT_TYPES}


def q4_blocks_to_int4(raw: torch.Tensor, ggml_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml Q4_0 / Q4_1 rows -> (q uint8 [N, K] in 0..15, scales, zeros float32 [N, K / 32]).

    raw: uint8 [N, K / 32 * block bytes], each row that output row's blocks (little-endian).
    (q - zeros) * scales reproduces gguf's dequantization (exactly for Q4_0).
    """
    if ggml_type not in KEPT_TYPES:
        raise ValueError(f"GGML type {ggml_type!r} cannot be kept as int4; only {', '.join(KEPT_TYPES)}")
    size = KEPT_TYPES[ggml_type]
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] % size:
        raise ValueError(f"{ggml_type} rows must be uint8 [N, blocks * {size}], got {raw.dtype} {tuple(raw.shape)}")
    n = raw.shape[0]
    b = raw.reshape(n, -1, size)  # [N, K/32, block bytes]
    d = b[..., 0:2].contiguous().view(torch.float16)[..., 0].float()  # [N, K/32]
    qs = b[..., size - 16:]  # [N, K/32, 16]
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1)  # [N, K/32, 32]: columns 0..15 low, 16..31 high
    if ggml_type == "Q4_0":
        return q.reshape(n, -1), d, torch.full_like(d, 8.0)
    m = b[..., 2:4].contiguous().view(torch.float16)[..., 0].float()  # [N, K/32]
    flat = d == 0  # a constant block (w = m): q = 0, scale m, zero -1
    scales = torch.where(flat, m, d)
    zeros = torch.where(flat, torch.full_like(d, -1.0), -m / torch.where(flat, 1.0, d))
    q = torch.where(flat[..., None], torch.zeros_like(q), q)
    return q.reshape(n, -1), scales, zeros


def convert_gguf(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The weight stream with each `<prefix>.ggml_q4_0|1` replaced by our int4 runtime tensors."""
    for name, tensor in weights:
        prefix, _, leaf = name.rpartition(".")
        if leaf.startswith("ggml_"):
            if leaf not in _LEAVES:
                raise ValueError(f"{name}: GGML blocks of this type cannot be kept as int4")
            q, s, z = q4_blocks_to_int4(tensor, _LEAVES[leaf])
            yield f"{prefix}.qweight", grids.pack_int4(q)  # [N, K/2]
            yield f"{prefix}.scales", s  # [N, K/32]
            yield f"{prefix}.zeros", z  # [N, K/32]
        else:
            yield name, tensor


def gguf_plan_parts(linear_types: Mapping[str, str] | None, where: str) -> tuple[Int4Config, frozenset[str], str]:
    """(config, GGML types to keep in block form, label) for keeping a GGUF file's Q4 linears.

    linear_types: HF weight name -> GGML type name of each decoder linear (None: the model is
    not a GGUF file). ValueError naming the problem when the file's linears cannot all be kept.
    """
    if linear_types is None:
        raise ValueError(f"quantization='gguf' keeps a GGUF file's Q4_0/Q4_1 weights, but {where} has no "
                         "GGUF weights (a safetensors checkpoint, a preset, or load_format='dummy')")
    if not linear_types:
        raise ValueError(f"{where}: the GGUF file has no decoder-linear weights to keep")
    others = {n: t for n, t in linear_types.items() if t not in KEPT_TYPES}
    if others:
        kinds = sorted(set(others.values()))
        example = next(iter(others))
        why = (" (Q8_0 has a scale per 32 weights; the int8 runtime has one per output row, so Q8_0 "
               "runs dequantized)" if "Q8_0" in kinds else "")
        raise ValueError(
            f"{where}: quantization='gguf' keeps only Q4_0/Q4_1 linears, but {len(others)} of "
            f"{len(linear_types)} are {', '.join(kinds)} (e.g. {example}){why}; leave quantization "
            "unset to dequantize the file at load, or pass int8/int4 to requantize it"
        )
    kept = frozenset(linear_types.values())
    return Int4Config(GGUF_GROUP, calibration="gguf"), kept, f"gguf {'+'.join(sorted(kept))} (int4 g32)"
