"""Where the time of an offline run goes: the issue-4 workload (1000 prompts x (512 random
tokens -> 256), ignore_eos) on a dummy preset, every step's host-side wall time split into
steps that carry prompt chunks ("mixed") and decode-only steps, and a torch-profiler kernel
table of a few mixed steps grouped by kind (matmul, attention, ...).

Usage: python bench/scripts/gpu_offline_profile.py [--model llama-3-8b] [--max-num-seqs 512]
       [--max-num-batched-tokens 16384] [--num-prompts 1000] [--quantization fp8] [--kv-cache-dtype fp8]
       [--log-jit]
Writes $OUT/offline_profile.json and $OUT/offline_profile_kernels.txt.
"""
import argparse
import collections
import json
import os
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from turbollm import LLM, SamplingParams

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
KINDS = (("norm + fp8 quantize", ("rmsnorm_quant",)), ("silu + fp8 quantize", ("silu_mul_quant",)),
         ("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "xmma", "splitk", "gemv", "small_m")),
         ("fp8 activation quantize", ("quant_kernel",)),
         ("attention", ("attention", "attn", "flash", "_combine")),
         ("norm", ("rmsnorm", "rms_norm")), ("activation", ("silu",)), ("rotary/kv write", ("rope", "rotary", "kv_")),
         ("sampling", ("argmax", "sample", "softmax", "topk", "gumbel")), ("copy", ("memcpy", "memset", "copy")))


def kind(name: str) -> str:
    low = name.lower()
    for k, keys in KINDS:
        if any(s in low for s in keys):
            return k
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--profile-at", type=int, default=20, help="first profiled step")
    ap.add_argument("--profile-steps", type=int, default=6)
    ap.add_argument("--quantization", default=None, help="e.g. fp8 (W8A8)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    ap.add_argument("--log-jit", action="store_true",
                    help="list the Triton kernel variants first loaded after start-up (warm-up misses), with their step")
    args = ap.parse_args()
    jit_events: list[tuple[float, int, str]] = []  # (seconds since start-up ended, step, variant)
    started = [0.0]
    if args.log_jit:
        import triton

        def on_load(*, repr: str, compile: dict, **_: object) -> None:  # every variant a process loads
            if started[0]:  # the specialization (alignment / 16-divisibility per argument) says why it is new
                names = list(compile["signature"])
                attrs = sorted(names[k[0]] for k, v in compile["configs"][0].items() if v)  # 16-aligned / divisible
                jit_events.append((time.perf_counter() - started[0], len(plans), f"{repr.split('(')[0]} {attrs}"))
        triton.knobs.runtime.jit_cache_hook = on_load
    quant = {"quantization": args.quantization} if args.quantization else {}
    llm = LLM(args.model, load_format="dummy", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_dtype=args.kv_cache_dtype, **quant)
    eng = llm.engine
    started[0] = time.perf_counter()
    plans = []
    schedule = eng.scheduler.schedule

    def recorded():  # type: ignore[no-untyped-def]
        plan = schedule()
        n = plan.num_scheduled_tokens
        plans.append((sum(1 for v in n.values() if v == 1), sum(v for v in n.values() if v > 1)))
        return plan

    eng.scheduler.schedule = recorded
    # host seconds per phase, per step (decode-only steps are picked out below)
    phase = collections.defaultdict(list)

    def timed(obj, name, key):  # type: ignore[no-untyped-def]
        f = getattr(obj, name)

        def g(*a, **k):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            r = f(*a, **k)
            phase[key].append(time.perf_counter() - t0)
            return r
        setattr(obj, name, g)

    timed(eng.scheduler, "schedule", "schedule")
    timed(eng.executor, "execute_async", "launch")
    timed(eng, "_process", "wait+process")
    from turbollm.worker import model_runner
    wait_s = []
    orig_result = model_runner.PendingStep.result

    def result(self):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        if self._result is None and self.event is not None:
            self.event.synchronize()
        wait_s.append(time.perf_counter() - t0)
        return orig_result(self)
    model_runner.PendingStep.result = result
    random.seed(0)
    sp = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    for i in range(args.num_prompts):
        eng.add_request(f"r{i}", [random.randrange(10, 30000) for _ in range(512)], sp)
    times, kernels = [], None
    # as LLM.generate does: no full GC collections while the batch runs
    from turbollm.engine.llm import _no_full_collections
    gc_pause = _no_full_collections()
    gc_pause.__enter__()
    t_start = time.perf_counter()
    step = 0
    while eng.has_unfinished_requests():
        if step == args.profile_at:
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.profile_steps):
                    eng.step()
                torch.cuda.synchronize()
            kernels = prof.key_averages()
            step += args.profile_steps
            times += [float("nan")] * args.profile_steps
            continue
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
        step += 1
    total = time.perf_counter() - t_start
    gc_pause.__exit__(None, None, None)
    # overlapped loop: step i's wall time mostly covers plan i's GPU work
    mixed = [(t, p) for t, p in zip(times, plans) if p[1] > 0 and t == t]
    dec = [(t, p) for t, p in zip(times, plans) if p[1] == 0 and p[0] > 0 and t == t]
    by_kind: dict[str, float] = collections.defaultdict(float)
    rows = []
    for e in kernels or []:
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if us <= 0:
            continue
        by_kind[kind(e.key)] += us
        rows.append((us, e.count, e.key[:110]))
    rows.sort(reverse=True)
    prof_plans = plans[args.profile_at:args.profile_at + args.profile_steps]
    # decode-only plans after the profiled window: mean host time of each phase (ms)
    idx = [i for i, p in enumerate(plans) if p[1] == 0 and p[0] > 400 and i > args.profile_at + args.profile_steps]
    host_ms = {k: 1e3 * sum(v[i] for i in idx if i < len(v)) / max(1, len(idx)) for k, v in phase.items()}
    host_ms["of which waiting for the GPU"] = 1e3 * sum(wait_s[i] for i in idx if i < len(wait_s)) / max(1, len(idx))
    res = {
        "model": args.model, "gpu": torch.cuda.get_device_name(), "total_s": total,
        "output_tok_s": args.num_prompts * 256 / total, "steps": len(plans),
        "mixed_steps": len(mixed), "mixed_s": sum(t for t, _ in mixed),
        "mixed_mean_prefill_tokens": sum(p[1] for _, p in mixed) / max(1, len(mixed)),
        "mixed_mean_decode_seqs": sum(p[0] for _, p in mixed) / max(1, len(mixed)),
        "decode_steps": len(dec), "decode_s": sum(t for t, _ in dec),
        "decode_mean_seqs": sum(p[0] for _, p in dec) / max(1, len(dec)),
        "profiled_plans": prof_plans,
        "decode_steps_host_ms": host_ms,
        "profiled_gpu_ms_by_kind": {k: v / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "triton_variants_loaded_after_startup": [
            {"s": round(t, 3), "step": n, "variant": r} for t, n, r in jit_events],
    }
    with open(os.path.join(OUT, "offline_profile.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(OUT, "offline_profile_kernels.txt"), "w") as f:
        f.writelines(f"{us / 1e3:10.2f} ms {n:6d} x  {name}\n" for us, n, name in rows[:60])
    for k, v in res.items():
        if k != "triton_variants_loaded_after_startup":
            print(f"{k}: {v}")
    if args.log_jit:
        print(f"Triton variants first loaded after start-up: {len(jit_events)}")
        for t, n, r in jit_events:
            print(f"  {t:8.3f} s  step {n:4d}  {r[:400]}")
    print("top kernels (ms over the profiled steps):")
    for us, n, name in rows[:15]:
        print(f"  {us / 1e3:9.2f} {n:5d}x {name}")


if __name__ == "__main__":
    main()
