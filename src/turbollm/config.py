"""Engine configuration: a tree of small frozen dataclasses (stdlib only).

Each field has one docstring line right under it; `field_help` reads those lines from the
source so the CLI's `--help` and this file never disagree. Users build an EngineConfig
(directly, through `LLM(**kwargs)` or through CLI flags); every stage reads only its branch.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how to run it."""

    model: str | None = None
    """HF checkpoint directory, .gguf file, or dummy preset name; default: the embedded SmolLM2-135M-Instruct."""
    load_format: str = "auto"
    """auto | safetensors | gguf | dummy (random weights with a preset's shapes)."""
    dtype: str = "auto"
    """auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16."""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda | cuda:N."""
    max_model_len: int | None = None
    """Context length cap in tokens; default: the model's own."""
    seed: int = 0
    """Seed for dummy weights and the random stream of requests that give no seed of their own."""
    tokenizer: str | None = None
    """Tokenizer directory, when it differs from the model's."""
    enforce_eager: bool = False
    """GPU: run every step eagerly instead of replaying CUDA graphs for decode steps."""

    def __post_init__(self) -> None:
        _check_choice("load_format", self.load_format, ("auto", "safetensors", "gguf", "dummy"))
        _check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    """Tokens per KV-cache block."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of a prompt prefix seen before."""
    gpu_memory_utilization: float = 0.9
    """GPU: fraction of the card's memory turbollm may use (weights + activations + KV cache)."""
    cpu_kv_cache_bytes: int = 1 << 30
    """CPU: bytes set aside for the KV cache."""
    num_blocks: int | None = None
    """Exact number of KV blocks, overriding the memory budget (tests, experiments)."""
    kv_cache_dtype: str = "auto"
    """auto (the model's dtype) | fp8 (e4m3, half the bytes of bf16: twice the tokens; per-layer k/v scales from the checkpoint, else 1.0)."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.cpu_kv_cache_bytes < 1:
            raise ValueError(f"cpu_kv_cache_bytes must be > 0, got {self.cpu_kv_cache_bytes}")
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, ("auto", "fp8"))
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_batched_tokens: int = 2048
    """Token budget of one step (prompt chunks + decode tokens)."""
    max_num_seqs: int = 256
    """Most requests running at once."""
    long_prefill_token_threshold: int = 0
    """Cap on one prompt chunk per step, so decodes are not starved; 0: no cap."""
    async_scheduling: str = "auto"
    """auto (on with a GPU) | on | off: plan and launch step N+1 while the device runs step N."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _check_choice("async_scheduling", self.async_scheduling, ("auto", "on", "off"))
        if self.long_prefill_token_threshold < 0:
            raise ValueError(
                "long_prefill_token_threshold must be >= 0, "
                f"got {self.long_prefill_token_threshold}"
            )


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over devices."""

    tensor_parallel_size: int = 1
    """GPUs a layer's weights are split over (1 for now)."""

    def __post_init__(self) -> None:
        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size must be 1 for now, got {self.tensor_parallel_size}"
            )


QUANTIZATION_METHODS = ("none", "int8", "int4", "fp8", "gguf")
INT4_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantizationConfig:
    """Weight quantization (a quantized checkpoint brings its own; these quantize a float one at load)."""

    quantization: str | None = None
    """none | int8 (weight-only) | int4 (weight-only, RTN) | fp8 (W8A8) | gguf (keep a GGUF file's Q4_0/Q4_1 linears as int4 instead of dequantizing them); default: as the checkpoint is (GGUF: dequantized)."""
    group_size: int = 128
    """int4: input columns per scale/zero group (32, 64 or 128; must divide every layer's width)."""
    quantization_ignore: str | None = None
    """Decoder linears kept dense when quantizing at load: comma-separated glob patterns over module names (model.layers.29.*, *.down_proj; q/k/v and gate/up are merged: *.qkv_proj, *.gate_up_proj)."""
    quantize_lm_head: bool = False
    """Also quantize the LM head (RTN, at load) with the model's method; checkpoints keep it dense. Off by default, as in vLLM; gpt-fast and torchao quantize it."""

    def __post_init__(self) -> None:
        if self.quantization_ignore is not None and self.quantization in (None, "none"):
            raise ValueError("quantization_ignore needs a quantization method to leave those linears out of")
        if self.quantization is not None:
            _check_choice("quantization", self.quantization, QUANTIZATION_METHODS)
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}; got {self.group_size}"
            )


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (off unless a method is given)."""

    speculative_method: str | None = None
    """ngram (prompt lookup) | draft (a smaller model with the same tokenizer); default: off."""
    num_speculative_tokens: int = 4
    """Most draft tokens K verified per step and request (the scheduler plans 1 + K tokens)."""
    draft_model: str | None = None
    """Draft for --speculative-method draft: a model like --model, or layers:N (the target's first N layers, norm and LM head)."""
    ngram_min: int = 1
    """Shortest suffix n-gram the ngram method matches in the prompt and output."""
    ngram_max: int = 4
    """Longest suffix n-gram the ngram method tries first."""
    speculative_adaptive: bool = True
    """Choose K per request from its acceptance and the measured step costs (off: always K)."""

    def __post_init__(self) -> None:
        if self.speculative_method is not None:
            _check_choice("speculative_method", self.speculative_method, SPECULATIVE_METHODS)
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(
                f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}"
            )
        if self.speculative_method == "draft" and not self.draft_model:
            raise ValueError("speculative_method 'draft' needs draft_model (a model or layers:N)")
        if self.draft_model and self.speculative_method != "draft":
            raise ValueError(
                f"draft_model={self.draft_model!r} needs speculative_method 'draft', "
                f"got {self.speculative_method!r}"
            )
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(
                f"need 1 <= ngram_min <= ngram_max, got ngram_min={self.ngram_min}, "
                f"ngram_max={self.ngram_max}"
            )

    @property
    def enabled(self) -> bool:
        return self.speculative_method is not None


SPECULATIVE_METHODS = ("ngram", "draft")
"""Values of speculative_method (each names a proposer in spec/)."""


@dataclass(frozen=True)
class EngineConfig:
    """The whole configuration tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    @staticmethod
    def from_flat(**kwargs: object) -> EngineConfig:
        """Build from flat keyword arguments (`LLM(model=..., block_size=...)`)."""
        parts: dict[str, dict[str, object]] = {}
        for name, cls in _SECTIONS.items():
            names = {f.name for f in dataclasses.fields(cls)}
            parts[name] = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        if kwargs:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(kwargs))}")
        return EngineConfig(**{name: _SECTIONS[name](**vals) for name, vals in parts.items()})


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
    "quantization": QuantizationConfig,
    "speculative": SpeculativeConfig,
}


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Map each field of a config dataclass to the docstring line written under it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    helps: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            helps[stmt.target.id] = nxt.value.value.strip()
    return helps


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
