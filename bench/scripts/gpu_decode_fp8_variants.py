"""One GPU visit: decode attention over an FP8 KV cache, the shipped choice (kernels/
paged_attention._use_words) against each loop forced through `_DecodeConfig` (SASS of each:
bench/scripts/cpu_decode_fp8_sass.py), with the bf16 cache as the bandwidth reference.

Shapes: the offline runs' batches and contexts (64 x 640, 256 x 640, 64 x 2048; Llama-3-8B also
128 and 512 x 640) for Llama-2-7B (32 / 32 heads) and Llama-3-8B (32 / 8), D 128, block 16, shuffled blocks. Data are realistic:
q and k with outlier channels, the FP8 cache holds k / k_scale and v / v_scale with per-layer
scales at the e4m3 range (amax / 448). Before timing, each variant's output is checked against the
shipped FP8 output (max abs difference, tolerance 2e-2 + 2e-2 |shipped|), and every FP8 path's
error against the fp32 reference (paged_decode_attention_ref with fp32 q, the first 8 requests) is
recorded. A variant that fails to compile is reported and skipped; one that does not match is
timed and marked (*), so a fixable accuracy fault does not hide its speed. Variants may also force
the split count (the shipped choice, choose_num_splits, aims at 2 x SMs programs whatever the
kernel's CTAs an SM).
Times: CUDA-graph replays, the best of --rounds rounds; GB/s counts the cache bytes (FP8: one a
value) + q and out, against a same-run 1 GiB device copy.

Usage: python bench/scripts/gpu_decode_fp8_variants.py [--json PATH] [--rounds 2] [--variants a,b] [--jitter]
Prints a table; writes --json (default $OUT/gpu_decode_fp8_variants.json).
"""
from __future__ import annotations

import argparse
import json
import os
import traceback

import torch

from turbollm.bench.kernels import _graph_time_ms, copy_bandwidth_gbs
from turbollm.kernels.paged_attention import _DecodeConfig, paged_decode_attention, paged_decode_attention_ref

MODELS = {"llama-2-7b": (32, 32), "llama-3-8b": (32, 8)}  # q heads, kv heads
SHAPES = {"llama-2-7b": [(64, 640), (256, 640), (64, 2048)],  # batch, context
          "llama-3-8b": [(64, 640), (128, 640), (256, 640), (512, 640), (64, 2048)]}
D, BLOCK, MAX_BLOCKS = 128, 16, 128  # block tables padded to 128 columns (16-divisible, like the engine's)
VARIANTS = {  # name -> (_config (None: the shipped choice, _use_words), num_splits (None: choose_num_splits))
    "shipped": (None, None),
    "plain": (_DecodeConfig(fp8_words=False), None),
    "plain 2 splits": (_DecodeConfig(fp8_words=False), 2),
    "fp8_words": (_DecodeConfig(fp8_words=True), None),
    "fp8_words 2 splits": (_DecodeConfig(fp8_words=True), 2),
    # the per-key loop (every key's table entry and masks, as before the thirteenth session)
    "plain per key": (_DecodeConfig(fp8_words=False, paged=False), None),
    "words per key": (_DecodeConfig(fp8_words=True, paged=False), None),
    "words 64": (_DecodeConfig(fp8_words=True, block_n=64), None),
    # names starting "bf16 cache" time the bf16 cache
    "bf16 cache per key": (_DecodeConfig(paged=False), None),
    "bf16 cache paged": (_DecodeConfig(paged=True), None),  # the "bf16 cache" column of visits 13b / 13c
}
REF_REQUESTS = 8
JITTER = False  # --jitter


