"""Calibrated FP8 W8A8 (compress/fp8_calib.py) and `turbollm quantize --method fp8 --calibrate`,
on CPU with tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from compressutil import correlated_inputs, random_windows, tiny_model
from turbollm.cli import main
from turbollm.compress import fp8_calib
from turbollm.compress.evaluate import window_hidden
from turbollm.compress.fp8_calib import Fp8CalibConfig, fp8_calibrate_model
from turbollm.layers.linear import QuantizableLinear
from turbollm.models.build import build_model, prepack_cpu_linears
from turbollm.models.loader import resolve_model
from turbollm.quant import grids
from turbollm.quant.checkpoint import save_quantized
from turbollm.quant.linear import Fp8LinearMethod
from turbollm.quant.methods import Fp8Config
from turbollm.quant.plan import resolve_quantization

CPU = torch.device("cpu")


def run_prefill(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of one prompt prefilled from position 0."""
    with torch.inference_mode():
        return model.compute_logits(window_hidden(model, ids))  # type: ignore[operator]


def _heavy_tailed(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.exp(0.7 * torch.randn(n, k, generator=g)) * 0.02


def test_e4m3_rounds_to_nearest_even_and_saturates() -> None:
    x = torch.tensor([1.0625, 1.1875, 17.0, 449.0, -1000.0, 2.0**-10, 0.75 * 2.0**-9, 0.3])
    want = torch.tensor([1.0, 1.25, 16.0, 448.0, -448.0, 0.0, 2.0**-9, 0.3125])
    assert torch.equal(fp8_calib.e4m3(x), want)
    # amax / 448 scales: the codes are the runtime's (grids.quantize_fp8) bit for bit.
    w = _heavy_tailed(16, 64, 0)
    q, s = grids.quantize_fp8(w)
    assert torch.equal(fp8_calib.amax_scales(w), s)
    assert torch.equal(s[:, None] * fp8_calib.e4m3(w / s[:, None]), q.float() * s[:, None])


@pytest.mark.parametrize("weighted", [False, True])
def test_scale_search_never_worse_than_amax_and_usually_better(weighted: bool) -> None:
    w = _heavy_tailed(64, 256, 1)
    d = torch.exp(torch.randn(256, generator=torch.Generator().manual_seed(2))) if weighted else None
    base = fp8_calib.weighted_error(w, fp8_calib.amax_scales(w), d)
    s = fp8_calib.search_weight_scales(w, d)
    found = fp8_calib.weighted_error(w, s, d)
    assert (found <= base).all()
    assert found.sum() < 0.97 * base.sum()  # the search does find better scales
    # A grid of only 1.0 is exactly amax / 448.
    assert torch.equal(fp8_calib.search_weight_scales(w, d, (1.0, 1.0, 1)), fp8_calib.amax_scales(w))


def test_gptq_fp8_beats_rounding_on_correlated_inputs_and_equals_it_for_diagonal_h() -> None:
    k, n = 96, 48
    x = correlated_inputs(k, 2048, seed=3)  # [T, K]
    w = _heavy_tailed(n, k, 4)
    s = fp8_calib.amax_scales(w)
    h = 2 * x.t() @ x / x.shape[0]
    rtn = s[:, None] * fp8_calib.e4m3(w / s[:, None])
    q = fp8_calib.gptq_fp8(w, h, s, damp=0.01, block_size=32)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    gptq = q.float() * s[:, None]

    def out_err(w_hat: torch.Tensor) -> float:
        return float((x @ (w - w_hat).t()).square().mean())

    assert out_err(gptq) < 0.7 * out_err(rtn)
    # Lazy blocks are an implementation detail: one block, or many, compensate alike.
    for bs in (8, k):
        other = fp8_calib.gptq_fp8(w, h, s, damp=0.01, block_size=bs).float() * s[:, None]
        assert out_err(other) == pytest.approx(out_err(gptq), rel=0.05)
    # Act-order rounds the columns in another order but returns the codes in input order.
    ordered = fp8_calib.gptq_fp8(w, h, s, damp=0.01, block_size=32, act_order=True).float() * s[:, None]
    assert out_err(ordered) < 0.7 * out_err(rtn) and not torch.equal(ordered, gptq)
    # Uncorrelated channels: nothing to compensate, GPTQ is plain rounding.
    for act_order in (False, True):
        q_diag = fp8_calib.gptq_fp8(w, torch.diag(torch.exp(torch.randn(k))), s, block_size=32, act_order=act_order)
        assert torch.equal(q_diag.float() * s[:, None], rtn)


def test_smoothing_keeps_the_float_model_and_moves_the_range() -> None:
    model = tiny_model("tiny-llama", seed=5)
    ids = list(range(3, 40))
    before = window_hidden(model, ids)
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(6)
    sizes = {"self_attn.qkv_proj": layer.self_attn.qkv_proj.weight.shape[1],
             "mlp.gate_up_proj": layer.mlp.gate_up_proj.weight.shape[1],
             "mlp.down_proj": layer.mlp.down_proj.weight.shape[1]}
    amax = {n: torch.exp(2 * torch.randn(k, generator=g)) for n, k in sizes.items()}
    w_qkv = layer.self_attn.qkv_proj.weight.clone()
    fp8_calib.smooth_decoder_layer(layer, amax, alpha=0.5)
    after = window_hidden(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(layer.self_attn.qkv_proj.weight, w_qkv)  # the weights did move


def test_bad_calibration_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="smooth_alpha must be in"):
        Fp8CalibConfig(smooth_alpha=1.5)
    with pytest.raises(ValueError, match="scale_grid"):
        Fp8CalibConfig(scale_grid=(1.1, 1.2, 5))
    model = tiny_model("tiny-llama", seed=7)
    with pytest.raises(ValueError, match=r"keep_dense pattern 'model.layers.7.\*' matches no decoder linear"):
        fp8_calibrate_model(model, random_windows(model.arch.vocab_size, 2, 24),
                            Fp8CalibConfig(keep_dense=("model.layers.7.*",)))
    with pytest.raises(ValueError, match="keep either all or none of layer 1"):
        fp8_calibrate_model(model, random_windows(model.arch.vocab_size, 2, 24),
                            Fp8CalibConfig(smooth_alpha=0.5, keep_dense=("model.layers.1.mlp.*",)))


def _linears(model: torch.nn.Module) -> dict[str, QuantizableLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizableLinear)}


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_calibrated_checkpoint_reloads_to_identical_logits(tiny_checkpoint, tmp_path, alpha: float | None) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_checkpoint("tiny-llama")
    src = resolve_model(path)
    ids = list(range(5, 45))
    dense = build_model(src, CPU, torch.float32, prepack_cpu=False)
    want_dense = run_prefill(build_model(src, CPU, torch.float32), ids)
    rtn = run_prefill(build_model(src, CPU, torch.float32, quantization=resolve_quantization("fp8", 128, None, CPU)), ids)
    cfg = Fp8CalibConfig(scale_search=alpha is not None, smooth_alpha=alpha,
                         keep_dense=("model.layers.1.*",) if alpha is None else ())
    kept = fp8_calibrate_model(dense, random_windows(src.arch.vocab_size, 4, 32), cfg)
    layers = _linears(dense)
    assert set(kept) == ({n for n in layers if n.startswith("model.layers.1.")} if alpha is None else set())
    for n, m in layers.items():
        assert isinstance(m.quant_method, Fp8LinearMethod) == (n not in kept)
    prepack_cpu_linears(dense)
    want = run_prefill(dense, ids)
    assert not torch.equal(want, rtn) and not torch.equal(want, want_dense)
    save_quantized(dense, Fp8Config("gptq+search"), str(tmp_path), src.arch.to_hf_config())
    qcfg = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert qcfg["method"] == "fp8" and qcfg["calibration"] == "gptq+search"
    assert sorted(qcfg.get("keep_dense", [])) == sorted(kept)
    qsrc = resolve_model(str(tmp_path))
    plan = resolve_quantization(None, 128, qsrc.quantization_config, CPU)
    assert plan is not None and plan.prequantized and plan.config == Fp8Config("gptq+search")
    reloaded = build_model(qsrc, CPU, torch.float32, quantization=plan)
    assert torch.equal(run_prefill(reloaded, ids), want)


