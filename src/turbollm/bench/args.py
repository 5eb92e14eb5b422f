"""Command-line flags of the benchmarks (kept apart so `--help` needs no torch import)."""

from __future__ import annotations

import argparse


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=32, help="prompts to run")
    p.add_argument("--output-len", type=int, default=128, help="most new tokens per prompt")
    p.add_argument("--dataset", choices=("chat", "random"), default="chat",
                   help="chat: varied questions in the chat template; random: random token ids")
    p.add_argument("--input-len", type=int, default=128, help="prompt length for --dataset random")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --output-len tokens")
    p.add_argument("--compare", choices=("hf", "none"), default="hf",
                   help="hf: also run transformers' generate on the same model and weights (dummy "
                        "weights are copied into it; on a GPU it runs after turbollm has released the card)")
    p.add_argument("--hf-single-prompts", type=int, default=8,
                   help="prompts for the transformers one-at-a-time baseline (a rate is compared)")
    p.add_argument("--hf-batch-sizes", default="8,16,32",
                   help="comma-separated static batch sizes for the transformers baseline")
    p.add_argument("--hf-num-prompts", type=int, default=None,
                   help="prompts for the transformers static batches (default: all; a rate is compared)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved rounds; the median of each system is reported")
    p.add_argument("--output-json", default=None, help="write the results here as JSON")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer <key>")
    p.add_argument("--num-prompts", type=int, default=32, help="requests per rate")
    p.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")],
                   help="Poisson arrival rates in requests/s (several: a sweep; inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--input-len", type=int, default=128, help="random prompt length in tokens")
    p.add_argument("--output-len", type=int, default=64, help="new tokens per request (ignore_eos)")
    p.add_argument("--prompt-file", default=None, help="text prompts, one per line, instead of random")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and arrival times")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput SLO on time to first token")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput SLO on time per output token")
    p.add_argument("--output-json", default=None, help="write the results here as JSON")
    p.add_argument("--plot", default=None, help="write a PNG of latency against request rate (matplotlib)")


def add_latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,8,32,64,128,256", help="comma-separated batch sizes")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (random ids)")
    p.add_argument("--output-len", type=int, default=256, help="new tokens per request (ignore_eos)")
    p.add_argument("--output-json", default=None, help="write the results here as JSON")
