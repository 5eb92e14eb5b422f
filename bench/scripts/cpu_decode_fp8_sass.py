"""Compile decode attention over an FP8 KV cache for sm_90 on a machine without a GPU and count
the SASS of its main loop: the plain loop against the words loop (`_DecodeConfig` variants)
(kernels/paged_attention.py).

Usage (CPU machine): python bench/scripts/cpu_decode_fp8_sass.py [--tma] [--dump DIR] [--json PATH]
Shapes: D 128, block 16, bf16 q, Llama-3-8B's GQA group of 4 (32 / 8 heads) and Llama-2-7B's
group of 1 (32 / 32), several splits (the partial-output epilogue); the shipped kernel over a
bf16 cache (64 keys a step, ~100% of the copy bandwidth on an H100) as a yardstick. Integer arguments get the
launch's 16-divisibility where Llama's strides have it (cpu_rope_sass.py does the same).
The main loop is the longest basic block that branches back to itself (cpu_sass.py); each count
is instructions a thread per iteration, i.e. per BLOCK_N keys, so `/key` divides by BLOCK_N and
`warp-ops/key` multiplies that by the program's warps (what an SM issues a key). `CTAs/SM`: the
programs an H100 SM can hold by registers, shared memory and warps (latency hiding).
Columns: smem loads (LDS*, LDSM), global loads (LDG), async copies (LDGSTS), TMA (UTMALDG), smem
stores, conversions (F2F / F2FP / HADD2 / HMUL2 / I2F), byte shuffles (PRMT), tensor-core ops
(HMMA fp16 mma.sync, HGMMA / QGMMA fp16 / fp8 wgmma), integer ALU (IMAD* incl. IMAD.MOV register
moves, IADD3, LEA, SHF, LOP3, SEL, ISETP); REG / STACK per thread from cuobjdump -res-usage,
smem per program.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cpu_rope_sass import sass_of  # noqa: E402  (bench/scripts is sys.path[0] when run as a script)
from turbollm.kernels import paged_attention as PA

CLASSES = {  # column -> opcode prefixes (before the first '.')
    "LDS": ("LDS", "LDSM"), "LDG": ("LDG",), "LDGSTS": ("LDGSTS",), "UTMALDG": ("UTMALDG",), "STS": ("STS", "STSM"),
    "cvt": ("F2F", "F2FP", "HADD2", "HMUL2", "I2F", "I2FP"), "PRMT": ("PRMT",),
    "HMMA": ("HMMA",), "HGMMA": ("HGMMA",), "QGMMA": ("QGMMA",),
    "int": ("IMAD", "IADD3", "VIADD", "LEA", "SHF", "LOP3", "SEL", "ISETP", "IABS", "SGXT"),
}
VARIANTS = {  # name -> _DecodeConfig (the fp8 wgmma QK^T loop was deleted in the twelfth session)
    "plain": PA._DecodeConfig(fp8_words=False, paged=True),
    "fp8_words": PA._DecodeConfig(fp8_words=True, paged=True),
    "fp8_words 64 keys": PA._DecodeConfig(fp8_words=True, block_n=64, paged=True),
    "fp8_words 2 stages": PA._DecodeConfig(fp8_words=True, num_stages=2, paged=True),
    "plain, per key": PA._DecodeConfig(fp8_words=False, paged=False),
    "words, per key": PA._DecodeConfig(fp8_words=True, paged=False),
}
COLS = [*CLASSES, "IMAD.MOV"]
MODELS = {"llama-3-8b": 4, "llama-2-7b": 1}  # GQA group (q heads a kv head)
PTR = {"q_ptr": "*bf16", "kv_ptr": "*fp8e4nv", "bt_ptr": "*i32", "seq_lens_ptr": "*i32", "out_ptr": "*bf16",
       "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "qk_scale": "fp32", "v_scale": "fp32"}
UNALIGNED = ("stride_btb", "stride_lh")  # max_blocks and the split count: not multiples of 16 in general


def compile_variant(config: PA._DecodeConfig, group: int, bf16_cache: bool = False):  # type: ignore[no-untyped-def]
    """The sm_90 CompiledKernel of the split launch `config` picks (bf16 q, FP8 cache, D 128,
    block 16, several splits, no window, PDL on), with the launcher's own constexprs."""
    kv_dtype = torch.bfloat16 if bf16_cache else torch.float8_e4m3fn
    block_n = config.block_n or (PA._DECODE_BLOCK_N if bf16_cache else PA._DECODE_BLOCK_N_FP8)
    fn, const, options = PA._split_kernel(torch.bfloat16, kv_dtype, group, 128, 16, block_n, False, False, config,
                                          bool(config.fp8_words), True)
    types = dict(PTR, kv_ptr="*bf16") if bf16_cache else PTR
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    aligned = [i for i, n in enumerate(fn.arg_names)
               if n.endswith("_ptr") or (n.startswith("stride") and n not in UNALIGNED)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options=options)


