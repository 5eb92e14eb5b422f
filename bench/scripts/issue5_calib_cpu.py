"""Issue 5, calibration methods on CPU: held-out Shakespeare perplexity of the embedded
SmolLM2-135M (fp32 = GGUF weights dequantized) with its decoder linears int4-quantized by
RTN, AWQ and GPTQ (compress/awq.py, compress/gptq.py), each method on a fresh model.

    PYTHONPATH=src python bench/scripts/issue5_calib_cpu.py --calib 16 --heldout 4 \
        --methods fp32,rtn128,awq128,gptq128ao --out results.json

Protocol (BENCHMARKS.md "ppl"): held-out files (calibration.corpus_files("heldout"), i.e.
the 7 files with sorted index i % 6 == 5) joined, tokenized, cut into non-overlapping
2048-token windows; the first --heldout windows are scored (token-level NLL, 2047
predictions each). Calibration: --calib windows of 512 tokens evenly spaced over the other 35 files.

Methods (--methods, comma-separated): `fp32`, or `rtn|awq|gptq` + group size (+ `ao`: GPTQ
act-order), then optional `:key=value` settings, e.g. `gptq128ao:zero_point=float:damp=0.05`.
Keys are fields of AWQConfig / GPTQConfig (`zero_point` also for rtn) or of the range search
_int4.RangeSearch (`grid`, `max_shrink`, `asymmetric`, `refine`; for GPTQ any of them, or
`search=1`, turns the search on; for AWQ they replace clip_search's fields). For GPTQ,
`awq=1` first folds AWQ's scales (GPTQConfig.awq). For both, `tune=1` (or `tune_<field>=` of any TuneConfig field:
`tune_lr=`, `tune_epochs=`, `tune_validation=`, `tune_offset_lr_scale=`, ...)
tunes the grids' scales and offsets end to end afterwards (compress/tune.py); for AWQ
`gptq=1` rounds the scaled weights with GPTQ.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import math
import os
import platform
import time

import torch

from turbollm.compress import _int4
from turbollm.compress._int4 import RangeSearch
from turbollm.compress.awq import AWQConfig, awq_quantize_model
from turbollm.compress.calibration import (
    calibration_windows, corpus_files, corpus_tokens, find_linears, forward_window,
    set_linear_weight,
)
from turbollm.compress.gptq import GPTQConfig, gptq_quantize_model
from turbollm.compress.tune import TuneConfig
from turbollm.distributed.parallel import SINGLE
from turbollm.models.loader import resolve_model
from turbollm.models.registry import get_model_class


def build(source):  # type: ignore[no-untyped-def]
    model = get_model_class(source.arch.architecture)(source.arch, SINGLE)
    model.load_weights(source.iter_weights())
    return model.eval()


@torch.inference_mode()
def window_nlls(model, windows: list[torch.Tensor]) -> list[tuple[float, int]]:  # type: ignore[no-untyped-def]
    """(summed NLL, predictions) of each window."""
    out = []
    for ids in windows:
        nll, count = 0.0, 0
        hidden = forward_window(model, ids)[:-1]  # [T - 1, hidden]
        for r in range(0, hidden.shape[0], 512):
            logits = model.compute_logits(hidden[r:r + 512]).float()
            nll += torch.nn.functional.cross_entropy(
                logits, ids[1 + r:1 + r + logits.shape[0]], reduction="sum").item()
            count += logits.shape[0]
        out.append((nll, count))
    return out


def perplexity_of(nlls: list[tuple[float, int]]) -> float:
    return math.exp(sum(n for n, _ in nlls) / sum(c for _, c in nlls))


def perplexity(model, windows: list[torch.Tensor]) -> float:  # type: ignore[no-untyped-def]
    return perplexity_of(window_nlls(model, windows))


def _changed_state(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The decoder's parameters (what a method may change), for --save."""
    return {n: p.detach().clone() for n, p in model.model.layers.named_parameters()}


