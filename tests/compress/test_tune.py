"""Grid tuning (compress/tune.py): its plain-PyTorch forward is the engine's, tuning keeps the
codes, lowers the distance to the float model, and hands back a grid that rebuilds it."""

from __future__ import annotations

import pytest
import torch
from compressutil import random_windows, tiny_model

from turbollm.compress import _int4
from turbollm.compress.awq import AWQConfig, awq_quantize_model
from turbollm.compress.calibration import find_linears, forward_window
from turbollm.compress.gptq import GPTQConfig, gptq_quantize_model
from turbollm.compress.tune import TuneConfig, _Grid, student_hidden, tune_grids


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_student_forward_is_the_engine_forward(preset: str) -> None:
    model = tiny_model(preset)
    windows = random_windows(model.arch.vocab_size, 2, 40)
    result = gptq_quantize_model(model, windows, config=GPTQConfig(group_size=32))
    grids = {n: _Grid(g, torch.device("cpu")) for n, g in result.items()}
    with torch.no_grad():
        got = student_hidden(model, grids, windows[1])
    torch.testing.assert_close(got, forward_window(model, windows[1]), rtol=1e-4, atol=1e-4)


def _distance(model: torch.nn.Module, ref: torch.nn.Module, windows: list[torch.Tensor]) -> float:
    return sum(((forward_window(model, w) - forward_window(ref, w)) ** 2).mean().item() for w in windows)


def test_tuning_keeps_codes_and_moves_toward_the_float_model() -> None:
    ref = tiny_model("tiny-llama")
    model = tiny_model("tiny-llama")
    windows = random_windows(ref.arch.vocab_size, 4, 64)
    result = gptq_quantize_model(model, windows, config=GPTQConfig(group_size=32))
    codes = {n: g["q"].clone() for n, g in result.items()}
    before = _distance(model, ref, windows)
    history = tune_grids(model, ref, result, windows, TuneConfig(epochs=3, lr=3e-3))
    assert history[-1] < history[0]
    assert _distance(model, ref, windows) < 0.8 * before
    linears = {f"model.layers.{n}": m for n, m in find_linears(model.model.layers).items()}
    for name, grid in result.items():
        assert torch.equal(grid["q"], codes[name])
        torch.testing.assert_close(linears[name].weight,
                                   _int4.dequantize(grid["q"], grid["scales"], grid["zeros"], 32))


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_methods_tune_when_asked(method: str) -> None:
    ref = tiny_model("tiny-llama")
    windows = random_windows(ref.arch.vocab_size, 3, 48)
    dist = []
    for tune in (None, TuneConfig(epochs=3, lr=3e-3)):
        model = tiny_model("tiny-llama")
        if method == "awq":
            awq_quantize_model(model, windows, config=AWQConfig(group_size=32, tune=tune))
        else:
            gptq_quantize_model(model, windows, config=GPTQConfig(group_size=32, tune=tune))
        dist.append(_distance(model, ref, windows))
    assert dist[1] < 0.8 * dist[0], dist


def test_bad_tune_options() -> None:
    with pytest.raises(ValueError, match="lr=0"):
        TuneConfig(lr=0).check()
    with pytest.raises(ValueError, match="epochs=-1"):
        TuneConfig(epochs=-1).check()
