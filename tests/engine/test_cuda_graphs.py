"""Decode steps replayed from CUDA graphs give the same tokens as eager steps (GPU only)."""

from __future__ import annotations

import gc

import pytest
import torch

from turbollm import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def test_graph_replay_matches_eager(tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_checkpoint("tiny-llama")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 17, 33, 64, 9, 40, 2, 25, 11)]
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        llm = LLM(path, device="cuda", dtype="float32", gpu_memory_utilization=0.2, max_num_seqs=16,
                  enforce_eager=eager)
        runner = llm.engine.executor.runner
        assert (runner.graphs is None) == eager
        replays: list[int] = []
        run = None
        if runner.graphs is not None:
            run = runner.graphs.run
            runner.graphs.run = lambda *a, **k: replays.append(a[-1]) or run(*a, **k)  # type: ignore[method-assign]
        batched = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:3]]
        outs[eager] = (batched, alone)
        if not eager:
            assert replays and 1 in replays and max(replays) >= 9, f"buckets replayed: {sorted(set(replays))}"
        # The next engine sizes its KV cache from what is free: release this one's first.
        del llm, runner, run
        gc.collect()
        torch.cuda.empty_cache()
    assert outs[True] == outs[False]