def rtn_model(model, group_size: int, zero_point: str = "integer") -> None:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        for name, lin in find_linears(model.model.layers).items():
            gs = _int4.group_size_for(lin.weight.shape[1], group_size, name)
            set_linear_weight(lin, _int4.rtn(lin.weight, gs, zero_point=zero_point).dequantize())


def _value(text: str, like: object) -> object:
    if isinstance(like, bool):
        return text.lower() in ("1", "true", "yes")
    return type(like)(text) if like is not None else text


def parse_method(token: str) -> tuple[str, int, object]:
    """`gptq128ao:damp=0.05:grid=10` -> ("gptq", 128, GPTQConfig(...)); rtn: its zero point."""
    head, *opts = token.split(":")
    m = re.fullmatch(r"(rtn|awq|gptq)(\d+)(ao)?", head)
    if m is None:
        raise ValueError(f"method {token!r}: expected rtn|awq|gptq + group size [+ ao]")
    kind, g = m.group(1), int(m.group(2))
    kv = dict(o.split("=", 1) for o in opts)
    if kind == "rtn":
        return kind, g, kv.pop("zero_point", "integer")
    cls = AWQConfig if kind == "awq" else GPTQConfig
    base = cls(group_size=g, **({"act_order": bool(m.group(3))} if kind == "gptq" else {}))
    fields = {f.name for f in dataclasses.fields(cls)}
    search_fields = {f.name for f in dataclasses.fields(RangeSearch)}
    tune_fields = {f.name for f in dataclasses.fields(TuneConfig)}
    current = base.clip_search if kind == "awq" else base.range_search  # type: ignore[union-attr]
    search = current or RangeSearch()
    changes, search_changes = {}, {}
    want_search = base.clip if kind == "awq" else current is not None  # type: ignore[union-attr]
    for key, val in kv.items():
        if key == "awq" and kind == "gptq":  # AWQ's scales (default AWQConfig) before GPTQ
            changes["awq"] = AWQConfig(group_size=g, gptq=False, tune=None) if _value(val, True) else None
        elif key == "tune" or key[5:] in tune_fields and key.startswith("tune_"):  # compress/tune.py
            t = changes.get("tune", base.tune) or TuneConfig()  # type: ignore[union-attr]
            if key == "tune":
                changes["tune"] = TuneConfig() if _value(val, True) else None
            else:
                changes["tune"] = dataclasses.replace(t, **{key[5:]: _value(val, getattr(t, key[5:]))})
        elif key == "search":
            want_search = _value(val, True)  # type: ignore[assignment]
        elif key in search_fields:
            search_changes[key], want_search = _value(val, getattr(search, key)), True
        elif key in fields:
            changes[key] = _value(val, getattr(base, key))
        else:
            raise ValueError(f"method {token!r}: unknown setting {key!r}")
    field = "clip_search" if kind == "awq" else "range_search"
    changes[field] = dataclasses.replace(search, **search_changes) if want_search else None
    if kind == "awq" and changes[field] is None:
        changes["clip"], changes[field] = False, base.clip_search
    return kind, g, dataclasses.replace(base, **changes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--calib-offset", type=float, default=0.0,
                    help="move each calibration window by this fraction of the free space after it (0..1)")
    ap.add_argument("--heldout", type=int, default=24, help="held-out windows scored (0: all)")
    ap.add_argument("--methods", default="fp32,rtn128,awq128,gptq128ao")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the shared 2-core machine is oversubscribed)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--save", default=None,
                    help="directory: save each quantized method's decoder parameters as <method>.pt")
    ap.add_argument("--load", default=None,
                    help="directory: take each non-fp32 method's decoder parameters from <method>.pt "
                         "(saved by --save) instead of quantizing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the tuning's KL log
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = resolve_model(None)
    tok = source.load_tokenizer()
    held = corpus_tokens(tok, "heldout")
    n_held = args.heldout or held.numel() // 2048
    windows = [held[i * 2048:(i + 1) * 2048] for i in range(n_held)]
    calib = calibration_windows(tok, args.calib, args.calib_len)
    if args.calib_offset:  # the same spacing, every window moved by a fraction of the stride
        ids = corpus_tokens(tok, "calibration")
        stride = ids.numel() // args.calib
        shift = int(args.calib_offset * (stride - args.calib_len))
        calib = [ids[i * stride + shift: i * stride + shift + args.calib_len].clone() for i in range(args.calib)]
    results: dict[str, dict[str, float]] = {}

    def dump() -> None:  # after every method: a cut-short run keeps what it measured
        if not args.out:
            return
        with open(args.out, "w") as f:
            json.dump({
                "what": "held-out Shakespeare perplexity, embedded SmolLM2-135M, int4 decoder linears",
                "date": time.strftime("%Y-%m-%d"), "machine": f"CPU ({platform.processor() or 'x86_64'}), 2 cores",
                "command": "PYTHONPATH=src python bench/scripts/issue5_calib_cpu.py "
                           f"--calib {args.calib} --calib-len {args.calib_len} --calib-offset {args.calib_offset} "
                           f"--heldout {args.heldout} "
                           f"--methods {args.methods} --threads {args.threads}"
                           + (f" --load {args.load}" if args.load else ""),
                "calibration_files": [os.path.basename(p) for p in corpus_files("calibration")],
                "heldout_files": [os.path.basename(p) for p in corpus_files("heldout")],
                "calibration_windows": args.calib, "calibration_window_tokens": args.calib_len,
                "heldout_windows": n_held, "heldout_window_tokens": 2048,
                "group_size_policy": "K=576 linears (qkv, o, gate_up) fall back to g64 at g128 "
                                     "(576 % 128 != 0); down_proj (K=1536) uses g128",
                "results": results,
            }, f, indent=1)

    for m in args.methods.split(","):
        model = build(source)
        t0 = time.time()
        fname = re.sub(r"[^A-Za-z0-9_.=-]", "_", m) + ".pt"
        if m != "fp32" and args.load:
            state = torch.load(os.path.join(args.load, fname), weights_only=True)
            with torch.no_grad():
                for n, p in model.model.layers.named_parameters():
                    p.copy_(state[n])
            for lin in find_linears(model.model.layers).values():
                set_linear_weight(lin, lin.weight)  # refresh a oneDNN pack, if any
        elif m != "fp32":
            kind, g, cfg = parse_method(m)
            if kind == "rtn":
                rtn_model(model, g, cfg)  # type: ignore[arg-type]
            elif kind == "awq":
                awq_quantize_model(model, calib, config=cfg)  # type: ignore[arg-type]
            else:
                gptq_quantize_model(model, calib, config=cfg)  # type: ignore[arg-type]
        tq = time.time() - t0
        if m != "fp32" and args.save:
            os.makedirs(args.save, exist_ok=True)
            torch.save(_changed_state(model), os.path.join(args.save, fname))
        nlls = window_nlls(model, windows)
        ppl = perplexity_of(nlls)
        results[m] = {"ppl": ppl, "quantize_s": round(tq, 1),
                      "window_nll": [[round(n, 4), c] for n, c in nlls]}
        if len(windows) > 4:
            results[m]["ppl_first4"] = perplexity_of(nlls[:4])
        if m != "fp32":
            results[m]["config"] = str(parse_method(m)[2])
        base = results.get("fp32", {}).get("ppl")
        rel = f" ({100 * (ppl / base - 1):+.2f}% vs fp32)" if base else ""
        first4 = results[m].get("ppl_first4")
        if first4 is not None:
            b4 = results.get("fp32", {}).get("ppl_first4")
            rel += f"; first 4 windows {first4:.4f}" + (f" ({100 * (first4 / b4 - 1):+.2f}%)" if b4 else "")
        print(f"{m:12s} ppl {ppl:.4f}{rel}  quantize {tq:.1f}s", flush=True)
        dump()


if __name__ == "__main__":
    main()
