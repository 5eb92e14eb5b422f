"""Shared fixtures: the embedded model, its transformers twin, tiny random checkpoints."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run through the interpreter on CPU. The variable is read when a kernel
    # is decorated (its module's import), and test modules collected before tests/kernels
    # import them via layers/attention.py, so it is set here, before any turbollm import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

    # Triton 3.6's interpreter turns a scalar into a Python int with int(ndarray of shape
    # [1]), which NumPy >= 2.4 rejects, so a loop with a runtime bound (range(start, end))
    # fails under the interpreter only (triton-lang/triton#9171; the fix there squeezes).
    from triton.runtime import interpreter as _interp

    _orig_patch_lang_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
        _orig_patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

from turbollm.models.arch import PRESETS  # noqa: E402
from turbollm.models.loader import embedded_model_path  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_gguf() -> str:
    return embedded_model_path()


@pytest.fixture(scope="session")
def hf_smollm(embedded_gguf: str) -> torch.nn.Module:
    """transformers' LlamaForCausalLM on the embedded GGUF (dequantized, float32)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    d, f = os.path.split(embedded_gguf)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm_tokenizer(embedded_gguf: str):  # type: ignore[no-untyped-def]
    from turbollm.models.loader import load_tokenizer

    return load_tokenizer(embedded_gguf)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[str, torch.nn.Module]]:
    """preset name -> (HF checkpoint dir with random weights, the transformers model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    made: dict[str, tuple[str, torch.nn.Module]] = {}

    def make(preset: str) -> tuple[str, torch.nn.Module]:
        if preset not in made:
            cfg = PRESETS[preset].to_hf_config()
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            torch.manual_seed(1234)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            # Larger weights than the default init, so logits are far from uniform and
            # greedy choices are not near-ties.
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" not in name:
                        p.normal_(0.0, 0.08)
            out = str(tmp_path_factory.mktemp(preset))
            model.save_pretrained(out, max_shard_size="200KB")
            made[preset] = (out, model)
        return made[preset]

    return make
