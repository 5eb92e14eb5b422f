"""Compile a Triton kernel for sm_90 on a machine without a GPU and report its IR and SASS.

Usage (CPU machine): python bench/scripts/cpu_sass.py int4_dot [--m 64] [--dump DIR]
Prints the TTGIR ops that touch shared memory / the tensor cores and the instruction count
of the main loop (the longest basic block that branches back to itself) by opcode.
"""
import argparse
import collections
import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from turbollm.kernels import _quant_matmul_kernels as qk

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")


MAXNREG = None  # --maxnreg


def compile_kernel(fn, signature: dict, constexprs: dict, aligned: list[int], num_warps: int, num_stages: int):
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages,
                                   **({"maxnreg": MAXNREG} if MAXNREG else {})})


def int4_dot(m: int, bn: int, bk: int, warps: int, stages: int, swap: bool, split_x: bool, deq: int):
    names = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr", "part_ptr", "M", "N", "K",
             "stride_xm", "stride_om", "k_per_split"]
    sig = {n: ("*bf16" if n in ("x_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr") else "*u8" if n == "w_ptr"
               else "*fp32" if n == "part_ptr" else "i32") for n in names}
    const = dict(GROUP=128, BLOCK_M=m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, DEQ=deq, MAGIC_BITS=0x4300,
                 MAGIC_BASE=128.0, SPLIT_X=split_x, SWAP=swap, SPLIT_K=1, HAS_BIAS=False, ROUND_W=False,
                 ROUND_OUT=False, DOT_PREC="tf32", UPCAST=False, FRAC_Z=False)
    for k, v in const.items():
        sig[k] = "constexpr"
    return compile_kernel(qk.int4_dot_kernel, sig, const, list(range(13)), warps, stages)


def gemv(bn: int, bk: int, warps: int, deq: int, fmt: int, prologue: int):
    from turbollm.kernels import gemv as g
    names = ["x_ptr", "res_ptr", "nw_ptr", "new_res_ptr", "w_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr",
             "N", "K", "k_per_split", "stride_wn", "stride_os", "eps"]
    wt = {2: "*u8", 1: "*i8", 0: "*bf16"}[fmt]
    sig = {n: "*bf16" for n in names[:9]}
    sig.update(w_ptr=wt, N="i32", K="i32", k_per_split="i32", stride_wn="i32", stride_os="i32", eps="fp32")
    const = dict(PROLOGUE=prologue, HAS_RESIDUAL=prologue == 1, HAS_BIAS=False, WFMT=fmt, GROUP=128 if fmt == 2 else 1,
                 DEQ=deq, BLOCK_N=bn, BLOCK_K=bk, ROUND=False, ROUND_OUT=False, PDL=True,
                 EARLY=g._EARLY_TILE[fmt][prologue], TRIGGER_FIRST=g._TRIGGER_FIRST[fmt])
    for k in const:
        sig[k] = "constexpr"
    return compile_kernel(g._gemv_kernel, sig, const, list(range(14)), warps, 3)


def sass_of(kernel) -> str:
    path = "/tmp/_k.cubin"
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    return subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True, check=True).stdout


def loop_report(sass: str) -> None:
    lines = [l for l in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", l)]
    ops = []
    for l in lines:
        m = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", l)
        if m:
            ops.append((int(m.group(1), 16), m.group(3), l))
    # backward branches: BRA to an earlier address
    best = None
    for addr, op, l in ops:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", l.split("BRA", 1)[1])
            if t and int(t.group(1), 16) < addr:
                lo = int(t.group(1), 16)
                body = [o for a, o, _ in ops if lo <= a <= addr]
                if best is None or len(body) > len(best):
                    best = body
    if best is None:
        print("no loop found")
        return
    c = collections.Counter(o.split(".")[0] for o in best)
    print(f"main loop: {len(best)} instructions")
    print("  " + ", ".join(f"{k} {v}" for k, v in c.most_common()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=["int4_dot", "gemv"])
    ap.add_argument("--fmt", type=int, default=2, help="gemv: 0 bf16, 1 int8, 2 int4")
    ap.add_argument("--prologue", type=int, default=0)
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--bn", type=int, default=64)
    ap.add_argument("--bk", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--no-swap", action="store_true")
    ap.add_argument("--split-x", action="store_true")
    ap.add_argument("--deq", type=int, default=2)
    ap.add_argument("--dump", default=None)
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap a thread")
    a = ap.parse_args()
    global MAXNREG
    MAXNREG = a.maxnreg
    if a.kernel == "gemv":
        k = gemv(a.bn, a.bk, a.warps, a.deq, a.fmt, a.prologue)
    else:
        k = int4_dot(a.m, a.bn, a.bk, a.warps, a.stages, not a.no_swap, a.split_x, a.deq)
    ttgir = k.asm["ttgir"]
    keys = ("local_alloc", "local_store", "local_load", "warp_group_dot", "tt.dot", "convert_layout",
            "async_copy", "ttng.", "ttg.")
    c = collections.Counter()
    for line in ttgir.splitlines():
        for key in keys:
            if key in line:
                mm = re.search(r"(tt[gn]?\.[a-z_]+)", line)
                c[mm.group(1) if mm else key] += 1
                break
    print("TTGIR ops:", dict(c))
    print("shared memory bytes:", k.metadata.shared, " registers:", getattr(k, "n_regs", None))
    report(k, a.dump)


def report(k, dump: str | None) -> None:  # type: ignore[no-untyped-def]
    """Registers / stack / shared memory and the main loop's instructions of compiled kernel k;
    with `dump`, its TTGIR, PTX and SASS written there."""
    s = sass_of(k)
    usage = subprocess.run([CUOBJDUMP, "-res-usage", "/tmp/_k.cubin"], capture_output=True, text=True).stdout
    print("resources:", " ".join(re.findall(r"(?:REG|STACK|SHARED|LOCAL):\d+", usage)))
    loop_report(s)
    if dump:
        os.makedirs(dump, exist_ok=True)
        for name in ("ttgir", "ptx"):
            open(os.path.join(dump, f"k.{name}"), "w").write(k.asm[name])
        open(os.path.join(dump, "k.sass"), "w").write(s)


if __name__ == "__main__":
    sys.exit(main())
