"""GPTQ (compress/gptq.py): beats RTN on held-out activations, stays on the contract grid,
act-order's permutation is consistent, and the model-level pass quantizes every linear."""

from __future__ import annotations

import pytest
import torch
from compressutil import correlated_inputs, random_windows, tiny_model

from turbollm.compress import _int4
from turbollm.compress._int4 import RangeSearch
from turbollm.compress.calibration import LinearStats, find_linears, forward_window
from turbollm.compress.gptq import GPTQConfig, gptq_quantize_model, gptq_quantize_weight


def _stats(x: torch.Tensor) -> LinearStats:
    k = x.shape[1]
    st = LinearStats(torch.zeros(k), torch.zeros(k, k))
    st.add(x)
    return st


def _out_mse(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return ((x @ (w_hat - w).T) ** 2).mean().item()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_heldout_activations(group_size: int, act_order: bool) -> None:
    n, k = 96, 256
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(7)) * 0.05
    calib, held = correlated_inputs(k, 2048, seed=1), correlated_inputs(k, 1024, seed=2)
    cfg = GPTQConfig(group_size=group_size, act_order=act_order)
    qw = gptq_quantize_weight(w, _stats(calib).hessian, cfg, group_size)
    rtn = _out_mse(w, _int4.rtn(w, group_size).dequantize(), held)
    gptq = _out_mse(w, qw.dequantize(), held)
    assert gptq < 0.8 * rtn, (gptq, rtn)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_codes_lie_on_the_contract_grid(act_order: bool) -> None:
    n, k, g = 64, 256, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(k, 512, seed=4)
    cfg = GPTQConfig(group_size=g, act_order=act_order, zero_point="integer")  # the HF-compatible grid
    qw = gptq_quantize_weight(w, _stats(x).hessian, cfg, g)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15
    assert qw.scales.shape == qw.zeros.shape == (n, k // g)
    assert (qw.scales > 0).all()
    assert torch.equal(qw.zeros, qw.zeros.round()) and qw.zeros.min() >= 0 and qw.zeros.max() <= 15
    # W_hat (stored column order) re-packs losslessly with the same scales and zeros.
    stored = _int4.dequantize(qw.q, qw.scales, qw.zeros, g)
    assert torch.equal(_int4.quantize(stored, qw.scales, qw.zeros, g, 4), qw.q)


@pytest.mark.parametrize("static", [False, True])
def test_float_zeros_and_range_search_beat_rtn(static: bool) -> None:
    n, k, g = 96, 256, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(7)) * 0.05
    calib, held = correlated_inputs(k, 2048, seed=1), correlated_inputs(k, 1024, seed=2)
    h = _stats(calib).hessian
    plain = gptq_quantize_weight(w, h, GPTQConfig(group_size=g, act_order=True, zero_point="integer",
                                                  range_search=None), g)  # the reference GPTQ
    cfg = GPTQConfig(group_size=g, act_order=True, zero_point="float", range_search=RangeSearch(grid=10),
                     static_groups=static)
    qw = gptq_quantize_weight(w, h, cfg, g)
    assert not torch.equal(qw.zeros, qw.zeros.round())
    # static groups: act-order is only the processing order, codes stay in input order
    assert (qw.perm is None) == static
    rtn = _out_mse(w, _int4.rtn(w, g, zero_point="float").dequantize(), held)
    assert _out_mse(w, qw.dequantize(), held) < 0.6 * rtn
    assert _out_mse(w, qw.dequantize(), held) < _out_mse(w, plain.dequantize(), held)


def test_static_groups_keep_input_order_grids() -> None:
    """With static groups the grid of each input group comes from W before any update, and
    the codes, in input order, lie on it."""
    n, k, g = 32, 128, 32
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(11))
    h = _stats(correlated_inputs(k, 512, seed=12)).hessian
    cfg = GPTQConfig(group_size=g, act_order=True, static_groups=True, zero_point="integer", range_search=None)
    qw = gptq_quantize_weight(w, h, cfg, g)
    lo, hi = _int4.minmax_range(w, g)
    s, z = _int4.scale_zero(lo, hi, 4)
    assert qw.perm is None and torch.equal(qw.scales, s) and torch.equal(qw.zeros, z)
    w_hat = qw.dequantize()
    assert torch.equal(_int4.quantize(w_hat, s, z, g, 4), qw.q)


