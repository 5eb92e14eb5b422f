"""`turbollm quantize` and `turbollm eval` from the command line."""

from __future__ import annotations

import json

import pytest

from turbollm.cli import main


def test_quantize_bad_bits_exit_2(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert main(["quantize", "tiny-llama", "--method", "rtn", "--bits", "3", "--out", str(tmp_path)]) == 2
    assert "--bits 3 is not supported by --method rtn; use 4 or 8" in capsys.readouterr().err


def test_calibrated_methods_need_their_module(capsys: pytest.CaptureFixture[str], tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    if importlib.util.find_spec("turbollm.compress.awq") is not None:
        pytest.skip("compress.awq is present")
    path, _ = tiny_checkpoint("tiny-llama")
    assert main(["quantize", path, "--method", "awq", "--bits", "4", "--group-size", "32",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--method awq is not available" in capsys.readouterr().err


def test_quantize_then_generate(tiny_checkpoint, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_checkpoint("tiny-llama")
    out = tmp_path / "q"
    assert main(["quantize", path, "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    cfg = json.load(open(out / "config.json"))
    assert cfg["quantization_config"] == {"quant_method": "turbollm", "method": "int4", "bits": 4,
                                          "group_size": 32, "act_order": False, "calibration": "rtn"}
    from turbollm.engine.llm import LLM
    from turbollm.sampling_params import SamplingParams

    llm = LLM(str(out), device="cpu")
    outs = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                        use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 5


def test_fp8_keeps_the_last_layer_dense_by_default(tiny_checkpoint, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """--method fp8 keeps the last decoder layer dense unless --keep-last-layers says otherwise;
    other methods keep none; bad counts and methods are refused by name."""
    path, _ = tiny_checkpoint("tiny-llama")  # 2 decoder layers
    last = {f"model.layers.1.{n}" for n in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    runs = {"fp8": ["--method", "fp8", "--bits", "8"],
            "fp8-all": ["--method", "fp8", "--bits", "8", "--keep-last-layers", "0"],
            "fp8-2": ["--method", "fp8", "--bits", "8", "--keep-last-layers", "1",
                      "--quantization-ignore", "model.layers.1.*,model.layers.0.mlp.down_proj"],
            "int8": ["--method", "rtn", "--bits", "8"]}
    kept = {}
    for name, flags in runs.items():
        assert main(["quantize", path, *flags, "--out", str(tmp_path / name)]) == 0
        kept[name] = set(json.load(open(tmp_path / name / "config.json"))["quantization_config"].get("keep_dense", []))
    assert kept == {"fp8": last, "fp8-all": set(), "fp8-2": last | {"model.layers.0.mlp.down_proj"}, "int8": set()}
    capsys.readouterr()
    for flags, msg in ((["--method", "fp8", "--bits", "8", "--keep-last-layers", "3"], "--keep-last-layers 3 must be in [0, 2]"),
                       (["--method", "gptq", "--bits", "4", "--keep-last-layers", "1"], "--keep-last-layers applies to --method rtn or fp8")):
        assert main(["quantize", path, *flags, "--out", str(tmp_path / "bad")]) == 2
        assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_eval_ppl_prints_baseline_beside_quantized(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r.json"
    assert main(["eval", "ppl", "--quantization", "int8", "--window", "48", "--max-windows", "1",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[none]: perplexity" in text and "[int8]: perplexity" in text and "baseline" in text
    rep = json.load(open(out))
    assert rep["protocol"]["window"] == 48 and rep["protocol"]["tokens_scored"] == 47
    assert rep["quantized"][0]["quantization"] == "int8"
    assert rep["quantized"][0]["delta_pct"] == pytest.approx(
        100 * (rep["quantized"][0]["perplexity"] / rep["baseline"]["perplexity"] - 1))


def test_install_calibrated_grids_round_trip_and_check_group_size(tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """What compress.awq / gptq return ({name: q, scales, zeros[, perm]}) becomes int4 layers
    with W_hat unchanged; a grid of another group size is refused by name."""
    import torch

    from turbollm.compress.quantize import install_calibrated
    from turbollm.layers.linear import QuantizableLinear
    from turbollm.models.build import build_model
    from turbollm.models.loader import resolve_model
    from turbollm.quant import grids
    from turbollm.quant.methods import Int4Config

    def dense():  # type: ignore[no-untyped-def]
        return build_model(resolve_model(tiny_checkpoint("tiny-llama")[0]), torch.device("cpu"),
                           torch.float32, prepack_cpu=False)

    model = dense()
    results, w_hats = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizableLinear):
            k = m.weight.shape[1]
            perm = torch.randperm(k)  # act-order: q's columns in perm order
            q, s, z = grids.quantize_int4(m.weight[:, perm], 32)
            w_hats[name] = torch.empty_like(m.weight)
            w_hats[name][:, perm] = grids.dequantize_int4(q, s, z, 32)
            m.weight.data.copy_(w_hats[name])  # the calibrators leave W_hat in place
            results[name] = {"q": q, "scales": s, "zeros": z, "perm": perm}
    assert install_calibrated(model, Int4Config(32, act_order=True), results) == len(w_hats)
    for name, m in model.named_modules():
        if name in w_hats:
            assert torch.equal(m.quant_method.dense_weight(m), w_hats[name])
    with pytest.raises(ValueError, match="2 groups over 64 input columns, not the 64-column groups"):
        install_calibrated(dense(), Int4Config(64), results)


def test_quantize_method_none_needs_kv_cache_scales(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert main(["quantize", "tiny-llama", "--method", "none", "--out", str(tmp_path)]) == 2
    assert "--method none writes only FP8 KV-cache scales: add --kv-cache-scales" in capsys.readouterr().err


def test_kv_cache_scales_need_a_tokenizer(capsys: pytest.CaptureFixture[str], tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_checkpoint("tiny-llama")
    assert main(["quantize", path, "--method", "none", "--kv-cache-scales", "--out", str(tmp_path / "o")]) == 2
    assert "--kv-cache-scales calibrates on text: the model needs a tokenizer" in capsys.readouterr().err


def test_eval_kv_flags_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "ppl", "--kv-cache-dtype", "fp8", "--kv-scales", "amax"]) == 2
    assert "--kv-scales entries must be auto, unit, calibrate; got 'amax'" in capsys.readouterr().err
    assert main(["eval", "ppl", "--kv-cache-dtype", "fp8", "--kv-rotation", "maybe"]) == 2
    assert "--kv-rotation entries must be on or off" in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_kv_cache_scales_embedded(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """`turbollm quantize --kv-cache-scales` calibrates on the calibration part and writes the
    scales; LLM(DIR, kv_cache_dtype='fp8') loads them (rotation on, as calibrated)."""
    from safetensors import safe_open

    from turbollm.compress import quantize as quantize_mod
    from turbollm.engine.llm import LLM
    from turbollm.layers.attention import attention_layers
    from turbollm.sampling_params import SamplingParams

    monkeypatch.setattr(quantize_mod, "DEFAULT_CALIB", (2, 64))  # keep the CPU test short
    out = tmp_path / "q8kv"
    assert main(["quantize", "--method", "rtn", "--bits", "8", "--kv-cache-scales", "--out", str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        k0 = f.get_tensor("model.layers.0.self_attn.k_scale")
        assert f.get_tensor("model.layers.0.self_attn.k_rotation").item() == 1.0
    assert k0.numel() == 1 and 0 < k0.item() < 1  # amax * 2 / 448 for k of magnitude ~10-30
    llm = LLM(str(out), device="cpu", kv_cache_dtype="fp8")
    attns = attention_layers(llm.engine.executor.runner.model)  # type: ignore[attr-defined]
    assert attns[0].k_scale == k0.item() and all(a.rotate_qk for a in attns)
    text = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=4),
                        use_tqdm=False)[0].outputs[0].text
    assert "Paris" in text


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_float_zero_checkpoint_reloads_to_identical_logits(method: str, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A calibrated model with fractional zeros installs, saves and reloads to the same
    logits, which are the calibrator's W_hat model's."""
    import torch
    from compressutil import random_windows

    from turbollm.compress.evaluate import window_hidden
    from turbollm.compress.quantize import calibrated_quantizer, calibration_config, install_calibrated
    from turbollm.models.build import build_model
    from turbollm.models.loader import resolve_model
    from turbollm.quant.checkpoint import save_quantized
    from turbollm.quant.methods import Int4Config
    from turbollm.quant.plan import resolve_quantization

    src = resolve_model(tiny_checkpoint("tiny-qwen2")[0])
    cpu = torch.device("cpu")
    model = build_model(src, cpu, torch.float32, prepack_cpu=False)
    config = Int4Config(32, calibration=method)
    settings = {"zero_point": "float", **({"act_order": True, "static_groups": True} if method == "gptq" else {})}
    results = calibrated_quantizer(method)(model, random_windows(src.arch.vocab_size, 2, 24),
                                           config=calibration_config(method, config, settings))
    assert all("perm" not in r for r in results.values())
    zeros = torch.cat([r["zeros"].flatten() for r in results.values()])
    assert not torch.equal(zeros, zeros.round())
    def run_prefill(m, ids):  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            return m.compute_logits(window_hidden(m, ids))

    ids = list(range(5, 40))
    w_hat_logits = run_prefill(model, ids)
    install_calibrated(model, config, results)
    want = run_prefill(model, ids)
    torch.testing.assert_close(want, w_hat_logits, rtol=1e-4, atol=1e-4)
    save_quantized(model, config, str(tmp_path), src.arch.to_hf_config())
    qsrc = resolve_model(str(tmp_path))
    plan = resolve_quantization(None, 128, qsrc.quantization_config, cpu)
    got = run_prefill(build_model(qsrc, cpu, torch.float32, quantization=plan), ids)
    assert torch.equal(got, want)


def test_calibration_settings_are_checked(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    from turbollm.compress.quantize import calibration_config
    from turbollm.quant.methods import Int4Config

    out = ["--out", str(tmp_path)]
    assert main(["quantize", "--method", "awq", "--damp", "0.1", *out]) == 2
    assert "--damp applies to --method gptq only" in capsys.readouterr().err
    assert main(["quantize", "--method", "rtn", "--zero-point", "float", *out]) == 2
    assert "--zero-point applies to --method awq / gptq only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "gptq", "--zero-point", "half", *out])
    assert "invalid choice: 'half'" in capsys.readouterr().err
    assert main(["quantize", "--method", "awq", "--act-order", *out]) == 2
    assert "--act-order applies to --method gptq only" in capsys.readouterr().err
    cfg = calibration_config("gptq", Int4Config(64), {"zero_point": "integer", "damp": 0.05})
    assert (cfg.group_size, cfg.zero_point, cfg.damp) == (64, "integer", 0.05)
    assert cfg.act_order and cfg.static_groups  # the default: act-order codes kept in input order
    dynamic = calibration_config("gptq", Int4Config(64, act_order=True))
    assert dynamic.act_order and not dynamic.static_groups
    with pytest.raises(ValueError, match="asks for the runtime permutation"):
        calibration_config("gptq", Int4Config(64, act_order=True), {"static_groups": True})
    with pytest.raises(ValueError, match="--damp does not apply to --method awq"):
        calibration_config("awq", Int4Config(64), {"damp": 0.1})


def test_tune_flag(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    from turbollm.compress.quantize import calibration_config
    from turbollm.compress.tune import TuneConfig
    from turbollm.quant.methods import Int4Config

    out = ["--out", str(tmp_path)]
    assert main(["quantize", "--method", "rtn", "--tune", "2", *out]) == 2
    assert "--tune applies to --method awq / gptq only" in capsys.readouterr().err
    assert main(["quantize", "--method", "gptq", "--tune", "-1", *out]) == 2
    assert "--tune -1 must be >= 0" in capsys.readouterr().err
    assert calibration_config("gptq", Int4Config(64)).tune is None  # off by default: --method gptq is GPTQ
    assert calibration_config("gptq", Int4Config(64), {"tune": TuneConfig()}).tune == TuneConfig()
    assert calibration_config("awq", Int4Config(64), {"tune": TuneConfig(epochs=3)}).tune.epochs == 3
    assert not calibration_config("awq", Int4Config(64)).gptq  # AWQ rounds to nearest by default (AutoAWQ)
    assert calibration_config("awq", Int4Config(64), {"gptq": True}).gptq  # --rounding gptq
    assert main(["quantize", "--method", "gptq", "--rounding", "nearest", *out]) == 2
    assert "--rounding applies to --method awq only" in capsys.readouterr().err
