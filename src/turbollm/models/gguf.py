"""GGUF files: metadata → ModelArch, tensors → HF-named float32 torch tensors (CPU).

The loader owns one GGUFFile (models/gguf_reader.py) per source; its tensor data is
memory-mapped, so `iter_gguf_weights` dequantizes one tensor at a time and never holds the
file twice. Opening parses only the header (no per-token objects for the vocabulary).

Two llama.cpp conventions are undone here:
- GGUF shapes list the innermost dimension first (ggml `ne`, GGUFTensor.dims); numpy/torch
  order is the reverse (GGUFTensor.shape), which is what this module uses.
- llama.cpp's converter permutes the rows of Q and K (weights and biases) of `llama` models so
  that rotary pairs are interleaved (x0, x1), (x2, x3) ...; HF models use rotate-half pairs
  (x_i, x_{i+d/2}). `unpermute_rotary` restores the HF row order. `qwen2` is not permuted.
- Llama 3's rope scaling is stored as a `rope_freqs` tensor of per-frequency divisors rather
  than metadata; `_llama3_scaling_from_factors` recovers the HF `rope_scaling` dict from it.

Block form (opt-in, `raw_types`): decoder-linear weights whose GGML type the caller names are
not dequantized; they are yielded as `<HF prefix>.ggml_<type>` (`raw_leaf`, e.g.
`model.layers.0.self_attn.q_proj.ggml_q4_1`), uint8 [out, row bytes]: each row is that output
row's ggml blocks, bytes as in the file, rows in HF order (the Q/K unpermute moves whole rows,
so every block keeps its own scale). quant/gguf_formats.py turns them into int4 tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from turbollm.errors import ModelLoadError
from turbollm.models.arch import ModelArch
from turbollm.models.gguf_reader import GGUF_MAGIC, GGUFFile, GGUFFormatError

_Q = GGMLQuantizationType
SUPPORTED_TENSOR_TYPES: frozenset[GGMLQuantizationType] = frozenset({
    _Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1,
    # K-quants: dequantized by gguf-py (the same code transformers uses); the common
    # format of published GGUF files.
    _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K,
})
"""Tensor types iter_gguf_weights can dequantize; anything else is a ModelLoadError at open."""

_GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Architectures whose Q/K rows llama.cpp permuted to interleaved rotary pairs.
_PERMUTED_ARCHS = frozenset({"llama"})

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_DECODER_LINEARS = frozenset({"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"})
"""GGUF block tensor kinds that are decoder linears (the layers quantization applies to)."""
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors that carry no HF parameter: consumed into ModelArch (rope_freqs) or ignored.
_NON_PARAMETER_TENSORS = frozenset({"rope_freqs.weight"})

_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def open_gguf(path: str) -> GGUFFile:
    """Open a GGUF file (memory-mapped); ModelLoadError if it is not one or is truncated."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e.strerror or e}") from e
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return GGUFFile(path)
    except GGUFFormatError as e:
        raise ModelLoadError(f"corrupt GGUF file {path}: {e}") from e
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e.strerror or e}") from e


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor name, or None if it has none."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved → rotate-half), per head.

    w: [n_head * head_dim, ...] (a weight or a bias). llama.cpp wrote, per head,
    rows reshape(2, head_dim/2).T; this reshapes (head_dim/2, 2) and transposes back.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelLoadError(f"cannot unpermute {rows} rows into {n_head} rotary heads")
    half = rows // n_head // 2
    pairs = w.reshape(n_head, half, 2, *w.shape[1:])  # [n_head, head_dim/2, 2, ...] interleaved
    return pairs.swapaxes(1, 2).reshape(w.shape)  # [n_head, 2, head_dim/2, ...] → [rows, ...]