def test_act_order_permutation_is_consistent() -> None:
    n, k, g = 48, 256, 32
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(5))
    x = correlated_inputs(k, 1024, seed=6)
    h = _stats(x).hessian
    qw = gptq_quantize_weight(w, h, GPTQConfig(group_size=g, act_order=True, static_groups=False), g)
    perm = qw.perm
    assert perm is not None and perm.dtype == torch.int64
    assert torch.equal(torch.sort(perm).values, torch.arange(k))
    d = h.diagonal()[perm]
    assert (d[:-1] >= d[1:]).all(), "columns are not in decreasing diag(H) order"
    # The runtime's x[:, perm] @ W_stored^T equals x @ W_hat^T in the model's column order.
    stored = _int4.dequantize(qw.q, qw.scales, qw.zeros, g)  # [N, K] permuted columns
    torch.testing.assert_close(x[:, perm] @ stored.T, x @ qw.dequantize().T, rtol=1e-4, atol=1e-3)
    # Quantizing without act-order gives another (valid) result: the flag does something.
    plain = gptq_quantize_weight(w, h, GPTQConfig(group_size=g, act_order=False), g)
    assert plain.perm is None and not torch.equal(plain.dequantize(), qw.dequantize())


def test_dead_input_channels_are_zeroed_not_nan() -> None:
    n, k, g = 16, 64, 32
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(8))
    x = correlated_inputs(k, 256, seed=9)
    x[:, 5] = 0.0
    qw = gptq_quantize_weight(w, _stats(x).hessian, GPTQConfig(group_size=g), g)
    w_hat = qw.dequantize()
    assert torch.isfinite(w_hat).all()
    assert torch.allclose(w_hat[:, 5], torch.zeros(n), atol=qw.scales.max().item())


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_model_quantizes_every_decoder_linear_in_place(act_order: bool, static: bool) -> None:
    model = tiny_model("tiny-qwen2")
    ref = tiny_model("tiny-qwen2")
    windows = random_windows(model.arch.vocab_size, 3, 40)
    cfg = GPTQConfig(group_size=32, act_order=act_order, static_groups=static)
    out = gptq_quantize_model(model, windows, config=cfg)
    linears = {f"model.layers.{n}" if not n.startswith("model") else n: m
               for n, m in find_linears(model.model.layers).items()}
    assert set(out) == {f"model.layers.{n}" for n in find_linears(model.model.layers)} == set(linears)
    assert out.float_params == {}
    for name, grid in out.items():
        w_hat = _int4.dequantize(grid["q"], grid["scales"], grid["zeros"], 32)
        if act_order and not static:
            unperm = torch.empty_like(w_hat)
            unperm[:, grid["perm"]] = w_hat
            w_hat = unperm
        else:
            assert "perm" not in grid
        torch.testing.assert_close(linears[name].weight, w_hat)
    # Quantized, close to the float model but not equal to it.
    ids = windows[0]
    y, y_ref = forward_window(model, ids), forward_window(ref, ids)
    assert not torch.equal(y, y_ref)
    assert torch.nn.functional.cosine_similarity(y, y_ref, dim=-1).mean() > 0.9


def test_bad_options_raise_value_errors() -> None:
    model = tiny_model()
    windows = random_windows(model.arch.vocab_size, 1, 16)
    with pytest.raises(ValueError, match="bits=9"):
        gptq_quantize_model(model, windows, bits=9, group_size=32)
    with pytest.raises(ValueError, match="group_size=48"):
        gptq_quantize_model(model, windows, bits=4, group_size=48)
    with pytest.raises(ValueError, match="damp=0"):
        gptq_quantize_model(model, windows, config=GPTQConfig(group_size=32, damp=0))
    with pytest.raises(ValueError, match="zero_point='x'"):
        gptq_quantize_model(model, windows, config=GPTQConfig(group_size=32, zero_point="x"))
    with pytest.raises(ValueError, match="at least one window"):
        gptq_quantize_model(model, [], bits=4, group_size=32)
    with pytest.raises(ValueError, match="no group size"):
        _int4.group_size_for(80, 128, "x")
    assert _int4.group_size_for(576, 128, "x") == 64 and _int4.group_size_for(1536, 128, "x") == 128
