"""Grid tuning (compress/tune.py): its plain-PyTorch forward is the engine's, tuning keeps the
codes, lowers the distance to the float model, and hands back a grid that rebuilds it."""

from __future__ import annotations

import logging

import pytest
import torch
from compressutil import random_windows, tiny_model

from turbollm.compress import _int4
from turbollm.compress.awq import AWQConfig, awq_quantize_model
from turbollm.compress.calibration import find_linears, forward_window
from turbollm.compress.gptq import GPTQConfig, gptq_quantize_model
from turbollm.compress.tune import (
    TuneConfig, _Grid, split_validation, student_hidden, tune_grids, validation_kl,
)


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


def _validation_kls(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [r.args[1] for r in caplog.records if "validation KL" in r.getMessage() and "keeping" not in r.getMessage()]


def test_early_stopping_hands_back_the_best_validated_grids(caplog: pytest.LogCaptureFixture) -> None:
    ref = tiny_model("tiny-llama")
    model = tiny_model("tiny-llama")
    a, c = random_windows(ref.arch.vocab_size, 2, 48)
    windows = [a, a, c, c, a, c]  # validation: windows 1 and 4 (both a); training a, c, c, c
    result = gptq_quantize_model(model, windows, config=GPTQConfig(group_size=32))
    cfg = TuneConfig(epochs=3, lr=0.01, validation=2, validate_every=1)
    with caplog.at_level(logging.INFO, logger="turbollm.compress.tune"):
        tune_grids(model, ref, result, windows, cfg)
    kls = _validation_kls(caplog)
    assert len(kls) == 1 + 3 * 4  # before the first step, then after each of 4 training windows x 3
    best = min(range(len(kls)), key=kls.__getitem__)
    assert 0 < best < len(kls) - 1, kls  # the test needs a best state that is neither the start nor the end
    # the handed-back grid is the best-validated one: rebuild it and measure it again
    _, val = split_validation(windows, 2)
    pieces = [torch.as_tensor(w) for w in val]
    with torch.inference_mode():
        targets = [forward_window(ref, w).clone() for w in pieces]
    grids = {n: _Grid(g, torch.device("cpu")) for n, g in result.items()}
    assert validation_kl(model, grids, pieces, targets) == pytest.approx(kls[best], rel=1e-4)
    assert validation_kl(model, grids, pieces, targets) < kls[-1]


def _gptq_grids(num_windows: int):  # type: ignore[no-untyped-def]
    """(float teacher, GPTQ-quantized student, windows, its grids, a copy of their scales and zeros)."""
    ref = tiny_model("tiny-llama")
    model = tiny_model("tiny-llama")
    windows = random_windows(ref.arch.vocab_size, num_windows, 48)
    result = gptq_quantize_model(model, windows, config=GPTQConfig(group_size=32))
    start = {n: (g["scales"].clone(), g["zeros"].clone()) for n, g in result.items()}
    return ref, model, windows, result, start


def test_early_stopping_keeps_the_start_when_every_step_hurts() -> None:
    ref, model, windows, result, start = _gptq_grids(4)
    tune_grids(model, ref, result, windows, TuneConfig(epochs=1, lr=5.0, validation=1))
    for name, (s, z) in start.items():
        torch.testing.assert_close(result[name]["scales"], s)
        torch.testing.assert_close(result[name]["zeros"], z)


def test_frozen_offsets_keep_the_zero_points() -> None:
    ref, model, windows, result, start = _gptq_grids(3)
    tune_grids(model, ref, result, windows, TuneConfig(epochs=2, lr=3e-3, offset_lr_scale=0))
    for name, (s, z) in start.items():  # b = 0: z = z0 - 0 * e^-a, while the scales move
        torch.testing.assert_close(result[name]["zeros"], z, rtol=0, atol=0)
        assert not torch.equal(result[name]["scales"], s)


def test_validation_windows_are_spread_and_disjoint() -> None:
    windows = [torch.tensor([i, i]) for i in range(8)]
    train, val = split_validation(windows, 2)
    assert [int(w[0]) for w in val] == [2, 6]
    assert [int(w[0]) for w in train] == [0, 1, 3, 4, 5, 7]
    assert split_validation(windows, 0) == (windows, [])
    with pytest.raises(ValueError, match="validation=8"):
        split_validation(windows, 8)


@pytest.mark.parametrize("field,value", [("offset_lr_scale", -1.0), ("offset_lr_scale", float("inf")),
                                         ("validation", -1), ("validate_every", -2)])
def test_bad_overfitting_options(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{field}={value}"):
        TuneConfig(**{field: value}).check()
