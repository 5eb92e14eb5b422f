"""One GPU visit: what the quantized LM head (quantize_lm_head) costs against the bf16 one, GPU
time only. Llama-2-7B preset (dummy weights), head [32000, 4096]; for int4 g128, int8 (and FP8) the
quantized head's `compute_logits` against the bf16 GEMV / cuBLAS of the same shape, at 1 and
64 rows, each timed as a CUDA-graph replay (weights out of L2 between replays: the head is
262 MB in bf16, far above the 50 MB L2). Also the batch-1 decode-graph replay of the layers.

Prints a table and writes $OUT/gpu_lm_head.json.
Usage: python bench/scripts/gpu_lm_head.py [--formats int4,int8,fp8]
"""
import argparse
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_b1_probe import replay_b1  # noqa: E402
from gpu_gemv import graph_us  # noqa: E402  (µs a call from CUDA-graph replays, median)

from turbollm import LLM  # noqa: E402
from turbollm.layers.linear import dense_linear  # noqa: E402

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="int4,int8")
    args = ap.parse_args()
    record: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "us": {}}
    dense_w = None
    for fmt in args.formats.split(","):
        quant = {"quantization": fmt, "group_size": 128}
        llm = LLM("llama-2-7b", load_format="dummy", max_num_seqs=64, max_model_len=4096,
                  gpu_memory_utilization=0.5, quantize_lm_head=True, **quant)
        model = llm.engine.executor.runner.model
        head = model.lm_head.quantized
        if dense_w is None:  # the bf16 head of the same shape
            dense_w = torch.randn(head.weight_shape, device="cuda", dtype=torch.bfloat16) * 0.02
        with torch.inference_mode():
            for rows in (1, 64):
                h = torch.randn(rows, dense_w.shape[1], device="cuda", dtype=torch.bfloat16)
                q = graph_us(lambda: model.compute_logits(h))
                d = graph_us(lambda: dense_linear(h, dense_w))
                record["us"][f"{fmt} {rows} rows"] = {"quantized head": q, "bf16 head": d}
                print(f"{fmt} head, {rows:2d} rows: {q:7.1f} us   bf16 head {d:7.1f} us   ({d - q:+.1f} us)", flush=True)
            record["us"][f"{fmt} b1 layers replay"] = replay_b1(llm) * 1e3
        del llm, model, head
        gc.collect()
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "gpu_lm_head.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
