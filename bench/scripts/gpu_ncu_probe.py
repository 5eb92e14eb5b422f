"""Kernels to profile under Nsight Compute (ncu): each case launches its kernel twice to compile
and warm, then once inside an NVTX range "PROFILE", so `ncu --nvtx --nvtx-include PROFILE/`
profiles exactly one launch a case, in the order printed.

Cases (Llama shapes, D 128, block 16, shuffled blocks, dummy data):
- gemv-{int4,int8,bf16}-{qkv,gate_up}: the batch-1 GEMV (kernels/gemv.gemv, plain prologue) on
  Llama-2-7B's qkv (12288 x 4096) and gate_up (22016 x 4096);
- attn-{fp8-words,fp8-plain,bf16}-{l3-512,l2-256}: decode attention, Llama-3-8B (32 / 8 heads) at
  512 x 640 keys and Llama-2-7B (32 / 32) at 256 x 640 keys.

Usage (GPU): ncu --clock-control none --set full --nvtx --nvtx-include PROFILE/ -o REP \
                 python3 bench/scripts/gpu_ncu_probe.py [--cases a,b]
"""
from __future__ import annotations

import argparse
import sys

import torch

from gpu_decode_fp8_variants import make_case  # same directory
from turbollm.kernels import gemv
from turbollm.kernels.paged_attention import _DecodeConfig, paged_decode_attention

GEMV_SHAPES = {"qkv": (12288, 4096), "gate_up": (22016, 4096)}
ATTN_SHAPES = {"l3-512": (32, 8, 512, 640), "l2-256": (32, 32, 256, 640)}  # heads, kv heads, batch, keys
ATTN_PATHS = {"fp8-words": _DecodeConfig(fp8_words=True), "fp8-plain": _DecodeConfig(fp8_words=False), "bf16": None}


def gemv_case(fmt: str, shape: str):  # type: ignore[no-untyped-def]
    n, k = GEMV_SHAPES[shape]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    if fmt == "int4":
        q = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
        s = torch.rand(n, k // 128, device="cuda", dtype=torch.bfloat16) / 100
        z = torch.randint(0, 16, (n, k // 128), device="cuda").bfloat16()
        w: object = gemv.QuantWeight(q, s, z, 128)
    elif fmt == "int8":
        w = gemv.QuantWeight(torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
                             torch.rand(n, device="cuda", dtype=torch.bfloat16) / 500)
    else:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64
    return lambda: gemv.gemv(x, w)


def attn_case(path: str, shape: str):  # type: ignore[no-untyped-def]
    heads, kv_heads, batch, ctx = ATTN_SHAPES[shape]
    case = make_case(heads, kv_heads, batch, ctx)
    cache = "bf16" if path == "bf16" else "fp8"
    scales = {} if cache == "bf16" else {"k_scale": case["k_scale"], "v_scale": case["v_scale"]}
    return lambda: paged_decode_attention(case["q"], case[cache], case["tables"], case["lens"], 128**-0.5, ctx,
                                          _config=ATTN_PATHS[path], **scales)


def all_cases() -> list[str]:
    names = [f"gemv-{f}-{s}" for f in ("int4", "int8", "bf16") for s in GEMV_SHAPES]
    return names + [f"attn-{p}-{s}" for s in ATTN_SHAPES for p in ATTN_PATHS]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(all_cases()))
    names = ap.parse_args().cases.split(",")
    for i, name in enumerate(names):
        kind, rest = name.split("-", 1)
        path, shape = rest.rsplit("-", 1) if kind == "gemv" else (rest.rsplit("-", 2)[0], "-".join(rest.rsplit("-", 2)[1:]))
        fn = gemv_case(path, shape) if kind == "gemv" else attn_case(path, shape)
        fn()
        fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("PROFILE")
        fn()
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        print(f"case {i}: {name}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
