"""One GPU visit: what sampling costs a batch-1 decode step. Llama-2-7B preset (dummy weights),
one 128-token prompt, 256 new tokens (ignore_eos), decode tok/s for greedy, temperature 1,
and temperature 1 with top_p 0.9 (the full-vocabulary sort at one row, sample/sampler.py) and
top_k 50, alternating over rounds in one process.

Prints a table and writes $OUT/gpu_b1_sampling_cost.json.
Usage: python bench/scripts/gpu_b1_sampling_cost.py [--quantization int4] [--rounds 2]
"""
import argparse
import json
import os
import time

import torch

from turbollm import LLM, SamplingParams

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
CASES = {
    "greedy": dict(temperature=0.0),
    "temperature 1": dict(temperature=1.0),
    "top_p 0.9": dict(temperature=1.0, top_p=0.9),
    "top_k 50": dict(temperature=1.0, top_k=50),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    quant = {"quantization": args.quantization, "group_size": 128} if args.quantization else {}
    llm = LLM("llama-2-7b", load_format="dummy", max_num_seqs=1, max_model_len=4096, **quant)
    prompt = list(range(1000, 1128))
    res: dict[str, list[float]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, kw in CASES.items():
            sp = SamplingParams(max_tokens=256, ignore_eos=True, **kw)
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = llm.generate([prompt], sp, use_tqdm=False)
            dt = time.perf_counter() - t
            n = len(out[0].outputs[0].token_ids)
            if r:
                res.setdefault(name, []).append(n / dt)
                print(f"round {r} {name:14s} {n / dt:7.1f} tok/s (incl. prefill)", flush=True)
    record = {"gpu": torch.cuda.get_device_name(), "quantization": args.quantization, "tok_s": res}
    with open(os.path.join(OUT, "gpu_b1_sampling_cost.json"), "w") as f:
        json.dump(record, f, indent=1)
    base = max(res["greedy"])
    for name, v in res.items():
        print(f"{name:14s} {' / '.join(f'{x:.1f}' for x in v):>16s} tok/s  best vs greedy {max(v) / base:.3f}")


if __name__ == "__main__":
    main()
