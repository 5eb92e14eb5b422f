"""FP8 KV cache accuracy as a distribution: held-out perplexity under tiny scale jitter (CPU).

A single FP8-cache perplexity is one draw: multiplying every scale by (1 + 1e-7) already
moves the embedded SmolLM2's perplexity by ~0.3% on one window (a few large rotary
channels of k, e.g. the attention sink's, sit near e4m3 rounding boundaries, and one flip
moves a score by a lot). This script evaluates each configuration at scales s * (1 + j * 1e-6),
j = 0..J-1 (no effect in exact arithmetic), on the recorded protocol (first 3 held-out
windows of 2048 tokens), and reports mean, std and range of the delta against the fp32 cache.

    PYTHONPATH=src python bench/scripts/kv_fp8_scale_jitter.py --jitters 4 \
        --json bench/results/ppl-cpu-smollm2-heldout-kvfp8-jitter-2026-11-27.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from turbollm.compress.calibration import calibration_windows
from turbollm.compress.corpus import load_corpus
from turbollm.compress.evaluate import default_window, load_eval_model, make_windows, perplexity
from turbollm.compress.kv_scales import DEFAULT_CALIB, KVScales, apply_kv_scales, calibrate_kv_scales
from turbollm.layers.attention import attention_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jitters", type=int, default=4)
    ap.add_argument("--max-windows", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = load_eval_model(None)
    windows = make_windows(base.tokenizer, load_corpus("shakespeare"), default_window(base.context_length),
                           args.max_windows)
    ref = perplexity(base, windows).perplexity
    print(f"fp32 cache: {ref:.4f}", flush=True)
    em = load_eval_model(None, kv_cache_dtype="fp8")
    layers = len(attention_layers(em.model))
    unit = KVScales((1.0,) * layers, (1.0,) * layers)
    report: dict = {"baseline_fp32_cache": ref, "windows": len(windows), "configs": {}}
    for name, rotate, calibrated in (("no rotation, unit scales", False, False),
                                     ("rotation, unit scales", True, False),
                                     ("rotation, calibrated scales", True, True)):
        for a in attention_layers(em.model):
            a.set_rotation(rotate)
        scales = unit
        if calibrated:
            scales = calibrate_kv_scales(em.model, calibration_windows(em.tokenizer, *DEFAULT_CALIB))
        deltas = []
        for j in range(args.jitters):
            f = 1.0 + j * 1e-6
            apply_kv_scales(em.model, KVScales(tuple(s * f for s in scales.k), tuple(s * f for s in scales.v)))
            t0 = time.perf_counter()
            p = perplexity(em, windows).perplexity
            deltas.append(100.0 * (p / ref - 1.0))
            print(f"{name}, jitter {j}: ppl {p:.4f} ({deltas[-1]:+.3f}%, {time.perf_counter() - t0:.0f}s)", flush=True)
        summary = {"deltas_pct": deltas, "mean_pct": statistics.mean(deltas),
                   "std_pct": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
                   "min_pct": min(deltas), "max_pct": max(deltas)}
        report["configs"][name] = summary
        print(f"{name}: mean {summary['mean_pct']:+.3f}% std {summary['std_pct']:.3f} "
              f"range [{summary['min_pct']:+.3f}, {summary['max_pct']:+.3f}]", flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=2)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
