"""`turbollm bench latency`: decode speed per batch size against the bandwidth roofline.

For each batch size B: B prompts of --input-len random tokens, --output-len new tokens
(ignore_eos), one warm-up pass, then a timed pass. Reports time to first token, decode
tokens/s per sequence and in total, and the fraction of the bandwidth roofline: the bytes a
decode step must read (every weight once, plus each sequence's KV cache at the mean
context) divided by the device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import time
from typing import Any

import torch

from turbollm.bench.report import write_json
from turbollm.engine.llm import LLM
from turbollm.sampling_params import SamplingParams


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and written (median of 10).
    Default size: 1 GiB on a GPU, 256 MiB elsewhere (still well past a CPU's caches; the 1 GiB
    copies took ~7 s on 2 CPU cores)."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 28
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_bytes(llm: LLM, batch: int, context: float) -> float:
    """Bytes one decode step reads: all weights at their stored size (quantized ones packed;
    the embedding only for `batch` rows when it is not also the LM head) and `batch` KV caches
    of `context` tokens."""
    model = llm.engine.executor.runner.model
    arch = llm.engine.model_info.arch
    elem = llm.engine.executor.runner.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not arch.tie_word_embeddings:  # the table is only gathered, `batch` rows of it
        weights -= (arch.vocab_size - batch) * arch.hidden_size * elem
    kv_per_token = 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * elem
    return weights + batch * context * kv_per_token


def _run(llm: LLM, prompts: list[list[int]], out_len: int) -> dict[str, float]:
    sp = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    dev = llm.engine.executor.runner.device
    _sync(dev)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    _sync(dev)
    total = time.perf_counter() - t0
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]  # type: ignore[operator]
    decode = [(o.metrics.finished_time - o.metrics.first_token_time) / max(1, out_len - 1)  # type: ignore[operator]
              for o in outs]
    return {"seconds": total, "ttft_ms": 1e3 * statistics.mean(ttft),
            "tpot_ms": 1e3 * statistics.mean(decode),
            "output_tok_s": len(prompts) * out_len / total}


def quant_label(opts: dict[str, Any]) -> str:
    """'none', 'int8', 'int4 g128', 'fp8' (or 'checkpoint' for a quantized checkpoint's own)."""
    q = opts.get("quantization")
    if q in (None, "none"):
        return "none" if q else "as checkpoint"
    return f"int4 g{opts.get('group_size', 128)}" if q == "int4" else str(q)


def run_latency(args: argparse.Namespace, engine_opts: dict[str, Any]) -> int:
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    opts = {"max_num_seqs": max(sizes), **engine_opts}
    llm = LLM(opts.pop("model", None), **opts)
    info = llm.engine.model_info
    dev = llm.engine.executor.runner.device
    bw = copy_bandwidth(dev)
    rng = random.Random(0)
    rows = []
    for b in sizes:
        def fresh() -> list[list[int]]:
            return [[rng.randrange(10, info.arch.vocab_size) for _ in range(args.input_len)] for _ in range(b)]

        # Warm-up on other prompts (kernels compiled, caches touched): the timed prompts must
        # not hit the prefix cache, or TTFT would time a one-block recompute.
        _run(llm, fresh(), min(8, args.output_len))
        prompts = fresh()
        r = _run(llm, prompts, args.output_len)
        context = args.input_len + args.output_len / 2
        roof_step_s = step_bytes(llm, b, context) / bw
        r |= {"batch": b, "decode_tok_s_per_seq": 1e3 / r["tpot_ms"], "decode_tok_s_total": b * 1e3 / r["tpot_ms"],
              "roofline_tok_s_per_seq": 1 / roof_step_s, "roofline_fraction": roof_step_s / (r["tpot_ms"] / 1e3)}
        rows.append(r)
        print(f"batch {b:4d}: TTFT {r['ttft_ms']:8.1f} ms | decode {r['decode_tok_s_per_seq']:7.1f} tok/s/seq, "
              f"{r['decode_tok_s_total']:9.1f} total | roofline {r['roofline_tok_s_per_seq']:7.1f} tok/s/seq "
              f"({100 * r['roofline_fraction']:.0f}%)", flush=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "model": info.path or "dummy", "dtype": info.dtype, "copy_bandwidth_gb_s": bw / 1e9,
        "quantization": quant_label(engine_opts),
        "input_len": args.input_len, "output_len": args.output_len, "rows": rows,
    }
    print(f"copy bandwidth (same run): {bw / 1e9:.0f} GB/s")
    if args.output_json:
        write_json(args.output_json, report)
    return 0
