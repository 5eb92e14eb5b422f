"""One GPU visit: where a decode step's time goes, GPU idle time between steps, and prefill
attention TFLOP/s (ours vs SDPA vs FlexAttention). Llama-2-7B preset, dummy weights, bf16.

Prints a short table and writes $OUT/gpu_profile.json (+ profiler tables as .txt).
Usage: python bench/scripts/gpu_profile.py [--skip-prefill] [--skip-engine]
"""
import argparse
import json
import os
import random
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from turbollm import LLM, SamplingParams
from turbollm.bench.kernels import time_ms

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
rows: list[tuple[str, str]] = []
record: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}


def note(key: str, value: str) -> None:
    rows.append((key, value))
    print(f"{key}: {value}", flush=True)


def busy_us(prof) -> tuple[float, float]:
    """(union of GPU kernel/memcpy intervals, wall span from first to last GPU event) in us."""
    iv = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            iv.append((e.time_range.start, e.time_range.end))
    if not iv:
        return 0.0, 0.0
    iv.sort()
    total, (cs, ce) = 0.0, iv[0]
    for s, e in iv[1:]:
        if s > ce:
            total += ce - cs
            cs, ce = s, e
        else:
            ce = max(ce, e)
    total += ce - cs
    return total, iv[-1][1] - iv[0][0]


def profile_steps(llm: LLM, prompts: list[list[int]], out_len: int, warm_steps: int, n_steps: int, tag: str):
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}-{i}", p, sp)
    for _ in range(warm_steps):
        eng.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n_steps):
            eng.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n_steps * 1e3
    busy, span = busy_us(prof)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    with open(os.path.join(OUT, f"prof_{tag}.txt"), "w") as f:
        f.write(table)
    # Unprofiled timing of the same kind of steps.
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n_steps):
        eng.step()
    torch.cuda.synchronize()
    plain = (time.perf_counter() - t) / n_steps * 1e3
    eng.abort_request([f"{tag}-{i}" for i in range(len(prompts))])
    while eng.has_unfinished_requests():
        eng.step()
    idle = 1 - busy / span if span else float("nan")
    note(f"{tag} step", f"{plain:.3f} ms unprofiled, {wall:.3f} ms profiled; GPU busy "
         f"{busy / n_steps / 1e3:.3f} ms/step; idle {100 * idle:.1f}% of the profiled span")
    record[tag] = {"ms_per_step": plain, "ms_per_step_profiled": wall,
                   "gpu_busy_ms_per_step": busy / n_steps / 1e3, "idle_fraction": idle}
    print(table[:6000], flush=True)


def replay_only(llm: LLM, bs: int, ctx: int) -> None:
    """Back-to-back replays of one bucket's graph: the GPU time of a decode step, no host work."""
    g = llm.engine.executor.runner.graphs
    b = g.bucket_for(bs)
    g.seq_lens[:b].fill_(ctx)
    g.positions[:b].fill_(ctx - 1)
    g.block_tables[:b].copy_(torch.arange(g.block_tables.shape[1], device=g.block_tables.device))
    g.slot_mapping[:b].fill_(g.scratch_slot)
    for _ in range(5):
        g.graphs[b].replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20):
            g.graphs[b].replay()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 20)
    ms = statistics.median(ts)
    note(f"replay bucket {b} ctx {ctx}", f"{ms:.3f} ms/step (GPU only)")
    record[f"replay_{b}_{ctx}"] = ms


def prefill_attention() -> None:
    from turbollm.kernels.prefill_attention import paged_prefill_attention

    T, H, KV, D, bs = 8192, 32, 32, 128, 16
    dev = "cuda"
    torch.manual_seed(0)
    q = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(T, KV, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(T, KV, D, device=dev, dtype=torch.bfloat16)
    nb = T // bs
    cache = torch.empty(2, nb, bs, KV, D, device=dev, dtype=torch.bfloat16)
    cache[0] = k.view(nb, bs, KV, D)
    cache[1] = v.view(nb, bs, KV, D)
    table = torch.arange(nb, device=dev)[None]
    qsl = torch.tensor([0, T], device=dev)
    sl = torch.tensor([T], device=dev)
    flops = 2 * T * T * H * D  # causal: half of 4 * T^2 * H * D

    def timeit(fn, n=10):
        return time_ms(fn, iters=n, warmup=3)

    scale = D**-0.5
    ours = timeit(lambda: paged_prefill_attention(q, cache, table, qsl, sl, scale, T))
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T, D]
    ref = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    got = paged_prefill_attention(q, cache, table, qsl, sl, scale, T).transpose(0, 1)[None]
    err = (got.float() - ref.float()).abs().max().item()
    sdpa = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True))
    res = {"ours_ms": ours, "sdpa_ms": sdpa, "max_abs_err_vs_sdpa": err}
    note("prefill attn 8k H32 D128 ours", f"{ours:.3f} ms = {flops / ours / 1e9:.0f} TFLOP/s (err {err:.3g})")
    note("prefill attn 8k SDPA (dense)", f"{sdpa:.3f} ms = {flops / sdpa / 1e9:.0f} TFLOP/s")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, 1, T, T, device=dev)
        flex = torch.compile(flex_attention)
        fx = timeit(lambda: flex(qh, kh, vh, block_mask=bm))
        res["flex_ms"] = fx
        note("prefill attn 8k FlexAttention", f"{fx:.3f} ms = {flops / fx / 1e9:.0f} TFLOP/s")
    except Exception as e:  # noqa: BLE001 - a measurement, report and go on
        note("flex", f"failed: {type(e).__name__}: {e}"[:200])
    record["prefill_attention"] = res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args()
    if not args.skip_prefill:
        prefill_attention()
    if not args.skip_engine:
        t0 = time.perf_counter()
        llm = LLM("llama-2-7b", load_format="dummy", max_num_seqs=256, max_model_len=4096,
                  max_num_batched_tokens=8192)
        note("cold start", f"{time.perf_counter() - t0:.1f} s")
        random.seed(0)
        p = lambda n: [random.randrange(10, 30000) for _ in range(n)]  # noqa: E731
        replay_only(llm, 1, 256)
        replay_only(llm, 64, 256)
        profile_steps(llm, [p(128)], 200, warm_steps=10, n_steps=30, tag="decode_b1")
        profile_steps(llm, [p(128) for _ in range(64)], 200, warm_steps=10, n_steps=30, tag="decode_b64")
        profile_steps(llm, [p(512) for _ in range(400)], 64, warm_steps=30, n_steps=20, tag="offline_mixed")
    with open(os.path.join(OUT, "gpu_profile.json"), "w") as f:
        json.dump(record, f, indent=1)
    print("\n| what | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
