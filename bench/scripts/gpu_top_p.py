"""Top-p (nucleus) filter on one GPU: the full sort (`apply_top_p`, the reference), the
sort-free search kernel (kernels/top_p.py, what the sampler runs on a GPU: `kernel`, with the
count of tokens it decides differently from the sort in `diff`), and the candidate path
(`sample.logits_processors.apply_top_p_candidates`: topk, one host sync, the full sort for the
rows it cannot decide; what the sampler runs on the CPU). End-to-end effect in the engine: gpu_top_p_engine.py.

    export PYTHONPATH=src && python3 bench/scripts/gpu_top_p.py            # H100 / H200
    PYTHONPATH=src python3 bench/scripts/gpu_top_p.py --device cpu          # smoke check

Cases: batch 1, 64, 256 x vocab 32000, 128256 x top_p 0.9, 0.95 x logits randn * scale
(scale 3: a flat nucleus of thousands of tokens, so every row falls back to the full sort;
scale 5: a nucleus of tens to hundreds). Each time is the median of --iters calls after
--warmup, one call per CUDA-event pair (wall clock on CPU); the candidate path's time includes
its host sync and the full sort of the rows it could not decide. `decided` is the fraction of
rows the candidates settled; `same` checks that both outputs are equal. `cand_us` times the
candidate cut alone (no sync, no fallback): the floor of the fast path.

--probe measures the full sort's own float32 rounding (mass before each of the first 4096
sorted tokens, against float64) on this device, for these logits and for tie-heavy rows,
as a fraction of `top_p_mass_tolerance`: the margin must stay below 1.

Prints a table; writes JSON to $OUT/top_p.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from turbollm.kernels.top_p import top_p_filter
from turbollm.sample.logits_processors import (
    TOP_P_CANDIDATES,
    _top_p_candidates,
    apply_top_p,
    apply_top_p_candidates,
    top_p_mass_tolerance,
)

def timed_us(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median microseconds of one call of `fn`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def bench_case(batch: int, vocab: int, top_p: float, scale: float, candidates: int,
               device: torch.device, warmup: int, iters: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(batch * 7 + vocab)
    logits = torch.randn(batch, vocab, generator=gen, device=device) * scale  # [batch, vocab]
    ps = [top_p] * batch
    old = apply_top_p(logits, ps)
    new = apply_top_p_candidates(logits, ps, num_candidates=candidates)
    p_dev = torch.full((batch, 1), top_p, device=device)  # [batch, 1]
    decided = _top_p_candidates(logits, p_dev, candidates)[1].float().mean().item()
    old_us = timed_us(lambda: apply_top_p(logits, ps), device, warmup, iters)
    new_us = timed_us(lambda: apply_top_p_candidates(logits, ps, num_candidates=candidates),
                      device, warmup, iters)
    cand_us = timed_us(lambda: _top_p_candidates(logits, p_dev, candidates), device, warmup, iters)
    row = dict(batch=batch, vocab=vocab, top_p=top_p, scale=scale, candidates=candidates,
               old_us=old_us, new_us=new_us, cand_us=cand_us, decided=decided,
               same=bool(torch.equal(old, new)))
    if device.type == "cuda":  # the sort-free search the sampler runs on a GPU (kernels/top_p.py)
        p_vec = p_dev[:, 0].contiguous()
        kernel = top_p_filter(logits, p_vec)
        row["kernel_us"] = timed_us(lambda: top_p_filter(logits, p_vec), device, warmup, iters)
        row["kernel_diff_tokens"] = int(((kernel == float("-inf")) != (old == float("-inf"))).sum())
    return row


def probe_rounding(vocab: int, device: torch.device, scales: list[float]) -> list[dict]:
    """Largest |float32 mass before - float64| of the full sort, over the first 4096 sorted
    tokens, for randn * scale rows and tie-heavy rows; as a fraction of the tolerance."""
    gen = torch.Generator(device=device).manual_seed(vocab)
    rand = lambda: torch.rand(8, vocab, generator=gen, device=device)  # noqa: E731
    rows = {f"randn*{s:g}": torch.randn(8, vocab, generator=gen, device=device) * s for s in scales}
    rows["round(randn*2)"] = (torch.randn(8, vocab, generator=gen, device=device) * 2).round()
    for frac in (1e-4, 1e-3, 0.3):
        for high in (6.0, 9.0, 12.0):
            rows[f"{frac:g} at {high:g}, rest 0"] = torch.where(rand() < frac, high, 0.0)
    tol = top_p_mass_tolerance(vocab, device)
    out = []
    for name, x in rows.items():
        s = x.sort(dim=-1, descending=True, stable=True).values  # [8, vocab]
        probs = s.softmax(dim=-1)
        ref = (probs.cumsum(dim=-1) - probs)[:, :4096].double()  # [8, 4096]
        exact = (s.double() - s[:, :1].double()).exp()
        exact = exact / exact.sum(dim=-1, keepdim=True)
        exact = (exact.cumsum(dim=-1) - exact)[:, :4096]
        err = (ref - exact).abs().max().item()
        out.append(dict(vocab=vocab, rows=name, max_err=err, fraction_of_tol=err / tol))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default=None, help="default 1,64,256 (cuda), 1,8 (cpu)")
    ap.add_argument("--vocabs", default=None, help="default 32000,128256 (cuda), 32000 (cpu)")
    ap.add_argument("--top-p", default="0.9,0.95")
    ap.add_argument("--scales", default="3,5")
    ap.add_argument("--candidates", default=str(TOP_P_CANDIDATES))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=None, help="default 50 (cuda), 3 (cpu)")
    ap.add_argument("--probe", action="store_true", help="also measure the rounding margin")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    floats = lambda s: [float(v) for v in s.split(",")]  # noqa: E731
    batches = ints(args.batches or ("1,64,256" if cuda else "1,8"))
    vocabs = ints(args.vocabs or ("32000,128256" if cuda else "32000"))
    iters = args.iters or (50 if cuda else 3)
    torch.set_grad_enabled(False)

    rows = [
        bench_case(b, v, p, s, c, device, args.warmup, iters)
        for v in vocabs for b in batches for p in floats(args.top_p)
        for s in floats(args.scales) for c in ints(args.candidates)
    ]
    probe = [r for v in vocabs for r in probe_rounding(v, device, floats(args.scales))] \
        if args.probe else []

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device: {name}, torch {torch.__version__}; median of {iters} calls, microseconds")
    print(f"{'batch':>5} {'vocab':>6} {'top_p':>5} {'scale':>5} {'C':>5} {'sorted':>9} "
          f"{'topk+sync':>9} {'speedup':>7} {'cand':>8} {'decided':>7} same {'kernel':>8} {'vs sort':>7} diff")
    for r in rows:
        kern = (f" {r['kernel_us']:8.1f} {r['old_us'] / r['kernel_us']:6.2f}x {r['kernel_diff_tokens']}"
                if "kernel_us" in r else "")
        print(f"{r['batch']:5d} {r['vocab']:6d} {r['top_p']:5.2f} {r['scale']:5g} "
              f"{r['candidates']:5d} {r['old_us']:9.1f} {r['new_us']:9.1f} "
              f"{r['old_us'] / r['new_us']:6.2f}x {r['cand_us']:8.1f} {r['decided']:7.2f} "
              f"{r['same']}{kern}")
    for r in probe:
        print(f"rounding vocab {r['vocab']:6d} {r['rows']:>22}: {r['max_err']:.2e} "
              f"= {r['fraction_of_tol']:.3f} of the tolerance")

    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "top_p.json"), "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, iters=iters, cases=rows,
                       rounding=probe), f, indent=1)
    print(f"wrote {os.path.join(out_dir, 'top_p.json')}")


if __name__ == "__main__":
    main()
