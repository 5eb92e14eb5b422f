"""What sampling costs on the CPU, on the embedded SmolLM2 (vocab 49,152).

    PYTHONPATH=src python bench/scripts/cpu_sampling_cost.py [--threads 1]

1. The sampler alone, per row: 63 rows of the model's own next-token logits (every 8th
   position of the first 512 held-out Shakespeare tokens), greedy / temperature 1 /
   temperature 0.7 + top_p 0.9 / temperature 1 + top_p 0.95 / top_k 50; mean over the rows of
   the mean of 5 calls.
2. End to end: `LLM.generate` of 3 chat-less prompts x 64 tokens (ignore_eos) for greedy,
   temperature 0.7 + top_p 0.9 and temperature 1; 2 timed rounds after a warm-up round.
Run it once per tree (PYTHONPATH) to compare; prints one line per case.
"""
import argparse
import time

import torch

from turbollm import LLM, SamplingParams
from turbollm.compress.calibration import corpus_tokens, forward_window
from turbollm.sample.sampler import Sampler, SamplingState

CASES = {
    "greedy": dict(temperature=0.0),
    "temperature 1": dict(temperature=1.0),
    "T 0.7 top_p 0.9": dict(temperature=0.7, top_p=0.9),
    "T 1 top_p 0.95": dict(temperature=1.0, top_p=0.95),
    "top_k 50": dict(temperature=1.0, top_k=50),
}


def sampler_cost(llm: LLM) -> None:
    model = llm.engine.executor.runner.model
    held = corpus_tokens(llm.get_tokenizer(), "heldout")
    with torch.inference_mode():
        hidden = forward_window(model, held[:512])
        rows = model.compute_logits(hidden[torch.arange(8, 512, 8)]).float()  # [63, vocab]
    sampler = Sampler()
    for name, kw in CASES.items():
        sp = SamplingParams(**kw)  # type: ignore[arg-type]
        states = [SamplingState(params=sp, prompt_token_ids=[1], output_token_ids=[], eos_token_ids=frozenset(),
                                 seed=None)]
        total = 0.0
        for r in range(rows.shape[0]):
            logits = rows[r : r + 1]
            for _ in range(2):
                sampler(logits, states)
            t = time.perf_counter()
            for _ in range(5):
                sampler(logits, states)
            total += (time.perf_counter() - t) / 5
        print(f"sampler  {name:16s} {total / rows.shape[0] * 1e6:8.0f} us a row", flush=True)


def generate_cost(llm: LLM) -> None:
    prompts = ["Write a short poem about the sea.", "Explain what a GPU is.", "Tell me a story about a fox."]
    res: dict[str, list[float]] = {}
    for r in range(3):
        for name in ("greedy", "T 0.7 top_p 0.9", "temperature 1"):
            sp = SamplingParams(max_tokens=64, ignore_eos=True, **CASES[name])  # type: ignore[arg-type]
            t = time.perf_counter()
            for p in prompts:
                llm.generate([p], sp, use_tqdm=False)
            if r:
                res.setdefault(name, []).append(3 * 64 / (time.perf_counter() - t))
    for name, v in res.items():
        print(f"generate {name:16s} {' / '.join(f'{x:.1f}' for x in v)} tok/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(device="cpu", max_num_seqs=1)
    sampler_cost(llm)
    generate_cost(llm)


if __name__ == "__main__":
    main()
