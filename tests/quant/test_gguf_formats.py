"""GGUF Q4_0 / Q4_1 linears kept in int4 form (`quantization='gguf'`, quant/gguf_formats.py).

References: gguf-py's `dequantize` for the block conversion; the same file dequantized at load
(the default path) for whole models, whose logits and greedy tokens must match.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from gguf_writing import arch_writer, finish, llama_cpp_permute
from tests_support import run_prefill
from turbollm.config import EngineConfig
from turbollm.models.arch import PRESETS
from turbollm.models.build import build_model
from turbollm.models.loader import ModelSource, resolve_model
from turbollm.quant import grids
from turbollm.quant.gguf_formats import convert_gguf, q4_blocks_to_int4
from turbollm.quant.linear import Int4LinearMethod
from turbollm.quant.plan import QuantPlan, resolve_quantization

CPU = torch.device("cpu")


def _random_blocks(qtype: Q, rows: int, blocks: int, seed: int) -> np.ndarray:
    """uint8 [rows, blocks * block bytes] of random ggml blocks (random d, m, codes), with
    every third block of row 0 given d = 0 (and for Q4_1 a non-zero m)."""
    rng = np.random.default_rng(seed)
    d = (rng.standard_normal((rows, blocks)) * 0.02).astype(np.float16)  # negative d too
    d[0, ::3] = 0.0
    parts = [d[..., None].view(np.uint8)]  # [rows, blocks, 2]
    if qtype == Q.Q4_1:
        m = (rng.standard_normal((rows, blocks)) * 0.1).astype(np.float16)
        m[0, 0] = np.float16(0.3)  # d == 0 there: a constant, non-zero block
        parts.append(m[..., None].view(np.uint8))
    parts.append(rng.integers(0, 256, (rows, blocks, 16), dtype=np.uint8))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=["Q4_0", "Q4_1"])
def test_q4_blocks_match_gguf_dequantize(qtype: Q) -> None:
    raw = _random_blocks(qtype, rows=6, blocks=5, seed=int(qtype))
    want = torch.from_numpy(dequantize(raw, qtype).reshape(6, 160))  # [N, K] float32
    q, s, z = q4_blocks_to_int4(torch.from_numpy(raw), qtype.name)
    assert q.dtype == torch.uint8 and q.shape == (6, 160) and int(q.max()) <= 15
    assert s.shape == z.shape == (6, 5)
    got = grids.dequantize_int4(q, s, z, 32)
    assert want.abs().max() > 0.1
    if qtype == Q.Q4_0:
        assert torch.equal(got, want) and (z == 8).all() and (want[0, :32] == 0).all()
    else:
        # exact up to the float32 rounding of -m/d and of the product
        tol = 4e-7 * (want.abs() + 16 * s.abs().repeat_interleave(32, dim=1))
        assert ((got - want).abs() <= tol).all()
        assert torch.equal(got[0, :32], want[0, :32]) and (got[0, :32] == np.float16(0.3)).all()
        assert torch.equal(got[0, 96:128], want[0, 96:128])  # d == 0, m random: exact too


def test_q4_blocks_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="GGML type 'Q8_0' cannot be kept as int4; only Q4_0, Q4_1"):
        q4_blocks_to_int4(torch.zeros(2, 34, dtype=torch.uint8), "Q8_0")
    with pytest.raises(ValueError, match=r"Q4_1 rows must be uint8 \[N, blocks \* 20\], got torch.uint8 \(2, 18\)"):
        q4_blocks_to_int4(torch.zeros(2, 18, dtype=torch.uint8), "Q4_1")


def test_embedded_kept_rows_equal_dequantized_rows(embedded_gguf: str) -> None:
    """Layer 0's seven Q4_1 linears in block form, converted, equal the dequantized stream:
    names, the Q/K unpermute (rows move with their scales) and the nibble order."""
    src = resolve_model(embedded_gguf)
    dense = {}
    for name, t in src.iter_weights():
        if name.startswith("model.layers.1."):
            break
        dense[name] = t
    kept = {}
    for name, t in convert_gguf(src.iter_weights({"Q4_1"})):
        if name.startswith("model.layers.1."):
            break
        kept[name] = t
    assert kept["model.embed_tokens.weight"].dtype == torch.float32  # Q8_0 embedding: dequantized
    linears = [n.removesuffix(".weight") for n in dense if n.endswith("_proj.weight")]
    assert len(linears) == 7
    for prefix in linears:
        assert f"{prefix}.weight" not in kept
        w = dense[f"{prefix}.weight"]
        s, z = kept[f"{prefix}.scales"], kept[f"{prefix}.zeros"]
        got = grids.dequantize_int4(grids.unpack_int4(kept[f"{prefix}.qweight"]), s, z, 32)
        assert got.shape == w.shape
        err = (got - w).abs().max().item()
        assert err <= 1e-6 * w.abs().max().item(), (prefix, err)


def test_embedded_model_kept_matches_dequantized() -> None:
    """The embedded Q4_1 file: int4 layers built from its blocks give the dequantized model's
    logits (fp32, CPU) to float rounding, and the same greedy tokens."""
    from turbollm.engine.llm import LLM
    from turbollm.sampling_params import SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    kept = LLM(quantization="gguf", device="cpu")
    layer = kept.engine.executor.runner.model.model.layers[3].self_attn.qkv_proj
    assert isinstance(layer.quant_method, Int4LinearMethod) and not hasattr(layer, "weight")
    assert layer.qweight.shape == (960, 288) and layer.scales.shape == (960, 18)
    assert not layer.int4_integer_zeros  # Q4_1's free offsets: the tensor-core path keeps its correction
    src = resolve_model(None)
    ids = kept.get_tokenizer()("To be, or not to be, that is the question")["input_ids"]
    want_model = build_model(src, CPU, torch.float32)
    got = run_prefill(kept.engine.executor.runner.model, ids)
    want = run_prefill(want_model, ids)
    assert (got - want).abs().max().item() < 1e-3 * want.abs().max().item()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    del want_model
    got_tokens = [o.outputs[0].token_ids for o in kept.generate(prompts, params, use_tqdm=False)]
    del kept
    dense = LLM(device="cpu")
    want_tokens = [o.outputs[0].token_ids for o in dense.generate(prompts, params, use_tqdm=False)]
    assert got_tokens == want_tokens and all(len(t) == 8 for t in got_tokens)


# ------------------------------------------------------------- tiny GGUF files, mixed types

_TO_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _write_tiny_gguf(path: Path, linear_types: dict[str, Q], seed: int = 0) -> None:
    """A tiny-llama GGUF as llama.cpp writes it (Q/K rows permuted), random N(0, 0.08)
    weights, decoder linears in the given types (by HF module name), the rest F32."""
    arch = PRESETS["tiny-llama"]
    rng = np.random.default_rng(seed)
    w = arch_writer(path, arch)
    h, f, kv = arch.hidden_size, arch.intermediate_size, arch.num_key_value_heads * arch.head_dim

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.08).astype(np.float32)

    w.add_tensor("token_embd.weight", normal(arch.vocab_size, h))
    for i in range(arch.num_hidden_layers):
        shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                  "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
        for module, shape in shapes.items():
            a = normal(*shape)
            heads = {"q_proj": arch.num_attention_heads, "k_proj": arch.num_key_value_heads}.get(module)
            if heads:  # convert_hf_to_gguf.py's permute: rotate-half rows -> interleaved pairs
                a = llama_cpp_permute(a, heads)
            qt = linear_types[module]
            name = f"blk.{i}.{_TO_GGUF[module]}.weight"
            if qt == Q.F32:
                w.add_tensor(name, a)
            else:
                w.add_tensor(name, quantize(a, qt), raw_dtype=qt)
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + normal(h))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + normal(h))
    w.add_tensor("output_norm.weight", 1 + normal(h))
    w.add_tensor("output.weight", normal(arch.vocab_size, h))
    finish(w)


def _plan(src: ModelSource, quantization: str | None = "gguf", where: str | None = None) -> QuantPlan | None:
    return resolve_quantization(quantization, 128, src.quantization_config, CPU, where or str(src.path),
                                gguf_linear_types=src.gguf_linear_types())


def test_mixed_q4_0_q4_1_file_is_kept(tmp_path: Path) -> None:
    """Q4_0 and Q4_1 linears in one file (even within merged q/k/v and gate/up) all become
    int4 g32, and the model's logits match the file dequantized at load."""
    types = {"q_proj": Q.Q4_0, "k_proj": Q.Q4_1, "v_proj": Q.Q4_0, "o_proj": Q.Q4_1,
             "gate_proj": Q.Q4_1, "up_proj": Q.Q4_0, "down_proj": Q.Q4_0}
    path = tmp_path / "mixed.gguf"
    _write_tiny_gguf(path, types)
    src = resolve_model(str(path))
    plan = _plan(src)
    assert plan is not None and plan.raw_gguf_types == {"Q4_0", "Q4_1"}
    assert plan.describe() == "gguf Q4_0+Q4_1 (int4 g32)"
    ids = list(range(3, 60))
    want = run_prefill(build_model(src, CPU, torch.float32), ids)
    model = build_model(src, CPU, torch.float32, quantization=plan)
    assert model.model.layers[1].mlp.down_proj.scales.shape == (64, 4)  # type: ignore[union-attr,index]
    got = run_prefill(model, ids)
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()


