"""AWQ: activation-aware weight quantization (Lin et al. 2023), offline, on CPU or GPU.

Input channels that carry large activations matter most. For each group of linears that
share an input, AWQ searches a per-input-channel scale s = mean|x|^alpha (alpha on a grid in
[0, 1), normalized so sqrt(max s * min s) = 1) that minimizes the output error of the
quantized layer on calibration activations, multiplies W's columns by s and divides the
producer of x by s (an exact rewrite in float), then (default, AutoAWQ's way) searches
each group's range (lo and hi shrunk independently, then a least-squares refit of
scale and offset: _int4.search_range) and rounds to nearest, on the int4 grid of
compress/_int4.py (by default with a float zero point, a free per-group offset;
`zero_point="integer"` gives AutoAWQ's grid). Opt-in: `gptq` hands the scaled layer to
GPTQ (compress/gptq.py) to round it with error compensation instead (llm-compressor's
AWQ + GPTQ recipe), and `tune` then tunes the grids' scales and offsets end to end against
the float model (compress/tune.py).

The output error of a weight error D [N, K] on inputs X is ||X D^T||^2 = tr(D X^T X D^T), so
both searches use the Hessian H = 2 X^T X / n from calibration.py instead of the raw
activations: exact, and independent of the number of calibration tokens.

Scaled groups per decoder layer (like AutoAWQ for Llama), names relative to the layer:
  self_attn.o_proj     <- v rows of self_attn.qkv_proj  (only without GQA: shapes must match)
  mlp.down_proj        <- up rows of mlp.gate_up_proj
  self_attn.qkv_proj   <- input_layernorm
  mlp.gate_up_proj     <- post_attention_layernorm
The row-folded groups go first so the qkv / gate_up searches see their final rows. As in
AutoAWQ, q and k rows are never clipped (their output error is not the attention error).
Layers are processed in order; layer i's statistics come from the outputs of layers
0..i-1 already quantized, as in GPTQ (AutoAWQ propagates the float outputs instead).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from turbollm.compress import _int4
from turbollm.compress._int4 import Int4Weight, QuantizedModel, RangeSearch
from turbollm.compress.calibration import LayerwiseRunner, LinearStats, set_linear_weight
from turbollm.compress.tune import TuneConfig, tune_grids


@dataclass(frozen=True)
class AWQConfig:
    """Options of the AWQ search (defaults follow AutoAWQ)."""

    bits: int = 4
    """Bits per weight code (the contract's int4 grid: 4)."""
    group_size: int = 128
    """Input columns per scale / zero group (32, 64 or 128; see _int4.group_size_for)."""
    n_grid: int = 20
    """alpha takes the values 0, 1/n_grid, ..., (n_grid - 1)/n_grid; alpha = 0 is plain RTN."""
    duo_scaling: bool = False
    """s = mean|x|^alpha / mean|w|^(1 - alpha) (AutoAWQ's default) instead of mean|x|^alpha."""
    zero_point: str = "float"
    """"float": free per-group offset (z = -lo / s); "integer": the HF-compatible grid (_int4)."""
    clip: bool = True
    """Search each group's range after scaling (AutoAWQ's auto_clip; _int4.search_range)."""
    clip_search: RangeSearch = RangeSearch()
    """How the range search explores: AutoAWQ's is RangeSearch(asymmetric=False, refine=0)."""
    tune: TuneConfig | None = None
    """Afterwards tune every group's scale and offset (codes fixed) end to end against the
    float model on the calibration windows (compress/tune.py; ~3x the fp32 model's memory);
    None (default): no tuning."""
    gptq: bool = False
    """Round the scaled weights with GPTQ (compress/gptq.py, its default GPTQConfig with this
    bits / group size / zero point: act-order, static groups, range search) instead of the
    range search (clip) + round to nearest of AutoAWQ."""


def output_error(d: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """tr(D H D^T): with H = 2 X^T X / n, twice the summed mean-squared output error of D."""
    return (d @ hessian * d).sum()


def search_scale(
    w: torch.Tensor, stats: LinearStats, cfg: AWQConfig, group_size: int
) -> tuple[torch.Tensor, float]:
    """Best input-channel scale s [K] for W [N, K] on inputs with `stats`, and its alpha."""
    x_mean = stats.mean_abs  # [K]
    h = stats.hessian  # [K, K]
    w_mean = None
    if cfg.duo_scaling:
        wg = w.abs().reshape(w.shape[0], -1, group_size)
        w_mean = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(w.shape).mean(0)  # [K]
    best_err, best_s, best_a = float("inf"), torch.ones_like(x_mean), 0.0
    for i in range(cfg.n_grid):
        a = i / cfg.n_grid
        s = x_mean.pow(a)
        if w_mean is not None:
            s = s / w_mean.pow(1 - a).clamp(min=1e-4)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        lo, hi = _int4.minmax_range(w * s, group_size, cfg.zero_point)
        d = _int4.fake_quantize(w * s, lo, hi, group_size, cfg.bits, cfg.zero_point) / s - w  # [N, K]
        err = output_error(d, h).item()
        if err < best_err:
            best_err, best_s, best_a = err, s, a
    return best_s, best_a


def search_clip(
    w: torch.Tensor, hessian: torch.Tensor, cfg: AWQConfig, group_size: int,
    frozen_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scales, zeros) [N, K // G] minimizing each group's output error.

    Group g of row n contributes err = d^T H_gg d, d its weight error and H_gg the diagonal
    block of H for its columns (_int4.search_range). Rows below `frozen_rows` keep the
    min/max grid.
    """
    return _int4.search_range(w, _int4.group_blocks(hessian, group_size), group_size, cfg.bits,
                              cfg.zero_point, cfg.clip_search, frozen_rows)


@dataclass
class _Group:
    linear: str  # the scaled linear, relative to the decoder layer
    norm: str | None = None  # RMSNorm that produces its input
    rows_of: str | None = None  # or: the linear whose rows [start, stop) produce it
    start: int = 0
    stop: int = 0


def _scale_groups(layer: nn.Module) -> list[_Group]:
    attn = layer.self_attn
    groups = []
    if attn.num_heads == attn.num_kv_heads:  # o_proj's input columns are v's rows one to one
        v0 = attn.q_size + attn.kv_size
        groups.append(_Group("self_attn.o_proj", rows_of="self_attn.qkv_proj", start=v0,
                             stop=v0 + attn.kv_size))
    i = layer.mlp.gate_up_proj.local_sizes[0]
    groups.append(_Group("mlp.down_proj", rows_of="mlp.gate_up_proj", start=i, stop=2 * i))
    groups.append(_Group("self_attn.qkv_proj", norm="input_layernorm"))
    groups.append(_Group("mlp.gate_up_proj", norm="post_attention_layernorm"))
    return groups


@torch.no_grad()
def _fold(layer: nn.Module, g: _Group, s: torch.Tensor, changed: set[str]) -> None:
    """W[:, c] *= s[c] on the linear; divide its input's producer by s (exact in float)."""
    lin = layer.get_submodule(g.linear)
    set_linear_weight(lin, lin.weight.float() * s)
    if g.norm is not None:
        norm = layer.get_submodule(g.norm)
        norm.weight.data.copy_((norm.weight.float() / s).to(norm.weight.dtype))
        changed.add(f"{g.norm}.weight")
        return
    src = layer.get_submodule(g.rows_of)
    w = src.weight.float().clone()
    w[g.start:g.stop] /= s[:, None]
    set_linear_weight(src, w)
    if src.bias is not None:
        src.bias.data[g.start:g.stop] /= s.to(src.bias.dtype)
        changed.add(f"{g.rows_of}.bias")


def _frozen_rows(layer: nn.Module, name: str) -> int:
    """q and k rows of the merged qkv_proj are not clipped (AutoAWQ's avoid_clipping)."""
    attn = layer.self_attn
    return attn.q_size + attn.kv_size if name == "self_attn.qkv_proj" else 0


def awq_scale_layer(layer: nn.Module, stats: dict[str, LinearStats], cfg: AWQConfig) -> set[str]:
    """Search and fold the input-channel scales of one decoder layer (in place, exact in
    float); `stats` (of every linear of the layer) become those of the scaled inputs.
    Returns the relative names of the float parameters the folding changed."""
    changed: set[str] = set()
    for g in _scale_groups(layer):
        lin = layer.get_submodule(g.linear)
        gs = _int4.group_size_for(lin.weight.shape[1], cfg.group_size, g.linear)
        s, _ = search_scale(lin.weight.float(), stats[g.linear], cfg, gs)
        _fold(layer, g, s, changed)
        stats[g.linear].scale_inputs(s)  # the linear now sees x / s
    return changed


def awq_quantize_layer(layer: nn.Module, stats: dict[str, LinearStats], cfg: AWQConfig) -> tuple[
        dict[str, Int4Weight], set[str]]:
    """Scale, clip and quantize one decoder layer in place (its linears become W_hat).

    Returns the codes of its linears (module names relative to the layer) and the
    relative names of float parameters the folding changed.
    """
    changed = awq_scale_layer(layer, stats, cfg)
    out: dict[str, Int4Weight] = {}
    for name, st in stats.items():
        lin = layer.get_submodule(name)
        w = lin.weight.float()
        gs = _int4.group_size_for(w.shape[1], cfg.group_size, name)
        if cfg.clip:
            s, z = search_clip(w, st.hessian, cfg, gs, _frozen_rows(layer, name))
            qw = Int4Weight(_int4.quantize(w, s, z, gs, cfg.bits), s, z, gs)
        else:
            qw = _int4.rtn(w, gs, cfg.bits, cfg.zero_point)
        set_linear_weight(lin, qw.dequantize())
        out[name] = qw
    return out, changed


def awq_quantize_model(
    model: nn.Module, calib_windows: Sequence[torch.Tensor], bits: int = 4,
    group_size: int = 128, config: AWQConfig | None = None,
) -> QuantizedModel:
    """AWQ-quantize every decoder linear of a turbollm Llama-family model, in place.

    calib_windows: token ids, each a [T] tensor or a list of ints (e.g.
    calibration.calibration_windows). Afterwards the model's linear weights hold W_hat
    (it can be evaluated as is) and its RMSNorm weights / biases the folded values.
    Returns {module name: {"q", "scales", "zeros"}} for every decoder linear, with the
    changed float parameters in `.float_params` (see _int4.QuantizedModel). Embeddings
    and the LM head stay in float. `config` overrides bits / group_size.
    """
    cfg = config or AWQConfig(bits=bits, group_size=group_size)
    _int4.check_bits(cfg.bits, cfg.group_size, cfg.zero_point)
    cfg.clip_search.check()
    if cfg.gptq:
        # gptq.py imports this module (for the scales), so import it here, not at the top
        from turbollm.compress.gptq import GPTQConfig, gptq_quantize_model

        gcfg = GPTQConfig(bits=cfg.bits, group_size=cfg.group_size, zero_point=cfg.zero_point,
                          awq=replace(cfg, gptq=False, tune=None), tune=cfg.tune)
        return gptq_quantize_model(model, calib_windows, config=gcfg)
    if cfg.tune is not None:
        cfg.tune.check()
    teacher = copy.deepcopy(model) if cfg.tune is not None else None
    runner = LayerwiseRunner(model, calib_windows)
    result = QuantizedModel()
    for i in range(runner.num_layers):
        layer = runner.inner.layers[i]
        codes, changed = awq_quantize_layer(layer, runner.layer_stats(i), cfg)
        prefix = f"model.layers.{i}."
        result.add_codes(prefix, codes)
        result.add_float_params(layer, prefix, changed)
        runner.run_layer(i, update=True)  # the next layer sees this layer's quantized outputs
    del runner
    if teacher is not None:
        tune_grids(model, teacher, result, calib_windows, cfg.tune)  # type: ignore[arg-type]
    return result
