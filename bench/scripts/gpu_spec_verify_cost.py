"""Cost of a speculative verify step relative to a plain decode step (issue 6, GPU part).

    python bench/scripts/gpu_spec_verify_cost.py                      # H100: llama-2-7b dummy, bf16
    python bench/scripts/gpu_spec_verify_cost.py --preset tiny-llama --device cpu --iters 3   # check

Drives the real engine path (ModelRunner.execute with hand-made plans) on B requests with
--context tokens each: a plain decode step (1 token per request: a CUDA-graph replay where
the engine would use one, and eagerly for reference) against a verify step with K = 1..8
draft tokens per request (1 + K tokens each: eager forward, the LM head on every row, exact
verification). Drafts come from the n-gram proposer over a periodic context, so every
request always has exactly K drafts; with dummy weights they are rejected, which changes no
cost. Each time is the median of --iters steps after warm-up, every step ending in its host
sync, with the state reset between steps.

Break-even: a draft costing c (one draft forward per token, relative to a plain decode step)
with per-token acceptance a emits E = (1 - a^(K+1)) / (1 - a) tokens per step at a cost of
r_K + K c plain steps (r_K = verify / plain); speculation pays when E > r_K + K c. The table
gives, per batch size, the smallest a at which it pays for the best K, for c = 0 (n-gram),
0.05 and 0.1. Prints a table; writes JSON to --out (default $OUT/spec_verify_cost.json).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from turbollm import LLM, SamplingParams
from turbollm.core.plan import CachedRequestData, NewRequestData, StepPlan


def _admit(runner: Any, batch: int, context: int, k_max: int, block_size: int, period: int) -> list[str]:
    """Prefill `batch` requests of `context` periodic tokens; returns their ids."""
    blocks_each = -(-(context + k_max + 2) // block_size)
    plan = StepPlan()
    vocab = runner.arch.vocab_size
    for i in range(batch):
        rid = f"r{i}"
        pattern = [(7 + 13 * i + 31 * j) % vocab for j in range(period)]
        tokens = (pattern * (context // period + 1))[:context]
        blocks = list(range(i * blocks_each, (i + 1) * blocks_each))
        plan.new_requests.append(NewRequestData(rid, tokens, context, SamplingParams(temperature=0.0),
                                                blocks, 0))
        plan.num_scheduled_tokens[rid] = context
    for start in range(0, batch, 16):  # prefill in slices so activations stay small
        part = StepPlan(new_requests=plan.new_requests[start : start + 16])
        part.num_scheduled_tokens = {n.request_id: context for n in part.new_requests}
        runner.execute(part)
    for new in plan.new_requests:  # continue the pattern, so n-gram lookup always finds K drafts
        st = runner.states[new.request_id]
        st.token_ids[-1] = new.token_ids[context - period]
        st.sampling.output_token_ids[-1] = st.token_ids[-1]
    return [f"r{i}" for i in range(batch)]


def _time_steps(runner: Any, rids: list[str], k: int, iters: int, warmup: int, eager: bool) -> float:
    """Median seconds of a step where every request computes 1 + k tokens (k = 0: plain)."""
    saved = {r: copy.deepcopy((runner.states[r].token_ids, runner.states[r].block_ids,
                               runner.states[r].num_computed_tokens,
                               runner.states[r].sampling.output_token_ids)) for r in rids}
    graphs = runner.graphs
    if eager:
        runner.graphs = None
    times = []
    try:
        for it in range(warmup + iters):
            for r in rids:
                st = runner.states[r]
                st.token_ids, st.block_ids, st.num_computed_tokens, out = copy.deepcopy(saved[r])
                st.sampling.output_token_ids = out
            plan = StepPlan(cached_requests=[CachedRequestData(r, [], runner.states[r].num_computed_tokens)
                                             for r in rids],
                            num_scheduled_tokens={r: 1 + k for r in rids},
                            num_spec_tokens={r: k for r in rids} if k else {})
            if runner.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = runner.execute(plan)  # ends with its host sync
            if it >= warmup:
                times.append(time.perf_counter() - t0)
            drafted = set(res.num_draft_tokens.values())
            assert not k or drafted == {k}, f"expected {k} drafts per request, got {drafted}"
    finally:
        runner.graphs = graphs
        for r in rids:
            st = runner.states[r]
            st.token_ids, st.block_ids, st.num_computed_tokens, out = copy.deepcopy(saved[r])
            st.sampling.output_token_ids = out
    return statistics.median(times)


def break_even(ratio: float, k: int, c: float) -> float | None:
    """Smallest acceptance a with (1 - a^(k+1)) / (1 - a) > ratio + k c; None if none < 1."""
    cost = ratio + k * c

    def tokens(a: float) -> float:
        return sum(a**i for i in range(k + 1))

    if tokens(0.999999) <= cost:
        return None
    lo, hi = 0.0, 0.999999
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens(mid) <= cost else (lo, mid)
    return hi


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--k-max", type=int, default=8)
    p.add_argument("--context", type=int, default=128, help="tokens already in each request's cache")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--draft-costs", default="0,0.05,0.1")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    period = 16
    llm = LLM(args.preset, load_format="dummy", device=args.device, speculative_method="ngram",
              num_speculative_tokens=args.k_max, speculative_adaptive=False, ngram_min=2,
              ngram_max=4, max_num_seqs=max(batches), max_model_len=args.context + 64,
              max_num_batched_tokens=max(4096, max(batches) * (args.k_max + 1)))
    runner = llm.engine.executor.runner
    for cache in runner.kv_caches:  # timing does not depend on values, but never time on zeros
        cache.normal_()
    for cache in getattr(runner.spec.proposer, "kv_caches", []):
        cache.normal_()
    rows: list[dict[str, Any]] = []
    costs = [float(c) for c in args.draft_costs.split(",")]
    for b in batches:
        for r in list(runner.states):
            runner.states.pop(r)
        rids = _admit(runner, b, args.context, args.k_max, llm.engine.config.cache.block_size, period)
        plain = _time_steps(runner, rids, 0, args.iters, args.warmup, eager=False)
        plain_eager = _time_steps(runner, rids, 0, args.iters, args.warmup, eager=True)
        row: dict[str, Any] = {"batch": b, "plain_ms": plain * 1e3, "plain_eager_ms": plain_eager * 1e3,
                               "graphs": runner.graphs is not None, "verify_ms": {}, "ratio": {}}
        for k in range(1, args.k_max + 1):
            t = _time_steps(runner, rids, k, args.iters, args.warmup, eager=True)
            row["verify_ms"][k] = t * 1e3
            row["ratio"][k] = t / plain
        row["break_even"] = {}
        for c in costs:
            per_k = {k: break_even(row["ratio"][k], k, c) for k in row["ratio"]}
            valid = {k: a for k, a in per_k.items() if a is not None}
            best = min(valid, key=lambda k: valid[k]) if valid else None
            row["break_even"][str(c)] = {"per_k": per_k, "best_k": best,
                                         "acceptance": valid.get(best) if best else None}
        rows.append(row)
        print(f"batch {b}: plain {plain * 1e3:.2f} ms (eager {plain_eager * 1e3:.2f}); "
              + " ".join(f"K={k}: {row['ratio'][k]:.2f}x" for k in row["ratio"]), file=sys.stderr, flush=True)
    dev = runner.device
    report = {
        "what": "verify step (1 + K tokens per request, eager) vs plain decode step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "preset": args.preset, "dtype": str(runner.dtype),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "context": args.context, "iters": args.iters, "rows": rows,
    }
    ks = range(1, args.k_max + 1)
    print(f"\nverify step time / plain decode step time ({report['device']}, {args.preset}, "
          f"context {args.context})")
    print(f"{'batch':>6}{'plain ms':>10}" + "".join(f"{'K=' + str(k):>7}" for k in ks))
    for r in rows:
        print(f"{r['batch']:>6}{r['plain_ms']:>10.2f}" + "".join(f"{r['ratio'][k]:>7.2f}" for k in ks))
    print("\nbreak-even acceptance per draft token (best K), by draft cost c per token")
    print(f"{'batch':>6}" + "".join(f"{'c=' + str(c):>16}" for c in costs))
    for r in rows:
        cells = []
        for c in costs:
            be = r["break_even"][str(c)]
            cells.append(f"{be['acceptance']:.2f} (K={be['best_k']})" if be["best_k"] else "never")
        print(f"{r['batch']:>6}" + "".join(f"{x:>16}" for x in cells))
    out = args.out or os.path.join(os.environ.get("OUT", "."), "spec_verify_cost.json")
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
