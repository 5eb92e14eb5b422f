"""One GPU visit: decode attention with a bf16 and an FP8 KV cache at the offline runs' batches
and contexts (Llama-2-7B MHA 32/32 and Llama-3-8B GQA 32/8, D 128, block 16, shuffled blocks),
as shipped and (FP8 only) with other keys-a-step / warps / stages. GB/s counts the cache bytes read (FP8:
one byte an element) + q and out. FP8 outputs are checked against the shipped setting's.

With --prefill: prefill attention of whole 512-token prompts over each cache instead.

Prints a table and writes $OUT/gpu_decode_attn_fp8.json (--prefill: gpu_prefill_attn_fp8.json).
With --splits the FP8 variants are KV split counts instead.
Usage: python bench/scripts/gpu_decode_attn_fp8.py [--quick | --splits | --prefill]
"""
import argparse
import json
import os

import torch

from turbollm.bench.kernels import _graph_time_ms, copy_bandwidth_gbs
from turbollm.kernels import paged_attention as PA
from turbollm.kernels import prefill_attention as PF

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
SHIPPED = (None, PA._DECODE_WARPS, PA._DECODE_STAGES)  # None: each cache dtype's shipped keys a step
SHIPPED_N = (PA._DECODE_BLOCK_N, PA._DECODE_BLOCK_N_FP8)
VARIANTS = {"shipped": SHIPPED, "64 keys": (64, 4, None), "128 keys": (128, 4, None),
            "128 keys 4 stages": (128, 4, 4), "128 keys 2 stages": (128, 4, 2), "128 keys 8 warps": (128, 8, None),
            "256 keys": (256, 4, None), "256 keys 8 warps": (256, 8, None), "256 keys 2 stages": (256, 4, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shipped setting only")
    ap.add_argument("--splits", action="store_true",
                    help="FP8 variants are KV splits (shipped tiles) instead of tilings: auto, 2, 4")
    ap.add_argument("--prefill", action="store_true",
                    help="instead: prefill attention of whole 512-token prompts over a bf16 and an FP8 cache")
    args = ap.parse_args()
    if args.prefill:
        return prefill()
    copy = copy_bandwidth_gbs()
    print(f"copy {copy:.0f} GB/s", flush=True)
    rows = []
    for model, (H, KV) in (("llama-2-7b", (32, 32)), ("llama-3-8b", (32, 8))):
        for batch, ctx in ((64, 640), (256, 640), (64, 2048)):
            torch.manual_seed(0)
            bs, D = 16, 128
            nb = batch * (-(-ctx // bs))
            base = torch.randn(2, nb, bs, KV, D, device="cuda", dtype=torch.bfloat16)
            tables = torch.randperm(nb, device="cuda").view(batch, -1).to(torch.int32)
            lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
            q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
            for kvd in ("bf16", "fp8"):
                cache = base if kvd == "bf16" else base.to(torch.float8_e4m3fn)
                ref = None
                variants = ({"shipped": (SHIPPED, None), "2 splits": (SHIPPED, 2), "4 splits": (SHIPPED, 4)}
                            if args.splits else {name: (v, None) for name, v in VARIANTS.items()})
                for name, ((bn, warps, stages), nsplit) in variants.items():
                    if (args.quick or kvd == "bf16") and name != "shipped":
                        continue
                    PA._DECODE_BLOCK_N, PA._DECODE_BLOCK_N_FP8 = SHIPPED_N if bn is None else (bn, bn)
                    PA._DECODE_WARPS, PA._DECODE_STAGES = warps, stages

                    def fn():
                        return PA.paged_decode_attention(q, cache, tables, lens, D**-0.5, ctx, k_scale=1.0,
                                                         v_scale=1.0, num_splits=nsplit)
                    out = fn()
                    if ref is None:
                        ref = out
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    ms = _graph_time_ms(fn, 50, 5)
                    nbytes = batch * ctx * KV * D * 2 * cache.element_size() + 2 * q.numel() * 2
                    gbs = nbytes / ms / 1e6
                    splits = nsplit or PA.choose_num_splits(batch, KV, ctx)
                    row = dict(model=model, batch=batch, ctx=ctx, kv=kvd, variant=name, us=ms * 1e3, gbs=gbs,
                               frac=gbs / copy, splits=splits, rel_err=err)
                    rows.append(row)
                    print(f"{model} b{batch} ctx{ctx} {kvd} {name:18s} {ms * 1e3:8.1f} us {gbs:6.0f} GB/s "
                          f"({gbs / copy:.0%}) splits {splits} err {err:.1e}", flush=True)
                    assert err < 2e-2, f"{name}: output differs"
    (PA._DECODE_BLOCK_N, PA._DECODE_BLOCK_N_FP8), (_, PA._DECODE_WARPS, PA._DECODE_STAGES) = SHIPPED_N, SHIPPED
    with open(os.path.join(OUT, "gpu_decode_attn_fp8.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "copy_gbs": copy, "rows": rows}, f, indent=1)
    print("\n== decode attention, us (fraction of copy bandwidth); best variant ==")
    keys = sorted({(r["model"], r["batch"], r["ctx"], r["kv"]) for r in rows}, key=lambda k: (k[0], k[1], k[2], k[3]))
    for k in keys:
        sel = [r for r in rows if (r["model"], r["batch"], r["ctx"], r["kv"]) == k]
        ship = next(r for r in sel if r["variant"] == "shipped")
        best = min(sel, key=lambda r: r["us"])
        print(f"{k[0]} b{k[1]} ctx{k[2]} {k[3]}: shipped {ship['us']:.1f} us ({ship['frac']:.0%}); "
              f"best {best['variant']} {best['us']:.1f} us ({best['frac']:.0%})")


def prefill() -> None:
    """32 whole prompts of 512 tokens (the offline runs' prefill) over a bf16 and an FP8 cache.
    (At commit d7b748c it also ran the FP8 cache with fp16 dots, then reverted: 5-8% slower.)"""
    rows = []
    for model, (H, KV) in (("llama-2-7b", (32, 32)), ("llama-3-8b", (32, 8))):
        torch.manual_seed(0)
        R, L, bs, D = 32, 512, 16, 128
        nb = R * L // bs
        base = torch.randn(2, nb, bs, KV, D, device="cuda", dtype=torch.bfloat16)
        tables = torch.randperm(nb, device="cuda").view(R, -1).to(torch.int32)
        starts = torch.arange(R + 1, device="cuda", dtype=torch.int32) * L
        lens = torch.full((R,), L, device="cuda", dtype=torch.int32)
        q = torch.randn(R * L, H, D, device="cuda", dtype=torch.bfloat16)
        flops = 2 * 2 * R * (L * (L + 1) // 2) * H * D
        ref = None
        for name, kvd in (("bf16 cache", "bf16"), ("fp8 cache", "fp8")):
            cache = base if kvd == "bf16" else base.to(torch.float8_e4m3fn)

            def fn():
                return PF.paged_prefill_attention(q, cache, tables, starts, lens, D**-0.5, L)
            out = fn()
            ref = out if ref is None else ref
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()  # fp8 against bf16
            ms = _graph_time_ms(fn, 30, 3)
            rows.append(dict(model=model, variant=name, us=ms * 1e3, tflops=flops / ms / 1e9, rel_err=err))
            print(f"prefill {model} {name:22s} {ms * 1e3:8.1f} us {flops / ms / 1e9:6.1f} TFLOP/s err {err:.1e}",
                  flush=True)
            assert err < 0.1, f"{name}: far from the bf16 cache's output"
    with open(os.path.join(OUT, "gpu_prefill_attn_fp8.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
