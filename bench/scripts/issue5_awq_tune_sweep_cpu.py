"""Issue 5, the grid tuning after AWQ on CPU: quantize once with AWQ (no tuning), then tune
copies of that result with each TuneConfig and score each on the held-out windows (all 101
by default), printing the tuning's epoch and validation KLs.

    PYTHONPATH=src python bench/scripts/issue5_awq_tune_sweep_cpu.py --calib 64 --threads 2 \
        --tunes lr=0.001:epochs=2,lr=0.001:epochs=4:validation=8:validate_every=16 --out sweep.json

Each tuned model is the one issue5_calib_cpu.py builds for `awq128:gptq=0:tune_<field>=...`
(same model, corpus, calibration windows and --calib-offset, whose helpers it uses; the
teacher is a fresh fp32 model, which is what awq_quantize_model copies), without quantizing
with AWQ again for each. `--every E` scores only held-out windows 0, E, 2E, ... (a screen).
No choice here looks at the held-out windows: TuneConfig.validation holds back calibration
windows.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time

import torch
from issue5_calib_cpu import _value, build, perplexity_of, window_nlls

from turbollm.compress.awq import AWQConfig, awq_quantize_model
from turbollm.compress.calibration import calibration_windows, corpus_tokens
from turbollm.compress.tune import TuneConfig, tune_grids
from turbollm.models.loader import resolve_model

FP32_ALL = 40.6213  # all 101 held-out windows, issue5-full-heldout-cpu-2026-11-27.json (deterministic)


def _settings(token: str, like: object) -> object:
    """`lr=0.001:epochs=4` -> dataclasses.replace(like, lr=0.001, epochs=4)."""
    kv = dict(o.split("=", 1) for o in token.split(":") if o)
    return dataclasses.replace(like, **{k: _value(v, getattr(like, k)) for k, v in kv.items()})  # type: ignore[type-var]


class _Validation(logging.Handler):
    """Collects the tuning's (step, validation KL) log records."""

    def __init__(self) -> None:
        super().__init__()
        self.kls: list[tuple[int, float]] = []
        self.kept: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "keeping step" in msg:
            self.kept = int(record.args[0])  # type: ignore[index]
        elif "validation KL" in msg:
            self.kls.append((int(record.args[0]), round(float(record.args[1]), 5)))  # type: ignore[index]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--calib-offset", type=float, default=0.0)
    ap.add_argument("--every", type=int, default=1, help="score held-out windows 0, E, 2E, ... (1: all)")
    ap.add_argument("--awq", default="", help="AWQConfig settings, e.g. n_grid=40")
    ap.add_argument("--untuned", action="store_true", help="also score the untuned AWQ model")
    ap.add_argument("--tunes", required=True, help="comma-separated TuneConfig settings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = resolve_model(None)
    tok = source.load_tokenizer()
    held = corpus_tokens(tok, "heldout")
    index = list(range(0, held.numel() // 2048, args.every))
    windows = [held[i * 2048:(i + 1) * 2048] for i in index]
    calib = calibration_windows(tok, args.calib, args.calib_len)
    if args.calib_offset:  # as issue5_calib_cpu.py
        ids = corpus_tokens(tok, "calibration")
        stride = ids.numel() // args.calib
        shift = int(args.calib_offset * (stride - args.calib_len))
        calib = [ids[i * stride + shift: i * stride + shift + args.calib_len].clone() for i in range(args.calib)]
    rows: dict[str, dict[str, object]] = {}

    def record(name: str, model: torch.nn.Module, extra: dict[str, object]) -> None:
        nlls = window_nlls(model, windows)
        ppl = perplexity_of(nlls)
        rows[name] = {"ppl": ppl, "ppl_first4": perplexity_of(nlls[:4]), **extra,
                      "window_nll": [[round(n, 4), c] for n, c in nlls]}
        rel = f" ({100 * (ppl / FP32_ALL - 1):+.2f}% vs fp32 {FP32_ALL})" if len(windows) == 101 else ""
        print(f"{name:60s} ppl {ppl:.4f}{rel}; first 4 {rows[name]['ppl_first4']:.4f} {extra}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"command": vars(args), "fp32_all_101": FP32_ALL, "heldout_windows": index,
                           "results": rows}, f, indent=1)

    teacher = build(source)
    model = build(source)
    cfg = _settings(args.awq, AWQConfig(group_size=128))
    t0 = time.time()
    result = awq_quantize_model(model, calib, config=cfg)  # type: ignore[arg-type]
    awq_s = round(time.time() - t0, 1)
    print(f"AWQ {cfg} quantized in {awq_s} s", flush=True)
    if args.untuned:
        record(f"awq {args.awq} untuned", model, {"quantize_s": awq_s})
    val = _Validation()
    logging.getLogger("turbollm.compress.tune").addHandler(val)
    for token in args.tunes.split(","):
        student, res = copy.deepcopy(model), copy.deepcopy(result)
        tcfg = _settings(token, TuneConfig())
        val.kls, val.kept = [], None
        t0 = time.time()
        history = tune_grids(student, teacher, res, calib, tcfg)  # type: ignore[arg-type]
        tune_s = round(time.time() - t0, 1)
        record(f"awq {args.awq} tune {token}", student,
               {"awq_s": awq_s, "tune_s": tune_s, "quantize_s": round(awq_s + tune_s, 1), "tune": str(tcfg),
                "epoch_kl": [round(h, 5) for h in history], "validation_kl": val.kls, "kept_step": val.kept})
        del student, res


if __name__ == "__main__":
    main()
