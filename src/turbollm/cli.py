"""`turbollm`: generate, chat and bench from the command line.

User errors (bad model path, bad parameter, over-long prompt) print one line and exit 2;
there is never a traceback for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from turbollm.config import (
    CacheConfig,
    ModelConfig,
    ParallelConfig,
    QuantizationConfig,
    SchedulerConfig,
    SpeculativeConfig,
    field_help,
)
from turbollm.errors import TurbollmError
from turbollm.sampling_params import SamplingParams
from turbollm.server.options import ServerOptions

_ENGINE_SECTIONS = (
    ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig, QuantizationConfig, SpeculativeConfig,
)
_SAMPLING_FLAGS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "n", "stop", "ignore_eos", "min_tokens",
)


def _arg_type(annotation: object) -> tuple[Callable[[str], Any], bool]:
    """(converter, is_bool) for a field annotation such as 'int | None' (a string here)."""
    first = str(annotation).split(" ")[0]
    return {"int": int, "float": float}.get(first, str), first == "bool"


def add_config_flags(parser: argparse.ArgumentParser, sections: Sequence[type], only: Sequence[str] = ()) -> None:
    """One --flag per config field, with the field's docstring line as its help."""
    for cls in sections:
        helps = field_help(cls)
        group = parser.add_argument_group(cls.__doc__.strip() if cls.__doc__ else cls.__name__)
        for f in dataclasses.fields(cls):
            if only and f.name not in only or f.name not in helps:
                continue
            flag = "--" + f.name.replace("_", "-")
            conv, is_bool = _arg_type(f.type)
            if is_bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helps[f.name])
            elif f.name == "stop":
                group.add_argument(flag, action="append", default=None, help=helps[f.name])
            else:
                group.add_argument(flag, type=conv, default=None, help=helps[f.name])


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine fields the user set on the command line."""
    names = {f.name for cls in _ENGINE_SECTIONS for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def sampling_params(args: argparse.Namespace, defaults: dict[str, Any]) -> SamplingParams:
    """SamplingParams from the model's defaults overridden by the flags given."""
    given = {k: getattr(args, k) for k in _SAMPLING_FLAGS if getattr(args, k, None) is not None}
    return SamplingParams(**{**defaults, **given})


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, [SamplingParams], only=_SAMPLING_FLAGS)


def _make_llm(args: argparse.Namespace) -> Any:
    from turbollm.engine.llm import LLM

    opts = engine_options(args)
    return LLM(opts.pop("model", None), **opts)


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = list(args.prompts)
    if args.file:
        with open(args.file, encoding="utf-8") as fh:
            prompts += [line.rstrip("\n") for line in fh if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass them as arguments or with --file")
    llm = _make_llm(args)
    params = sampling_params(args, llm.engine.generation_defaults())
    t0 = time.perf_counter()
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    for p, o in zip(prompts, outs, strict=True):
        for c in o.outputs:
            print(f"### {p!r}\n{c.text.strip()}\n[{len(c.token_ids)} tokens, {c.finish_reason}]\n")
    print(f"{len(prompts)} prompts, {n_out} output tokens in {dt:.2f}s: {n_out / dt:.1f} tok/s "
          f"({llm.engine.model_info.device}, {llm.engine.model_info.dtype})")
    spec = llm.engine.stats().spec
    if spec is not None:
        by_pos = " ".join(f"{a:.2f}" for a in spec.acceptance_by_position)
        print(f"speculative: acceptance {spec.acceptance_rate:.1%}, tau {spec.mean_accepted_length:.2f} "
              f"tokens per target pass, by position [{by_pos}]")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = sampling_params(args, llm.engine.generation_defaults())
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("turbollm chat: type a message; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in llm.stream_chat(history, params):
                reply.append(piece)
                print(piece, end="", flush=True)
        except TurbollmError as e:  # e.g. the conversation outgrew the context: say so, go on
            history.pop()
            print(f"turbollm: error: {e}", file=sys.stderr)
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from turbollm.bench.throughput import run_throughput

    return run_throughput(args, engine_options(args))


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from turbollm.bench.latency import run_latency

    return run_latency(args, engine_options(args))


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from turbollm.bench.serve import run_bench_serve

    return run_bench_serve(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from turbollm.server.launcher import run_server

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerOptions)
             if getattr(args, f.name, None) is not None}
    return run_server(engine_options(args), ServerOptions(**given))


def cmd_eval(args: argparse.Namespace) -> int:
    from turbollm.compress.eval_cli import run_eval_compare, run_eval_ppl

    return run_eval_ppl(args) if args.eval_command == "ppl" else run_eval_compare(args)


def cmd_quantize(args: argparse.Namespace) -> int:
    from turbollm.compress.quantize import run_quantize

    return run_quantize(args)


def _add_offline_commands(sub: Any) -> None:
    """`eval ppl|compare` and `quantize` (compress/; flags need no torch import)."""
    from turbollm.compress.flags import add_eval_args, add_quantize_args

    ev = sub.add_parser("eval", help="accuracy: perplexity and agreement on held-out text")
    esub = ev.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    ppl = esub.add_parser("ppl", help="perplexity (with --quantization: beside the unquantized baseline)")
    add_eval_args(ppl, pair=False)
    cmp_ = esub.add_parser("compare", help="top-1 agreement and KL(A||B) of next-token distributions")
    add_eval_args(cmp_, pair=True)
    for p in (ppl, cmp_):
        p.set_defaults(func=cmd_eval)
    quant = sub.add_parser("quantize", help="write a quantized checkpoint (rtn, awq, gptq, fp8)")
    add_quantize_args(quant)
    quant.set_defaults(func=cmd_quantize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbollm", description="Fast inference for Llama-family LLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="complete prompts and print the outputs with tokens/s")
    gen.add_argument("prompts", nargs="*", help="prompts (text)")
    gen.add_argument("--file", help="a text file with one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    chat = sub.add_parser("chat", help="interactive chat that streams tokens as they come")
    chat.add_argument("--system", default=None, help="system message")
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    thr = bsub.add_parser("throughput", help="turbollm vs transformers on the same prompts and weights")
    from turbollm.bench.args import add_throughput_args

    add_throughput_args(thr)
    lat = bsub.add_parser("latency", help="decode tok/s and TTFT per batch size vs the bandwidth roofline")
    from turbollm.bench.args import add_latency_args

    add_latency_args(lat)
    lat.set_defaults(func=cmd_bench_latency)
    bserve = bsub.add_parser("serve", help="load-test an OpenAI-compatible server (TTFT, TPOT, ITL, goodput)")
    from turbollm.bench.args import add_serve_args

    add_serve_args(bserve)
    bserve.set_defaults(func=cmd_bench_serve)
    _add_offline_commands(sub)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, ...)")
    add_config_flags(serve, [ServerOptions])
    for p in (gen, chat, thr, lat, serve):
        add_config_flags(p, _ENGINE_SECTIONS)
    for p in (gen, chat):
        _add_sampling_flags(p)
    gen.set_defaults(func=cmd_generate)
    chat.set_defaults(func=cmd_chat)
    thr.set_defaults(func=cmd_bench)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        return int(args.func(args))
    except (TurbollmError, ValueError, OSError) as e:
        print(f"turbollm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
