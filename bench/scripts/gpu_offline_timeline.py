"""Does the GPU wait for the host in an offline run? The issue-4 workload (1000 prompts x
(512 random tokens -> 256), ignore_eos) on a dummy preset, with two CUDA events per step
(recorded when execute_async starts and when it has queued the sampler), so that for every
decode-only step we get the GPU's span and the gap before the next step's work reached the
stream. A torch-profiler window over a few decode-only steps then lists the host's CUDA
runtime calls (which ones block) and the GPU's idle intervals.

Usage: python bench/scripts/gpu_offline_timeline.py [--model llama-3-8b] [--max-num-seqs 512]
       [--max-num-batched-tokens 16384] [--num-prompts 1000] [--tag NAME]
Writes $OUT/offline_timeline[-TAG].json.
"""
import argparse
import collections
import contextlib
import gc
import json
import os
import random
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from turbollm import LLM, SamplingParams

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)


def gpu_idle(prof) -> dict:  # type: ignore[no-untyped-def]
    """Union of kernel / memcpy intervals over the window, and the idle gaps between them."""
    iv = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA)
    if not iv:
        return {}
    busy, gaps, cur_s, cur_e = 0.0, [], iv[0][0], iv[0][1]
    for s, e in iv[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = iv[-1][1] - iv[0][0]
    big = sorted(gaps, reverse=True)
    return {"span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_fraction": 1 - busy / span,
            "gaps_over_100us": sum(1 for g in gaps if g > 100), "largest_gaps_ms": [g / 1e3 for g in big[:12]]}


def runtime_calls(prof) -> dict:  # type: ignore[no-untyped-def]
    """Host-side CUDA runtime / driver calls and a few aten ops: total ms and count."""
    acc: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        n = e.name
        if n.startswith(("cuda", "cu")) or n in ("aten::pin_memory", "aten::_pin_memory", "aten::to",
                                                 "aten::copy_", "aten::tolist", "aten::item"):
            acc[n][0] += (e.time_range.end - e.time_range.start) / 1e3
            acc[n][1] += 1
    return {k: {"ms": round(v[0], 3), "n": v[1]} for k, v in sorted(acc.items(), key=lambda kv: -kv[1][0])[:25]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--profile-steps", type=int, default=8)
    ap.add_argument("--tag", default="")
    ap.add_argument("--full-gc", action="store_true", help="leave full GC collections on (LLM.generate pauses them)")
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    eng = llm.engine
    steps: list[dict] = []
    launch = eng.executor.execute_async

    def recorded(plan):  # type: ignore[no-untyped-def]
        n = plan.num_scheduled_tokens
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        r = launch(plan)
        b.record()
        steps.append({"decodes": sum(1 for v in n.values() if v == 1),
                      "prefill": sum(v for v in n.values() if v > 1), "a": a, "b": b,
                      "host_launch_ms": 1e3 * (time.perf_counter() - t0)})
        return r

    eng.executor.execute_async = recorded
    random.seed(0)
    sp = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    for i in range(args.num_prompts):
        eng.add_request(f"r{i}", [random.randrange(10, 30000) for _ in range(512)], sp)
    gcs: list[tuple[int, float]] = []  # (generation, ms) of each collection
    gc_t = [0.0]

    def gc_cb(phase, info):  # type: ignore[no-untyped-def]
        if phase == "start":
            gc_t[0] = time.perf_counter()
        else:
            gcs.append((info["generation"], 1e3 * (time.perf_counter() - gc_t[0])))
    gc.callbacks.append(gc_cb)
    try:
        from turbollm.engine.llm import _no_full_collections as pause
    except ImportError:  # an older tree
        pause = contextlib.nullcontext
    t_start = time.perf_counter()
    prof_res = None
    ctx = contextlib.nullcontext() if args.full_gc else pause()
    ctx.__enter__()
    while eng.has_unfinished_requests():
        # profile a window once the last 3 plans were decode-only at a large batch
        if prof_res is None and len(steps) > 3 and all(s["prefill"] == 0 and s["decodes"] > 0.8 * args.max_num_seqs
                                                       for s in steps[-3:]):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.profile_steps):
                    eng.step()
            prof_res = {"first_step": len(steps) - args.profile_steps, "gpu": gpu_idle(prof),
                        "host_calls": runtime_calls(prof)}
            continue
        eng.step()
    torch.cuda.synchronize()
    total = time.perf_counter() - t_start
    ctx.__exit__(None, None, None)
    rows = []
    for i, s in enumerate(steps):
        span = s["a"].elapsed_time(s["b"])
        gap = s["b"].elapsed_time(steps[i + 1]["a"]) if i + 1 < len(steps) else float("nan")
        rows.append({"decodes": s["decodes"], "prefill": s["prefill"], "gpu_ms": span, "gap_after_ms": gap,
                     "host_launch_ms": s["host_launch_ms"]})
    dec = [r for r in rows if r["prefill"] == 0 and r["decodes"] > 0.8 * args.max_num_seqs and r["gap_after_ms"] == r["gap_after_ms"]]
    mixed = [r for r in rows if r["prefill"] > 0]

    def summ(rs: list[dict], key: str) -> dict:
        v = [r[key] for r in rs]
        return {"mean": statistics.fmean(v), "median": statistics.median(v), "sum_s": sum(v) / 1e3} if v else {}

    res = {
        "model": args.model, "gpu": torch.cuda.get_device_name(), "total_s": total,
        "output_tok_s": args.num_prompts * 256 / total, "steps": len(rows),
        "decode_steps": len(dec), "decode_gpu_ms": summ(dec, "gpu_ms"), "decode_gap_after_ms": summ(dec, "gap_after_ms"),
        "decode_host_launch_ms": summ(dec, "host_launch_ms"),
        "mixed_steps": len(mixed), "mixed_gpu_ms": summ(mixed, "gpu_ms"), "mixed_gap_after_ms": summ(mixed, "gap_after_ms"),
        "all_gaps_s": sum(r["gap_after_ms"] for r in rows if r["gap_after_ms"] == r["gap_after_ms"]) / 1e3,
        "all_gpu_s": sum(r["gpu_ms"] for r in rows) / 1e3,
        "gc_ms_by_generation": {g: [round(sum(ms for gg, ms in gcs if gg == g), 1), sum(1 for gg, _ in gcs if gg == g)]
                                for g in (0, 1, 2)},
        "gaps_over_50ms": [(i, round(r["gap_after_ms"], 1)) for i, r in enumerate(rows) if r["gap_after_ms"] > 50],
        "slow_host_launch_over_15ms": [(i, r["decodes"], round(r["host_launch_ms"], 1)) for i, r in enumerate(rows)
                                       if r["prefill"] == 0 and r["host_launch_ms"] > 15],
        "profile": prof_res,
    }
    name = f"offline_timeline{'-' + args.tag if args.tag else ''}.json"
    with open(os.path.join(OUT, name), "w") as f:
        json.dump({**res, "rows": rows}, f, indent=1)
    for k, v in res.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
