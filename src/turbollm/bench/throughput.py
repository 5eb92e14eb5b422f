"""`turbollm bench throughput`: N prompts through turbollm and through transformers.

Same model, same weights, same greedy settings, same run. Each system runs --repeats times
and the median is reported: on CPU in interleaved rounds (a shared 2-core machine drifts by
±25% between minutes), on a GPU transformers after turbollm has released the card, so that
each has all of its memory. Prints output tokens/s for each and the ratios, checks the greedy tokens
agree, and writes JSON with every sample.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import sys
import time
from typing import Any

import torch

from turbollm.bench.hf_baseline import hf_generate, load_hf_model
from turbollm.bench.latency import quant_label
from turbollm.bench.prompts import chat_prompts, random_prompts
from turbollm.core.spec_policy import SpecCounters
from turbollm.bench.report import write_json
from turbollm.engine.llm import LLM
from turbollm.models.build import build_model
from turbollm.sampling_params import SamplingParams


def _turbollm_run(llm: LLM, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=args.ignore_eos)
    before = llm.engine.stats().spec
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    secs = time.perf_counter() - t0
    toks = [o.outputs[0].token_ids for o in outs]
    run = {"name": "turbollm", "num_prompts": len(prompts), "output_tokens": sum(map(len, toks)),
           "seconds": secs, "outputs": toks}
    after = llm.engine.stats().spec
    if before is not None and after is not None:
        run["spec"] = spec_delta(before, after)
    return run


def spec_delta(before: SpecCounters, after: SpecCounters) -> dict[str, Any]:
    """Speculative-decoding metrics of what ran between two stats snapshots."""
    n = len(after.drafted_by_position)
    pad = [0] * (n - len(before.drafted_by_position))
    delta = SpecCounters(
        after.num_verified - before.num_verified,
        after.num_draft_tokens - before.num_draft_tokens,
        after.num_accepted_tokens - before.num_accepted_tokens,
        after.num_emitted_tokens - before.num_emitted_tokens,
        [a - b for a, b in zip(after.drafted_by_position, before.drafted_by_position + pad)],
        [a - b for a, b in zip(after.accepted_by_position, before.accepted_by_position + pad)],
    )
    return delta.as_dict()


def _median_run(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time, with every sample's seconds and the median rate."""
    ordered = sorted(samples, key=lambda r: r["seconds"])
    run = dict(ordered[len(ordered) // 2])
    run["seconds_samples"] = [round(r["seconds"], 3) for r in samples]
    run["tok_per_s"] = run["output_tokens"] / run["seconds"]
    return run


def run_throughput(args: argparse.Namespace, engine_opts: dict[str, Any]) -> int:
    opts = dict(engine_opts)
    if args.compare == "hf" and opts.get("quantization") not in (None, "none"):
        raise ValueError("--compare hf runs transformers on dense weights; with --quantization pass "
                         "--compare none and run the unquantized twin as a second command")
    llm = LLM(opts.pop("model", None), **opts)
    eng = llm.engine
    info = eng.model_info
    if args.dataset == "chat":
        prompts = chat_prompts(eng.tokenizer, args.num_prompts)
    else:
        prompts = random_prompts(info.arch.vocab_size, args.num_prompts, args.input_len)
    device, dtype = eng.executor.runner.device, eng.executor.runner.dtype
    eos = set(eng.eos_token_ids)
    kv_tokens, kv_dtype = eng.kv_capacity_tokens, eng.config.cache.kv_cache_dtype
    # On a GPU transformers runs after turbollm has released its memory, so each system has
    # the whole card (turbollm's KV cache is not cut to make room for a second copy of the
    # weights); on CPU the rounds interleave, so drifting machine speed hits both alike.
    hf_after = args.compare == "hf" and device.type == "cuda"
    hf = None
    if args.compare == "hf" and not hf_after:
        hf = load_hf_model(eng.executor.source, dtype, device, eng.executor.runner.model)
    llm.generate([prompts[0][:8]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    samples: dict[str, list[dict[str, Any]]] = {}
    for rnd in range(args.repeats):
        print(f"round {rnd + 1}/{args.repeats}", file=sys.stderr, flush=True)
        samples.setdefault("turbollm", []).append(_turbollm_run(llm, prompts, args))
        if hf is not None:
            _hf_round(hf, prompts, args, rnd, eos, samples)
    if hf_after:
        source, seed, ours = eng.executor.source, eng.config.model.seed, eng.executor.runner.model
        check = _weights_checksum(ours)
        del llm, eng, ours
        hf = _hf_model_alone(source, dtype, device, seed, check)
        for rnd in range(args.repeats):
            print(f"transformers round {rnd + 1}/{args.repeats}", file=sys.stderr, flush=True)
            _hf_round(hf, prompts, args, rnd, eos, samples)
    runs = [_median_run(v) for v in samples.values()]
    report = _report(args, info, device, dtype, prompts, runs[0], runs[1:])
    report["quantization"] = quant_label(engine_opts)
    report["kv_capacity_tokens"] = kv_tokens
    report["kv_cache_dtype"] = kv_dtype
    report["hf_after_turbollm"] = hf_after
    _print_table(report)
    print(f"KV cache: {kv_tokens} tokens ({kv_dtype})")
    if args.output_json:
        write_json(args.output_json, report)
    return 0


def _hf_round(hf: torch.nn.Module, prompts: list[list[int]], args: argparse.Namespace, rnd: int,
              eos: set[int], samples: dict[str, list[dict[str, Any]]]) -> None:
    """One round of every transformers configuration (one-at-a-time only in round 0: slow)."""
    batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",") if b]
    for bs in ([1] if rnd == 0 else []) + batch_sizes:
        subset = prompts[: args.hf_single_prompts if bs == 1 else args.hf_num_prompts]
        r = hf_generate(hf, subset, bs, args.output_len, args.ignore_eos, eos, min(eos))
        samples.setdefault(r.name, []).append(vars(r))


def _weights_checksum(model: torch.nn.Module) -> list[float]:
    return [float(p.float().sum()) for p in list(model.parameters())[:4]]


def _hf_model_alone(source: Any, dtype: torch.dtype, device: torch.device, seed: int,
                    check: list[float]) -> torch.nn.Module:
    """transformers' model once turbollm's engine is gone (the caller dropped it): dummy
    weights are rebuilt from the same seed (checked against the engine's) and copied over."""
    gc.collect()
    torch.cuda.empty_cache()
    if source.kind != "dummy":
        return load_hf_model(source, dtype, device)
    ours = build_model(source, device, dtype, seed)
    if _weights_checksum(ours) != check:
        raise RuntimeError("rebuilt dummy weights differ from the engine's; transformers would run other weights")
    hf = load_hf_model(source, dtype, device, ours)
    del ours
    gc.collect()
    torch.cuda.empty_cache()
    return hf


def _report(args: argparse.Namespace, info: Any, device: torch.device, dtype: torch.dtype,
            prompts: list[list[int]], ours: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    for r in runs:
        r["turbollm_speedup"] = ours["tok_per_s"] / r["tok_per_s"]
        n = r["num_prompts"]
        r["greedy_match"] = sum(a == b for a, b in zip(ours["outputs"][:n], r["outputs"])) / n
    strip = [{k: v for k, v in r.items() if k != "outputs"} for r in [ours, *runs]]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "model": info.path or "dummy", "dtype": str(dtype).removeprefix("torch."),
        "dataset": args.dataset, "num_prompts": len(prompts),
        "mean_prompt_len": sum(map(len, prompts)) / len(prompts),
        "output_len": args.output_len, "ignore_eos": args.ignore_eos, "repeats": args.repeats,
        "runs": strip,
    }


def _print_table(rep: dict[str, Any]) -> None:
    print(f"\nmodel {rep['model']} ({rep['dtype']}, {rep['host']['device']}), {rep['num_prompts']} prompts "
          f"(mean {rep['mean_prompt_len']:.0f} tokens), up to {rep['output_len']} new tokens"
          f"{', ignore_eos' if rep['ignore_eos'] else ''}")
    print(f"{'run':<24}{'prompts':>8}{'out tok':>9}{'sec':>9}{'tok/s':>9}{'turbollm x':>12}{'same tokens':>13}")
    for r in rep["runs"]:
        sp = f"{r['turbollm_speedup']:.2f}" if "turbollm_speedup" in r else "-"
        gm = f"{100 * r['greedy_match']:.0f}%" if "greedy_match" in r else "-"
        print(f"{r['name']:<24}{r['num_prompts']:>8}{r['output_tokens']:>9}{r['seconds']:>9.2f}"
              f"{r['tok_per_s']:>9.1f}{sp:>12}{gm:>13}")
        if r.get("spec"):
            print(format_spec(r["spec"]))


def format_spec(spec: dict[str, Any]) -> str:
    """One line of speculative-decoding metrics (acceptance, tau, acceptance by position)."""
    by_pos = " ".join(f"{a:.2f}" for a in spec["acceptance_by_position"])
    return (f"  speculative: acceptance {spec['acceptance_rate']:.1%}, tau {spec['mean_accepted_length']:.2f} "
            f"tokens per target pass ({spec['num_verified']} verifications), by position [{by_pos}]")
