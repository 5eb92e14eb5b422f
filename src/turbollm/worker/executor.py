"""Executor: the engine's one handle on the workers.

With one rank it owns a ModelRunner and calls it directly; several ranks (a later stage)
will run one ModelRunner per process behind the same interface. It also resolves the model
source once, so the engine can read the model's facts and load its tokenizer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from turbollm.config import EngineConfig
from turbollm.core.plan import StepPlan, StepResult
from turbollm.errors import ModelLoadError
from turbollm.models.arch import ModelArch
from turbollm.models.loader import ModelSource, resolve_model
from turbollm.worker.model_runner import ModelRunner, PendingStep


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the loaded model the engine needs (host side)."""

    arch: ModelArch
    max_model_len: int
    generation_defaults: dict[str, Any]
    source_kind: str
    path: str | None
    device: str
    dtype: str


class Executor:
    """Runs StepPlans on the model; one rank, direct calls."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.source: ModelSource = resolve_model(config.model.model, config.model.load_format)
        max_len = self._max_model_len(self.source.arch)
        self.runner = ModelRunner(config, self.source, max_len)
        self.info = ModelInfo(
            arch=self.source.arch,
            max_model_len=max_len,
            generation_defaults=dict(self.source.generation_defaults),
            source_kind=self.source.kind,
            path=self.source.path,
            device=str(self.runner.device),
            dtype=str(self.runner.dtype).removeprefix("torch."),
        )

    def _max_model_len(self, arch: ModelArch) -> int:
        asked = self.config.model.max_model_len
        if asked is None:
            return arch.max_position_embeddings
        if asked > arch.max_position_embeddings:
            raise ModelLoadError(
                f"max_model_len={asked} exceeds the model's context of {arch.max_position_embeddings}"
            )
        return asked

    def load_tokenizer(self) -> Any:
        """The model's tokenizer (transformers), or None for dummy weights without one."""
        return self.source.load_tokenizer(self.config.model.tokenizer)

    def initialize_cache(self) -> int:
        """Size and allocate the KV cache; returns the number of blocks."""
        num_blocks = self.runner.determine_num_blocks()
        self.runner.init_kv_cache(num_blocks)
        return num_blocks

    def execute(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        result = self.runner.execute(plan)
        # Measured step costs drive the adaptive speculation length (core/spec_policy.py).
        result.step_seconds = result.step_seconds or time.perf_counter() - t0
        return result

    def execute_async(self, plan: StepPlan) -> PendingStep:
        """Queue the step; its StepResult comes from `.result()` (see ModelRunner)."""
        return self.runner.execute_async(plan)

    @property
    def overlap_steps(self) -> bool:
        """Whether the engine should plan step N+1 while step N runs (async_scheduling).

        Not with speculative decoding: proposing needs the previous step's tokens on the host."""
        if self.config.speculative.speculative_method is not None:
            return False
        mode = self.config.scheduler.async_scheduling
        return mode == "on" or (mode == "auto" and self.runner.device.type == "cuda")
