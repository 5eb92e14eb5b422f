"""FP8 (e4m3) KV cache: same engine, a quarter of the fp32 bytes per token, close logprobs."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import save_file

from turbollm import LLM, SamplingParams
from turbollm.compress.kv_scales import apply_kv_scales, kv_amax, scales_from_amax
from turbollm.errors import ModelLoadError
from turbollm.kernels.prefill_attention import paged_prefill_attention_ref
from turbollm.kernels.rope_cache import rope_and_cache_ref
from turbollm.layers.attention import Attention, AttentionMetadata, attention_layers, check_kv_cache_device
from turbollm.layers.rotary import RotaryEmbedding
from turbollm.models.arch import PRESETS
from turbollm.models.build import build_model
from turbollm.models.loader import resolve_model
from turbollm.quant.checkpoint import save_quantized


def test_fp8_cache_capacity_and_logprobs() -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 250) for _ in range(40)] for _ in range(3)]
    sp = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=0, ignore_eos=True)
    budget = 1 << 20
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM("tiny-llama", load_format="dummy", device="cpu", kv_cache_dtype=kv,
                  cpu_kv_cache_bytes=budget)
        runs[kv] = (llm.engine.kv_capacity_tokens, llm.generate(prompts, sp, use_tqdm=False))
    cap_auto, outs_auto = runs["auto"]
    cap_fp8, outs_fp8 = runs["fp8"]
    assert cap_fp8 == 4 * cap_auto  # fp32 on CPU -> 1 byte per value
    for a, b in zip(outs_auto, outs_fp8, strict=True):
        la = [e.logprob for e in a.prompt_logprobs[1:]]
        lb = [e.logprob for e in b.prompt_logprobs[1:]]
        assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 0.05
        assert la != lb  # the cache really is FP8


def test_bad_kv_cache_dtype() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM("tiny-llama", load_format="dummy", device="cpu", kv_cache_dtype="int4")


# ---- per-layer scales and the Hadamard rotation ------------------------------------------------

def _checkpoint_with(tiny_checkpoint, tmp_path, extra: dict[str, torch.Tensor]) -> str:  # type: ignore[no-untyped-def]
    """A copy of the tiny-llama checkpoint with extra tensors in one more safetensors file."""
    src, _ = tiny_checkpoint("tiny-llama")
    out = tmp_path / "ckpt"
    shutil.copytree(src, out)
    save_file(extra, str(out / "model-extra.safetensors"))
    index = out / "model.safetensors.index.json"
    if index.exists():  # sharded: the index must name the new tensors' file
        data = json.loads(index.read_text())
        data["weight_map"].update({k: "model-extra.safetensors" for k in extra})
        index.write_text(json.dumps(data))
    return str(out)


def _scales(llm: LLM) -> list[tuple[float, float, bool]]:
    model = llm.engine.executor.runner.model  # type: ignore[attr-defined]
    return [(a.k_scale, a.v_scale, a.rotate_qk) for a in attention_layers(model)]


def test_checkpoint_kv_scales_vllm_names(tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """vLLM / llm-compressor scale names load; their scales are for unrotated k (rotation off)."""
    layers = PRESETS["tiny-llama"].num_hidden_layers
    extra = {}
    for i in range(layers):
        if i % 2:
            extra[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.01 * (i + 1))
            extra[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([0.002 * (i + 1)])
        else:
            extra[f"model.layers.{i}.self_attn.k_proj.output_scale"] = torch.tensor(0.01 * (i + 1))
    llm = LLM(_checkpoint_with(tiny_checkpoint, tmp_path, extra), device="cpu", kv_cache_dtype="fp8")
    got = _scales(llm)
    for i, (k, v, rot) in enumerate(got):
        assert k == pytest.approx(0.01 * (i + 1)) and not rot
        assert v == (pytest.approx(0.002 * (i + 1)) if i % 2 else 1.0)
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("bad,match", [
    ({"model.layers.0.self_attn.k_scale": torch.tensor(-1.0)}, "k_scale must be finite and > 0"),
    ({"model.layers.0.self_attn.v_scale": torch.tensor(float("nan"))}, "v_scale must be finite and > 0"),
    ({"model.layers.0.self_attn.k_scale": torch.ones(2)}, "only one scale per layer"),
    ({"model.layers.0.self_attn.k_scale": torch.tensor(0.1)}, "KV-cache scales for 1 of"),
])
def test_bad_checkpoint_kv_scales(tiny_checkpoint, tmp_path, bad, match) -> None:  # type: ignore[no-untyped-def]
    layers = PRESETS["tiny-llama"].num_hidden_layers
    extra = {f"model.layers.{i}.self_attn.k_scale": torch.tensor(0.1) for i in range(1, layers)}
    if "1 of" in match:
        extra = {}
    extra.update(bad)
    with pytest.raises(ModelLoadError, match=match):
        LLM(_checkpoint_with(tiny_checkpoint, tmp_path, extra), device="cpu", kv_cache_dtype="fp8")


def test_calibrated_scales_round_trip(tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Scales calibrated on a model (on rotated k) are saved with it and used by
    LLM(DIR, kv_cache_dtype='fp8'); its logprobs stay close to the fp32 cache's."""
    path, _ = tiny_checkpoint("tiny-llama")
    source = resolve_model(path)
    model = build_model(source, torch.device("cpu"), torch.float32, prepack_cpu=False)
    rng = random.Random(1)
    windows = [[rng.randrange(3, 250) for _ in range(40)] for _ in range(3)]
    k_amax, v_amax = kv_amax(model, windows)
    scales = scales_from_amax(k_amax, v_amax, margin=2.0)
    assert all(s != 1.0 for s in scales.k + scales.v)
    assert scales.k[0] == pytest.approx(float(k_amax[0].max()) * 2.0 / 448.0)
    apply_kv_scales(model, scales)
    out = tmp_path / "scaled"
    save_quantized(model, None, str(out), source.arch.to_hf_config())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    sp = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0, ignore_eos=True)
    scaled = LLM(str(out), device="cpu", kv_cache_dtype="fp8")
    assert _scales(scaled) == [(k, v, True) for k, v in zip(scales.k, scales.v, strict=True)]
    plain = LLM(path, device="cpu")
    a = plain.generate(windows[:1], sp, use_tqdm=False)[0].prompt_logprobs[1:]
    b = scaled.generate(windows[:1], sp, use_tqdm=False)[0].prompt_logprobs[1:]
    la, lb = [e.logprob for e in a], [e.logprob for e in b]
    diffs = [abs(x - y) for x, y in zip(la, lb, strict=True)]
    # FP8 noise on this sharp random model: mean ~0.02, max ~0.06 (also at scale 1). A scale
    # applied on write but not on read (or twice) moves scores by ~100x: off by far more.
    assert max(diffs) < 0.2 and sum(diffs) / len(diffs) < 0.04
    assert la != lb


