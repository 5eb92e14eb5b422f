"""Top-p (nucleus) filter on one GPU: the full sort (`apply_top_p`, the reference), the
sort-free search kernel (kernels/top_p.py, what the sampler runs on a GPU: `kernel`, with the
count of tokens it decides differently from the sort in `diff`), and the candidate path (`apply_top_p_candidates`: topk, one host sync, the full sort for
the rows it cannot decide). End-to-end effect in the engine: gpu_top_p_engine.py.

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
from turbollm.sample.logits_processors import _NEG_INF, apply_top_p, to_device

# The candidate path below was built in the sampler (seventh session), measured slower than the
# sort in the overlapped engine (its host sync), superseded by kernels/top_p.py, and moved here
# as the benchmark's second contender. Its exactness tests were tests/sample/test_top_p.py at
# commit 063a779.

TOP_P_CANDIDATES = 1024
"""Tokens per row `apply_top_p_candidates` takes with `topk`. A row whose nucleus needs more (a
flat distribution) goes to the full sort. On an H100, 256 and 4096 decided no more rows for less."""


def apply_top_p_candidates(
    logits: torch.Tensor, top_p: list[float], num_candidates: int = TOP_P_CANDIDATES
) -> torch.Tensor:
    """`apply_top_p`'s result, cutting among each row's `num_candidates` best tokens (topk).

    A row the candidates decide (`_top_p_candidates`) equals `apply_top_p`'s in any batch. The
    others are redone by `apply_top_p` on the sub-batch of those rows. On CPU that equals the
    full batch's result too. On CUDA the full sort's cumsum picks its kernel by row count
    (CUB's device scan for one row), so its float32 rounding, and with it a cut that falls
    within rounding of top_p (e.g. 0.999999, deep in the tail), can depend on the number of
    rows: as it already does when the sampler's top-p sub-batch changes size.

    float32 only: other dtypes, and vocabularies of at most `num_candidates` tokens, go
    straight to the full sort.

    Host sync: one, the `.tolist()` of the per-row decided flags, to learn which rows need the
    full sort; the exception to this module's no-sync rule. The sampler does not use this. On
    an H100 (bench/scripts/gpu_top_p.py, bench/results/top-p-*.json) it beats the sort only at
    about 256 rows of 128k with peaked rows (2.3x); it loses on smaller batches (launch-bound;
    CUDA's `topk` itself sorts when there are at most 10 rows of 100k+) and on flat rows (all
    fall back). And its sync stalls the overlapped engine: Llama-3-8B decode (dummy weights)
    ran 4-14% slower with it at batch 64 and 256, even with 94% of rows decided.
    """
    num_rows, vocab = logits.shape
    if num_rows == 0 or vocab <= num_candidates or logits.dtype != torch.float32:
        return apply_top_p(logits, top_p)
    p = to_device(top_p, torch.float32, logits.device)[:, None]  # [num_rows, 1]
    out, decided = _top_p_candidates(logits, p, num_candidates)
    redo = [i for i, ok in enumerate(decided.tolist()) if not ok]  # the host sync
    if not redo:
        return out
    if len(redo) == num_rows:
        return apply_top_p(logits, top_p)
    index = to_device(redo, torch.long, logits.device)  # [num_redo]
    sub = apply_top_p(logits.index_select(0, index), [top_p[i] for i in redo])
    return out.index_copy_(0, index, sub)


def top_p_mass_tolerance(vocab: int, device: torch.device) -> float:
    """How near top_p a cut may fall before the candidate path defers to the full sort.

    The full sort's float32 softmax normalizer carries rounding error that depends on the
    sorted order, so the candidate path cannot reproduce it; within this margin only the full
    sort can say on which side of top_p a token falls. The softmax sums a row in float32
    accumulators that each add `terms` values in sequence: one per vector lane on CPU (at
    least 4 lanes), one per thread on CUDA (min(vocab, 1024) threads). A sequential float32 sum
    of n terms is off by at most n units of 2**-24 of the total, and so is every mass it
    divides; 64 more units cover the reduction tree, the exps, the division and the cumsum
    (float32 on CUDA, at most 1024 / 32 + 10 roundings per candidate). CUDA takes twice that:
    its kernels' shapes were read from PyTorch's source, not derived. Worst measured, on
    tie-heavy rows: 0.21 of the tolerance on CPU (AVX-512), 0.11 on an H100
    (the removed tests/sample/test_top_p.py; this script's --probe).
    """
    if device.type == "cuda":
        return 2 * (vocab / 1024 + 64) * 2.0**-24
    return (vocab / 4 + 64) * 2.0**-24


def _top_p_candidates(
    logits: torch.Tensor, p: torch.Tensor, num_candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p cut among each row's `num_candidates` best tokens; no host sync.

    logits: float32 [num_rows, vocab]; p: float32 [num_rows, 1]. Returns the filtered logits
    [num_rows, vocab] and `decided` [num_rows] bool; where False, the row's result may differ
    from `apply_top_p`'s and the caller must use that instead.

    Why a decided row matches the full sort. Let v_min be the smallest candidate value and g
    the number of candidates above it. `topk` returns every token above v_min, so candidates
    0..g-1, put in the full sort's order (value descending, then index ascending), are exactly
    its first g positions, with the same mass before each. Its position g is the first token
    tied at v_min, preceded by the mass of those g. Which tied tokens `topk` picked is
    unspecified, so a row is decided only when:
    - every position before g is further than the tolerance from top_p, so float32 rounding in
      the full sort cannot move it across the cut; and
    - position g is dropped by more than the tolerance, so the tie group and everything below
      it are dropped too (the full sort's mass before is non-decreasing up to rounding far
      below the tolerance); or v_min is -inf (rows after top-k): then every finite token is a
      candidate, and the others are -inf whether kept or dropped; and
    - the row's normalizer is finite (not for NaN or +inf logits, nor an all -inf row).
    """
    vocab = logits.shape[1]
    tol = top_p_mass_tolerance(vocab, logits.device)
    # topk's order among tied values is unspecified: sort the candidates by token id, then
    # stably by value, which is the full sort's order.
    values, ids = logits.topk(num_candidates, dim=-1, sorted=False)  # [num_rows, C]
    ids, by_id = ids.sort(dim=-1)  # [num_rows, C]
    values, order = values.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)  # [num_rows, C], best first

    # The whole row's softmax normalizer, without a sort: sum of exp(x - max).
    top = values[:, :1]  # [num_rows, 1]; the row max
    total = (logits - top).exp().sum(dim=-1, keepdim=True)  # [num_rows, 1]
    # float64 from here: the candidate path's own rounding stays far below the tolerance.
    probs = (values - top).exp().double() / total.double()  # [num_rows, C]
    mass_before = probs.cumsum(dim=-1) - probs  # [num_rows, C]
    p64 = p.double()  # [num_rows, 1]

    v_min = values[:, -1:]  # [num_rows, 1]
    above = values > v_min  # [num_rows, C]; True at positions 0..g-1
    g = above.sum(dim=-1, keepdim=True)  # [num_rows, 1]
    clear = (mass_before - p64).abs() > tol  # [num_rows, C]; False where NaN
    tie_dropped = mass_before.gather(1, g) > p64 + tol  # [num_rows, 1]
    decided = (
        (clear | ~above).all(dim=-1)
        & (tie_dropped | (v_min == _NEG_INF)).squeeze(1)
        & torch.isfinite(total).squeeze(1)
    )  # [num_rows]

    keep = above & (mass_before < p64)  # [num_rows, C]
    kept_values = values.masked_fill(~keep, _NEG_INF)  # [num_rows, C]
    out = torch.full_like(logits, _NEG_INF).scatter_(1, ids, kept_values)  # [num_rows, vocab]
    return out, decided


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
