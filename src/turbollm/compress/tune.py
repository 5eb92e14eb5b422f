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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from turbollm.compress._int4 import QuantizedModel
from turbollm.compress.calibration import find_linears, forward_window, set_linear_weight
from turbollm.layers.rotary import apply_rope


@dataclass(frozen=True)
class TuneConfig:
    """Options of the distillation pass (defaults: measured on SmolLM2-135M, docs/performance.md)."""

    epochs: int = 2
    """Passes over the calibration windows (one Adam step per window)."""
    lr: float = 2e-3
    """Adam learning rate of the log-scales a and offsets b (b in units of the starting step)."""
    max_tokens: int = 512
    """Longest stretch of a window used per step (longer windows are cut into pieces)."""

    def check(self) -> None:
        """ValueError naming the bad value."""
        if self.epochs < 0:
            raise ValueError(f"tune epochs={self.epochs} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"tune lr={self.lr} must be > 0")
        if self.max_tokens < 2:
            raise ValueError(f"tune max_tokens={self.max_tokens} must be >= 2")


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


def tune_grids(model: nn.Module, teacher: nn.Module, result: QuantizedModel,
               windows: Sequence[torch.Tensor | Sequence[int]], cfg: TuneConfig) -> list[float]:
    """Tune `result`'s scales and zeros in place (codes fixed) so the quantized `model`
    matches the float `teacher` on `windows`; the model's linears then hold the tuned W_hat.
    Returns the mean KL of each epoch (as trained, before that epoch's last step)."""
    cfg.check()
    dev = next(model.parameters()).device
    grids = {name: _Grid(g, dev) for name, g in result.items()}
    pieces = _pieces(windows, cfg.max_tokens, dev)
    with torch.inference_mode():
        targets = [forward_window(teacher, ids) for ids in pieces]  # [T, hidden] each
    targets = [t.clone() for t in targets]  # ordinary tensors (out of inference mode)
    params = [p for g in grids.values() for p in (g.a, g.b)]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    history = []
    for _ in range(cfg.epochs):
        total = 0.0
        for ids, target in zip(pieces, targets, strict=True):
            loss = kl_loss(model, student_hidden(model, grids, ids), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        history.append(total / max(len(pieces), 1))
    linears = {f"model.layers.{n}": m for n, m in find_linears(model.model.layers).items()}  # type: ignore[attr-defined]
    with torch.no_grad():
        for name, g in grids.items():
            s, z = g.scales_zeros()
            result[name]["scales"], result[name]["zeros"] = s.cpu(), z.cpu()
            set_linear_weight(linears[name], g.weight())
    if not all(math.isfinite(h) for h in history):
        raise FloatingPointError(f"grid tuning diverged (epoch KL {history}); lower the learning rate")
    return history
