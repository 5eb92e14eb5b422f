"""What every handler needs: the engine, the options, the metrics, and request preparation
(model check, sampling parameters with caps, tokenization, chat rendering, context check).

Tokenizer contract: the engine's tokenizer belongs to the engine thread. The server works on
its own deep copy, used by one worker thread at a time (`_tok_lock`), so the event loop never
blocks on tokenization and no tokenizer is ever shared between threads.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from turbollm.engine.async_engine import AsyncEngine
from turbollm.sampling_params import SamplingParams
from turbollm.server.errors import APIError, from_value_error
from turbollm.server.metrics import ServerMetrics
from turbollm.server.options import ServerOptions
from turbollm.server.protocol import ChatMessage, SamplingFields

T = TypeVar("T")
_PARAM_NAMES = {f.name for f in dataclasses.fields(SamplingParams)} | {"prompt", "messages"}


class Serving:
    """Shared state of one server (loop thread)."""

    def __init__(self, engine: AsyncEngine, options: ServerOptions, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.options = options
        self.metrics = metrics
        core = engine.engine
        self.max_model_len: int = core.max_model_len
        self.vocab_size: int = core.model_info.arch.vocab_size
        self.defaults: dict[str, Any] = core.generation_defaults()
        self.tokenizer = copy.deepcopy(core.tokenizer) if core.tokenizer is not None else None
        self._tok_lock = asyncio.Lock()
        self.model_name = options.served_model_name or _default_name(core.model_info.path)
        self.chat_template: str | None = None
        if options.chat_template is not None:
            with open(options.chat_template, encoding="utf-8") as fh:
                self.chat_template = fh.read()
        self.draining = False
        self.started = time.time()

    # ---- checks ---------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")

    def sampling_params(self, req: SamplingFields, max_tokens: int | None,
                        logprobs: int | None) -> SamplingParams:
        """SamplingParams from the body over the model's defaults, within the server's caps."""
        o = self.options
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        _cap("n", req.n, o.max_n)
        _cap("stop", len(stops), o.max_stop, what="stop strings")
        for s in stops:
            _cap("stop", len(s), o.max_stop_len, what="characters in a stop string")
        _cap("stop_token_ids", len(req.stop_token_ids or []), o.max_stop, what="stop token ids")
        if logprobs is not None:
            _cap("logprobs", logprobs, o.max_logprobs)
        if max_tokens is not None:
            _cap("max_tokens", max_tokens, self.max_model_len)
        given = {k: getattr(req, k) for k in ("temperature", "top_p", "top_k", "min_p",
                                              "repetition_penalty") if getattr(req, k) is not None}
        try:
            return SamplingParams(
                **{**self.defaults, **given}, n=req.n, stop=stops, seed=req.seed,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
                stop_token_ids=req.stop_token_ids, skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
                max_tokens=max_tokens, logprobs=logprobs,
            )
        except ValueError as e:
            raise from_value_error(e, _PARAM_NAMES) from None

    def check_context(self, prompt_len: int, params: SamplingParams) -> None:
        """400 when prompt + max_tokens exceeds the context; the message gives both lengths."""
        limit = self.max_model_len
        want = prompt_len + (params.max_tokens or 1)
        if prompt_len >= limit or want > limit:
            raise APIError(
                400, f"this model's context length is {limit} tokens, but {want} were requested "
                f"({prompt_len} in the prompt, {want - prompt_len} for the completion); shorten "
                "the prompt or lower max_tokens", param="max_tokens" if prompt_len < limit else
                "prompt", code="context_length_exceeded")

    # ---- tokenizer work (off the loop, one thread at a time) -------------------------------
    async def with_tokenizer(self, fn: Callable[[Any], T]) -> T:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send prompts as token id lists")
        async with self._tok_lock:
            return await asyncio.to_thread(fn, self.tokenizer)

    async def tokenize(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text or id prompt (ids are range-checked)."""
        if isinstance(prompt, list):
            if not prompt:
                raise APIError(400, "a token-id prompt must not be empty", param="prompt")
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary "
                               f"[0, {self.vocab_size})", param="prompt")
            return list(prompt)
        ids = await self.with_tokenizer(
            lambda tok: list(tok(prompt, add_special_tokens=add_special_tokens).input_ids))
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    async def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
        """Token ids of a conversation rendered with the chat template."""
        convo = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                 for m in messages]

        def render(tok: Any) -> list[int]:
            if not (self.chat_template or getattr(tok, "chat_template", None)):
                raise APIError(400, "this model has no chat template; use /v1/completions or "
                               "start the server with --chat-template", param="messages")
            try:
                text = tok.apply_chat_template(convo, tokenize=False, chat_template=self.chat_template,
                                               add_generation_prompt=add_generation_prompt)
            except Exception as e:  # a template's own raise_exception(...) or a Jinja error
                raise APIError(400, f"the chat template rejected the messages: {e}",
                               param="messages") from None
            return list(tok(text, add_special_tokens=False).input_ids)

        ids = await self.with_tokenizer(render)
        if not ids:
            raise APIError(400, "the rendered conversation is empty", param="messages")
        return ids

    async def token_strings(self, ids: list[int]) -> list[str]:
        """The text of each token on its own (for logprobs)."""
        return await self.with_tokenizer(lambda tok: [tok.decode([i]) for i in ids])

    async def decode(self, ids: list[int]) -> str:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                           param="tokens")
        return await self.with_tokenizer(lambda tok: tok.decode(ids))


def _cap(param: str, value: int, cap: int, what: str = "") -> None:
    if value > cap:
        msg = f"at most {cap} {what} allowed, got {value}" if what else f"{param} must be <= {cap}, got {value}"
        raise APIError(400, msg, param=param)


def _default_name(path: str | None) -> str:
    if not path:
        return "turbollm"
    base = os.path.basename(os.path.normpath(path))
    return base[:-5] if base.endswith(".gguf") else base
