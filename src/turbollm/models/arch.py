"""ModelArch: the shape and numerics of a Llama-family checkpoint (CPU, plain data).

Built by the loader from a HF config.json, GGUF metadata, or a named preset; read by the
model constructor. Frozen: one per loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from turbollm.errors import ModelLoadError, ModelNotFoundError


@dataclass(frozen=True)
class ModelArch:
    """Everything the Llama-family decoder needs to know about a checkpoint."""

    architecture: str
    """HF architecture name: LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """None for plain RoPE, else a dict with 'rope_type' ('linear' | 'llama3' | ...) and its knobs."""
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2; Llama with attention_bias)."""
    o_bias: bool = False
    """Bias on the output projection (Llama with attention_bias)."""
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    sliding_window: int | None = None
    """Attention window (Mistral, Qwen2 with use_sliding_window): a query sees the last `window` keys."""

    @property
    def model_type(self) -> str:
        """The HF model_type ('llama' | 'mistral' | 'qwen2') of this architecture."""
        return _ARCH_TO_MODEL_TYPE[self.architecture]

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> ModelArch:
        """Build a ModelArch from a HF config.json dict (llama, mistral or qwen2).

        Accepts both the transformers-4 rope form (`rope_theta` + `rope_scaling`) and the
        transformers-5 form (`rope_parameters`). Optional keys take the defaults of the
        matching transformers config class. Raises ModelLoadError naming the offending key
        for a missing or mistyped value, or listing the supported architectures.
        """
        if not isinstance(d, dict):
            raise ModelLoadError(f"config must be a JSON object, got {type(d).__name__}")
        architecture = _architecture_of(d)
        model_type = _ARCH_TO_MODEL_TYPE[architecture]
        defaults = _HF_DEFAULTS[model_type]
        act = _get(d, "hidden_act", str, "silu")
        if act not in ("silu", "swish"):
            raise ModelLoadError(f"config: hidden_act {act!r} is not supported (only 'silu')")
        hidden = _get(d, "hidden_size", int)
        heads = _get(d, "num_attention_heads", int)
        layers = _get(d, "num_hidden_layers", int)
        if d.get("head_dim") is None and heads > 0 and hidden % heads:
            raise ModelLoadError(
                f"config: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
                "and no head_dim is given"
            )
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        elif model_type == "llama":
            qkv_bias = o_bias = _get(d, "attention_bias", bool, False)
        else:
            qkv_bias = o_bias = False
        rope_theta, rope_scaling = _parse_rope(d)
        arch = cls(
            architecture=architecture,
            vocab_size=_get(d, "vocab_size", int),
            hidden_size=hidden,
            intermediate_size=_get(d, "intermediate_size", int),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=_get(d, "num_key_value_heads", int, heads),
            head_dim=_get(d, "head_dim", int, hidden // heads if heads > 0 else 0),
            rms_norm_eps=_get(d, "rms_norm_eps", float, 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=_get(
                d, "max_position_embeddings", int, defaults["max_position_embeddings"]
            ),
            tie_word_embeddings=_get(d, "tie_word_embeddings", bool, False),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=_get(d, "mlp_bias", bool, False) if model_type == "llama" else False,
            bos_token_id=_get(d, "bos_token_id", int, defaults["bos_token_id"]),
            eos_token_ids=_parse_eos(d.get("eos_token_id", defaults["eos_token_id"])),
            sliding_window=_sliding_window(d, model_type, layers),
        )
        arch.validate()
        return arch

    def to_hf_config(self) -> dict[str, Any]:
        """A config dict that transformers 5.x (AutoConfig / {Llama,Mistral,Qwen2}Config) accepts.

        Used by tests and benchmarks to build a reference transformers model of the same
        shape. Rope is written as `rope_parameters` (rope_theta folded in).
        """
        self.validate()
        model_type = self.model_type
        rope: dict[str, Any] = dict(self.rope_scaling or {"rope_type": "default"})
        rope["rope_theta"] = self.rope_theta
        eos: int | list[int] | None = list(self.eos_token_ids) or None
        if eos is not None and len(eos) == 1:
            eos = eos[0]
        cfg: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        }
        if model_type == "llama":
            cfg["attention_bias"] = self.qkv_bias
            cfg["mlp_bias"] = self.mlp_bias
        elif model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
        else:  # qwen2: a window, when set, applies to every layer (max_window_layers=0)
            cfg["use_sliding_window"] = self.sliding_window is not None
            cfg["sliding_window"] = self.sliding_window
            cfg["max_window_layers"] = 0 if self.sliding_window is not None else self.num_hidden_layers
        return cfg

    def validate(self) -> None:
        """Raise ModelLoadError if the fields are inconsistent (shapes, biases per family)."""
        if self.architecture not in _ARCH_TO_MODEL_TYPE:
            raise ModelLoadError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim must be even for RoPE, got {self.head_dim}")
        expected = _FAMILY_BIASES.get(self.model_type)
        if expected is not None and (self.qkv_bias, self.o_bias, self.mlp_bias) != expected:
            raise ModelLoadError(
                f"{self.architecture} has fixed biases (qkv, o, mlp) = {expected}, got "
                f"{(self.qkv_bias, self.o_bias, self.mlp_bias)}"
            )
        if self.model_type == "llama" and self.qkv_bias != self.o_bias:
            raise ModelLoadError("LlamaForCausalLM has one attention_bias: qkv_bias must equal o_bias")


SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_ARCH_TO_MODEL_TYPE = dict(zip(SUPPORTED_ARCHITECTURES, ("llama", "mistral", "qwen2"), strict=True))
_MODEL_TYPE_TO_ARCH = {v: k for k, v in _ARCH_TO_MODEL_TYPE.items()}
# (qkv_bias, o_bias, mlp_bias) that a family always has; llama's are configurable.
_FAMILY_BIASES = {"mistral": (False, False, False), "qwen2": (True, False, False)}
# Defaults of the transformers config classes for keys a config.json may omit.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None},
}
_REQUIRED: Any = object()


def _get(d: dict[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """d[key] checked against kind (int excludes bool; float accepts int); null means absent."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ModelLoadError(f"config: missing required key {key!r}")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ModelLoadError(
            f"config: {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _architecture_of(d: dict[str, Any]) -> str:
    """The supported HF architecture named by `architectures` (else `model_type`)."""
    archs = d.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ModelLoadError(f"config: 'architectures' must be a list of names, got {archs!r}")
        for name in archs:
            if name in _ARCH_TO_MODEL_TYPE:
                return name
        raise ModelLoadError(
            f"unsupported architecture {archs!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    model_type = d.get("model_type")
    if model_type is None:
        raise ModelLoadError("config: missing required key 'architectures' (or 'model_type')")
    if model_type not in _MODEL_TYPE_TO_ARCH:
        raise ModelLoadError(
            f"unsupported model_type {model_type!r}; supported: "
            f"{', '.join(_MODEL_TYPE_TO_ARCH)} ({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return _MODEL_TYPE_TO_ARCH[model_type]


def _parse_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, normalized rope_scaling) from either config form.

    The scaling dict is None for plain RoPE, else a copy keyed by 'rope_type' (legacy files
    say 'type') without 'rope_theta'.
    """
    key = "rope_parameters" if d.get("rope_parameters") is not None else "rope_scaling"
    raw = d.get(key)
    if raw is not None and not isinstance(raw, dict):
        raise ModelLoadError(f"config: {key!r} must be an object, got {raw!r}")
    scaling = dict(raw or {})
    theta = scaling.pop("rope_theta", None)
    if theta is None:
        theta = _get(d, "rope_theta", float, 10000.0)
    elif isinstance(theta, bool) or not isinstance(theta, int | float):
        raise ModelLoadError(f"config: '{key}.rope_theta' must be a number, got {theta!r}")
    legacy_type = scaling.pop("type", None)
    rope_type = scaling.pop("rope_type", legacy_type)
    if not scaling and rope_type in (None, "default"):
        return float(theta), None
    if not isinstance(rope_type, str):
        raise ModelLoadError(f"config: {key!r} needs a string 'rope_type', got {raw!r}")
    if rope_type == "default":
        return float(theta), None
    return float(theta), {"rope_type": rope_type, **scaling}


def _parse_eos(value: Any) -> tuple[int, ...]:
    """eos_token_id as int, list of ints or null → tuple of ids (order kept, duplicates dropped)."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ModelLoadError(f"config: 'eos_token_id' must be an int or a list of ints, got {value!r}")
    return tuple(dict.fromkeys(items))


def _sliding_window(d: dict[str, Any], model_type: str, num_layers: int) -> int | None:
    """The attention window applying to every layer, or None; mixed layouts are rejected."""
    if model_type == "llama":
        return None
    # An explicit null means "no window"; an absent key takes the transformers default.
    window = _get(d, "sliding_window", int, None) if "sliding_window" in d else 4096
    if model_type == "mistral" or window is None:
        return window
    if not _get(d, "use_sliding_window", bool, False):
        return None
    types = d.get("layer_types")
    if isinstance(types, list) and types:
        sliding = [t == "sliding_attention" for t in types]
    else:
        first = _get(d, "max_window_layers", int, 28)
        sliding = [i >= first for i in range(num_layers)]
    if all(sliding):
        return window
    if not any(sliding):
        return None
    raise ModelLoadError("config: qwen2 with sliding attention on only some layers is not supported")


def _llama3_rope(original: int, factor: float = 8.0) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original,
    }


