"""transformers as the same-run baseline: the same checkpoint, its own `generate`.

Only the benchmark and the tests build transformers models; serving code never does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from turbollm.models.loader import ModelSource


def load_hf_model(
    source: ModelSource, dtype: torch.dtype, device: torch.device, ours: torch.nn.Module | None = None
) -> torch.nn.Module:
    """The transformers model for the same weights turbollm loaded from `source`.

    Dummy weights exist only in turbollm's model (`ours`): they are copied into a
    transformers model built from the preset's config.
    """
    from transformers import AutoModelForCausalLM

    if source.kind == "dummy":
        if ours is None:
            raise ValueError("dummy weights: pass the turbollm model to copy them from")
        return hf_twin(ours, dtype, device)
    if source.kind == "gguf":
        assert source.path is not None
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(source.path), gguf_file=os.path.basename(source.path), dtype=dtype
        )
    elif source.kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, local_files_only=True)
    else:
        raise ValueError(f"unknown model source kind {source.kind!r}")
    return model.to(device).eval()


def hf_twin(ours: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A transformers model of the same architecture holding a copy of `ours`' weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = ours.arch.to_hf_config()  # type: ignore[attr-defined]
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # FP8 KV-cache scales (set only from a checkpoint that has them) have no transformers twin.
    weights = {n: t for n, t in ours.hf_state_dict()  # type: ignore[operator]
               if not n.endswith((".k_scale", ".v_scale", ".k_rotation"))}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"weights do not map onto transformers: missing {missing}, unexpected {unexpected}")
    return model.eval()


@dataclass
class HFRun:
    """One baseline configuration's result."""

    name: str
    num_prompts: int
    output_tokens: int
    seconds: float
    outputs: list[list[int]]

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds


def _trim(row: list[int], eos: set[int]) -> list[int]:
    """Generated ids up to and including the first EOS (HF pads finished rows after it)."""
    out = []
    for t in row:
        out.append(t)
        if t in eos:
            break
    return out


@torch.inference_mode()
def hf_generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
    ignore_eos: bool,
    eos: set[int],
    pad_id: int,
) -> HFRun:
    """Greedy `generate` over padded static batches (left padding), timed end to end."""
    dev = next(model.parameters()).device
    outputs: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=dev)
        gen = model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if ignore_eos else None, pad_token_id=pad_id,
            eos_token_id=sorted(eos), top_p=None, top_k=None, temperature=None,
        )
        outputs += [_trim(row[width:].tolist(), eos) for row in gen]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    secs = time.perf_counter() - t0
    name = "hf one-at-a-time" if batch_size == 1 else f"hf static batch {batch_size}"
    return HFRun(name, len(prompts), sum(len(o) for o in outputs), secs, outputs)
