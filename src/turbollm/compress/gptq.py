"""GPTQ: Hessian-based int4 quantization with error compensation (Frantar et al. 2022).

Offline, on CPU or GPU, float32. For a linear with inputs X and H = 2 X^T X / n, GPTQ
quantizes W's columns one at a time and spreads each column's rounding error over the
columns not yet quantized, weighted by the Cholesky factor of H^-1 (damped by
`damp` * mean diag H), in blocks of 128 columns with lazy updates. With act-order, columns
are processed by decreasing diag(H). Group scale / zero come from _int4 (by default a float
zero point and the per-group range search on H's diagonal block) and are computed either
all at once from W before any update (`static_groups`, the default: codes stay in input
order, no runtime permutation), or when a group starts, from the error-updated columns;
then under act-order the groups are contiguous in the permuted order and the codes come
with `perm`, so the runtime computes x[:, perm] @ W_stored^T (contract).

Layers are quantized in order from activations of the already-quantized earlier layers.
With `true_sequential`, inside a layer qkv_proj, o_proj, gate_up_proj and down_proj are
also quantized one after another, each from inputs produced by the quantized ones before.
Options: `awq` first folds AWQ's input-channel scales into the layer (compress/awq.py),
then GPTQ quantizes the scaled weights; `tune` (opt-in: `turbollm quantize --tune 2`)
afterwards tunes every group's scale and offset end to end against the float model
(compress/tune.py). Both are off by default, so `--method gptq` is GPTQ.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from turbollm.compress import _int4
from turbollm.compress._int4 import Int4Weight, QuantizedModel, RangeSearch
from turbollm.compress.awq import AWQConfig, awq_scale_layer
from turbollm.compress.calibration import LayerwiseRunner, set_linear_weight
from turbollm.compress.tune import TuneConfig, tune_grids

SEQUENTIAL_GROUPS = (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                     ("mlp.down_proj",))
"""Order of a layer's linears under true_sequential (each group from the one before)."""


@dataclass(frozen=True)
class GPTQConfig:
    """Options of GPTQ (defaults follow the reference implementation)."""

    bits: int = 4
    """Bits per weight code (the contract's int4 grid: 4)."""
    group_size: int = 128
    """Input columns per scale / zero group (32, 64 or 128; see _int4.group_size_for)."""
    act_order: bool = True
    """Quantize columns by decreasing diag(H) (with static_groups only the processing order,
    else the groups form in that order and the result carries the permutation)."""
    damp: float = 0.01
    """Dampening added to diag(H), as a fraction of its mean."""
    block_size: int = 128
    """Columns per lazy-update block (a multiple of the group size)."""
    true_sequential: bool = True
    """Re-collect inputs after each of a layer's linears is quantized."""
    zero_point: str = "float"
    """"float": free per-group offset (z = -lo / s); "integer": the HF-compatible grid (_int4)."""
    range_search: RangeSearch | None = RangeSearch()
    """Search each group's range when the group starts (None: its min/max, as the reference)."""
    static_groups: bool = True
    """Fix every group's grid from W before any error update. With act_order the codes then
    stay in input order (no perm at runtime): act-order only sets the processing order."""
    awq: AWQConfig | None = None
    """First search and fold AWQ's input-channel scales into each layer (compress/awq.py),
    then run GPTQ on the scaled weights (llm-compressor's AWQ + GPTQ recipe); its gptq and tune
    fields are not used here."""
    tune: TuneConfig | None = None
    """Afterwards tune every group's scale and offset (codes fixed) end to end against the
    float model on the calibration windows (compress/tune.py; ~3x the fp32 model's memory);
    None (default): no tuning."""


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1 [K, K]."""
    h = h.clone()
    k = h.shape[0]
    h.diagonal().add_(damp * h.diagonal().mean())
    for extra in (0.0, 1e-6, 1e-4, 1e-2):  # rare: H numerically indefinite; damp harder
        try:
            if extra:
                h.diagonal().add_(extra * h.diagonal().mean())
            lower = torch.linalg.cholesky(h)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError(f"the {k}x{k} Hessian is not positive definite even when damped")


def _group_grid(w: torch.Tensor, h: torch.Tensor, cfg: GPTQConfig,
                group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, z) [N, K // G] of W [N, K] whose columns have the Hessian H [K, K]."""
    if cfg.range_search is None:
        lo, hi = _int4.minmax_range(w, group_size, cfg.zero_point)
        return _int4.scale_zero(lo, hi, cfg.bits, cfg.zero_point)
    return _int4.search_range(w, _int4.group_blocks(h, group_size), group_size, cfg.bits,
                              cfg.zero_point, cfg.range_search)