def main_loop(sass: str) -> list[str]:
    """Opcodes (modifiers kept) of the longest block ending in a backward branch."""
    ops = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", line)
        if m:
            ops.append((int(m.group(1), 16), m.group(2), m.group(3)))
    best: list[str] = []
    for addr, op, rest in ops:
        t = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if t and int(t.group(1), 16) < addr:
            body = [o for a, o, _ in ops if int(t.group(1), 16) <= a <= addr]
            best = body if len(body) > len(best) else best
    return best


def classify(loop: list[str]) -> dict[str, int]:
    c = collections.Counter(o.split(".")[0] for o in loop)
    row = {col: sum(c[p] for p in prefixes) for col, prefixes in CLASSES.items()}
    row["IMAD.MOV"] = sum(o.startswith("IMAD.MOV") for o in loop)
    return row


# ---------------------------------------------------------------------------------------------
# Per-page TMA, the rejected design (--tma): a compile-only prototype, not a correct kernel (no
# masking of pages past the end). A tile of PAGES pages is PAGES [BLOCK_SIZE, D] descriptor loads
# from a host-side TensorDescriptor over the cache viewed as [2 * blocks * block_size, KV * D]
# rows, joined row-wise in registers: Triton 3.6 has no way to land them in one shared buffer.

@triton.jit
def _cat_rows(a, b):  # [R, C] x2 -> [2R, C], a's rows first
    r: tl.constexpr = a.shape[0]
    c: tl.constexpr = a.shape[1]
    return tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), [2 * r, c])