def arch_from_gguf(reader: GGUFFile, path: str) -> ModelArch:
    """ModelArch from GGUF metadata (general.architecture 'llama' | 'qwen2') and tensor names.

    Validates the tensor set too (every tensor mappable, every type supported), so an
    unsupported file fails here rather than halfway through iter_gguf_weights.
    """
    meta = _Metadata(reader, path)
    gguf_arch = meta.get("general.architecture", str)
    if gguf_arch not in _GGUF_ARCHS:
        raise ModelLoadError(
            f"{path}: unsupported GGUF architecture {gguf_arch!r}; supported: {', '.join(_GGUF_ARCHS)}"
        )
    tensors = _check_tensors(reader, path)
    a = gguf_arch
    hidden = meta.get(f"{a}.embedding_length", int)
    heads = meta.get(f"{a}.attention.head_count", int)
    head_dim = meta.get(f"{a}.attention.key_length", int, hidden // heads)
    rope_dim = meta.get(f"{a}.rope.dimension_count", int, head_dim)
    if rope_dim != head_dim:
        raise ModelLoadError(f"{path}: partial rotary ({rope_dim} of {head_dim} dims) is not supported")
    theta = meta.get(f"{a}.rope.freq_base", float, 10000.0)
    vocab = meta.get(f"{a}.vocab_size", int, 0) or _embedding_rows(reader, path)
    arch = ModelArch(
        architecture=_GGUF_ARCHS[gguf_arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta.get(f"{a}.feed_forward_length", int),
        num_hidden_layers=meta.get(f"{a}.block_count", int),
        num_attention_heads=heads,
        num_key_value_heads=meta.get(f"{a}.attention.head_count_kv", int, heads),
        head_dim=head_dim,
        rms_norm_eps=meta.get(f"{a}.attention.layer_norm_rms_epsilon", float, 1e-6),
        rope_theta=theta,
        rope_scaling=_rope_scaling(meta, reader, a, theta, head_dim),
        max_position_embeddings=meta.get(f"{a}.context_length", int, 4096),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", int, None),
        eos_token_ids=tuple(dict.fromkeys(
            t for key in ("eos", "eot", "eom")
            if (t := meta.get(f"tokenizer.ggml.{key}_token_id", int, None)) is not None
        )),
    )
    try:
        arch.validate()
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    return arch


def generation_defaults_from_gguf(reader: GGUFFile, path: str) -> dict[str, object]:
    """Sampling defaults recorded under general.sampling.* (rare); {} when absent."""
    meta = _Metadata(reader, path)
    out: dict[str, object] = {}
    for key, name in _SAMPLING_KEYS.items():
        value = meta.get(key, int if name == "top_k" else float, None)
        if value is not None:
            out[name] = value
    return out


def raw_leaf(type_name: str) -> str:
    """The leaf name under which a decoder linear's weight of GGML type `type_name` (e.g.
    'Q4_1') is yielded in block form: 'ggml_q4_1'."""
    return "ggml_" + type_name.lower()


def _is_linear_weight(gguf_name: str) -> bool:
    """Whether a GGUF tensor is a decoder linear's weight (blk.N.attn_q.weight, ...)."""
    m = _BLOCK_RE.fullmatch(gguf_name)
    return m is not None and m.group(2) in _DECODER_LINEARS and m.group(3) == "weight"


def linear_tensor_types(reader: GGUFFile) -> dict[str, str]:
    """HF weight name -> GGML type name (e.g. 'Q4_1') of every decoder-linear weight."""
    return {hf_name(t.name): t.tensor_type.name  # type: ignore[misc]
            for t in reader.tensors if _is_linear_weight(t.name)}


def iter_gguf_weights(
    reader: GGUFFile, arch: ModelArch, raw_types: Collection[str] = ()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, CPU tensor in torch shape) for each parameter tensor, in file order.

    Float32, dequantized, except decoder-linear weights whose GGML type name is in
    `raw_types`: those come in block form (module docstring), uint8 [out, row bytes].
    """
    permuted = _gguf_arch(reader) in _PERMUTED_ARCHS
    if raw_types and reader.endian != "<":
        raise ModelLoadError(f"{reader.path}: a big-endian GGUF file cannot keep its blocks (dequantize it)")
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:  # rope_freqs: already folded into arch.rope_scaling
            continue
        raw = t.tensor_type.name in raw_types and _is_linear_weight(t.name)
        # [out, row bytes] uint8 blocks, or [out, in] / [n] float
        w = t.data if raw else dequantize(t.data, t.tensor_type).reshape(t.shape)
        if permuted and ".attn_q." in t.name:
            w = unpermute_rotary(w, arch.num_attention_heads)
        elif permuted and ".attn_k." in t.name:
            w = unpermute_rotary(w, arch.num_key_value_heads)
        if raw:
            name = f"{name.removesuffix('.weight')}.{raw_leaf(t.tensor_type.name)}"
        else:
            w = np.asarray(w, dtype=np.float32)
        if not (w.flags.writeable and w.flags.c_contiguous):
            w = np.array(w, copy=True, order="C")  # detach from the read-only memory map
        yield name, torch.from_numpy(w)


def llama3_rope_factors(
    theta: float, head_dim: int, factor: float, low_freq_factor: float,
    high_freq_factor: float, original_max_position_embeddings: int,
) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as `rope_freqs` for Llama 3 scaling. [head_dim/2]"""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, medium))
    return out.astype(np.float32)