def test_calibration_measures_rotated_k() -> None:
    """kv_amax reads k as the FP8 cache stores it: rotated where the layer rotates."""
    from turbollm.models.loader import ModelSource

    source = ModelSource("dummy", None, PRESETS["tiny-llama"])
    model = build_model(source, torch.device("cpu"), torch.float32)
    windows = [list(range(3, 40))]
    k_rot, v_rot = kv_amax(model, windows)
    for a in attention_layers(model):
        a.set_rotation(False)
    k_plain, v_plain = kv_amax(model, windows)
    assert torch.equal(v_rot, v_plain)
    assert not torch.allclose(k_rot, k_plain)


def test_torch_attention_scales_and_rotation_match_kernel_semantics() -> None:
    """The layer's torch path (CPU) with an FP8 cache, scales and rotation equals the kernel
    references: rope_and_cache_ref (rotate, scales) then paged_prefill_attention_ref."""
    heads, kv_heads, dim, n = 4, 2, 32, 20
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=g) * 0.05
    rot = RotaryEmbedding(dim, 512, 10000.0, None)
    cos, sin = rot.cos_sin(torch.arange(n), torch.float32)  # [T, 1, D / 2] each
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), block_tables=torch.arange(2)[None, :], seq_lens=torch.tensor([n]),
        query_start_loc=torch.tensor([0, n]), query_lens_cpu=[n], seq_lens_cpu=[n], num_decodes=0,
    )
    layer = Attention(heads, kv_heads, dim)
    layer.set_kv_scales(0.002, 0.0005)  # |k|, |v| ~ 0.05: e4m3(x / scale) is normal, not subnormal
    assert layer.rotate_qk
    cache = torch.zeros(2, 2, 16, kv_heads, dim, dtype=torch.float8_e4m3fn)
    out = layer.forward_qkv(qkv.clone(), (cos, sin), cache, meta)  # [T, H * D]

    ref_qkv, ref_cache = qkv.clone(), torch.zeros_like(cache)
    rope_and_cache_ref(ref_qkv, cos[:, 0].contiguous(), sin[:, 0].contiguous(), ref_cache, meta.slot_mapping,
                       heads, kv_heads, dim, 0.002, 0.0005, rotate=True)
    q = ref_qkv[:, : heads * dim].reshape(n, heads, dim)
    ref = paged_prefill_attention_ref(q, ref_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                                      dim**-0.5, k_scale=0.002, v_scale=0.0005)
    # Same stored bytes up to one e4m3 step where fp32 rounding differs; outputs close.
    a, b = cache.float(), ref_cache.float()
    assert ((a - b).abs() <= b.abs() / 8 + 2**-9).all() and (a == b).float().mean() > 0.99
    torch.testing.assert_close(out.view(n, heads, dim), ref, atol=2e-4, rtol=1e-2)
    # And the result is attention over the unquantized k, v within FP8's error.
    exact = Attention(heads, kv_heads, dim)
    fp32 = exact.forward_qkv(qkv.clone(), (cos, sin), torch.zeros(2, 2, 16, kv_heads, dim), meta)
    err = (out - fp32).norm() / fp32.norm()
    assert 1e-4 < err.item() < 0.06