@triton.jit
def _pages(desc, bt_row, j0, row0, col, PAGES: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """[PAGES * BLOCK_SIZE, D]: the rows of block-table entries j0 .. j0 + PAGES."""
    if PAGES == 1:
        return desc.load([row0 + tl.load(bt_row + j0) * BLOCK_SIZE, col])
    else:
        half: tl.constexpr = PAGES // 2
        return _cat_rows(_pages(desc, bt_row, j0, row0, col, half, BLOCK_SIZE),
                         _pages(desc, bt_row, j0 + half, row0, col, half, BLOCK_SIZE))


@triton.jit
def _tma_prototype(q_ptr, kv_desc, bt_ptr, seq_lens_ptr, part_out_ptr, qk_scale, num_splits, num_blocks,
                   stride_qb, stride_qh, stride_btb, stride_pb, stride_ph, stride_ps,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGES: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    BLOCK_N: tl.constexpr = PAGES * BLOCK_SIZE
    seq_len = tl.load(seq_lens_ptr + b)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + tl.arange(0, 16)  # [16]: GROUP_PAD
    g_mask = tl.arange(0, 16) < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    q = q.to(tl.float16)
    partition = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    end = tl.minimum((split + 1) * partition, seq_len)
    m_i = tl.full([16], float("-inf"), tl.float32)
    l_i = tl.zeros([16], tl.float32)
    acc = tl.zeros([16, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + b * stride_btb
    for t0 in range(split * partition, end, BLOCK_N):
        k = _pages(kv_desc, bt_row, t0 // BLOCK_SIZE, 0, kvh * HEAD_DIM, PAGES, BLOCK_SIZE).to(tl.float16)
        v = _pages(kv_desc, bt_row, t0 // BLOCK_SIZE, num_blocks * BLOCK_SIZE, kvh * HEAD_DIM, PAGES, BLOCK_SIZE)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [16, N]
        s = tl.where((t0 + tl.arange(0, BLOCK_N) < end)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v.to(tl.float16))
        m_i = m_new
    p_ptrs = part_out_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :]
    tl.store(p_ptrs, acc / l_i[:, None], mask=g_mask[:, None])


def compile_tma_prototype(pages: int, group: int):  # type: ignore[no-untyped-def]
    fn = _tma_prototype
    const = dict(GROUP=group, HEAD_DIM=128, BLOCK_SIZE=16, PAGES=pages)
    types = dict(PTR, kv_desc="tensordesc<fp8e4nv[16, 128]>")
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    aligned = [i for i, n in enumerate(fn.arg_names)
               if n.endswith("_ptr") or (n.startswith("stride") and n not in UNALIGNED)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tma", action="store_true", help="also the per-page TMA prototype (1, 2, 8 pages a step)")
    ap.add_argument("--dump", default=None, help="write each case's TTGIR and SASS there")
    ap.add_argument("--json", default=None, help="write the table there")
    a = ap.parse_args()
    print("sm_90, bf16 q over an FP8 cache, D 128, block 16; main-loop instructions a thread per step")
    print(f"{'model':10} {'variant':20} {'keys':>4} {'loop':>5} {'/key':>5} " + " ".join(f"{c:>7}" for c in COLS)
          + "  REG STACK   smem warp-ops/key CTAs/SM")
    cases = [(m, name, config.block_n or PA._DECODE_BLOCK_N_FP8, lambda c=config, g=g: compile_variant(c, g))
             for m, g in MODELS.items() for name, config in VARIANTS.items()]
    cases += [(m, name, PA._DECODE_BLOCK_N, lambda g=g, c=c: compile_variant(c, g, True))
              for m, g in MODELS.items()
              for name, c in (("bf16 cache (ref.)", PA._DecodeConfig()), ("bf16 cache, paged", PA._DecodeConfig(paged=True)))]
    if a.tma:
        cases += [(m, f"TMA proto {p} pages", 16 * p, lambda p=p, g=g: compile_tma_prototype(p, g))
                  for m, g in MODELS.items() for p in (1, 2, 8)]
    rows = [report(model, name, keys, build(), a.dump) for model, name, keys, build in cases]
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"target": "sm_90", "triton": triton.__version__, "rows": rows}, f, indent=1)


def report(model: str, name: str, keys: int, k, dump: str | None) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Print and return one row for compiled kernel k (its TTGIR and SASS written to `dump`)."""
    sass, usage = sass_of(k)
    loop = main_loop(sass)
    counts = classify(loop)
    reg, stack = (int(m.group(1)) if (m := re.search(rf"{f}:(\d+)", usage)) else -1 for f in ("REG", "STACK"))
    warps = k.metadata.num_warps
    # Programs an SM can hold (H100): 64 K registers allocated 8 a thread at a time, 228 KB of
    # shared memory with 1 KB reserved a program, 64 warps.
    ctas = min(65536 // (-(-reg // 8) * 8 * 32 * warps), 233472 // (k.metadata.shared + 1024), 64 // warps)
    row = dict(model=model, variant=name, keys=keys, loop=len(loop), **counts, reg=reg, stack=stack,
               smem=k.metadata.shared, warps=warps, warp_ops_per_key=len(loop) * warps / keys, ctas_per_sm=ctas)
    print(f"{model:10} {name:20} {keys:>4} {len(loop):>5} {len(loop) / keys:>5.1f} "
          + " ".join(f"{counts[c]:>7}" for c in COLS)
          + f"  {reg:>3} {stack:>5} {k.metadata.shared:>6} {row['warp_ops_per_key']:>12.1f} {ctas:>8}", flush=True)
    if dump:
        os.makedirs(dump, exist_ok=True)
        stem = os.path.join(dump, f"{model}_{name.replace(' ', '_')}")
        for ext, text in (("ttgir", k.asm["ttgir"]), ("sass", sass)):
            with open(f"{stem}.{ext}", "w") as f:
                f.write(text)
    return row


if __name__ == "__main__":
    sys.exit(main())
