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
                   help="hf: also run transformers' generate on the same model and weights")
    p.add_argument("--hf-single-prompts", type=int, default=8,
                   help="prompts for the transformers one-at-a-time baseline (a rate is compared)")
    p.add_argument("--hf-batch-sizes", default="8,16,32",
                   help="comma-separated static batch sizes for the transformers baseline")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved rounds; the median of each system is reported")
    p.add_argument("--output-json", default=None, help="write the results here as JSON")
