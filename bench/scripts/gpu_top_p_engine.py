"""Engine A/B on one GPU: decode tok/s with top_p=0.9 when the sampler's top-p is the full sort
(`apply_top_p`) against the sort-free search kernel the sampler runs on a GPU
(kernels/top_p.py, through sampler._nucleus); neither syncs the host. (An earlier version
of this script compared the candidate path `apply_top_p_candidates`, one host sync: 4-14%
slower than the sort, bench/results/top-p-engine-h100-2026-11-27.json.)

    export PYTHONPATH=src && python3 bench/scripts/gpu_top_p_engine.py     # needs gguf importable

Llama-3-8B preset, dummy weights (vocab 128256), overlapped scheduling as the engine chooses,
batch 256 and 64 requests of 64 random prompt tokens and 96 new tokens. Two distributions:
the dummy model's own logits at temperature 1 (flat: every row falls back to the sort) and
at temperature std/5 (peaked like randn * 5). Modes alternate order each round; the table
gives the median of --rounds. Writes $OUT/top_p_engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

import turbollm.sample.logits_processors as lp
import turbollm.sample.sampler as sampler_module
from turbollm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="256,64")
    ap.add_argument("--output-len", type=int, default=96)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    stds: list[float] = []
    kernel = sampler_module._nucleus

    def probe(logits: torch.Tensor, ps: list[float]) -> torch.Tensor:
        stds.append(logits.std(dim=-1).mean().item())
        return kernel(logits, ps)

    llm = LLM(args.model, load_format="dummy", max_num_seqs=max(batches), max_model_len=1024)
    random.seed(0)
    prompts = [[random.randrange(10, 30000) for _ in range(64)] for _ in range(max(batches))]
    sampler_module._nucleus = probe
    llm.generate(prompts[:2], SamplingParams(top_p=0.9, max_tokens=2), use_tqdm=False)
    dists = {"flat T=1": 1.0, "peaked T=std/5": stds[0] / 5}
    modes = {"sort": lp.apply_top_p, "kernel": kernel}

    def tok_s(batch: int, temperature: float, new_tokens: int) -> float:
        sp = SamplingParams(temperature=temperature, top_p=0.9, max_tokens=new_tokens,
                            ignore_eos=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate(prompts[:batch], sp, use_tqdm=False)
        torch.cuda.synchronize()
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)

    for fn in modes.values():  # warm up both paths
        sampler_module._nucleus = fn
        for temperature in dists.values():
            tok_s(max(batches), temperature, 8)
    rows = []
    for rnd in range(args.rounds):
        order = list(modes) if rnd % 2 == 0 else list(modes)[::-1]
        for batch in batches:
            for dist, temperature in dists.items():
                for mode in order:
                    sampler_module._nucleus = modes[mode]
                    rate = tok_s(batch, temperature, args.output_len)
                    rows.append(dict(round=rnd, batch=batch, dist=dist, mode=mode, tok_s=rate))
                    print(f"round {rnd} batch {batch:3d} {dist:15s} {mode:10s} {rate:8.1f} tok/s",
                          flush=True)

    print(f"{args.model} dummy, {torch.cuda.get_device_name()}, median of {args.rounds} rounds")
    print(f"{'batch':>5} {'logits':15s} {'sort tok/s':>10} {'kernel tok/s':>12} {'ratio':>6}")
    summary = []
    for batch in batches:
        for dist in dists:
            med = {m: statistics.median(r["tok_s"] for r in rows if r["batch"] == batch
                                        and r["dist"] == dist and r["mode"] == m) for m in modes}
            summary.append(dict(batch=batch, dist=dist, sort=med["sort"], kernel=med["kernel"]))
            print(f"{batch:5d} {dist:15s} {med['sort']:10.1f} {med['kernel']:12.1f} "
                  f"{med['kernel'] / med['sort']:6.3f}")
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "top_p_engine.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                       model=args.model, logits_std=stds[0], summary=summary, rows=rows), f,
                  indent=1)


if __name__ == "__main__":
    main()
