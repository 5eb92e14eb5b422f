"""Bytes of the decoder-linear weights of a GGUF model, dequantized at load vs kept (gguf).

    PYTHONPATH=src python bench/scripts/gguf_linear_bytes.py --out bench/results/gguf-linear-bytes-cpu-2026-11-27.json

Counts the stored tensors of every decoder linear (q/k/v/o/gate/up/down; no biases, no
embeddings, LM head or norms) in the built model: `weight` for the dequantized model,
`qweight + scales + zeros` for the kept one, in float32 (CPU) and bfloat16 (the GPU dtype;
built on CPU without prepacking, so only the storage is measured). On CPU a quantized linear
also keeps a oneDNN-prepacked float32 copy of its dequantized weight (quant/linear.py); that
copy is reported separately. The file's own bytes for those tensors are given as the floor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch
from torch import nn

from turbollm.layers.linear import QuantizableLinear
from turbollm.models.build import build_model
from turbollm.models.loader import resolve_model
from turbollm.quant.plan import resolve_quantization

CPU = torch.device("cpu")


def linear_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(stored bytes of the decoder linears, bytes of their CPU-packed copies, parameter count)."""
    stored = packed = count = 0
    for m in model.modules():
        if not isinstance(m, QuantizableLinear):
            continue
        for name, p in m.named_parameters(recurse=False):
            if name != "bias":
                stored += p.numel() * p.element_size()
        w = getattr(m, "weight", None)
        count += w.numel() if w is not None else 2 * m.qweight.numel()
        if m.quant_method is not None and getattr(m, "packed", None) is not None:
            packed += m.packed.numel() * m.packed.element_size()
    return stored, packed, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="a .gguf file (default: the embedded SmolLM2)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    src = resolve_model(args.model)
    types = src.gguf_linear_types()
    assert types is not None, "not a GGUF model"
    reader = src._gguf_reader()
    from turbollm.models.gguf import hf_name

    file_bytes = sum(t.n_bytes for t in reader.tensors if hf_name(t.name) in types)
    plan = resolve_quantization("gguf", 128, None, CPU, str(src.path), gguf_linear_types=types)
    out: dict = {"model": args.model or "embedded SmolLM2-135M-Instruct", "linear_types": sorted(set(types.values())),
                 "num_linears": len(types), "file_bytes": file_bytes}
    for dtype in (torch.float32, torch.bfloat16):
        key = str(dtype).removeprefix("torch.")
        prepack = dtype == torch.float32
        dense = linear_bytes(build_model(src, CPU, dtype, prepack_cpu=prepack))
        kept = linear_bytes(build_model(src, CPU, dtype, quantization=plan, prepack_cpu=prepack))
        out[key] = {"dequantized_bytes": dense[0], "kept_bytes": kept[0], "kept_cpu_packed_copy_bytes": kept[1],
                    "weights": dense[2], "kept_bits_per_weight": 8 * kept[0] / kept[2],
                    "ratio": dense[0] / kept[0]}
    out["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    out["host"] = platform.node()
    print(json.dumps(out, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
