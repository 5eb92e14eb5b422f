"""One GPU visit: where the batch-1 GEMV loads its first weight tile (in the loop, after the PDL
wait, or before it) and where it lets the next kernel launch (after its last tile, or at its
start), measured as the decode-graph replay of Llama-2-7B (dummy weights, ctx 256) in bf16,
int4 g128 and int8. Variants alternate within one process per format; each recaptures the
batch-1 graph. Outputs of every variant are checked bit-identical to the shipped one's.

With --down it compares tilings of the down projection (split K or not) instead, and with
--tiles int4 / int8 tilings of each shape, one shape at a time; their outputs' relative difference
to the shipped tiling's is printed, not checked.
With --ablate it recaptures the graph with kernels left out or changed (the rotary / KV-write
kernel, decode attention with its split combine) to measure what each costs the step under PDL,
where kernel durations overlap, and with other decode-attention splits, tiles, warps and stages;
outputs are not checked.
(At commit d36b3ad its --attention mode compared decode attention and the rotary / KV-write
kernel loading before their wait; reverted since, see docs/performance.md.)

Prints a table and writes $OUT/gpu_pdl_early.json.
Usage: python bench/scripts/gpu_pdl_early.py [--rounds 2] [--formats bf16,int4,int8] [--batches 1,64]
       [--down | --tiles | --ablate]
"""
import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _rounds import save_and_print  # noqa: E402
from gpu_b1_probe import replay_b1  # noqa: E402

from turbollm import LLM  # noqa: E402
from turbollm.kernels import gemv as G  # noqa: E402
from turbollm.kernels import paged_attention as PA  # noqa: E402
from turbollm.kernels import rope_cache as RC  # noqa: E402

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
SHIPPED = {f: (G._EARLY_TILE[f], G._TRIGGER_FIRST[f]) for f in G._EARLY_TILE}
FMTS = {"bf16": G._DENSE, "int4": G._INT4, "int8": G._INT8}
# format -> name -> (GEMV EARLY for every prologue, or None: as shipped; GEMV trigger first, or
# None: as shipped)
GEMV_VARIANTS = {
    "bf16": {"shipped": (None, None), "trigger first": (None, True),
             "pre-wait tile + trigger first": (2, True)},
    "int4": {"shipped": (None, None), "tile after the wait (earlier default)": ((0, 1, 0), False),
             "pre-wait tile, trigger after the loop": (2, False),
             "tile after the wait + trigger first": ((0, 1, 0), True)},
    "int8": {"shipped": (None, None), "pre-wait tile on o only": ((2, 0, 0), True),
             "pre-wait tile on o and down": ((2, 0, 2), True)},
}

