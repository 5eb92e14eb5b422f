"""The CLI: one clear line for user errors, never a traceback; --help lists the commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

from turbollm.cli import build_parser, main


def test_help_lists_commands() -> None:
    text = build_parser().format_help()
    for cmd in ("generate", "chat", "bench"):
        assert cmd in text
    gen_help = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()  # type: ignore[union-attr]
    assert "--model" in gen_help and "--dtype" in gen_help and "--device" in gen_help
    assert "Tokens per KV-cache block" in gen_help  # field docstrings become --help


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "--model", "/no/such/dir", "hi"], "/no/such/dir"),
        (["generate", "--model", "llama-9000", "hi"], "llama-9000"),
        (["generate", "--model", "tiny-llama", "--temperature", "-1", "hi"], "temperature"),
        (["generate", "--model", "tiny-llama", "--block-size", "3", "hi"], "block_size"),
    ],
)
def test_user_errors_are_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_malformed_checkpoint(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text("{not json")
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err


@pytest.mark.slow
def test_generate_and_too_long_prompt_in_a_real_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    prompts = tmp_path / "p.txt"
    prompts.write_text("word " * 40 + "\nshort\n")
    # The two processes run side by side (each spends most of its time importing and loading).
    procs = [subprocess.Popen([sys.executable, "-m", "turbollm.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for args in (("generate", "--device", "cpu", "--max-tokens", "5", "--temperature", "0",
                           "The capital of France is"),
                          ("generate", "--device", "cpu", "--max-model-len", "16", "--file", str(prompts)))]
    (ok_out, ok_err), (_, bad_err) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 0, ok_err
    assert "tok/s" in ok_out and "[5 tokens" in ok_out
    assert procs[1].returncode == 2
    assert bad_err.strip().splitlines()[-1].startswith("turbollm: error: the prompt has")
    assert "Traceback" not in bad_err


def test_speculative_flags_reach_the_engine_options(capsys: pytest.CaptureFixture[str]) -> None:
    from turbollm.cli import engine_options

    for cmd in (["generate", "hi"], ["serve"], ["bench", "throughput"]):
        args = build_parser().parse_args([*cmd, "--speculative-method", "draft", "--draft-model", "layers:4",
                                          "--num-speculative-tokens", "3", "--no-speculative-adaptive"])
        assert engine_options(args) == {"speculative_method": "draft", "draft_model": "layers:4",
                                        "num_speculative_tokens": 3, "speculative_adaptive": False}
    assert main(["generate", "--model", "tiny-llama", "--speculative-method", "eagle", "hi"]) == 2
    assert "speculative_method must be one of ngram, draft; got 'eagle'" in capsys.readouterr().err
