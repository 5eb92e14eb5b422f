"""`turbollm quantize`: make a quantized checkpoint from a float model (offline, compress/).

rtn / fp8 quantize every decoder linear at load, exactly as `LLM(quantization=...)` does,
then save. `--method fp8 --calibrate` instead builds the dense model and hands it with
calibration windows to compress/fp8_calib.py (GPTQ onto the per-row e4m3 grid; optional
`--scale-search` and SmoothQuant folding `--smooth-alpha`); the checkpoint has the same
runtime tensors as plain fp8 (weight e4m3 + weight_scale), so it loads through the same
path. `--quantization-ignore` keeps matching decoder linears dense (rtn, fp8), and so does
`--keep-last-layers N` for the last N decoder layers (fp8's default: 1, measured). awq / gptq
build the dense model, hand it with calibration windows (the Shakespeare calibration part,
never the evaluation files) to compress.awq / compress.gptq, and install the int4 grids
they return (opt-in: `--rounding gptq` has AWQ round its scaled weights with GPTQ, and
`--tune EPOCHS` then tunes either method's grid scales and offsets against the float model:
compress/tune.py). `--method none` keeps the weights as they are.
`--kv-cache-scales` then calibrates per-layer FP8 KV-cache scales on the (quantized) model
(compress/kv_scales.py) and writes them beside the weights, so that
`LLM(model=DIR, kv_cache_dtype="fp8")` uses them. The checkpoint is written by
quant/checkpoint.py.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from turbollm.compress.calibration import calibration_windows
from turbollm.compress.fp8_calib import Fp8CalibConfig, fp8_calibrate_model
from turbollm.compress.kv_scales import DEFAULT_CALIB, KVScales, apply_kv_scales, calibrate_kv_scales
from turbollm.compress.tune import TuneConfig
from turbollm.quant import grids
from turbollm.layers.linear import QuantizableLinear
from turbollm.models.build import build_model, resolve_device, resolve_dtype
from turbollm.models.loader import ModelSource, resolve_model
from turbollm.quant.checkpoint import save_quantized
from turbollm.quant.linear import Int4LinearMethod, install_int4
from turbollm.quant.methods import Fp8Config, Int4Config, QuantConfig, check_device_support, method_for_cli
from turbollm.quant.plan import QuantPlan

_CALIBRATED = {"awq": ("turbollm.compress.awq", "awq_quantize_model", "AWQConfig"),
               "gptq": ("turbollm.compress.gptq", "gptq_quantize_model", "GPTQConfig")}
"""--method -> (module, function, config class) of the calibrated int4 algorithms."""
_GPTQ_ONLY = ("act_order", "damp")
"""CLI flags only GPTQ takes."""
_ACT_ORDER = {"static": {"act_order": True, "static_groups": True},
              "dynamic": {"act_order": True, "static_groups": False},
              "off": {"act_order": False, "static_groups": False}}
"""--act-order MODE -> GPTQConfig fields."""


def calibrated_quantizer(method: str) -> Callable[..., Any]:
    """The AWQ / GPTQ entry point; ValueError saying so when it is not available yet."""
    module, fn, _ = _CALIBRATED[method]
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError):
        raise ValueError(f"--method {method} is not available in this build ({module}.{fn} is missing)") from None


def calibration_config(method: str, config: Int4Config, settings: dict[str, Any] | None = None) -> Any:
    """The AWQConfig / GPTQConfig for `config` (bits, group size, act-order) plus `settings`
    (config fields, e.g. zero_point, damp); ValueError naming a setting the method lacks."""
    module, _, cls_name = _CALIBRATED[method]
    cls = getattr(importlib.import_module(module), cls_name)
    fields = {"bits": config.bits, "group_size": config.group_size, **(settings or {})}
    if method == "gptq" and config.act_order:  # a runtime perm: groups formed in act-order
        fields = {**_ACT_ORDER["dynamic"], **fields}
    for key in fields:
        if key not in cls.__dataclass_fields__:
            raise ValueError(f"--{key.replace('_', '-')} does not apply to --method {method}")
    cfg = cls(**fields)
    runtime_perm = method == "gptq" and cfg.act_order and not cfg.static_groups
    if runtime_perm != config.act_order:  # static groups keep act-order codes in input order
        raise ValueError(f"{config} {'lacks' if runtime_perm else 'asks for'} the runtime permutation "
                         f"that {cfg} {'gives' if runtime_perm else 'does not give'}")
    return cfg


def install_calibrated(model: nn.Module, config: Int4Config, results: dict[str, dict[str, torch.Tensor]]) -> int:
    """Make every decoder linear int4 from {module name: grid} (see quant.linear.install_int4)."""
    method = Int4LinearMethod(config.group_size, prequantized=True, has_perm=config.act_order)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizableLinear)}
    missing = sorted(set(layers) - set(results))
    if missing:
        raise ValueError(f"the calibrated quantizer returned no grid for {len(missing)} linears, e.g. {missing[:2]}")
    for name, layer in layers.items():
        k, groups = layer.weight.shape[1], results[name]["scales"].shape[1]
        if groups * grids.group_size_for(k, config.group_size, name) != k:  # the one group policy
            raise ValueError(
                f"{name}: the calibrated grid has {groups} groups over {k} input columns, not the "
                f"{grids.group_size_for(k, config.group_size, name)}-column groups --group-size "
                f"{config.group_size} gives this layer"
            )
        install_int4(layer, method, results[name])
    return len(layers)


def _generation_config(source: ModelSource) -> dict[str, Any]:
    eos = list(source.arch.eos_token_ids)
    return {**source.generation_defaults, "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "bos_token_id": source.arch.bos_token_id}


def quantize_model(
    model_name: str | None, config: QuantConfig | None, method: str, device: str = "auto", dtype: str = "auto",
    calib: tuple[int, int] = (64, 512), settings: dict[str, Any] | None = None,
    fp8_calib: Fp8CalibConfig | None = None, ignore: tuple[str, ...] = (),
) -> tuple[nn.Module, ModelSource]:
    """The quantized model (not prepacked; config None: dense) and its source. `settings`:
    AWQConfig / GPTQConfig fields for --method awq / gptq (see calibration_config);
    fp8_calib: calibrate FP8 weights (config must be Fp8Config); ignore: glob patterns of
    decoder linears kept dense (quantize-at-load methods; with fp8_calib, its keep_dense)."""
    source = resolve_model(model_name)
    if source.quantization_config is not None:
        raise ValueError(f"{source.path} is already quantized; quantize a float checkpoint")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if config is None:
        return build_model(source, dev, dt, prepack_cpu=False), source
    check_device_support(config, dev)
    if fp8_calib is not None:
        assert isinstance(config, Fp8Config)
        model = build_model(source, dev, dt, prepack_cpu=False)
        tok = source.load_tokenizer()
        if tok is None:
            raise ValueError("--calibrate calibrates on text: the model needs a tokenizer")
        fp8_calibrate_model(model, calibration_windows(tok, *calib), fp8_calib)
        return model, source
    if method not in _CALIBRATED:
        plan = QuantPlan(config, prequantized=False, keep_dense=ignore)
        return build_model(source, dev, dt, quantization=plan, prepack_cpu=False), source
    assert isinstance(config, Int4Config)
    fn = calibrated_quantizer(method)
    cfg = calibration_config(method, config, settings)
    model = build_model(source, dev, dt, prepack_cpu=False)
    tok = source.load_tokenizer()
    # Windows spread evenly over the calibration part (compress/calibration.py), as FP8
    # calibration, the KV-cache scales and the measured AWQ / GPTQ recipes use (docs/performance.md).
    windows = calibration_windows(tok, *calib)
    results = fn(model, windows, config=cfg)
    install_calibrated(model, config, results)
    return model, source


def add_kv_cache_scales(model: nn.Module, tokenizer: Any) -> KVScales:
    """Calibrate per-layer FP8 KV-cache scales on the calibration part and install them."""
    if tokenizer is None:
        raise ValueError("--kv-cache-scales calibrates on text: the model needs a tokenizer")
    scales = calibrate_kv_scales(model, calibration_windows(tokenizer, *DEFAULT_CALIB))
    apply_kv_scales(model, scales)
    return scales


def fp8_calibration_from_args(args: argparse.Namespace, keep_dense: tuple[str, ...] = ()) -> Fp8CalibConfig | None:
    """--calibrate / --smooth-alpha / --no-gptq / --scale-search -> the FP8 calibration
    (None: plain fp8 or another method), keeping `keep_dense` linears dense; ValueError naming
    a flag that does not apply."""
    fp8_only = [f for f, on in (("--smooth-alpha", args.smooth_alpha is not None), ("--no-gptq", args.no_gptq),
                                ("--scale-search", args.scale_search)) if on]
    if not args.calibrate:
        if fp8_only:
            raise ValueError(f"{fp8_only[0]} applies to --method fp8 --calibrate only")
        return None
    if args.method != "fp8":
        raise ValueError(f"--calibrate applies to --method fp8 (awq and gptq always calibrate); got --method {args.method}")
    if args.no_gptq and not args.scale_search and args.smooth_alpha is None:
        raise ValueError("--calibrate --no-gptq without --scale-search or --smooth-alpha changes nothing: "
                         "drop --calibrate")
    return Fp8CalibConfig(gptq=not args.no_gptq, scale_search=args.scale_search,
                          smooth_alpha=args.smooth_alpha, keep_dense=keep_dense)


def _patterns(ignore: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (ignore or "").split(",") if p.strip())


KEEP_LAST_LAYERS_DEFAULT = {"fp8": 1}
"""--keep-last-layers by method (others 0): see its --help for the measurement behind it."""


def ignore_patterns(args: argparse.Namespace, num_layers: int) -> tuple[str, ...]:
    """--quantization-ignore's patterns plus one per layer of --keep-last-layers (default by
    method, KEEP_LAST_LAYERS_DEFAULT); ValueError for a count out of range or a method that
    cannot keep linears dense."""
    keep = args.keep_last_layers
    if keep is None:
        keep = KEEP_LAST_LAYERS_DEFAULT.get(args.method, 0)
    elif not 0 <= keep <= num_layers:
        raise ValueError(f"--keep-last-layers {keep} must be in [0, {num_layers}] (the model's decoder layers)")
    elif keep and args.method not in ("rtn", "fp8"):
        raise ValueError(f"--keep-last-layers applies to --method rtn or fp8; got --method {args.method}")
    last = tuple(f"model.layers.{i}.*" for i in range(num_layers - keep, num_layers))
    return tuple(dict.fromkeys(_patterns(args.quantization_ignore) + last))  # once each, in order


def calibration_label(cfg: Fp8CalibConfig) -> str:
    """Fp8Config.calibration for a calibrated checkpoint, e.g. 'gptq+search+smooth0.5'."""
    parts = [p for p, on in (("gptq", cfg.gptq), ("search", cfg.scale_search)) if on]
    if cfg.smooth_alpha is not None:
        parts.append(f"smooth{cfg.smooth_alpha:g}")
    return "+".join(parts)


def run_quantize(args: argparse.Namespace) -> int:
    """CLI driver: quantize, save, print what was written."""
    if args.quantization_ignore and args.method not in ("rtn", "fp8"):
        raise ValueError(f"--quantization-ignore applies to --method rtn or fp8; got --method {args.method}")
    model_name = None if args.model in (None, "embedded") else args.model
    probe = resolve_model(model_name)  # for the layer count and the tokenizer checks below
    ignore = ignore_patterns(args, probe.arch.num_hidden_layers)
    fp8_calib = fp8_calibration_from_args(args, ignore)
    if args.method == "none":
        if not args.kv_cache_scales:
            raise ValueError("--method none writes only FP8 KV-cache scales: add --kv-cache-scales")
        config = None
    else:
        config = method_for_cli(args.method, args.bits, args.group_size)
    settings = {k: v for k in ("zero_point", "tune", "rounding", *_GPTQ_ONLY) if (v := getattr(args, k, None)) is not None}
    if "rounding" in settings:  # --rounding (awq only) -> AWQConfig.gptq
        if args.method != "awq":
            raise ValueError(f"--rounding applies to --method awq only; got --method {args.method}")
        settings["gptq"] = settings.pop("rounding") == "gptq"
    if "tune" in settings:  # --tune EPOCHS -> a TuneConfig, or None for no tuning
        if settings["tune"] < 0:
            raise ValueError(f"--tune {settings['tune']} must be >= 0 (0: no tuning)")
        settings["tune"] = TuneConfig(epochs=settings["tune"]) if settings["tune"] > 0 else None
    if args.method not in _CALIBRATED and settings:
        raise ValueError(f"--{next(iter(settings)).replace('_', '-')} applies to --method awq / gptq only")
    if args.method != "gptq" and (bad := [k for k in _GPTQ_ONLY if k in settings]):
        raise ValueError(f"--{bad[0].replace('_', '-')} applies to --method gptq only")
    settings.update(_ACT_ORDER[settings.pop("act_order", "static")] if args.method == "gptq" else {})
    if settings.get("act_order") and not settings.get("static_groups"):  # codes carry a perm
        config = Int4Config(config.group_size, act_order=True, calibration="gptq")  # type: ignore[union-attr]
    t0 = time.perf_counter()
    has_tokenizer = (args.kv_cache_scales or fp8_calib is not None) and probe.load_tokenizer() is not None
    if args.kv_cache_scales and not has_tokenizer:  # fail before the work
        raise ValueError("--kv-cache-scales calibrates on text: the model needs a tokenizer")
    if fp8_calib is not None:
        if not has_tokenizer:  # fail before the work
            raise ValueError("--calibrate calibrates on text: the model needs a tokenizer")
        config = Fp8Config(calibration_label(fp8_calib))
    model, source = quantize_model(model_name, config, args.method, args.device, args.dtype,
                                   (args.calib_windows, args.calib_window_len), settings, fp8_calib, ignore)
    tokenizer = source.load_tokenizer()
    kv_note = ""
    if args.kv_cache_scales:
        scales = add_kv_cache_scales(model, tokenizer)
        kv_note = (f"; FP8 KV-cache scales k {min(scales.k):.3g}..{max(scales.k):.3g}, "
                   f"v {min(scales.v):.3g}..{max(scales.v):.3g}")
    files = save_quantized(model, config, args.out, source.arch.to_hf_config(),
                           _generation_config(source), tokenizer)
    what = config.to_dict() if config is not None else "weights unchanged"
    print(f"quantized {source.path} with {args.method} ({what}){kv_note} in "
          f"{time.perf_counter() - t0:.1f}s; wrote {args.out}: {', '.join(sorted(files))}")
    return 0
