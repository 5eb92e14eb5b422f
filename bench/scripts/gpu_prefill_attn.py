"""Prefill attention on one GPU: correctness of `paged_prefill_attention` and a tiling sweep.

Imports only turbollm.kernels.paged_attention (the GPU image lacks gguf), so run it as
    export PYTHONPATH=src && python3 bench/scripts/gpu_prefill_attn.py [--quick] [--baseline OLD.py]
Checks the kernel against SDPA (dense, causal) and against paged_prefill_attention_ref on
varlen chunks with cached prefixes and windows; then times tilings on
  (a) one 8192-token sequence, H=32, KV=32, D=128, bf16, block_size 16;
  (b) the same with KV=8 (GQA group 4);
  (c) 16 chunks of 512 tokens, each after a 512-token cached prefix, H=32, KV=8;
  (d) decode-like: 64 chunks of 8 tokens after 2040 cached tokens, H=32, KV=8;
  (e) 32 chunks of 64 tokens after 4032 cached; (f) as (b) at D=64; (g) 4 fresh 2048-token prompts;
and SDPA on the same work (dense tensors, bottom-right causal mask for (c)).
FLOPs: 4 * H * D * (visible query-key pairs); a fresh causal sequence counts 2 * T^2 * H * D.
Writes $OUT/prefill_attn.json; prints a table last. --baseline times another copy of
paged_attention.py (e.g. main's) on the same cases.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import torch
import torch.nn.functional as F
import triton

from turbollm.kernels import prefill_attention as pa

OUT = os.environ.get("OUT", "out")
DEV = "cuda"
BF16 = torch.bfloat16


def make_case(qlens: list[int], prefixes: list[int], heads: int, kv_heads: int, head_dim: int,
              block_size: int = 16, dtype: torch.dtype = BF16, seed: int = 0) -> dict:
    """Paged inputs (shuffled block tables) plus the dense per-request k/v they hold."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    seqs = [a + b for a, b in zip(qlens, prefixes)]
    need = [-(-n // block_size) for n in seqs]
    nblocks = sum(need) + 4
    cache = torch.randn(2, nblocks, block_size, kv_heads, head_dim, device=DEV, generator=g).to(dtype)
    perm = torch.randperm(nblocks, device=DEV, generator=g)
    tables = torch.zeros(len(seqs), max(need) + 1, dtype=torch.int32, device=DEV)
    used, dense = 0, []
    for r, (n, s) in enumerate(zip(need, seqs)):
        tables[r, :n] = perm[used:used + n]
        used += n
        pos = torch.arange(s, device=DEV)
        blk = tables[r].long()[pos // block_size]
        dense.append((cache[0, blk, pos % block_size], cache[1, blk, pos % block_size]))  # [S, KV, D]
    q = torch.randn(sum(qlens), heads, head_dim, device=DEV, generator=g).to(dtype)  # [T, H, D]
    qsl = torch.tensor([0, *qlens], device=DEV).cumsum(0).to(torch.int32)
    lens = torch.tensor(seqs, device=DEV, dtype=torch.int32)
    pairs = sum(ql * p + ql * (ql + 1) // 2 for ql, p in zip(qlens, prefixes))  # visible (query, key)
    return dict(q=q, cache=cache, tables=tables, qsl=qsl, lens=lens, dense=dense, qlens=qlens,
                prefixes=prefixes, maxq=max(qlens), flops=4 * heads * head_dim * pairs)


def args_of(c: dict, window: int | None = None) -> tuple:
    d = c["q"].shape[-1]
    return (c["q"], c["cache"], c["tables"], c["qsl"], c["lens"], d**-0.5, c["maxq"], window)


def sdpa_fn(c: dict):
    """SDPA over the same work: one batched call when all chunks match, bottom-right causal."""
    from torch.nn.attention.bias import causal_lower_right

    ql, pre = c["qlens"], c["prefixes"]
    assert len(set(ql)) == 1 and len(set(pre)) == 1
    heads = c["q"].shape[1]
    qb = c["q"].view(len(ql), ql[0], heads, -1).transpose(1, 2)  # [R, H, Lq, D]
    kb = torch.stack([k for k, _ in c["dense"]]).transpose(1, 2)  # [R, KV, Lk, D]
    vb = torch.stack([v for _, v in c["dense"]]).transpose(1, 2)
    group = heads // kb.shape[1]
    kb, vb = kb.repeat_interleave(group, 1).contiguous(), vb.repeat_interleave(group, 1).contiguous()
    lq, lk = ql[0], ql[0] + pre[0]
    if lq == lk:
        return lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
    mask = causal_lower_right(lq, lk)
    return lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)


def to_tokens(out_b: torch.Tensor) -> torch.Tensor:
    return out_b.transpose(1, 2).reshape(-1, out_b.shape[1], out_b.shape[3])  # [T, H, D]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm()).item()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=120, return_mode="median")


_INFO: dict = {}
_SEEN = [0]


def kernel_info(cfg) -> dict:
    """Registers, spills and shared memory of the kernel the last call compiled (if it did)."""
    try:
        cache = pa._prefill_kernel.device_caches[torch.cuda.current_device()][0]
        if len(cache) > _SEEN[0]:
            _SEEN[0] = len(cache)
            k = list(cache.values())[-1]
            _INFO[cfg] = {"regs": k.n_regs, "spills": k.n_spills, "smem": k.metadata.shared}
        return dict(_INFO.get(cfg, {}))
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return {"info_error": repr(e)[:80]}


def check_ref(results: dict) -> None:
    """Default configs vs the fp32 reference: varlen, prefixes, windows, GQA, small chunks."""
    cases = [
        ([300, 1, 777, 64, 16], [0, 999, 100, 2000, 0], 32, 8, 128, BF16, None),
        ([300, 1, 777, 64, 16], [0, 999, 100, 2000, 0], 32, 8, 128, BF16, 256),
        ([513, 200], [0, 77], 16, 16, 128, BF16, None),
        ([129, 40], [5, 3000], 16, 2, 64, torch.float16, 100),
        ([8, 5, 16], [2000, 30, 0], 32, 8, 128, BF16, None),
        ([8, 5, 16], [2000, 30, 0], 28, 4, 128, BF16, 64),  # group 7: no packing
        ([200, 33], [17, 0], 8, 2, 128, torch.float32, None),
        ([100, 60], [50, 10], 8, 8, 96, BF16, 40),  # head dim not a power of two
    ]
    errs = []
    for i, (ql, pre, h, kv, d, dt, w) in enumerate(cases):
        c = make_case(ql, pre, h, kv, d, dtype=dt, seed=10 + i)
        a = args_of(c, w)
        got = pa.paged_prefill_attention(*a)
        ref = pa.paged_prefill_attention_ref(*a)
        e = rel_err(got, ref)
        errs.append({"case": f"q{ql} pre{pre} H{h} KV{kv} D{d} {str(dt)[6:]} w{w}", "rel_err": e})
        print(f"ref check {errs[-1]['case']}: rel err {e:.2e}", flush=True)
    results["ref_checks"] = errs


def _cfgs(spec: str) -> list:
    """'bm,bn,warps,stages,pack[,flags]' items separated by spaces; flags: m = m_fastest,
    l = loop_stages."""
    out = []
    for item in spec.split():
        f = item.split(",")
        flags = "".join(f[5:])
        out.append(pa.PrefillConfig(*map(int, f[:5]), m_fastest="m" in flags, loop_stages="l" in flags))
    return out


# The tilings worth comparing (earlier sweeps, in bench/results, also tried block_n 32, 4 and
# 2 stages, 16 warps x 256 rows and a lazy-rescale variant; all were slower).
LONG = _cfgs("128,128,8,3,1,m 128,128,8,3,1 128,128,8,3,1,ml 128,64,4,3,1,m 64,64,4,3,1,m 256,64,16,2,1,m")
GQA = _cfgs("128,128,8,3,2,m 128,128,8,3,4,m 128,64,4,3,4,ml")
SHORT = _cfgs("64,64,4,3,1,m 64,64,4,4,1,m 128,128,8,3,1,m 128,64,4,3,1,m")
MEDIUM = _cfgs("64,64,4,4,1,m 64,64,4,3,1 128,128,8,3,1,m 64,64,4,3,4")
SMALL = _cfgs("32,64,4,3,4 32,128,4,3,4 32,128,4,2,4 16,64,4,3,1")
D64 = _cfgs("64,64,4,3,1,m 128,128,4,3,1,m 128,64,8,3,1,m")
MIDLONG = _cfgs("64,64,4,3,1,m 128,128,8,3,1,m 128,128,8,3,2,m")


def run_case(name: str, c: dict, sweep: list, results: dict, baseline) -> None:
    a = args_of(c)
    rows = []
    tflops = lambda ms: c["flops"] / ms / 1e9  # noqa: E731
    ref = None
    if len(set(c["qlens"])) == 1:
        fn = sdpa_fn(c)
        ref = to_tokens(fn()) if c["qlens"][0] > 1 else None
        ms = bench(fn)
        rows.append({"impl": "sdpa", "ms": ms, "tflops": tflops(ms)})
        print(f"{name} sdpa: {ms:.3f} ms {tflops(ms):.0f} TFLOP/s", flush=True)
    if ref is None:
        ref = pa.paged_prefill_attention_ref(*a)
    if baseline is not None:
        ms = bench(lambda: baseline.paged_prefill_attention(*a))
        e = rel_err(baseline.paged_prefill_attention(*a), ref)
        rows.append({"impl": "main (before)", "ms": ms, "tflops": tflops(ms), "rel_err": e})
        print(f"{name} main: {ms:.3f} ms {tflops(ms):.0f} TFLOP/s err {e:.1e}", flush=True)
    group = c["q"].shape[1] // c["cache"].shape[3]
    default = pa.choose_prefill_config(c["q"].dtype, c["q"].shape[2], group, c["maxq"])
    configs = [default] + [s for s in sweep if group % s.pack == 0]
    for i, cfg in enumerate(configs):
        tag = ("default " if i == 0 else "") + "bm{} bn{} w{} s{} pack{}".format(
            cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.pack
        ) + (" mfast" if cfg.m_fastest else "") + (" loop" if cfg.loop_stages else "")
        try:
            t0 = time.perf_counter()
            out = pa._launch_prefill(*a, cfg)
            torch.cuda.synchronize()
            info = kernel_info(cfg)
            info["compile_s"] = round(time.perf_counter() - t0, 2)
            e = rel_err(out, ref)
            ms = bench(lambda: pa._launch_prefill(*a, cfg))
            rows.append({"impl": tag, "ms": ms, "tflops": tflops(ms), "rel_err": e, **info})
            print(f"{name} {tag}: {ms:.3f} ms {tflops(ms):.0f} TFLOP/s err {e:.1e} {info}", flush=True)
        except Exception as ex:  # noqa: BLE001 - a config that fails to compile is a data point
            rows.append({"impl": tag, "error": f"{type(ex).__name__}: {ex}"[:300]})
            print(f"{name} {tag}: FAILED {rows[-1]['error']}", flush=True)
    results["cases"][name] = {"flops": c["flops"], "rows": rows}
    with open(os.path.join(OUT, "prefill_attn.json"), "w") as f:
        json.dump(results, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="default configs only")
    ap.add_argument("--baseline", help="path of another paged_attention.py to time alongside")
    ap.add_argument("--skip-ref", action="store_true")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    baseline = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_paged_attention", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cases": {}}
    if not args.skip_ref:
        check_ref(results)
    q = args.quick
    cases = [
        ("a 8k KV32", ([8192], [0], 32, 32, 128), LONG),
        ("b 8k KV8", ([8192], [0], 32, 8, 128), LONG + GQA),
        ("c 16x512 +512", ([512] * 16, [512] * 16, 32, 8, 128), SHORT),
        ("d 64x8 +2040", ([8] * 64, [2040] * 64, 32, 8, 128), SMALL),
        ("e 32x64 +4032", ([64] * 32, [4032] * 32, 32, 8, 128), MEDIUM),
        ("f 8k KV8 D64", ([8192], [0], 32, 8, 64), D64),
        ("g 4x2048 KV8", ([2048] * 4, [0] * 4, 32, 8, 128), MIDLONG),
    ]
    for name, shape, sweep in cases:
        run_case(name, make_case(*shape), [] if q else sweep, results, None if name[0] in "fg" else baseline)
    print("\n| case | impl | ms | TFLOP/s | rel err |\n|---|---|---|---|---|")
    for name, case in results["cases"].items():
        for r in case["rows"]:
            if "error" in r:
                print(f"| {name} | {r['impl']} | failed | | {r['error'][:60]} |")
            else:
                print(f"| {name} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r.get('rel_err', 0):.1e} |")


if __name__ == "__main__":
    main()