_P = G._PACKED
DOWN_VARIANTS = {  # format -> name -> GEMV config of Llama-2-7B's down_proj (4096 x 11008), None: shipped
    "bf16": {"shipped": None, "8 x 1024, no split, 8 warps": (8, 1024, 1, 8, 3),
             "16 x 1024, no split, 8 warps": (16, 1024, 1, 8, 3), "8 x 512, no split, 4 warps": (8, 512, 1, 4, 3)},
    "int4": {"shipped": None, "16 x 2048, no split, 8 warps": (16, 2048, 1, 8, 3, _P),
             "8 x 2048, no split, 4 warps": (8, 2048, 1, 4, 3, _P), "16 x 1024, no split, 4 warps": (16, 1024, 1, 4, 3, _P)},
    "int8": {"shipped": None, "8 x 1024, no split, 4 warps": (8, 1024, 1, 4, 3, 1),
             "16 x 1024, no split, 8 warps": (16, 1024, 1, 8, 3, 1), "8 x 2048, no split, 8 warps": (8, 2048, 1, 8, 3, 1)},
}
_SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
TILE_VARIANTS = {  # --tiles: one Llama-2-7B shape's int4 tiling at a time, the others as shipped
    "int4": {"shipped": None,
             **{f"qkv {c[:4]}": ("qkv", c) for c in ((16, 2048, 1, 4, 3, _P), (32, 512, 1, 4, 3, _P),
                                                      (16, 1024, 1, 4, 3, _P), (32, 1024, 1, 8, 3, _P))},
             **{f"o {c[:4]}": ("o", c) for c in ((16, 2048, 1, 4, 3, _P), (16, 1024, 1, 4, 3, _P),
                                                  (32, 2048, 1, 8, 3, _P))},
             **{f"gate_up {c[:4]}": ("gate_up", c) for c in ((64, 512, 1, 4, 3, _P), (16, 1024, 1, 4, 3, _P),
                                                              (16, 2048, 1, 4, 3, _P))},
             **{f"down {c[:4]}": ("down", c) for c in ((16, 1024, 2, 4, 3, _P), (16, 2048, 2, 4, 3, _P),
                                                        (32, 1024, 2, 8, 3, _P))}},
    "int8": {"shipped": None,  # standalone sweep of the ninth session: gemv-tune-int8-qkv-gateup-h100-*
             **{f"qkv {c[:4]}": ("qkv", c) for c in ((16, 512, 1, 8, 3, 1), (8, 512, 1, 4, 3, 1))},
             **{f"gate_up {c[:4]}": ("gate_up", c) for c in ((8, 1024, 1, 4, 3, 1), (16, 1024, 1, 4, 3, 1),
                                                              (16, 1024, 1, 8, 3, 1))},
             "qkv (16, 512, 1, 8) + gate_up (8, 1024, 1, 4)": {"qkv": (16, 512, 1, 8, 3, 1),
                                                               "gate_up": (8, 1024, 1, 4, 3, 1)}},
}
_SHIPPED_CONFIG = G.gemv_config
_SHIPPED_KERNELS = {"rope": RC.rope_and_cache, "attn": PA.paged_decode_attention, "splits": PA.choose_num_splits,
                    "attn_pdl": PA.pdl_kwargs, "rope_pdl": RC.pdl_kwargs, "gemv_pdl": G.pdl_kwargs}


def _no_pdl(device):  # type: ignore[no-untyped-def]
    return {"PDL": False}


def _no_attention(q, *args, **kwargs):  # type: ignore[no-untyped-def]
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # no kernel: an allocation in the graph pool


_SHIPPED_ATTN = {"block_n": PA._DECODE_BLOCK_N, "warps": PA._DECODE_WARPS, "stages": PA._DECODE_STAGES}


def _splits(n: int):  # type: ignore[no-untyped-def]
    return lambda *a, **k: n


ABLATIONS = {  # --ablate: name -> replacements of module functions / decode-attention settings
    "shipped": {},
    "no rotary / KV write": {"rope": lambda *a, **k: None},
    "no decode attention": {"attn": _no_attention},
    "neither": {"rope": lambda *a, **k: None, "attn": _no_attention},
    "attention on 4 splits": {"splits": _splits(4)},
    "attention 32 keys a step, 9 splits": {"block_n": 32},
    "attention 32 keys a step, 16 splits": {"block_n": 32, "splits": _splits(16)},
    "attention 16 keys a step, 16 splits": {"block_n": 16, "splits": _splits(16)},
    "attention 2 warps": {"warps": 2},
    "attention 1 stage": {"stages": 1},
    "attention without PDL": {"attn_pdl": _no_pdl},
    "rotary / KV write without PDL": {"rope_pdl": _no_pdl},
    "attention + rotary without PDL": {"attn_pdl": _no_pdl, "rope_pdl": _no_pdl},
    "GEMVs without PDL": {"gemv_pdl": _no_pdl},
}


def ablate(change: dict) -> None:
    """Put the shipped functions and settings back, then replace those named in `change`."""
    funcs = {**_SHIPPED_KERNELS, **_SHIPPED_ATTN, **change}
    RC.rope_and_cache = funcs["rope"]
    PA.paged_decode_attention = funcs["attn"]
    PA.choose_num_splits = funcs["splits"]
    PA._DECODE_BLOCK_N, PA._DECODE_WARPS, PA._DECODE_STAGES = funcs["block_n"], funcs["warps"], funcs["stages"]
    PA.pdl_kwargs, RC.pdl_kwargs, G.pdl_kwargs = funcs["attn_pdl"], funcs["rope_pdl"], funcs["gemv_pdl"]


