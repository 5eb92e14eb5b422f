"""AWQ (compress/awq.py): beats RTN on held-out activations, folds scales exactly, stays on
the contract grid, and the model-level pass returns codes + folded norms that reproduce it."""

from __future__ import annotations

import pytest
import torch
from compressutil import correlated_inputs, random_windows, tiny_model

from turbollm.compress import _int4
from turbollm.compress._int4 import RangeSearch
from turbollm.compress.awq import (
    AWQConfig, _fold, _scale_groups, awq_quantize_model, search_clip, search_scale,
)
from turbollm.compress.calibration import LinearStats, find_linears, forward_window
from turbollm.compress.tune import TuneConfig


def _stats(x: torch.Tensor) -> LinearStats:
    k = x.shape[1]
    st = LinearStats(torch.zeros(k), torch.zeros(k, k))
    st.add(x)
    return st


def _out_mse(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return ((x @ (w_hat - w).T) ** 2).mean().item()


@pytest.mark.parametrize("group_size,duo", [(64, False), (128, False), (128, True)])
def test_awq_beats_rtn_on_heldout_activations(group_size: int, duo: bool) -> None:
    n, k = 96, 256
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(7)) * 0.05
    calib, held = correlated_inputs(k, 2048, seed=1), correlated_inputs(k, 1024, seed=2)
    cfg = AWQConfig(group_size=group_size, duo_scaling=duo)
    st = _stats(calib)
    s, alpha = search_scale(w, st, cfg, group_size)
    assert alpha > 0, "salient channels exist, so some scaling must help"
    ws = w * s
    lo, hi = _int4.minmax_range(ws, group_size)
    scaled = _int4.fake_quantize(ws, lo, hi, group_size, 4) / s
    st.scale_inputs(s)
    sc, zc = search_clip(ws, st.hessian, cfg, group_size)
    clipped = _int4.dequantize(_int4.quantize(ws, sc, zc, group_size, 4), sc, zc, group_size) / s
    rtn = _out_mse(w, _int4.rtn(w, group_size).dequantize(), held)
    assert _out_mse(w, scaled, held) < 0.8 * rtn
    assert _out_mse(w, clipped, held) <= _out_mse(w, scaled, held) * 1.02


def test_scaled_stats_match_stats_of_scaled_inputs() -> None:
    x = correlated_inputs(32, 100, seed=3)
    s = torch.rand(32) + 0.5
    st = _stats(x)
    st.scale_inputs(s)
    ref = _stats(x / s)
    torch.testing.assert_close(st.mean_abs, ref.mean_abs)
    torch.testing.assert_close(st.hessian, ref.hessian, rtol=1e-5, atol=1e-5)


def test_clip_search_never_widens_and_freezes_rows() -> None:
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(4))
    h = _stats(correlated_inputs(128, 256, seed=5)).hessian
    autoawq = AWQConfig(zero_point="integer", clip_search=RangeSearch(asymmetric=False, refine=0))
    s, z = search_clip(w, h, autoawq, 64, frozen_rows=4)  # AutoAWQ's: symmetric shrink, no refit
    lo0, hi0 = _int4.minmax_range(w, 64)
    s0, z0 = _int4.scale_zero(lo0, hi0, 4)
    assert (s <= s0).all() and (s >= 0.5 * s0 - 1e-7).all() and torch.equal(z, z.round())
    assert torch.equal(s[:4], s0[:4]) and torch.equal(z[:4], z0[:4])
    assert not torch.equal(s, s0), "no group was clipped: the search did nothing"


@pytest.mark.parametrize("zero_point", ["integer", "float"])
def test_awq_float_zeros_and_asymmetric_search_beat_rtn(zero_point: str) -> None:
    n, k, g = 96, 256, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(7)) * 0.05
    calib, held = correlated_inputs(k, 2048, seed=1), correlated_inputs(k, 1024, seed=2)
    cfg = AWQConfig(group_size=g, zero_point=zero_point,
                    clip_search=RangeSearch(grid=10, max_shrink=0.3, asymmetric=True, refine=2))
    st = _stats(calib)
    s, _ = search_scale(w, st, cfg, g)
    st.scale_inputs(s)
    sc, zc = search_clip(w * s, st.hessian, cfg, g)
    assert torch.equal(zc, zc.round()) == (zero_point == "integer")
    w_hat = _int4.dequantize(_int4.quantize(w * s, sc, zc, g, 4), sc, zc, g) / s
    rtn = _out_mse(w, _int4.rtn(w, g, zero_point=zero_point).dequantize(), held)
    assert _out_mse(w, w_hat, held) < 0.7 * rtn