def test_quantize_cli_fp8_calibrate_and_bad_flags(tiny_checkpoint, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_checkpoint("tiny-llama")
    out = tmp_path / "q"
    bad = [
        (["--method", "rtn", "--bits", "8", "--calibrate"], "--calibrate applies to --method fp8"),
        (["--method", "fp8", "--bits", "8", "--smooth-alpha", "0.5"], "--smooth-alpha applies to --method fp8 --calibrate only"),
        (["--method", "fp8", "--bits", "8", "--calibrate", "--smooth-alpha", "2"], "smooth_alpha must be in [0, 1]; got 2.0"),
        (["--method", "fp8", "--bits", "8", "--calibrate", "--no-gptq"], "changes nothing"),
        (["--method", "fp8", "--bits", "8", "--scale-search"], "--scale-search applies to --method fp8 --calibrate only"),
        (["--method", "gptq", "--bits", "4", "--quantization-ignore", "*.down_proj"], "--quantization-ignore applies to --method rtn or fp8"),
    ]
    for flags, msg in bad:
        assert main(["quantize", path, *flags, "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
    # The calibrated model needs text: a tokenizer-less checkpoint is refused by name.
    assert main(["quantize", path, "--method", "fp8", "--bits", "8", "--calibrate", "--out", str(out)]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_fp8_calibrate_embedded_runs_in_the_engine(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`turbollm quantize --method fp8 --calibrate` on the embedded SmolLM2 writes an FP8
    checkpoint (e4m3 weights, fp32 scales, the ignored layer dense) that LLM(DIR) serves."""
    from safetensors import safe_open

    from turbollm.engine.llm import LLM
    from turbollm.sampling_params import SamplingParams

    out = tmp_path / "fp8c"
    assert main(["quantize", "--method", "fp8", "--bits", "8", "--calibrate", "--calib-windows", "2",
                 "--calib-window-len", "64", "--quantization-ignore", "model.layers.29.*", "--out", str(out)]) == 0
    qcfg = json.load(open(out / "config.json"))["quantization_config"]
    assert qcfg["calibration"] == "gptq" and len(qcfg["keep_dense"]) == 4
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.float32
        assert f.get_tensor("model.layers.29.mlp.down_proj.weight").dtype == torch.float32
    llm = LLM(str(out), device="cpu")
    text = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=4),
                        use_tqdm=False)[0].outputs[0].text
    assert "Paris" in text

