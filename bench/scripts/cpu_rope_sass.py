"""Compile the rotary + KV-write kernel (kernels/rope_cache.py) for sm_90 without a GPU and
count its SASS instructions: tensor-core (HGMMA / HMMA) against CUDA-core float (FFMA, FMUL,
FADD), and spills (STL / LDL: local memory), per program shape and rotation precision.

Usage (CPU machine): python bench/scripts/cpu_rope_sass.py [--dtype bf16] [--cache fp8] [--no-rotate]
    [--dump DIR]
Shapes are Llama-3-8B's (32 q heads, 8 kv heads, head_dim 128). A program of the narrow shape
handles 16 heads of one token, one of the wide shape 64 flattened (token, head) rows, so the
last column divides by that to compare per row. Compiling needs triton's bundled ptxas and
cuobjdump only (cpu_sass.py). REG / STACK: per thread; smem: bytes per program, dynamic
included.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from turbollm.kernels import rope_cache as rc

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
HEADS, KV, DIM = 32, 8, 128
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
PRECISIONS = ("ieee", "tf32x3", "bf16_split3")  # rc._dot_pm1; "ieee" is the old kernel's
OPS = ("HGMMA", "HMMA", "FFMA", "FMUL", "FADD", "F2FP", "LDG", "STG", "LDS", "STS", "STL", "LDL")


def compile_rope(wide: bool, precision: str, dtype: str, cache: str, rotate: bool):  # type: ignore[no-untyped-def]
    """The compiled kernel (triton's CompiledKernel) for one program shape and precision."""
    fn = rc._rope_cache_kernel
    block = rc._BLOCK_R if wide else rc._BLOCK_H
    const = dict(NUM_HEADS=HEADS, NUM_KV=KV, HEAD_DIM=DIM, HALF_PAD=DIM // 2, BLOCK_R=block, WIDE=wide,
                 ROUND=False, CACHE_FP8=cache == "fp8", ROUND_FP8=False, ROTATE=rotate, PRECISION=precision,
                 PDL=True)
    types = {"qkv_ptr": PTR[dtype], "cos_ptr": PTR[dtype], "sin_ptr": PTR[dtype],
             "cache_ptr": "*fp8e4nv" if cache == "fp8" else PTR[dtype], "slot_ptr": "*i64",
             "k_inv": "fp32", "v_inv": "fp32"}
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    # 16-divisible: the pointers and the strides (Llama-3-8B's are 6144, 64, 64, plane, 1024).
    aligned = [i for i, n in enumerate(fn.arg_names) if n.endswith("_ptr") or n.startswith("stride")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": rc._num_warps(wide, rotate), "num_stages": 1})


def sass_of(kernel) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """(SASS text, resource usage line) of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    return sass, " ".join(re.findall(r"(?:REG|STACK|LOCAL):\d+", usage))


def count_ops(sass: str) -> collections.Counter:
    """Opcode (without modifiers) -> count over the whole kernel; predicated ones included."""
    c: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            c[m.group(1)] += 1
    return c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=sorted(PTR), default="bf16")
    ap.add_argument("--cache", choices=["fp8", "same"], default="fp8")
    ap.add_argument("--no-rotate", action="store_true")
    ap.add_argument("--dump", default=None, help="write each case's TTGIR and SASS there")
    a = ap.parse_args()
    print(f"sm_90, {a.dtype} qkv, {a.cache} cache, rotate={not a.no_rotate}, H={HEADS} KV={KV} D={DIM}")
    print(f"{'shape':7} {'precision':11} {'rows':>4} {'total':>6} " + " ".join(f"{o:>5}" for o in OPS)
          + "  FFMA/row  resources")
    for shape, prec in [(sh, p) for sh in ("narrow", "wide") for p in PRECISIONS]:
        k = compile_rope(shape == "wide", prec, a.dtype, a.cache, not a.no_rotate)
        sass, usage = sass_of(k)
        c = count_ops(sass)
        rows = rc._BLOCK_R if shape == "wide" else rc._BLOCK_H
        print(f"{shape:7} {prec:11} {rows:>4} {sum(c.values()):>6} " + " ".join(f"{c[o]:>5}" for o in OPS)
              + f"  {c['FFMA'] / rows:8.0f}  {usage} smem:{k.metadata.shared}")
        if a.dump:
            os.makedirs(a.dump, exist_ok=True)
            for ext, text in (("ttgir", k.asm["ttgir"]), ("sass", sass)):
                with open(os.path.join(a.dump, f"{shape}_{prec}.{ext}"), "w") as f:
                    f.write(text)


if __name__ == "__main__":
    sys.exit(main())