_LLAMA3_8B = ModelArch(
    architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=8192, bos_token_id=128000, eos_token_ids=(128001, 128009),
)
_TINY_LLAMA = ModelArch(
    architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
    bos_token_id=1, eos_token_ids=(2,),
)

PRESETS: dict[str, ModelArch] = {
    "llama-2-7b": ModelArch(
        architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=4096,
        intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama-3-8b": _LLAMA3_8B,
    "llama-3.1-8b": replace(
        _LLAMA3_8B, rope_scaling=_llama3_rope(8192), max_position_embeddings=131072,
        eos_token_ids=(128001, 128008, 128009),
    ),
    "smollm2-135m": ModelArch(
        architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
        eos_token_ids=(2,),
    ),
    "mistral-7b": ModelArch(
        architecture="MistralForCausalLM", vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,),
    ),
    "qwen2-7b": ModelArch(
        architecture="Qwen2ForCausalLM", vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=32768, qkv_bias=True, bos_token_id=151643,
        eos_token_ids=(151643, 151645),
    ),
    # Tiny shapes for tests and CPU smoke runs (random weights).
    "tiny-llama": _TINY_LLAMA,
    "tiny-llama3": replace(
        _TINY_LLAMA, rope_theta=500000.0, rope_scaling=_llama3_rope(128),
        tie_word_embeddings=True,
    ),
    "tiny-qwen2": replace(
        _TINY_LLAMA, architecture="Qwen2ForCausalLM", qkv_bias=True, rms_norm_eps=1e-6,
        rope_theta=1e6, bos_token_id=None, eos_token_ids=(2, 3),
    ),
    "tiny-mistral": replace(_TINY_LLAMA, architecture="MistralForCausalLM", rope_theta=1e6),
}


def get_preset(name: str) -> ModelArch:
    """The named preset; ModelNotFoundError listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}"
        ) from None
