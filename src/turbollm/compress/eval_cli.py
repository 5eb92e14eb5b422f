"""`turbollm eval ppl|compare`: drivers that print and write JSON (flags in add_eval_args)."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import time
from typing import Any

from turbollm.compress.calibration import calibration_windows
from turbollm.compress.corpus import load_corpus
from turbollm.compress.evaluate import (
    EvalModel,
    compare,
    default_window,
    load_eval_model,
    make_windows,
    perplexity,
    result_dict,
)
from turbollm.compress.kv_scales import (
    DEFAULT_CALIB,
    KVScales,
    apply_kv_scales,
    calibrate_kv_scales,
    model_kv_scales,
)
from turbollm.layers.attention import attention_layers


def _model_name(name: str | None) -> str | None:
    return None if name in (None, "embedded") else name


def _protocol(args: argparse.Namespace, em: EvalModel, windows: list[list[int]]) -> dict[str, Any]:
    return {"corpus": args.corpus, "window": len(windows[0]), "num_windows": len(windows),
            "max_windows": args.max_windows, "tokens_scored": len(windows) * (len(windows[0]) - 1),
            "device": str(em.device), "dtype": str(em.dtype).removeprefix("torch."),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
            "host": platform.node(), "torch_threads": __import__("torch").get_num_threads()}


def _windows(args: argparse.Namespace, em: EvalModel) -> list[list[int]]:
    window = args.window or default_window(em.context_length)
    return make_windows(em.tokenizer, load_corpus(args.corpus), window, args.max_windows)


def _write(path: str | None, payload: dict[str, Any], quiet: bool = False) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        if not quiet:
            print(f"wrote {path}")


KV_SCALE_CHOICES = ("auto", "unit", "calibrate")


def kv_scale_variants(kv_scales: str) -> list[str]:
    """--kv-scales unit,calibrate -> ['unit', 'calibrate'] (checked)."""
    out = [s.strip() for s in str(kv_scales).split(",") if s.strip()]
    bad = [s for s in out if s not in KV_SCALE_CHOICES]
    if bad or not out:
        raise ValueError(f"--kv-scales entries must be {', '.join(KV_SCALE_CHOICES)}; got {kv_scales!r}")
    return out


def kv_rotation_variants(kv_rotation: str) -> list[bool]:
    """--kv-rotation on,off -> [True, False] (checked)."""
    out = [s.strip() for s in str(kv_rotation).split(",") if s.strip()]
    if not out or any(s not in ("on", "off") for s in out):
        raise ValueError(f"--kv-rotation entries must be on or off; got {kv_rotation!r}")
    return [s == "on" for s in out]


def set_kv_scales(em: EvalModel, how: str, rotate: bool = True) -> None:
    """Give an FP8-cache model its KV scales: 'auto' keeps what loading set (the checkpoint's
    or 1.0), 'unit' sets 1.0, 'calibrate' measures them on the calibration part (after the
    rotation is set, so k is measured as stored). rotate=False turns the Hadamard rotation
    of q and k off ('auto' keeps what the checkpoint says)."""
    if not rotate:
        for attn in attention_layers(em.model):
            attn.set_rotation(False)
        em.quantization += ", no rotation"
    if how == "auto":
        return
    layers = em.model.arch.num_hidden_layers  # type: ignore[union-attr]
    if how == "unit":
        scales = KVScales((1.0,) * layers, (1.0,) * layers)
    else:
        scales = calibrate_kv_scales(em.model, calibration_windows(em.tokenizer, *DEFAULT_CALIB))
    apply_kv_scales(em.model, scales)
    em.quantization += f", {how} scales"


def quantization_variants(quantization: str | None, group_sizes: str) -> list[tuple[str, int]]:
    """--quantization int8,int4,fp8,gguf --group-size 32,64,128 -> [(method, group size), ...]
    (int4 once per group size, the others once); 'none' entries are dropped. gguf: a GGUF
    file's Q4_0/Q4_1 linears kept in int4 (the baseline is the same file dequantized)."""
    groups = [int(g) for g in str(group_sizes).split(",") if g.strip()]
    out: list[tuple[str, int]] = []
    for m in (quantization or "").split(","):
        m = m.strip()
        if m in ("", "none"):
            continue
        if m not in ("int8", "int4", "fp8", "gguf"):
            raise ValueError(f"--quantization entries must be none, int8, int4, fp8 or gguf; got {m!r}")
        out += [(m, g) for g in groups] if m == "int4" else [(m, groups[0] if groups else 128)]
    return out