def shape_config(shape: str | dict, cfg: tuple[int, ...] | None = None) -> None:
    """Replace the GEMV tiling of one Llama-2-7B shape, or of several ({shape: config}); None:
    every shape as shipped."""
    table = shape if isinstance(shape, dict) else {shape: cfg}
    by_nk = {_SHAPES[name]: c for name, c in table.items() if c is not None}

    def config(n: int, k: int, fmt: int = G._DENSE) -> tuple[int, ...]:
        return by_nk.get((n, k)) or _SHIPPED_CONFIG(n, k, fmt)
    G.gemv_config = config


def apply(fmt: str, early: int | tuple[int, int, int] | None, trigger_first: bool | None) -> None:
    f = FMTS[fmt]
    e = SHIPPED[f][0] if early is None else early if isinstance(early, tuple) else (early,) * 3
    G._EARLY_TILE = {**G._EARLY_TILE, f: e}
    G._TRIGGER_FIRST = {**G._TRIGGER_FIRST, f: SHIPPED[f][1] if trigger_first is None else trigger_first}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--formats", default="bf16,int4,int8")
    ap.add_argument("--batches", default="1", help="decode-graph batches to replay, e.g. 1,64")
    ap.add_argument("--down", action="store_true",
                    help="compare tilings of the down projection (DOWN_VARIANTS) instead of GEMV_VARIANTS")
    ap.add_argument("--tiles", action="store_true", help="compare int4 tilings of each shape (TILE_VARIANTS)")
    ap.add_argument("--ablate", action="store_true", help="leave kernels out of the graph (ABLATIONS)")
    ap.add_argument("--only", default="", help="comma-separated names: run only these variants (and 'shipped')")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    record: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "us": {}}
    for fmt in args.formats.split(","):
        quant = {} if fmt == "bf16" else {"quantization": fmt, "group_size": 128}
        llm = LLM("llama-2-7b", load_format="dummy", max_num_seqs=max(batches), max_model_len=4096,
                  gpu_memory_utilization=0.5, **quant)
        g = llm.engine.executor.runner.graphs
        ref: dict[int, torch.Tensor] = {}
        for r in range(args.rounds):
            table = (TILE_VARIANTS[fmt] if args.tiles else DOWN_VARIANTS[fmt] if args.down
                     else ABLATIONS if args.ablate else GEMV_VARIANTS[fmt])
            only = {n for n in args.only.split(",") if n}
            for name, variant in table.items():
                if only and name != "shipped" and name not in only:
                    continue
                if args.ablate:
                    ablate(variant)
                elif args.tiles:
                    shape_config(*(variant if isinstance(variant, tuple) else (variant or "down",)))
                elif args.down:
                    shape_config("down", variant)
                else:
                    apply(fmt, *variant)
                g.capture()
                for bs in batches:
                    ms = replay_b1(llm, batch=bs)
                    out = g.outputs[g.bucket_for(bs)].clone()
                    ref.setdefault(bs, out)
                    # another tiling sums in another order: reported, not bit-identical
                    err = ((out.float() - ref[bs].float()).norm() / ref[bs].float().norm()).item()
                    same = args.down or args.tiles or args.ablate or torch.equal(out.view(torch.int16),
                                                                  ref[bs].view(torch.int16))  # bits
                    key = f"{fmt} b{bs}"
                    record["us"].setdefault(key, {}).setdefault(name, []).append(ms * 1e3)
                    print(f"{key:8s} round {r} {name:38s} {ms * 1e3:8.1f} us  relative difference {err:.2e}", flush=True)
                    assert same, f"{key} {name}: output differs from the shipped variant's"
        apply(fmt, None, None)
        shape_config("down", None)
        ablate({})
        del llm, g
        gc.collect()
        torch.cuda.empty_cache()
    save_and_print(os.path.join(OUT, "gpu_pdl_early.json"), record, record["us"],
                   "decode-graph replay (ctx 256), us (rounds)", "shipped")


if __name__ == "__main__":
    main()
