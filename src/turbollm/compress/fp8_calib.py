"""Calibrated FP8 e4m3 W8A8 (offline, CPU or GPU, float32): better weights for the same runtime.

The runtime format does not change (quant/linear.Fp8LinearMethod, prequantized: weight
float8_e4m3fn [N, K] + weight_scale float32 [N], activations quantized per token at run
time), so a calibrated checkpoint runs on the same GPU kernels. What calibration chooses:
- weight scales: per output row, the scale minimizing sum_k d_k (w_k - s * e4m3(w_k / s))^2
  over a grid of multiples of amax / 448 that includes 1 (so never worse than amax / 448 on
  that objective); d = diag(H) (activation-weighted) or 1;
- GPTQ onto the per-row e4m3 grid: columns are rounded one at a time and each column's
  error is spread over the columns not yet rounded through the Cholesky factor of H^-1
  (Frantar et al. 2022), H = 2 X^T X / n of the inputs the layer sees in the
  already-quantized model (earlier layers and, true-sequentially, earlier linears of the
  same layer FP8 W8A8). A compact copy of compress/gptq.py's loop for a float grid with a
  fixed per-row scale (no groups, no zero points);
- SmoothQuant migration (optional, `smooth_alpha`): per input channel factors
  f_k = amax|x_k|^alpha / amax|W_:k|^(1 - alpha), folded into the preceding RMSNorm weight
  (qkv_proj, gate_up_proj) and into up_proj's rows (down_proj): the float model's function
  is unchanged, only the split of magnitude between x and W moves.
Embeddings, the LM head and the linears matching `keep_dense` stay float. The result is
installed on the model's linears in place (install_fp8), ready for quant/checkpoint.py.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from turbollm.compress.calibration import LayerwiseRunner
from turbollm.compress.gptq import inverse_hessian_factor
from turbollm.layers.linear import QuantizableLinear
from turbollm.quant import grids
from turbollm.quant.linear import Fp8LinearMethod, install_fp8

SEQUENTIAL = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
"""A decoder layer's linears in the order their inputs are produced."""
_EPS = 1e-8