def run_eval_ppl(args: argparse.Namespace) -> int:
    """Baseline perplexity, and each quantized variant's beside it (same windows)."""
    name = _model_name(args.model)
    variants = quantization_variants(args.quantization, args.group_size)
    if args.kv_cache_dtype != "auto":  # the float model with a compressed KV cache (flags checked first)
        variants += [(f"kv:{how}:{int(rot)}", 0) for rot in kv_rotation_variants(args.kv_rotation)
                     for how in kv_scale_variants(args.kv_scales)]
    opts = {"device": args.device, "dtype": args.dtype}
    t0 = time.perf_counter()
    base = load_eval_model(name, None, **opts)
    windows = _windows(args, base)
    payload: dict[str, Any] = {"protocol": _protocol(args, base, windows)}
    res = perplexity(base, windows)
    payload["baseline"] = {**result_dict(res, base), "seconds": round(time.perf_counter() - t0, 1)}
    print(f"{base.name} [{base.quantization}]: perplexity {res.perplexity:.4f} "
          f"({res.num_tokens} tokens, {res.num_windows} x {res.window}-token windows)", flush=True)
    del base
    payload["quantized"] = []
    for method, group in variants:
        gc.collect()
        t0 = time.perf_counter()
        try:
            if method.startswith("kv:"):
                q = load_eval_model(name, None, kv_cache_dtype=args.kv_cache_dtype, **opts)
                _, how, rot = method.split(":")
                set_kv_scales(q, how, rot == "1")
                payload.setdefault("kv_scales", {})[q.quantization] = _scales_dict(q)
            else:
                q = load_eval_model(name, method, group_size=group, quantization_ignore=args.quantization_ignore,
                                    quantize_lm_head=args.quantize_lm_head, **opts)
        except ValueError as e:  # e.g. a group size that does not divide a layer's width
            label = f"{method} g{group}" if method == "int4" else method
            payload["quantized"].append({"quantization": label, "error": str(e)})
            print(f"[{label}]: not run: {e}", flush=True)
            continue
        qres = perplexity(q, windows)
        delta = 100.0 * (qres.perplexity / res.perplexity - 1.0)
        payload["quantized"].append({**result_dict(qres, q), "delta_pct": delta,
                                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{q.name} [{q.quantization}]: perplexity {qres.perplexity:.4f} "
              f"(baseline {res.perplexity:.4f}, {delta:+.2f}%)", flush=True)
        del q
        _write(args.json, payload, quiet=True)  # partial results survive an interrupted run
    _write(args.json, payload)
    return 0


def run_eval_compare(args: argparse.Namespace) -> int:
    """Top-1 agreement and KL of MODEL_B (optionally quantized) against MODEL_A."""
    variants = quantization_variants(args.quantization, args.group_size)
    if len(variants) > 1:
        raise ValueError("eval compare takes one --quantization method and one --group-size")
    hows, rots = kv_scale_variants(args.kv_scales), kv_rotation_variants(args.kv_rotation)
    if len(hows) > 1 or len(rots) > 1:
        raise ValueError("eval compare takes one --kv-scales and one --kv-rotation value")
    method, group = variants[0] if variants else (None, 128)
    opts = {"device": args.device, "dtype": args.dtype}
    a = load_eval_model(_model_name(args.model_a), None, **opts)
    b = load_eval_model(_model_name(args.model_b), method, group_size=group,
                        kv_cache_dtype=args.kv_cache_dtype, quantization_ignore=args.quantization_ignore,
                        quantize_lm_head=args.quantize_lm_head, **opts)
    if args.kv_cache_dtype == "fp8":
        set_kv_scales(b, hows[0], rots[0])
    windows = _windows(args, a)
    res = compare(a, b, windows)
    print(f"A = {a.name} [{a.quantization}], B = {b.name} [{b.quantization}]")
    print(f"perplexity: A {res.ppl_a:.4f}, B {res.ppl_b:.4f} ({100 * (res.ppl_b / res.ppl_a - 1):+.2f}%)")
    print(f"top-1 agreement {100 * res.top1_agreement:.2f}%, mean KL(A||B) {res.mean_kl:.5f} nats "
          f"over {res.num_tokens} tokens ({res.num_windows} x {res.window})")
    _write(args.json, {"protocol": _protocol(args, a, windows), **result_dict(res),
                       "model_a": result_dict_model(a), "model_b": result_dict_model(b)})
    return 0


def _scales_dict(em: EvalModel) -> dict[str, list[float]]:
    scales = model_kv_scales(em.model)
    return {"k_scale": list(scales.k), "v_scale": list(scales.v)}


def result_dict_model(em: EvalModel) -> dict[str, Any]:
    return {"model": em.name, "quantization": em.quantization}