@torch.no_grad()
def gptq_quantize_weight(w: torch.Tensor, hessian: torch.Tensor, cfg: GPTQConfig,
                         group_size: int) -> Int4Weight:
    """GPTQ codes of W [N, K] (any float dtype) for inputs with Hessian H [K, K]."""
    w = w.float().clone()  # [N, K]
    h = hessian.float().clone()  # [K, K]
    n, k = w.shape
    dead = h.diagonal() == 0  # channels never active: any value works, zero them
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    ng = k // group_size
    static = _group_grid(w, h, cfg, group_size) if cfg.static_groups else None  # input-order groups
    perm = None
    if cfg.act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    # group of each processed column: its input column's group (static) or its position's
    col_group = (perm if perm is not None and static is not None else torch.arange(k)) // group_size
    hinv = inverse_hessian_factor(h, cfg.damp)  # [K, K] upper
    maxq = 2**cfg.bits - 1
    q = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    scales, zeros = static if static is not None else (torch.zeros(n, ng, device=w.device),
                                                      torch.zeros(n, ng, device=w.device))
    bs = max(group_size, cfg.block_size // group_size * group_size)
    for b0 in range(0, k, bs):
        b1 = min(b0 + bs, k)
        w1 = w[:, b0:b1].clone()  # [N, B], updated with this block's errors as it goes
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if static is None and col % group_size == 0:  # groups lie inside blocks (bs: multiple of G)
                gi = col // group_size
                sg, zg = _group_grid(w1[:, i:i + group_size], h[col:col + group_size, col:col + group_size],
                                     cfg, group_size)
                scales[:, gi], zeros[:, gi] = sg[:, 0], zg[:, 0]
            gi = int(col_group[col])
            s, z = scales[:, gi], zeros[:, gi]
            wc = w1[:, i]
            qc = torch.round(wc / s + z).clamp(0, maxq)
            q[:, col] = qc.to(torch.uint8)
            e = (wc - (qc - z) * s) / hinv1[i, i]  # [N]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    if static is not None and perm is not None:  # back to input order: no runtime perm
        q_in = torch.empty_like(q)
        q_in[:, perm] = q
        q, perm = q_in, None
    return Int4Weight(q, scales, zeros, group_size, perm)


@torch.no_grad()
def _quantize_linears(layer: nn.Module, stats: dict, cfg: GPTQConfig) -> dict[str, Int4Weight]:
    out = {}
    for name, st in stats.items():
        lin = layer.get_submodule(name)
        gs = _int4.group_size_for(lin.weight.shape[1], cfg.group_size, name)
        qw = gptq_quantize_weight(lin.weight, st.hessian, cfg, gs)
        set_linear_weight(lin, qw.dequantize())
        out[name] = qw
    return out


def gptq_quantize_model(
    model: nn.Module, calib_windows: Sequence[torch.Tensor], bits: int = 4,
    group_size: int = 128, act_order: bool = True, config: GPTQConfig | None = None,
) -> QuantizedModel:
    """GPTQ-quantize every decoder linear of a turbollm Llama-family model, in place.

    calib_windows: token ids, each a [T] tensor or a list of ints (e.g.
    calibration.calibration_windows). Afterwards the model's linear weights hold W_hat in
    the original column order (it can be evaluated as is). Returns {module name: {"q",
    "scales", "zeros"} + "perm" under act-order} for every decoder linear (see
    _int4.QuantizedModel); float_params holds the RMSNorm weights / biases that AWQ's
    scales changed (config.awq), else it stays empty.
    Embeddings and the LM head stay in float. `config` overrides bits / group_size / act_order.
    Defaults (GPTQConfig): act-order with static groups (no "perm": codes in input order),
    float zero points, the per-group range search; grid tuning (compress/tune.py) if asked.
    """
    cfg = config or GPTQConfig(bits=bits, group_size=group_size, act_order=act_order)
    _int4.check_bits(cfg.bits, cfg.group_size, cfg.zero_point)
    if cfg.range_search is not None:
        cfg.range_search.check()
    if cfg.damp <= 0:
        raise ValueError(f"GPTQ damp={cfg.damp} must be > 0")
    if cfg.awq is not None:
        _int4.check_bits(cfg.awq.bits, cfg.awq.group_size, cfg.awq.zero_point)
    if cfg.tune is not None:
        cfg.tune.check()
    teacher = copy.deepcopy(model) if cfg.tune is not None else None
    runner = LayerwiseRunner(model, calib_windows)
    result = QuantizedModel()
    order = SEQUENTIAL_GROUPS if cfg.true_sequential else (sum(SEQUENTIAL_GROUPS, ()),)
    for i in range(runner.num_layers):
        layer = runner.inner.layers[i]
        prefix = f"model.layers.{i}."
        if cfg.awq is not None:
            result.add_float_params(layer, prefix, awq_scale_layer(layer, runner.layer_stats(i), cfg.awq))
        for names in order:
            result.add_codes(prefix, _quantize_linears(layer, runner.layer_stats(i, names), cfg))
        runner.run_layer(i, update=True)
    del runner
    if teacher is not None:
        tune_grids(model, teacher, result, calib_windows, cfg.tune)  # type: ignore[arg-type]
    return result
