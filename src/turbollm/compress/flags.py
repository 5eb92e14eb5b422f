"""Command-line flags of `turbollm eval` and `turbollm quantize` (argparse only: `--help`
must not import torch)."""

from __future__ import annotations

import argparse


def add_eval_args(p: argparse.ArgumentParser, pair: bool) -> None:
    """Flags shared by `eval ppl` and `eval compare`."""
    if pair:
        p.add_argument("model_a", help="reference model (path, .gguf, preset; 'embedded' for the default)")
        p.add_argument("model_b", help="model compared against it ('embedded' for the default)")
    else:
        p.add_argument("model", nargs="?", default=None, help="model (default: the embedded SmolLM2)")
    which = (" (applies to MODEL_B)" if pair else
             "; comma-separated for several (e.g. int8,int4,fp8); the unquantized baseline runs too")
    p.add_argument("--quantization", default=None, help=f"none | int8 | int4 | fp8: quantize at load; gguf: keep a GGUF's Q4_0/Q4_1 "
                   f"linears as int4{which}")
    p.add_argument("--group-size", default="128",
                   help="int4 group size: 32, 64 or 128" + ("" if pair else "; comma-separated: one run each"))
    p.add_argument("--quantization-ignore", default=None,
                   help="decoder linears kept dense when quantizing: comma-separated glob patterns over module "
                        "names (model.layers.29.*, *.down_proj)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize the LM head (RTN) with the same method")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="auto | fp8: also evaluate (ppl) / give model B (compare) an FP8 (e4m3) KV cache")
    p.add_argument("--kv-scales", default="auto",
                   help="FP8 KV cache scales: auto (the checkpoint's, else 1.0) | unit (1.0) | calibrate "
                        "(per-layer amax on the Shakespeare calibration part)"
                        + ("" if pair else "; comma-separated: one run each"))
    p.add_argument("--kv-rotation", default="on",
                   help="FP8 KV cache: on (Hadamard-rotate q and k where the model's scales allow: the default) | off"
                        + ("" if pair else "; comma-separated: one run each (x each --kv-scales)"))
    p.add_argument("--corpus", default="shakespeare",
                   help="shakespeare (held-out part), shakespeare-calib, or a .txt file")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per window (default: min(2048, context length))")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16")
    p.add_argument("--json", default=None, help="write the results here as JSON")


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    """Flags of `turbollm quantize`."""
    p.add_argument("model", nargs="?", default=None,
                   help="float model to quantize (default: the embedded SmolLM2, dequantized)")
    p.add_argument("--method", required=True,
                   help="rtn | awq | gptq | fp8 | none (weights unchanged; with --kv-cache-scales)")
    p.add_argument("--bits", type=int, default=4, help="4 (rtn, awq, gptq) or 8 (rtn: int8, fp8)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64, 128)")
    p.add_argument("--act-order", nargs="?", const="dynamic", default=None, choices=("static", "dynamic", "off"),
                   help="gptq: quantize columns in activation order. static (the default): groups keep input "
                        "order, no runtime permutation; dynamic (bare --act-order): groups form in activation "
                        "order and the layers carry a permutation; off: input order (reference GPTQ)")
    p.add_argument("--zero-point", default=None, choices=("float", "integer"),
                   help="awq/gptq: per-group zero point: float (free offset, turbollm's runtime) or integer "
                        "(the AutoAWQ / GPTQ grid); default: the method's")
    p.add_argument("--damp", type=float, default=None,
                   help="gptq: dampening added to diag(H), as a fraction of its mean (default 0.01)")
    p.add_argument("--rounding", default=None, choices=("gptq", "nearest"),
                   help="awq: round the AWQ-scaled weights to nearest after AutoAWQ's range search (clip; the "
                        "default) or with GPTQ (with --tune 2: +2.4%% and +3.2%% on SmolLM2's full held-out set, two calibrations)")
    p.add_argument("--tune", type=int, default=None, metavar="EPOCHS",
                   help="awq/gptq: passes of end-to-end tuning of the int4 grids' scales and offsets against the "
                        "float model on the calibration windows (codes fixed; compress/tune.py; needs ~3x the "
                        "fp32 model's memory); default 0: off; 2 is the measured setting (SmolLM2 g128, held-out "
                        "perplexity: GPTQ +1.8%%..+2.3%% over three 16-window calibrations, +3.5%%..+3.8%% without; "
                        "AWQ with its own rounding +2.8%% / +2.5%% over two 64-window calibrations, +8.0%% without)")
    p.add_argument("--calibrate", action="store_true",
                   help="fp8: choose the FP8 weights on calibration text (GPTQ onto the per-row e4m3 grid); "
                        "the checkpoint runs like plain fp8")
    p.add_argument("--smooth-alpha", type=float, default=None,
                   help="fp8 --calibrate: also SmoothQuant-migrate activation range into the weights with this "
                        "strength in [0, 1] (folded into the norms and up_proj)")
    p.add_argument("--no-gptq", action="store_true", help="fp8 --calibrate: no GPTQ error compensation")
    p.add_argument("--scale-search", action="store_true",
                   help="fp8 --calibrate: per-row activation-weighted MSE-optimal weight scales instead of amax / 448")
    p.add_argument("--quantization-ignore", default=None,
                   help="rtn, fp8: decoder linears kept dense, comma-separated glob patterns over module names "
                        "(model.layers.29.*, *.down_proj)")
    p.add_argument("--keep-last-layers", type=int, default=None, metavar="N",
                   help="rtn, fp8: keep the last N decoder layers' linears dense (added to --quantization-ignore); "
                        "default 1 for fp8, 0 otherwise. FP8's e4m3 weights cost most in the last layer: on "
                        "SmolLM2's 101 held-out windows, --calibrate gives +1.19%% perplexity with every layer FP8 "
                        "and +0.82%% with the last one dense; Llama-3-8B offline throughput (FP8 KV) -1.3%%")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--calib-windows", type=int, default=64,
                   help="awq/gptq/fp8 --calibrate: calibration windows, spread evenly over the Shakespeare "
                        "calibration part")
    p.add_argument("--calib-window-len", type=int, default=512,
                   help="awq/gptq/fp8 --calibrate: tokens per calibration window")
    p.add_argument("--kv-cache-scales", action="store_true",
                   help="also calibrate per-layer FP8 KV-cache scales (k_scale, v_scale; 16 windows of 512 "
                        "tokens of the Shakespeare calibration part) and write them into the checkpoint "
                        "(used with kv_cache_dtype fp8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16")
