"""Accuracy evaluation: perplexity and next-token agreement on held-out text.

One fixed protocol, so numbers from different methods compare:
1. the corpus's text (compress/corpus.py; default the held-out Shakespeare part) is
   tokenized whole with the model's tokenizer (no special tokens added);
2. the token stream is cut into non-overlapping windows of `window` tokens, by default
   min(2048, the model's context length); a final partial window is dropped;
3. each window is one sequence prefilled from position 0 (no context carried over), and
   every position but the last predicts the next token: window - 1 predictions per window;
4. perplexity = exp(mean token-level negative log-likelihood over all predictions).
`compare` runs two models over the same windows and reports, over the same predictions,
top-1 agreement (argmaxes equal) and mean KL(P_a || P_b) of the next-token distributions,
plus each model's perplexity. `max_windows` caps the windows (first ones) for quick runs.

Everything runs on the models' device; logits are made and reduced in row chunks so a
2048-token window never holds a [window, vocab] float32 tensor more than a chunk at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from turbollm.compress import corpus
from turbollm.layers.attention import AttentionMetadata, check_kv_cache_device
from turbollm.models.build import build_model, resolve_device, resolve_dtype
from turbollm.models.loader import resolve_model
from turbollm.quant.plan import resolve_quantization

MAX_WINDOW = 2048
BLOCK_SIZE = 16  # KV-cache block size of the evaluation forward
_ROW_CHUNK = 512  # logits rows reduced at a time


@dataclass
class EvalModel:
    """A built model (on its device, eval mode) with its tokenizer and how it was made."""

    model: nn.Module
    tokenizer: Any
    name: str
    quantization: str
    """'none' or the method (e.g. 'int4 g128')."""
    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype | None = None
    """The KV cache's dtype when it differs from the model's (FP8 cache); None: the model's."""

    @property
    def context_length(self) -> int:
        return int(self.model.arch.max_position_embeddings)  # type: ignore[union-attr]


def load_eval_model(
    model: str | None, quantization: str | None = None, group_size: int = 128, device: str = "auto",
    dtype: str = "auto", load_format: str = "auto", tokenizer: str | None = None,
    kv_cache_dtype: str = "auto", quantization_ignore: str | None = None, quantize_lm_head: bool = False,
) -> EvalModel:
    """Build a model as the engine would (optionally quantized at load, `quantization_ignore`
    linears kept dense, the LM head quantized too) for evaluation."""
    source = resolve_model(model, load_format)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    plan = resolve_quantization(quantization, group_size, source.quantization_config, dev,
                                str(source.path or "the preset model"),
                                gguf_linear_types=source.gguf_linear_types(), ignore=quantization_ignore,
                                lm_head=quantize_lm_head)
    tok = source.load_tokenizer(tokenizer)
    if tok is None:
        raise ValueError(f"{model}: evaluation needs a tokenizer; pass one with --tokenizer")
    built = build_model(source, dev, dt, quantization=plan)
    label = plan.describe() if plan is not None else "none"
    kv = None
    if kv_cache_dtype == "fp8":
        kv, label = torch.float8_e4m3fn, ("" if label == "none" else label + " + ") + "fp8 KV cache"
        check_kv_cache_device(kv, dev)
    elif kv_cache_dtype != "auto":
        raise ValueError(f"kv_cache_dtype must be auto or fp8, got {kv_cache_dtype!r}")
    return EvalModel(built, tok, model or "embedded SmolLM2-135M-Instruct", label, dev, dt, kv)


def default_window(context_length: int) -> int:
    return min(MAX_WINDOW, context_length)


def make_windows(tokenizer: Any, text: str, window: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `window` token ids of the whole text (last partial dropped)."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    ids = corpus.tokenize_text(tokenizer, text)
    count = len(ids) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"the text has {len(ids)} tokens: fewer than one window of {window}")
    return [ids[i * window : (i + 1) * window] for i in range(count)]


def single_sequence_meta(num_tokens: int, device: torch.device) -> AttentionMetadata:
    """Metadata of one prompt of `num_tokens` at positions 0..T-1 in a fresh paged cache
    whose blocks are 0..ceil(T / 16) - 1, in order."""
    nblocks = -(-num_tokens // BLOCK_SIZE)
    return AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=device),
        block_tables=torch.arange(nblocks, device=device)[None, :],  # [1, nblocks]
        seq_lens=torch.tensor([num_tokens], device=device),
        query_start_loc=torch.tensor([0, num_tokens], device=device),
        query_lens_cpu=[num_tokens],
        seq_lens_cpu=[num_tokens],
        num_decodes=int(num_tokens == 1),
    )


