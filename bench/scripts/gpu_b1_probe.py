"""One GPU visit: where a batch-1 decode step's GPU time goes (kernels by name in an eager
step vs the graph replay), the engine's step time, and prefill attention of an 8k prompt
through the Attention layer's dense route against the paged kernel and plain SDPA.

Prints a short table and writes $OUT/gpu_b1_probe.json (+ the kernel table as .txt).
Usage: python bench/scripts/gpu_b1_probe.py [--quantization int4|int8] [--kernels-only]
"""
import argparse
import json
import os
import time
from collections import defaultdict

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


def timeit(fn, n: int = 10) -> float:
    return time_ms(fn, iters=n, warmup=3)


def dense_prefill_probe() -> None:
    """Prefill attention of one whole 8k prompt through the Attention layer: the dense (SDPA)
    route on strided q/k/v views vs the paged kernel, and SDPA on contiguous inputs."""
    from turbollm.kernels.prefill_attention import paged_prefill_attention
    from turbollm.layers.attention import Attention, AttentionMetadata

    T, D, bs = 8192, 128, 16
    for H, KV in ((32, 32), (32, 8)):
        torch.manual_seed(0)
        heads = torch.randn(T, H + 2 * KV, D, device="cuda", dtype=torch.bfloat16)
        q, k, v = heads[:, :H], heads[:, H : H + KV], heads[:, H + KV :]
        nb = T // bs
        cache = torch.empty(2, nb, bs, KV, D, device="cuda", dtype=torch.bfloat16)
        cache[0] = k.reshape(nb, bs, KV, D)
        cache[1] = v.reshape(nb, bs, KV, D)
        table = torch.arange(nb, device="cuda")[None]
        qsl = torch.tensor([0, T], device="cuda")
        sl = torch.tensor([T], device="cuda")
        meta = AttentionMetadata(torch.arange(T, device="cuda"), table, sl, qsl, [T], [T], 0)
        layer = Attention(H, KV, D)
        flops = 2 * T * T * H * D
        dense = timeit(lambda: layer._dense_prefill(q, k, v, meta))
        ours = timeit(lambda: paged_prefill_attention(q, cache, table, qsl, sl, D**-0.5, T))
        qh, kh, vh = (x.transpose(0, 1)[None].contiguous() for x in (q, k, v))
        sd = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True))
        err = (layer._dense_prefill(q, k, v, meta).float()
               - paged_prefill_attention(q, cache, table, qsl, sl, D**-0.5, T).float()).abs().max().item()
        record[f"prefill_8k_H{H}_KV{KV}"] = {"dense_route_ms": dense, "paged_kernel_ms": ours, "sdpa_contig_ms": sd}
        note(f"prefill 8k H{H}/KV{KV}", f"dense route {dense:.3f} ms = {flops / dense / 1e9:.0f} TFLOP/s; "
             f"paged kernel {ours:.3f} ms = {flops / ours / 1e9:.0f}; SDPA contiguous {sd:.3f} ms = "
             f"{flops / sd / 1e9:.0f}; max diff {err:.3g}")


