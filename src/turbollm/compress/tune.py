"""End-to-end tuning of the int4 grids' scales and offsets by distillation (offline, CPU or GPU).

After AWQ or GPTQ have chosen every decoder linear's codes q, the group scales s and offsets
m = -z * s are continuous: this pass keeps q fixed and moves (s, m) of all linears together
to minimize KL(p_float || p_quant) of the next-token distributions on the calibration
windows (the float model is the teacher), by Adam on a log-scale a and an offset b in units
of the starting step s0 of each group:

    W_hat[n, k] = s0 e^a (q[n, k] - z0) + s0 b        (group of k; a = b = 0 at the start)

so the result is again a grid (s, z) = (s0 e^a, z0 - b e^-a): same codes, same runtime.
This is the "P step" of PV-tuning / EfficientQAT's E2E-QP, kept small: per-group affine
parameters only (2.9 M for SmolLM2-135M: 1.45 M groups), a few passes over the calibration
windows. GPTQ and AWQ fit each linear's own output; this fits the model's output, where
their layer-wise errors add up (docs/performance.md, all 101 held-out windows: GPTQ +3.52% ->
+1.76%, +3.84% -> +2.32% and +3.68% -> +2.26% on three calibrations).

Owns nothing persistent: the student's weights are rebuilt from (q, s, z) by a plain
PyTorch forward in float32 (attention by scaled_dot_product_attention) on the model's
device, checked against the engine's forward in the tests; the teacher runs the engine's
forward. Memory: the float teacher (a copy of the model) and each linear's q - z0 in float32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from turbollm.compress._int4 import QuantizedModel
from turbollm.compress.calibration import find_linears, forward_window, set_linear_weight
from turbollm.layers.rotary import apply_rope

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneConfig:
    """Options of the distillation pass (defaults: measured on SmolLM2-135M, docs/performance.md)."""

    epochs: int = 2
    """Passes over the calibration windows (one Adam step per window)."""
    lr: float = 2e-3
    """Adam learning rate of the log-scales a and offsets b (b in units of the starting step)."""
    max_tokens: int = 512
    """Longest stretch of a window used per step (longer windows are cut into pieces)."""
    offset_lr_scale: float = 1.0
    """The offsets b learn at lr * this; 0 freezes them (only the log-scales a move: half the
    free parameters)."""
    validation: int = 0
    """Calibration windows held back from the steps (evenly spaced among those given) to
    validate on: the tuning hands back the grids with the lowest mean KL on them, measured
    before the first step and every `validate_every` steps (early stopping). 0 (default):
    no validation; the last step's grids."""
    validate_every: int = 0
    """Steps between two validations (0: at the end of each epoch); used with `validation`."""

    def check(self) -> None:
        """ValueError naming the bad value."""
        if self.epochs < 0:
            raise ValueError(f"tune epochs={self.epochs} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"tune lr={self.lr} must be > 0")
        if self.max_tokens < 2:
            raise ValueError(f"tune max_tokens={self.max_tokens} must be >= 2")
        if not 0 <= self.offset_lr_scale < math.inf:
            raise ValueError(f"tune offset_lr_scale={self.offset_lr_scale} must be >= 0 and finite")
        if self.validation < 0:
            raise ValueError(f"tune validation={self.validation} must be >= 0 (0: no validation)")
        if self.validate_every < 0:
            raise ValueError(f"tune validate_every={self.validate_every} must be >= 0 (0: each epoch)")


class _Grid(nn.Module):
    """One linear's trainable grid: W_hat = s0 e^a (q - z0) + s0 b, groups of G columns."""

    def __init__(self, grid: dict[str, torch.Tensor], device: torch.device) -> None:
        super().__init__()
        q, s0, z0 = (grid[k].to(device) for k in ("q", "scales", "zeros"))
        self.group_size = q.shape[1] // s0.shape[1]
        self.register_buffer("qz", q.float() - z0.repeat_interleave(self.group_size, 1))  # [N, K]
        self.register_buffer("s0", s0.float())  # [N, K // G]
        self.register_buffer("z0", z0.float())  # [N, K // G]
        self.a = nn.Parameter(torch.zeros_like(self.s0))  # [N, K // G] log-scale
        self.b = nn.Parameter(torch.zeros_like(self.s0))  # [N, K // G] offset / s0
        perm = grid.get("perm")  # GPTQ act-order with dynamic groups: q's columns are permuted
        self.inverse_perm = None if perm is None else torch.argsort(perm.to(device))  # [K]

    def weight(self) -> torch.Tensor:
        """W_hat [N, K] in the model's column order."""
        s = (self.s0 * self.a.exp()).repeat_interleave(self.group_size, 1)  # [N, K]
        m = (self.s0 * self.b).repeat_interleave(self.group_size, 1)  # [N, K]
        w = s * self.qz + m
        return w if self.inverse_perm is None else w[:, self.inverse_perm]

    @torch.no_grad()
    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, z) [N, K // G] of the tuned grid (same codes)."""
        return self.s0 * self.a.exp(), self.z0 - self.b * (-self.a).exp()


def _linear(x: torch.Tensor, mod: nn.Module, grids: dict[str, _Grid], name: str) -> torch.Tensor:
    w = grids[name].weight() if name in grids else mod.weight.float()
    bias = getattr(mod, "bias", None)
    return F.linear(x, w, None if bias is None else bias.float())


def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return norm.weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def student_hidden(model: nn.Module, grids: dict[str, _Grid], ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states [T, hidden] of the model with the grids' weights (autograd on),
    one sequence ids [T] at positions 0..T-1; computed in float32 whatever the model's dtype."""
    inner = model.model  # type: ignore[attr-defined]
    x = inner.embed_tokens(ids).float()  # [T, hidden]
    t = ids.numel()
    cos, sin = inner.rotary.cos_sin(torch.arange(t, device=ids.device), x.dtype)  # [T, 1, D / 2] each
    for i, layer in enumerate(inner.layers):
        p = f"model.layers.{i}."
        attn = layer.self_attn
        d = attn.q_size // attn.num_heads
        qkv = _linear(_norm(x, layer.input_layernorm), attn.qkv_proj, grids, p + "self_attn.qkv_proj")
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)  # [T, H * D], [T, KV * D] x 2
        q, k = apply_rope(q, cos, sin, d), apply_rope(k, cos, sin, d)
        rep = attn.num_heads // attn.num_kv_heads
        q = q.view(t, attn.num_heads, d).transpose(0, 1)  # [H, T, D]
        k = k.view(t, attn.num_kv_heads, d).transpose(0, 1).repeat_interleave(rep, 0)  # [H, T, D]
        v = v.view(t, attn.num_kv_heads, d).transpose(0, 1).repeat_interleave(rep, 0)  # [H, T, D]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [H, T, D]
        o = o.transpose(0, 1).reshape(t, attn.q_size)  # [T, H * D]
        x = x + _linear(o, attn.o_proj, grids, p + "self_attn.o_proj")
        gate_up = _linear(_norm(x, layer.post_attention_layernorm), layer.mlp.gate_up_proj, grids,
                          p + "mlp.gate_up_proj")  # [T, 2 I]
        gate, up = gate_up.chunk(2, dim=-1)
        x = x + _linear(F.silu(gate) * up, layer.mlp.down_proj, grids, p + "mlp.down_proj")
    return _norm(x, inner.norm)


def _pieces(windows: Sequence[torch.Tensor | Sequence[int]], max_tokens: int,
            device: torch.device) -> list[torch.Tensor]:
    out = []
    for w in windows:
        w = torch.as_tensor(w, dtype=torch.long).reshape(-1).to(device)
        out += [w[i:i + max_tokens] for i in range(0, w.numel(), max_tokens) if w[i:i + max_tokens].numel() > 1]
    return out


def kl_loss(model: nn.Module, hidden: torch.Tensor, teacher_hidden: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student) from final hidden states [T, hidden]."""
    total = hidden.new_zeros(())
    dtype = teacher_hidden.dtype  # the model's: the LM head runs in it
    for r in range(0, hidden.shape[0], chunk):
        logp = F.log_softmax(model.compute_logits(hidden[r:r + chunk].to(dtype)).float(), -1)  # type: ignore[operator]
        with torch.no_grad():
            logq = F.log_softmax(model.compute_logits(teacher_hidden[r:r + chunk]).float(), -1)  # type: ignore[operator]
        total = total + F.kl_div(logp, logq, log_target=True, reduction="sum")
    return total / hidden.shape[0]


def split_validation(windows: Sequence[torch.Tensor | Sequence[int]], count: int) -> tuple[
        list[torch.Tensor | Sequence[int]], list[torch.Tensor | Sequence[int]]]:
    """(training, validation) windows: `count` of them, evenly spaced, held back for validation."""
    n = len(windows)
    if count == 0:
        return list(windows), []
    if count >= n:
        raise ValueError(f"tune validation={count} leaves none of the {n} calibration windows to train on")
    held = sorted({int((j + 0.5) * n / count) for j in range(count)})  # distinct: spacing n / count >= 1
    return [w for i, w in enumerate(windows) if i not in held], [windows[i] for i in held]


def _teacher_hidden(teacher: nn.Module, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.inference_mode():
        targets = [forward_window(teacher, ids) for ids in pieces]  # [T, hidden] each
    return [t.clone() for t in targets]  # ordinary tensors (out of inference mode)


@torch.no_grad()
def validation_kl(model: nn.Module, grids: dict[str, _Grid], pieces: list[torch.Tensor],
                  targets: list[torch.Tensor]) -> float:
    """Mean over pieces of kl_loss of the grids' model against the teacher's hidden states."""
    total = sum(kl_loss(model, student_hidden(model, grids, ids), t).item() for ids, t in zip(pieces, targets, strict=True))
    return total / len(pieces)


class _EarlyStop:
    """Early stopping: the grids' (a, b) at their lowest validation KL so far (a copy on the
    model's device, 2 floats per group: 12 MB for SmolLM2-135M)."""

    def __init__(self, model: nn.Module, grids: dict[str, _Grid], pieces: list[torch.Tensor],
                 targets: list[torch.Tensor]) -> None:
        self.model, self.grids, self.pieces, self.targets = model, grids, pieces, targets
        self.best = math.inf
        self.state: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.history: list[tuple[int, float]] = []  # (step, validation KL)

    def __call__(self, step: int) -> None:
        if not self.pieces:
            return
        kl = validation_kl(self.model, self.grids, self.pieces, self.targets)
        self.history.append((step, kl))
        logger.info("grid tuning: step %d, validation KL %.5f", step, kl)
        if kl < self.best:  # a NaN never wins
            self.best = kl
            self.state = {n: (g.a.detach().clone(), g.b.detach().clone()) for n, g in self.grids.items()}

    @torch.no_grad()
    def restore(self) -> None:
        """Put the best-validated (a, b) back (no-op without validation)."""
        if self.state is None:
            return
        for name, (a, b) in self.state.items():
            self.grids[name].a.copy_(a)
            self.grids[name].b.copy_(b)
        step = min(self.history, key=lambda h: h[1] if math.isfinite(h[1]) else math.inf)[0]
        logger.info("grid tuning: keeping step %d (validation KL %.5f)", step, self.best)


def _optimizer(grids: dict[str, _Grid], cfg: TuneConfig) -> torch.optim.Optimizer:
    groups = [{"params": [g.a for g in grids.values()], "lr": cfg.lr}]
    if cfg.offset_lr_scale > 0:  # else the offsets stay at b = 0
        groups.append({"params": [g.b for g in grids.values()], "lr": cfg.lr * cfg.offset_lr_scale})
    return torch.optim.Adam(groups)


def tune_grids(model: nn.Module, teacher: nn.Module, result: QuantizedModel,
               windows: Sequence[torch.Tensor | Sequence[int]], cfg: TuneConfig) -> list[float]:
    """Tune `result`'s scales and zeros in place (codes fixed) so the quantized `model`
    matches the float `teacher` on `windows`; the model's linears then hold the tuned W_hat.
    With cfg.validation, that many windows only validate, and the best-validated grids win.
    Returns the mean training KL of each epoch (as trained, before that epoch's last step)."""
    cfg.check()
    dev = next(model.parameters()).device
    grids = {name: _Grid(g, dev) for name, g in result.items()}
    train, val = split_validation(windows, cfg.validation)
    pieces = _pieces(train, cfg.max_tokens, dev)
    targets = _teacher_hidden(teacher, pieces)
    val_pieces = _pieces(val, cfg.max_tokens, dev)
    early = _EarlyStop(model, grids, val_pieces, _teacher_hidden(teacher, val_pieces))
    every = cfg.validate_every or len(pieces)
    opt = _optimizer(grids, cfg)
    history, step = [], 0
    early(step)
    for epoch in range(cfg.epochs):
        total = 0.0
        for ids, target in zip(pieces, targets, strict=True):
            loss = kl_loss(model, student_hidden(model, grids, ids), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            step += 1
            if step % every == 0:
                early(step)
        history.append(total / max(len(pieces), 1))
        logger.info("grid tuning: epoch %d of %d, mean KL %.5f", epoch + 1, cfg.epochs, history[-1])
    if step % every != 0:
        early(step)
    early.restore()
    linears = {f"model.layers.{n}": m for n, m in find_linears(model.model.layers).items()}  # type: ignore[attr-defined]
    with torch.no_grad():
        for name, g in grids.items():
            s, z = g.scales_zeros()
            result[name]["scales"], result[name]["zeros"] = s.cpu(), z.cpu()
            set_linear_weight(linears[name], g.weight())
    if early.state is None and not all(math.isfinite(h) for h in history):
        raise FloatingPointError(f"grid tuning diverged (epoch KL {history}); lower the learning rate")
    return history
