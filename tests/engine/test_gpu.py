"""The CUDA path (bf16): the same greedy tokens as transformers on the same GPU."""

from __future__ import annotations

import pytest
import torch

from turbollm import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def test_bf16_greedy_matches_transformers_on_gpu(tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_checkpoint("tiny-qwen2")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 17, 33, 64, 9, 40, 2, 25)]
    refs = []
    for p in prompts:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([p], device="cuda"), do_sample=False, max_new_tokens=24,
                              top_p=None, top_k=None, temperature=None)
        refs.append(out[0, len(p):].tolist())
    del hf
    llm = LLM(path, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3)
    assert llm.engine.model_info.dtype == "bfloat16"
    sp = SamplingParams(temperature=0.0, max_tokens=24)  # both stop after EOS, if it comes
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert alone == refs
    assert batched == refs