def replay_b1(llm: LLM, ctx: int = 256, batch: int = 1) -> float:
    """ms of one replay of the decode graph of `batch` (default 1) at context ctx for every
    row, each row reading its own blocks (median of timed batches)."""
    g = llm.engine.executor.runner.graphs
    b = g.bucket_for(batch)
    g.seq_lens[:b].fill_(ctx)
    g.positions[:b].fill_(ctx - 1)
    per = -(-ctx // g.block_size)  # blocks a row reads
    g.block_tables[:b].copy_(torch.arange(g.block_tables.shape[1], device=g.block_tables.device))
    g.block_tables[:b, :per] = torch.arange(b * per, device=g.block_tables.device).view(b, per)
    g.slot_mapping[:b].fill_(g.scratch_slot)
    replay = timeit(lambda: [g.graphs[b].replay() for _ in range(20)], n=20) / 20
    note(f"graph replay b{b} ctx{ctx}", f"{replay * 1e3:.1f} us")
    return replay


def replay_kernels(llm: LLM, batch: int) -> None:
    """GPU time per replay of the decode graph by kernel name (CUPTI sees the graph's kernels)."""
    g = llm.engine.executor.runner.graphs
    b = g.bucket_for(batch)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            g.graphs[b].replay()
        torch.cuda.synchronize()
    lines, total, n = _by_kernel(prof, 5)
    print("\n".join(lines[:14]), flush=True)
    note(f"replay b{b} kernels", f"{n:.0f} kernels, {total:.1f} us summed")


def _by_kernel(prof, reps: int) -> tuple[list[str], float, float]:  # type: ignore[no-untyped-def]
    """(lines "us per rep, calls per rep, name" slowest first, us summed, kernels) per repetition."""
    per = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += e.device_time / reps
            per[e.name][1] += 1 / reps
    lines = [f"{v[0]:9.1f} us {v[1]:6.0f}x  {k[:110]}" for k, v in sorted(per.items(), key=lambda kv: -kv[1][0])]
    return lines, sum(v[0] for v in per.values()), sum(v[1] for v in per.values())

def kernel_breakdown(llm: LLM) -> None:
    runner = llm.engine.executor.runner
    g = runner.graphs
    model = runner.model
    ctx = 256
    b = g.bucket_for(1)
    replay = replay_b1(llm, ctx)
    meta = g._meta(b)
    meta.seq_lens_cpu = [ctx]
    with torch.inference_mode():
        for _ in range(3):
            model(g.input_ids[:b], g.positions[:b], runner.kv_caches, meta)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model(g.input_ids[:b], g.positions[:b], runner.kv_caches, meta)
            torch.cuda.synchronize()
    lines, total, n = _by_kernel(prof, 5)
    with open(os.path.join(OUT, "b1_kernels.txt"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines[:25]), flush=True)
    note("eager b1 step kernels", f"{n:.0f} kernels, {total:.1f} us summed; graph replay {replay * 1e3:.1f} us "
         f"-> {replay * 1e3 - total:.1f} us of gaps ({(replay * 1e3 - total) / max(n, 1):.2f} us/kernel)")
    record["b1"] = {"replay_us": replay * 1e3, "kernel_us": total, "kernels": n, "top": lines[:30]}


def engine_steps(llm: LLM) -> None:
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    eng.add_request("b1", list(range(1000, 1128)), sp)
    for _ in range(20):
        eng.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200):
        eng.step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / 200 * 1e3
    note("engine step b1", f"{ms:.3f} ms = {1e3 / ms:.1f} tok/s")
    record["engine_step_b1_ms"] = ms
    # GPU timeline of 30 steps: idle gaps between consecutive GPU activities, by neighbours.
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(30):
            eng.step()
        torch.cuda.synchronize()
    ev = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA)
    gaps = defaultdict(lambda: [0.0, 0])
    busy_end, total_gap = ev[0][1], 0.0
    prev = ev[0][2]
    outside = defaultdict(lambda: [0.0, 0])
    for st, en, name in ev[1:]:
        if st > busy_end:
            key = f"{prev[:40]} -> {name[:40]}"
            gaps[key][0] += (st - busy_end) / 30
            gaps[key][1] += 1 / 30
            total_gap += st - busy_end
        busy_end = max(busy_end, en)
        prev = name
        if not name.startswith("_") or "sample" in name:
            outside[name[:80]][0] += (en - st) / 30
            outside[name[:80]][1] += 1 / 30
    span = ev[-1][1] - ev[0][0]
    lines = [f"{v[0]:8.1f} us/step {v[1]:5.1f}x  {k}" for k, v in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:15]]
    lines += ["-- non-Triton GPU work per step --"]
    lines += [f"{v[0]:8.1f} us/step {v[1]:5.1f}x  {k}" for k, v in sorted(outside.items(), key=lambda kv: -kv[1][0])[:15]]
    print("\n".join(lines), flush=True)
    with open(os.path.join(OUT, "b1_gaps.txt"), "w") as f:
        f.write("\n".join(lines))
    note("b1 GPU idle", f"{total_gap / 30:.1f} us/step = {100 * total_gap / span:.1f}% of the span")
    eng.abort_request(["b1"])
    while eng.has_unfinished_requests():
        eng.step()


def argmax_probe() -> None:
    for rows in (1, 64):
        x = torch.randn(rows, 32000, device="cuda", dtype=torch.bfloat16)
        a = timeit(lambda: [x.argmax(dim=-1) for _ in range(20)]) / 20
        b = timeit(lambda: [x.view(-1).argmax() for _ in range(20)]) / 20 if rows == 1 else float("nan")
        c = timeit(lambda: [torch.max(x, dim=-1) for _ in range(20)]) / 20
        note(f"argmax [{rows}, 32000] bf16", f"argmax(dim=-1) {a * 1e3:.1f} us; flat argmax {b * 1e3:.1f} us; max(dim=-1) {c * 1e3:.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default=None, help="e.g. int4 (group 128) or int8: the quantized step")
    ap.add_argument("--kernels-only", action="store_true", help="skip the argmax and prefill probes")
    ap.add_argument("--replay-only", action="store_true",
                    help="only the graph replay time (ctx 256): the step's GPU time without host work")
    ap.add_argument("--batch", type=int, default=1, help="--replay-only: the batch whose graph is replayed")
    ap.add_argument("--profile-replay", action="store_true", help="--replay-only: kernels of the replay by name")
    ap.add_argument("--int4-band64", default=None,
                    help="BLOCK_N,waves,max_split: replaces the int4 M <= 64 tensor-core band (tuning aid)")
    args = ap.parse_args()
    if args.int4_band64:
        from dataclasses import replace

        from turbollm.kernels import quant_matmul_config as qc
        bn, waves, split = args.int4_band64.split(",")
        bands = list(qc._BANDS["int4"])
        i = next(j for j, b in enumerate(bands) if b.max_m == 64)
        bands[i] = replace(bands[i], cfg=replace(bands[i].cfg, block_n=int(bn)), waves=float(waves), max_split=int(split))
        qc._BANDS["int4"] = tuple(bands)
        note("int4 M<=64 band", str(bands[i]))
    if not args.kernels_only:
        argmax_probe()
        dense_prefill_probe()
    t0 = time.perf_counter()
    quant = {"quantization": args.quantization, "group_size": 128} if args.quantization else {}
    llm = LLM("llama-2-7b", load_format="dummy", max_num_seqs=64, max_model_len=4096, **quant)
    note("cold start", f"{time.perf_counter() - t0:.1f} s")
    if args.replay_only:
        replay_b1(llm, batch=args.batch)
        if args.profile_replay:
            replay_kernels(llm, args.batch)
        return
    engine_steps(llm)
    kernel_breakdown(llm)
    tag = f"_{args.quantization}" if args.quantization else ""
    with open(os.path.join(OUT, f"gpu_b1_probe{tag}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print("\n== summary ==")
    for k, v in rows:
        print(f"{k:32s} {v}")


if __name__ == "__main__":
    main()