def test_fp8_cache_rejects_a_gpu_without_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8' needs a GPU with FP8 support.*A100 has 8.0"):
        check_kv_cache_device(torch.float8_e4m3fn, torch.device("cuda"))
    check_kv_cache_device(torch.bfloat16, torch.device("cuda"))  # a bf16 cache is fine
    check_kv_cache_device(torch.float8_e4m3fn, torch.device("cpu"))  # the CPU runs the torch path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rotate", [True, False])
def test_gpu_fp8_cache_scales_end_to_end(tiny_checkpoint, tmp_path, rotate: bool) -> None:  # type: ignore[no-untyped-def]
    """On the GPU (fused rope + cache kernel, decode and prefill kernels, CUDA graphs) an FP8
    cache with calibrated scales, with and without the rotation, stays close to the bf16
    cache's prompt logprobs, and greedy decoding runs."""
    path, _ = tiny_checkpoint("tiny-llama")
    source = resolve_model(path)
    model = build_model(source, torch.device("cpu"), torch.float32, prepack_cpu=False)
    for a in attention_layers(model):
        a.set_rotation(rotate)
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in (40, 300, 7)]
    apply_kv_scales(model, scales_from_amax(*kv_amax(model, prompts)))
    out = tmp_path / "scaled"
    save_quantized(model, None, str(out), source.arch.to_hf_config())
    sp = SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=0, ignore_eos=True)
    # max_num_seqs 4: three prompts need graphs for 1-4 requests only; capturing 4 buckets
    # instead of 13 shortens each LLM's start-up (this test outlasted 120 s test budgets twice).
    ref = LLM(path, device="cuda", max_num_seqs=4).generate(prompts, sp, use_tqdm=False)
    fp8 = LLM(str(out), device="cuda", kv_cache_dtype="fp8", max_num_seqs=4).generate(prompts, sp, use_tqdm=False)
    for a, b in zip(ref, fp8, strict=True):
        la = [e.logprob for e in a.prompt_logprobs[1:]]
        lb = [e.logprob for e in b.prompt_logprobs[1:]]
        diffs = [abs(x - y) for x, y in zip(la, lb, strict=True)]
        assert sum(diffs) / len(diffs) < 0.06 and max(diffs) < 0.4
        assert len(b.outputs[0].token_ids) == 8
