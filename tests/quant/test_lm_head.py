"""quantize_lm_head: the LM head quantized at load with the model's method (layers/embedding.py
ParallelLMHead.quantize, QuantPlan.lm_head), on tiny random models on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbollm.compress.evaluate import window_hidden
from turbollm.config import QuantizationConfig
from turbollm.models.build import build_model
from turbollm.models.loader import resolve_model
from turbollm.quant import grids
from turbollm.quant.plan import resolve_quantization

CPU = torch.device("cpu")
IDS = list(range(5, 40))


def _dequantized(w: torch.Tensor, method: str) -> torch.Tensor:
    """What RTN at load makes of a float weight [N, K] (grids' own quantize / dequantize)."""
    if method == "int8":
        return grids.dequantize_int8(*grids.quantize_int8(w, scale_dtype=w.dtype), w.dtype)
    group = grids.group_size_for(w.shape[1], 32)
    q, s, z = grids.quantize_int4(w, group, scale_dtype=w.dtype)
    return grids.dequantize_int4(q, s, z, group, w.dtype)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-llama3"])  # untied, tied embeddings
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_head_computes_the_rtn_weight(tiny_checkpoint, preset: str, method: str) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_checkpoint(preset)
    src = resolve_model(path)
    dense = build_model(src, CPU, torch.float32, prepack_cpu=False)
    w = dense.lm_head.weight.detach().clone()  # [vocab, hidden] (the embedding's when tied)
    plan = resolve_quantization(method, 32, None, CPU, lm_head=True)
    assert plan is not None and plan.describe().endswith("+ LM head")
    for prepack in (False, True):  # the GPU-style layer path and the CPU's packed W_hat
        model = build_model(src, CPU, torch.float32, quantization=plan, prepack_cpu=prepack)
        head = model.lm_head
        assert head.quantized is not None
        with torch.inference_mode():
            hidden = window_hidden(model, IDS)  # [T, hidden]
            got = model.compute_logits(hidden)  # [T, vocab]
        want = F.linear(hidden, _dequantized(w, method))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        dense_logits = F.linear(hidden, w)
        assert (got - dense_logits).abs().max() > 1e-3  # the head really is quantized
        tied = src.arch.tie_word_embeddings
        # A tied embedding keeps its float rows; an untied head's float weight is freed.
        assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
        assert head.weight.numel() == (w.numel() if tied else 0)
        with pytest.raises(ValueError, match="quantized LM head"):
            next(iter(model.hf_state_dict()))


def test_lm_head_without_a_quantized_model_is_a_clear_error(tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    assert QuantizationConfig(quantization="int4", quantize_lm_head=True).quantize_lm_head
    with pytest.raises(ValueError, match="quantize_lm_head .* not quantized: pass a quantization method"):
        resolve_quantization(None, 128, None, CPU, lm_head=True)
    with pytest.raises(ValueError, match="quantize_lm_head .* not quantized"):
        resolve_quantization("none", 128, None, CPU, lm_head=True)
    # A quantized checkpoint stores its head dense: quantize_lm_head quantizes it at load.
    plan = resolve_quantization(None, 128, {"quant_method": "turbollm", "method": "int8"}, CPU, lm_head=True)
    assert plan is not None and plan.lm_head and plan.prequantized
    assert plan.lm_head_method is not None and not plan.lm_head_method.prequantized


@pytest.mark.parametrize("method", ["int4", "fp8"])  # fp8: simulated on the CPU
def test_engine_generates_with_a_quantized_head(method: str) -> None:
    from turbollm import LLM, SamplingParams

    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = {}
    for head in (False, True):
        llm = LLM("tiny-llama", load_format="dummy", quantization=method, group_size=32, device="cpu",
                  quantize_lm_head=head)
        runner = llm.engine.executor.runner
        assert (runner.model.lm_head.quantized is not None) == head
        outs[head] = llm.generate([[3, 4, 5, 6]], sp, use_tqdm=False)[0].outputs[0].token_ids
        assert len(outs[head]) == 6