def make_case(heads: int, kv_heads: int, batch: int, ctx: int) -> dict[str, object]:
    """bf16 and FP8 caches of the same k / v, block tables, lengths and q for one shape."""
    g = torch.Generator(device="cuda").manual_seed(0)
    nb = batch * (-(-ctx // BLOCK))
    kv = torch.randn(2, nb, BLOCK, kv_heads, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kv[0, ..., [3, 67]] *= 6.0  # rotary outlier channels of k
    q = torch.randn(batch, heads, D, device="cuda", generator=g) * 2.0  # [B, H, D]
    q[..., [3, 67]] *= 12.0
    k_scale, v_scale = (kv[i].abs().amax().item() / 448.0 for i in (0, 1))
    fp8 = torch.stack([(kv[0] / k_scale), (kv[1] / v_scale)]).to(torch.float8_e4m3fn)
    tables = torch.zeros(batch, MAX_BLOCKS, device="cuda", dtype=torch.int32)  # [B, 128]
    tables[:, : nb // batch] = torch.randperm(nb, device="cuda", generator=g).view(batch, -1).to(torch.int32)
    # Lengths in (ctx - 128, ctx] (--jitter): as in serving, most requests end inside a tile.
    jitter = torch.randint(0, 128, (batch,), device="cuda", generator=g) if JITTER else 0
    lens = (torch.full((batch,), ctx, device="cuda") - jitter).to(torch.int32)  # [B]
    return dict(q=q.to(torch.bfloat16), bf16=kv, fp8=fp8, tables=tables, lens=lens, k_scale=k_scale,
                v_scale=v_scale, ctx=ctx)


def attention(case: dict[str, object], cache: str, config: _DecodeConfig | None,
              splits: int | None = None) -> torch.Tensor:
    scales = {} if cache == "bf16" else {"k_scale": case["k_scale"], "v_scale": case["v_scale"]}
    return paged_decode_attention(case["q"], case[cache], case["tables"], case["lens"], D**-0.5, case["ctx"],
                                  num_splits=splits, _config=config, **scales)


def ref_error(case: dict[str, object], out: torch.Tensor) -> tuple[float, float]:
    """(max, RMS) error of the first REF_REQUESTS outputs against the fp32 reference."""
    n = REF_REQUESTS
    ref = paged_decode_attention_ref(case["q"][:n].float(), case["fp8"], case["tables"][:n], case["lens"][:n],
                                     D**-0.5, k_scale=case["k_scale"], v_scale=case["v_scale"])
    err = out[:n].float() - ref
    return err.abs().max().item(), err.pow(2).mean().sqrt().item()


def measure(case: dict[str, object], name: str, variant: tuple[_DecodeConfig | None, int | None],
            shipped: torch.Tensor | None, rounds: int) -> dict[str, object]:
    """Check then time one FP8 path (or the bf16 cache with name 'bf16 cache'); errors are
    recorded. A variant whose output differs from the shipped one is still timed (its row keeps
    the mismatch), so a fixable accuracy fault does not hide its speed."""
    config, splits = variant
    cache = "bf16" if name.startswith("bf16 cache") else "fp8"
    row: dict[str, object] = dict(variant=name)
    try:
        out = attention(case, cache, config, splits)
        torch.cuda.synchronize()
        if cache == "fp8":
            row["ref_max_err"], row["ref_rms_err"] = ref_error(case, out)
        if shipped is not None:
            diff = (out.float() - shipped.float()).abs()
            row["max_abs_vs_shipped"] = diff.max().item()
            if not (diff <= 2e-2 + 2e-2 * shipped.float().abs()).all():
                row["mismatch"] = f"output differs from the shipped FP8 kernel's (max abs {diff.max().item():.3g})"
        row["us_rounds"] = [_graph_time_ms(lambda: attention(case, cache, config, splits), 30, 3) * 1e3
                            for _ in range(rounds)]
        row["us"] = min(row["us_rounds"])
    except Exception as e:  # noqa: BLE001 - one variant's failure must not end the visit
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "out"), "gpu_decode_fp8_variants.json"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--jitter", action="store_true", help="lengths in (ctx - 128, ctx] instead of all ctx")
    a = ap.parse_args()
    global JITTER
    JITTER = a.jitter
    names = [n for n in a.variants.split(",") if n]
    copy = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}, copy {copy:.0f} GB/s", flush=True)
    rows = []
    for model, (heads, kv_heads) in MODELS.items():
        for batch, ctx in SHAPES[model]:
            case = make_case(heads, kv_heads, batch, ctx)
            shipped = attention(case, "fp8", None)
            for name in ["bf16 cache", *names]:
                row = measure(case, name, VARIANTS.get(name, (None, None)),
                              None if name.startswith("bf16 cache") or name == "shipped" else shipped,
                              a.rounds)
                elem = 2 if name.startswith("bf16 cache") else 1
                nbytes = int(case["lens"].sum()) * kv_heads * D * 2 * elem + 2 * case["q"].numel() * 2
                if "us" in row:
                    row["gbs"] = nbytes / row["us"] / 1e3
                    row["frac_of_copy"] = row["gbs"] / copy
                row.update(model=model, batch=batch, ctx=ctx)
                rows.append(row)
                print(_line(row), flush=True)
            del case, shipped
            torch.cuda.empty_cache()
    _table(rows, ["bf16 cache", *names])
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gbs": copy,
                   "rows": rows}, f, indent=1)


def _line(r: dict[str, object]) -> str:
    head = f"{r['model']} b{r['batch']} ctx{r['ctx']} {r['variant']:18s}"
    if "error" in r:
        return f"{head} FAILED: {r['error']}"
    err = f" ref err max {r['ref_max_err']:.2e} rms {r['ref_rms_err']:.2e}" if "ref_max_err" in r else ""
    vs = f" vs shipped {r['max_abs_vs_shipped']:.1e}" if "max_abs_vs_shipped" in r else ""
    bad = f" MISMATCH: {r['mismatch']}" if "mismatch" in r else ""
    return f"{head} {r['us']:8.1f} us {r['gbs']:6.0f} GB/s ({r['frac_of_copy']:.0%}){err}{vs}{bad}"


def _table(rows: list[dict[str, object]], names: list[str]) -> None:
    print("\n== decode attention, us (fraction of copy bandwidth) ==")
    print(f"{'shape':24s} " + " ".join(f"{n:>18s}" for n in names))
    by_key = {(r["model"], r["batch"], r["ctx"], r["variant"]): r for r in rows}
    for model in MODELS:
        for batch, ctx in SHAPES[model]:
            cells = []
            for n in names:
                r = by_key.get((model, batch, ctx, n), {})
                mark = "*" if "mismatch" in r else ""
                cells.append(f"{r['us']:.1f} ({r['frac_of_copy']:.0%}){mark}" if "us" in r else "failed")
            print(f"{model + f' {batch}x{ctx}':24s} " + " ".join(f"{c:>18s}" for c in cells))


if __name__ == "__main__":
    main()