@torch.inference_mode()
def window_hidden(model: nn.Module, ids: list[int], kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Final hidden states [L, hidden] of one sequence prefilled from position 0 (attention
    reads the keys and values back from a cache of `kv_dtype`, default the model's dtype)."""
    dev = next(model.parameters()).device
    arch = model.arch  # type: ignore[union-attr]
    n = len(ids)
    nblocks = -(-n // BLOCK_SIZE)
    dtype = kv_dtype or next(p for p in model.parameters() if p.is_floating_point()).dtype
    caches = [torch.zeros(2, nblocks, BLOCK_SIZE, arch.num_key_value_heads, arch.head_dim, dtype=dtype, device=dev)
              for _ in range(arch.num_hidden_layers)]
    meta = single_sequence_meta(n, dev)
    positions = torch.arange(n, device=dev)
    return model(torch.tensor(ids, device=dev), positions, caches, meta)  # [L, hidden]


def _logprobs(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model.compute_logits(hidden).float(), dim=-1)  # type: ignore[operator]


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    num_tokens: int
    """Predictions scored (windows x (window - 1))."""
    num_windows: int
    window: int


@torch.inference_mode()
def perplexity(em: EvalModel, windows: list[list[int]]) -> PerplexityResult:
    """Perplexity of one model over the windows (see the module docstring)."""
    total, count = 0.0, 0
    for ids in windows:
        hidden = window_hidden(em.model, ids, em.kv_dtype)
        targets = torch.tensor(ids[1:], device=hidden.device)  # [L - 1]
        for r in range(0, len(ids) - 1, _ROW_CHUNK):
            lp = _logprobs(em.model, hidden[r : r + _ROW_CHUNK][: len(ids) - 1 - r])  # [rows, vocab]
            t = targets[r : r + lp.shape[0]]
            total -= lp.gather(1, t[:, None]).double().sum().item()
            count += lp.shape[0]
    return PerplexityResult(math.exp(total / count), total / count, count, len(windows), len(windows[0]))


@dataclass
class CompareResult:
    top1_agreement: float
    mean_kl: float
    """Mean over predictions of KL(P_a || P_b) in nats."""
    ppl_a: float
    ppl_b: float
    num_tokens: int
    num_windows: int
    window: int


@torch.inference_mode()
def compare(a: EvalModel, b: EvalModel, windows: list[list[int]]) -> CompareResult:
    """Top-1 agreement and mean KL(P_a || P_b) of next-token distributions, and both perplexities."""
    agree, kl, nll_a, nll_b, count = 0, 0.0, 0.0, 0.0, 0
    for ids in windows:
        ha, hb = window_hidden(a.model, ids, a.kv_dtype), window_hidden(b.model, ids, b.kv_dtype)
        hb = hb.to(ha.device)
        targets = torch.tensor(ids[1:], device=ha.device)  # [L - 1]
        for r in range(0, len(ids) - 1, _ROW_CHUNK):
            rows = min(_ROW_CHUNK, len(ids) - 1 - r)
            la = _logprobs(a.model, ha[r : r + rows])  # [rows, vocab]
            lb = _logprobs(b.model, hb[r : r + rows]).to(la.device)  # [rows, vocab]
            t = targets[r : r + rows, None]
            agree += int((la.argmax(-1) == lb.argmax(-1)).sum().item())
            kl += (la.exp() * (la - lb)).sum(-1).double().sum().item()
            nll_a -= la.gather(1, t).double().sum().item()
            nll_b -= lb.gather(1, t).double().sum().item()
            count += rows
    return CompareResult(agree / count, kl / count, math.exp(nll_a / count), math.exp(nll_b / count),
                         count, len(windows), len(windows[0]))


def result_dict(result: PerplexityResult | CompareResult, em: EvalModel | None = None) -> dict[str, Any]:
    """JSON-ready fields of a result (plus the model's name, method, device, dtype)."""
    d: dict[str, Any] = asdict(result)
    if em is not None:
        d.update(model=em.name, quantization=em.quantization, device=str(em.device),
                 dtype=str(em.dtype).removeprefix("torch."))
    return d