@dataclass(frozen=True)
class Fp8CalibConfig:
    """Options of the calibrated FP8 quantizer (`turbollm quantize --method fp8 --calibrate`)."""

    gptq: bool = True
    """GPTQ error compensation onto the e4m3 grid."""
    scale_search: bool = False
    """Per-row MSE-optimal weight scale (activation-weighted) instead of amax / 448. Off by
    default: alone it recovers half of FP8's loss on SmolLM2, after GPTQ it adds nothing
    (docs/performance.md) and doubles the calibration time."""
    act_order: bool = False
    """GPTQ rounds columns by decreasing diag(H) (the stored codes stay in input order: per-row
    scales have no groups, so the runtime needs no permutation)."""
    smooth_alpha: float | None = None
    """SmoothQuant migration strength in [0, 1]; None: no smoothing."""
    keep_dense: tuple[str, ...] = ()
    """Glob patterns of decoder-linear names left in float (like --quantization-ignore)."""
    damp: float = 0.01
    """GPTQ dampening, a fraction of mean diag(H)."""
    block_size: int = 128
    """GPTQ lazy-update block (columns)."""
    scale_grid: tuple[float, float, int] = (0.8, 1.2, 81)
    """Scale search candidates: linspace(lo, hi, n) x amax / 448 (1.0 is always added)."""

    def __post_init__(self) -> None:
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1]; got {self.smooth_alpha}")
        if not 0.0 < self.damp < 1.0:
            raise ValueError(f"damp must be in (0, 1); got {self.damp}")
        lo, hi, n = self.scale_grid
        if not (0.0 < lo <= 1.0 <= hi and n >= 1):
            raise ValueError(f"scale_grid must be (lo <= 1 <= hi, n >= 1) with lo > 0; got {self.scale_grid}")


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest float8_e4m3fn value (ties to even, saturating at +-448), float32."""
    return x.float().clamp(-grids.FP8_MAX, grids.FP8_MAX).to(torch.float8_e4m3fn).float()


def amax_scales(w: torch.Tensor) -> torch.Tensor:
    """The default per-row scale amax / 448 [N] (grids.quantize_fp8's)."""
    return (w.float().abs().amax(dim=1) / grids.FP8_MAX).clamp_min(_EPS)


def weighted_error(w: torch.Tensor, s: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row sum_k d_k (w - s e4m3(w / s))^2 [N] for w [N, K], s [N], d [K] (None: 1)."""
    wf = w.float()
    err = (wf - s[:, None] * e4m3(wf / s[:, None])).square()  # [N, K]
    return err.sum(1) if d is None else err @ d.float()


@torch.no_grad()
def search_weight_scales(
    w: torch.Tensor, d: torch.Tensor | None = None, grid: tuple[float, float, int] = (0.8, 1.2, 81)
) -> torch.Tensor:
    """Per-row scale [N] minimizing weighted_error over {m * amax / 448 : m in grid or m = 1}.
    Ties keep the earlier candidate, and m = 1 comes first, so amax / 448 wins unless beaten."""
    base = amax_scales(w)  # [N]
    best_s, best_e = base.clone(), weighted_error(w, base, d)
    for m in torch.linspace(*grid[:2], grid[2]).tolist():
        s = base * m
        e = weighted_error(w, s, d)
        better = e < best_e
        best_s = torch.where(better, s, best_s)
        best_e = torch.where(better, e, best_e)
    return best_s


@torch.no_grad()
def gptq_fp8(
    w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, damp: float = 0.01, block_size: int = 128,
    act_order: bool = False,
) -> torch.Tensor:
    """GPTQ of W [N, K] onto the e4m3 grid with the fixed per-row scale [N], for inputs with
    Hessian H [K, K]: the codes q [N, K] float8_e4m3fn (W_hat = q * scale), in input order."""
    w = w.float().clone()  # [N, K], error-updated as columns are rounded
    h = h.float().clone()  # [K, K]
    s = scale.float()[:, None]  # [N, 1]
    n, k = w.shape
    dead = h.diagonal() == 0  # channels never active: any value works
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)  # [K]
        q = gptq_fp8(w[:, perm], h[perm][:, perm], scale, damp, block_size)
        out = torch.empty_like(q)
        out[:, perm] = q
        return out
    hinv = inverse_hessian_factor(h, damp)  # [K, K] upper
    qt = torch.empty(k, n, dtype=torch.float8_e4m3fn, device=w.device)  # codes, column i in row i
    s = s[:, 0]  # [N]
    # The block is held transposed (a column a contiguous row) and updated in place, in as few
    # torch calls a column as possible: the loop runs K times a linear in Python (2x faster
    # than column slices of W on 2 CPU cores).
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        w1 = w[:, b0:b1].t().contiguous()  # [B, N]
        err1 = torch.empty_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            code = (w1[i] / s).clamp_(-grids.FP8_MAX, grids.FP8_MAX).to(torch.float8_e4m3fn)  # [N]
            qt[b0 + i] = code
            e = torch.sub(w1[i], code.float().mul_(s)).div_(hinv1[i, i])  # [N]
            w1[i:].addr_(hinv1[i, i:], e, alpha=-1.0)
            err1[i] = e
        w[:, b1:].addmm_(err1.t(), hinv[b0:b1, b1:], alpha=-1.0)
    return qt.t().contiguous()


def smoothing_factors(act_amax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant factors f [K] = amax|x|^alpha / amax|W_:k|^(1-alpha) (x / f, W * f)."""
    wmax = w.float().abs().amax(dim=0).clamp_min(1e-5)  # [K]
    f = act_amax.float().clamp_min(1e-5).pow(alpha) / wmax.pow(1.0 - alpha)
    return f.clamp_min(1e-5)


@torch.no_grad()
def smooth_decoder_layer(layer: nn.Module, act_amax: dict[str, torch.Tensor], alpha: float) -> None:
    """Fold SmoothQuant factors into one decoder layer (float weights, before quantizing):
    qkv_proj's input through input_layernorm, gate_up_proj's through post_attention_layernorm,
    down_proj's through up_proj's rows. act_amax: per-channel max |x| by linear name
    (relative to the layer). The layer computes the same function (up to float rounding)."""
    qkv, gate_up, down = (layer.get_submodule(n) for n in ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"))
    for norm, lin, name in ((layer.input_layernorm, qkv, "self_attn.qkv_proj"),
                            (layer.post_attention_layernorm, gate_up, "mlp.gate_up_proj")):
        f = smoothing_factors(act_amax[name], lin.weight, alpha)  # [K]
        norm.weight.div_(f.to(norm.weight.dtype))
        _set_weight(lin, lin.weight * f[None, :])
    f = smoothing_factors(act_amax["mlp.down_proj"], down.weight, alpha)  # [I]
    inter = down.weight.shape[1]
    w = gate_up.weight.clone()  # [2I, K]: rows [gate; up]; silu(g) * (u / f) = (silu(g) * u) / f
    w[inter:] /= f[:, None]
    _set_weight(gate_up, w)
    _set_weight(down, down.weight * f[None, :])


def _set_weight(lin: nn.Module, w: torch.Tensor) -> None:
    lin.weight.data.copy_(w.to(lin.weight.dtype))
    if getattr(lin, "packed", None) is not None:
        lin.prepack_cpu()  # type: ignore[operator]


def quantize_linear(lin: QuantizableLinear, h: torch.Tensor | None, cfg: Fp8CalibConfig) -> None:
    """Make one dense linear FP8 (prequantized runtime tensors) with the configured scale
    choice and compensation; h: its input Hessian [K, K] (None: plain amax / 448, no GPTQ)."""
    w = lin.weight.detach().float()  # [N, K]
    if h is not None and cfg.scale_search:
        s = search_weight_scales(w, h.diagonal(), cfg.scale_grid)
    else:
        s = amax_scales(w)
    if h is not None and cfg.gptq:
        q = gptq_fp8(w, h, s, cfg.damp, cfg.block_size, cfg.act_order)
    else:
        q = (w / s[:, None]).clamp(-grids.FP8_MAX, grids.FP8_MAX).to(torch.float8_e4m3fn)
    install_fp8(lin, Fp8LinearMethod(prequantized=True), q, s)


def _dense(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@torch.no_grad()
def _act_amax(runner: LayerwiseRunner, i: int, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| [K] of layer i's named linears at the current boundary."""
    layer = runner.inner.layers[i]
    amax: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], n: str = n) -> None:
            a = args[0].reshape(-1, args[0].shape[-1]).abs().amax(0).float()  # [K]
            amax[n] = a if n not in amax else torch.maximum(amax[n], a)
        handles.append(layer.get_submodule(n).register_forward_pre_hook(hook))
    try:
        runner.layer_stats(i, list(names))
    finally:
        for hd in handles:
            hd.remove()
    return amax


def fp8_calibrate_model(model: nn.Module, windows: Sequence[torch.Tensor | Sequence[int]],
                        cfg: Fp8CalibConfig) -> list[str]:
    """Quantize every decoder linear of a dense Llama-family model to FP8 in place, layer by
    layer from the already-quantized model's activations; returns the names kept dense.

    Afterwards the linears not matching cfg.keep_dense are FP8 prequantized (weight e4m3,
    weight_scale), norm and up_proj weights carry any smoothing, and the model runs (and
    saves, quant/checkpoint.py) as an FP8 checkpoint.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizableLinear)]
    for pattern in cfg.keep_dense:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"keep_dense pattern {pattern!r} matches no decoder linear (names look like "
                             f"{names[0] if names else 'model.layers.0.self_attn.qkv_proj'!r}; q/k/v and gate/up are merged)")
    runner = LayerwiseRunner(model, windows)
    kept: list[str] = []
    for i in range(runner.num_layers):
        layer = runner.inner.layers[i]
        prefix = f"model.layers.{i}."
        if cfg.smooth_alpha is not None:
            if any(_dense(prefix + n, cfg.keep_dense) for n in SEQUENTIAL):
                raise ValueError(f"smoothing folds factors across a decoder layer's linears: keep either "
                                 f"all or none of layer {i}'s linears dense (keep_dense {cfg.keep_dense})")
            names = ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")
            smooth_decoder_layer(layer, _act_amax(runner, i, names), cfg.smooth_alpha)
        for name in SEQUENTIAL:
            if _dense(prefix + name, cfg.keep_dense):
                kept.append(prefix + name)
                continue
            lin = layer.get_submodule(name)
            need_h = cfg.gptq or cfg.scale_search
            h = runner.layer_stats(i, [name])[name].hessian if need_h else None
            quantize_linear(lin, h, cfg)
        runner.run_layer(i, update=True)
    return kept