class _Metadata:
    """Typed access to GGUF key/values; errors name the key and the file."""

    def __init__(self, reader: GGUFFile, path: str) -> None:
        self._fields = reader.fields
        self.path = path

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        field = self._fields.get(key)
        if field is None:
            if default is ...:
                raise ModelLoadError(f"{self.path}: GGUF metadata lacks required key {key!r}")
            return default
        if field.type == GGUFValueType.ARRAY:
            raise ModelLoadError(f"{self.path}: GGUF key {key!r} is an array, expected {kind.__name__}")
        try:
            value = field.value()
        except GGUFFormatError as e:
            raise ModelLoadError(f"corrupt GGUF file {self.path}: key {key!r}: {e}") from e
        if kind is float and isinstance(value, float):
            # float32 metadata: keep the shortest decimal that round-trips (1e-05, not 9.99e-06)
            return float(str(np.float32(value))) if field.type == GGUFValueType.FLOAT32 else value
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ModelLoadError(f"{self.path}: GGUF key {key!r} must be {kind.__name__}, got {value!r}")
        return value


def _gguf_arch(reader: GGUFFile) -> str:
    return str(reader.fields["general.architecture"].value())


def _check_tensors(reader: GGUFFile, path: str) -> set[str]:
    """Names of all tensors, after checking each maps to a HF name and has a supported type."""
    names = set()
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(sorted(q.name for q in SUPPORTED_TENSOR_TYPES))
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} has unsupported GGUF type {t.tensor_type.name}; "
                f"supported: {supported}"
            )
        if hf_name(t.name) is None and t.name not in _NON_PARAMETER_TENSORS:
            raise ModelLoadError(f"{path}: unexpected GGUF tensor {t.name!r} (not a Llama-family weight)")
        names.add(t.name)
    if "token_embd.weight" not in names:
        raise ModelLoadError(f"{path}: GGUF file has no token_embd.weight tensor")
    return names


def _embedding_rows(reader: GGUFFile, path: str) -> int:
    """Vocabulary size from the embedding's shape ([vocab, hidden])."""
    t = reader.get_tensor("token_embd.weight")
    if t is not None:
        return t.shape[0]
    raise ModelLoadError(f"{path}: GGUF file has no token_embd.weight tensor")


def _rope_scaling(
    meta: _Metadata, reader: GGUFFile, a: str, theta: float, head_dim: int
) -> dict[str, Any] | None:
    """HF rope_scaling from {a}.rope.scaling.* metadata, or from a Llama 3 rope_freqs tensor."""
    kind = meta.get(f"{a}.rope.scaling.type", str, None)
    factor = meta.get(f"{a}.rope.scaling.factor", float, None)
    if factor is None:  # pre-2024 files: rope.scale_linear
        factor = meta.get(f"{a}.rope.scale_linear", float, None)
        kind = kind or ("linear" if factor is not None else None)
    original = meta.get(f"{a}.rope.scaling.original_context_length", int, None)
    freqs = reader.get_tensor("rope_freqs.weight")
    if freqs is not None:
        divisors = dequantize(freqs.data, freqs.tensor_type).reshape(-1)
        return _llama3_scaling_from_factors(divisors, theta, head_dim, original, meta.path)
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        if original is not None:
            out["original_max_position_embeddings"] = original
        return out
    raise ModelLoadError(f"{meta.path}: unsupported GGUF rope scaling type {kind!r}")


def _llama3_scaling_from_factors(
    divisors: np.ndarray, theta: float, head_dim: int, original: int | None, path: str
) -> dict[str, Any] | None:
    """Recover Llama 3 rope_scaling (low=1, high=4 as in every Llama 3.x) from rope_freqs.

    The scaling factor is the largest divisor; the original context length comes from the
    metadata or from a divisor in the smoothed band, and the whole vector is then checked.
    """
    if divisors.shape != (head_dim // 2,):
        raise ModelLoadError(f"{path}: rope_freqs has shape {divisors.shape}, expected ({head_dim // 2},)")
    factor = round(float(divisors.max()), 4)  # float32 in the file: 8.000001 means 8
    if np.allclose(divisors, 1.0):
        return None
    low, high = 1.0, 4.0
    if original is None:
        inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        band = np.flatnonzero((divisors > 1.0 + 1e-6) & (divisors < factor * (1 - 1e-6)))
        if band.size == 0:
            raise ModelLoadError(f"{path}: cannot infer Llama 3 rope scaling from rope_freqs")
        i = int(band[band.size // 2])
        smooth = (1.0 / float(divisors[i]) - 1.0 / factor) / (1.0 - 1.0 / factor)
        original = round((smooth * (high - low) + low) * 2 * math.pi / inv_freq[i])
    expected = llama3_rope_factors(theta, head_dim, factor, low, high, original)
    if not np.allclose(divisors, expected, rtol=1e-4, atol=1e-6):
        raise ModelLoadError(f"{path}: rope_freqs does not match Llama 3 rope scaling; unsupported")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(original),
    }