@pytest.mark.parametrize("preset,kv_heads", [("tiny-llama", 2), ("tiny-qwen2", 4)])
def test_folding_scales_leaves_the_float_layer_unchanged(preset: str, kv_heads: int) -> None:
    """Every scale group (incl. o_proj <- v rows and their bias, without GQA) is an exact
    rewrite of the float model."""
    model = tiny_model(preset, num_key_value_heads=kv_heads)
    groups = [g.linear for g in _scale_groups(model.model.layers[0])]
    assert ("self_attn.o_proj" in groups) == (kv_heads == 4)
    ids = random_windows(model.arch.vocab_size, 1, 24)[0]
    before = forward_window(model, ids)
    gen = torch.Generator().manual_seed(0)
    for layer in model.model.layers:
        for g in _scale_groups(layer):
            k = layer.get_submodule(g.linear).weight.shape[1]
            _fold(layer, g, torch.rand(k, generator=gen) + 0.5, set())
    torch.testing.assert_close(forward_window(model, ids), before, rtol=1e-4, atol=1e-4)


def test_o_proj_group_only_without_gqa() -> None:
    model = tiny_model("tiny-llama")
    names = [g.linear for g in _scale_groups(model.model.layers[0])]
    assert "self_attn.o_proj" not in names  # 4 heads, 2 kv heads
    assert names == ["mlp.down_proj", "self_attn.qkv_proj", "mlp.gate_up_proj"]
    no_gqa = tiny_model("tiny-llama", num_key_value_heads=4)
    assert [g.linear for g in _scale_groups(no_gqa.model.layers[0])][0] == "self_attn.o_proj"


@pytest.mark.parametrize("gptq,tune", [(False, None), (True, None), (True, TuneConfig(epochs=1))])
def test_awq_model_returns_codes_and_folded_params_that_rebuild_it(gptq: bool, tune: TuneConfig | None) -> None:
    """Nearest rounding (AutoAWQ, the default), GPTQ rounding (GPTQConfig.awq: AWQ scales, then
    GPTQ), and GPTQ + tuning."""
    model = tiny_model("tiny-qwen2", num_key_value_heads=4)  # no GQA: o_proj is scaled too
    ref = tiny_model("tiny-qwen2", num_key_value_heads=4)
    windows = random_windows(model.arch.vocab_size, 3, 40)
    out = awq_quantize_model(model, windows, config=AWQConfig(group_size=32, gptq=gptq, tune=tune))
    layers = find_linears(model.model.layers)
    assert set(out) == {f"model.layers.{n}" for n in layers}
    params = dict(model.named_parameters())
    for name, grid in out.items():
        assert grid["q"].dtype == torch.uint8 and int(grid["q"].max()) <= 15 and "perm" not in grid
        w_hat = _int4.dequantize(grid["q"], grid["scales"], grid["zeros"], 32)
        assert torch.equal(_int4.quantize(w_hat, grid["scales"], grid["zeros"], 32, 4), grid["q"])
        torch.testing.assert_close(params[name + ".weight"], w_hat)
    # Folded: both RMSNorms of every layer, and qkv's bias (its v part carries o_proj's 1/s).
    expected = {f"model.layers.{i}.{n}" for i in range(2) for n in (
        "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.qkv_proj.bias")}
    assert set(out.float_params) == expected
    for name, value in out.float_params.items():
        torch.testing.assert_close(params[name], value)
        assert not torch.equal(value, dict(ref.named_parameters())[name])
    ids = windows[0]
    y, y_ref = forward_window(model, ids), forward_window(ref, ids)
    assert torch.nn.functional.cosine_similarity(y, y_ref, dim=-1).mean() > 0.9


def test_awq_bad_options() -> None:
    model = tiny_model()
    windows = random_windows(model.arch.vocab_size, 1, 16)
    with pytest.raises(ValueError, match="bits=1"):
        awq_quantize_model(model, windows, bits=1, group_size=32)
    with pytest.raises(ValueError, match="group_size=100"):
        awq_quantize_model(model, windows, bits=4, group_size=100)
    with pytest.raises(ValueError, match="zero_point='int'"):
        awq_quantize_model(model, windows, config=AWQConfig(group_size=32, zero_point="int"))
    with pytest.raises(ValueError, match="max_shrink=-0.1"):
        awq_quantize_model(model, windows, config=AWQConfig(group_size=32, clip_search=RangeSearch(max_shrink=-0.1)))