def test_files_that_cannot_be_kept_give_clear_errors(tmp_path: Path, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    from turbollm.engine.llm import LLM

    types = dict.fromkeys(_TO_GGUF, Q.Q4_1) | {"o_proj": Q.Q8_0}
    path = tmp_path / "q8.gguf"
    _write_tiny_gguf(path, types)
    src = resolve_model(str(path))
    with pytest.raises(ValueError, match=r"keeps only Q4_0/Q4_1 linears, but 2 of 14 are Q8_0 "
                                         r"\(e\.g\. model\.layers\.0\.self_attn\.o_proj\.weight\).*"
                                         r"Q8_0 runs dequantized.*leave quantization unset"):
        _plan(src)
    assert _plan(src, None) is None  # the default: dequantized at load, builds fine
    build_model(src, CPU, torch.float32)
    f32 = tmp_path / "f32.gguf"
    _write_tiny_gguf(f32, dict.fromkeys(_TO_GGUF, Q.F32))
    with pytest.raises(ValueError, match=r"14 of 14 are F32"):
        _plan(resolve_model(str(f32)))
    with pytest.raises(ValueError, match="quantization='gguf' keeps a GGUF file's Q4_0/Q4_1 weights, "
                                         "but the preset model has no GGUF weights"):
        LLM("tiny-llama", quantization="gguf", device="cpu")
    with pytest.raises(ValueError, match=r"dummy.gguf has no GGUF weights \(.*load_format='dummy'\)"):
        _plan(resolve_model(str(path), load_format="dummy"), where=str(tmp_path / "dummy.gguf"))
    hf_path, _ = tiny_checkpoint("tiny-llama")
    with pytest.raises(ValueError, match=f"{hf_path} has no GGUF weights"):
        _plan(resolve_model(hf_path))
    with pytest.raises(ValueError, match="is a quantized safetensors checkpoint"):
        resolve_quantization("gguf", 128, {"quant_method": "turbollm", "method": "int8"}, CPU, "ckpt")
    with pytest.raises(ValueError, match="only a GGUF file has GGML blocks to keep"):
        next(resolve_model(hf_path).iter_weights({"Q4_1"}))
    assert EngineConfig.from_flat(quantization="gguf").quantization.quantization == "gguf"
