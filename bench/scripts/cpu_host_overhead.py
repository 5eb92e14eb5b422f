"""Host work of one engine step at a large decode batch, on CPU: the tiny-llama preset (dummy
weights, so the forward is small) with N sequences decoding at once; prints the mean step time
and the time in the scheduler, the forward, the scheduler update and the output processing.
Run it against another tree with PYTHONPATH=<tree>/src for a same-machine A/B (a tree
without `final_only` runs its requests in per-step-output mode).

    PYTHONPATH=src python bench/scripts/cpu_host_overhead.py [--seqs 512] [--steps 40]
    PYTHONPATH=src python bench/scripts/cpu_host_overhead.py --generate   # LLM.generate, tok/s
"""
import argparse
import collections
import gc
import inspect
import random
import time

from turbollm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--generate", action="store_true", help="time LLM.generate of --seqs prompts x 256 tokens")
    args = ap.parse_args()
    n = args.seqs
    llm = LLM("tiny-llama", load_format="dummy", device="cpu", max_num_seqs=n,
              max_num_batched_tokens=max(8192, n * 16), max_model_len=512)
    if args.generate:
        random.seed(0)
        prompts = [[random.randrange(3, 250) for _ in range(16)] for _ in range(n)]
        llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True), use_tqdm=False)
        dt = time.perf_counter() - t0
        print(f"LLM.generate {n} x 256 tokens: {n * 256 / dt:.0f} tok/s ({dt:.2f} s)")
        return
    eng = llm.engine
    acc: dict[str, float] = collections.defaultdict(float)

    def timed(obj, name, key):  # type: ignore[no-untyped-def]
        f = getattr(obj, name)

        def g(*a, **k):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            r = f(*a, **k)
            acc[key] += time.perf_counter() - t
            return r
        setattr(obj, name, g)

    timed(eng.scheduler, "schedule", "schedule")
    timed(eng.scheduler, "update", "update")
    timed(eng, "_process", "process (incl. update)")
    timed(eng.executor.runner, "_forward", "forward")
    kw = {"final_only": True} if "final_only" in inspect.signature(eng.add_request).parameters else {}
    random.seed(0)
    sp = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    for i in range(n):
        eng.add_request(f"r{i}", [random.randrange(3, 250) for _ in range(16)], sp, **kw)
    for _ in range(5):
        eng.step()
    gc.collect()  # the admission's garbage would otherwise be collected inside the timed steps
    acc.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    step = (time.perf_counter() - t0) / args.steps * 1e3
    parts = "; ".join(f"{k} {v / args.steps * 1e3:.2f}" for k, v in acc.items())
    print(f"seqs {n}, final_only {bool(kw)}: step {step:.2f} ms (host {step - acc['forward'] / args.steps * 1e3:.2f}); {parts}")


if __name__ == "__main__":
    main()
