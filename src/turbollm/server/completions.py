"""POST /v1/completions: text or token-id prompts (one or many), plain or streamed.

Logprobs use OpenAI's legacy shape (tokens, token_logprobs, top_logprobs, text_offset).
`echo` prepends the prompt text; with `logprobs` too, the choice's logprobs cover the prompt
tokens (the first has None: nothing precedes it) and then the generated ones, with one
text_offset running over both, as OpenAI and vLLM do. `echo` with `max_tokens=0` returns
only the prompt (and its logprobs): how lm-evaluation-harness scores a loglikelihood.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from turbollm.core.plan import TokenLogprobs
from turbollm.engine.async_engine import EngineRequest
from turbollm.server.errors import APIError, stream_error_frame
from turbollm.server.generation import Delta, Generation
from turbollm.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    dump,
)
from turbollm.server.serving import Serving
from turbollm.server.streaming import DONE, SSE_HEADERS, sse, until_disconnected


async def create_completion(serving: Serving, request: Request, body: CompletionRequest) -> Response:
    serving.check_model(body.model)
    # The engine always generates at least one token: for echo with max_tokens=0, ask for one
    # and drop it (its text, logprobs and usage) from the reply.
    prompt_only = body.echo and body.max_tokens == 0
    prompts = _prompt_list(body.prompt, serving.options.max_prompts)
    params = serving.sampling_params(body, 1 if prompt_only else body.max_tokens, body.logprobs)
    if body.echo and body.logprobs is not None:
        params = params.clone(prompt_logprobs=body.logprobs)
    ids = [await serving.tokenize(p) for p in prompts]
    for prompt_ids in ids:
        serving.check_context(len(prompt_ids), params)
    base = f"cmpl-{uuid.uuid4().hex}"
    requests = [EngineRequest(f"{base}-{i}", x, params, p if isinstance(p, str) else None)
                for i, (p, x) in enumerate(zip(prompts, ids, strict=True))]
    echo = [p if isinstance(p, str) else await serving.decode(p) for p in prompts] if body.echo else None
    gen = Generation(serving, requests)
    await gen.__aenter__()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(serving, gen, base, echo, include_usage, prompt_only),
                                 media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(gen.close))
    try:
        outputs = await until_disconnected(request, gen.final())
    finally:
        gen.close()
    choices = []
    for p, out in enumerate(outputs):
        for c in out.outputs:
            prefix = echo[p] if echo else ""
            lp = None
            if c.logprobs is not None:
                ids, lps = _echoed(out.prompt_token_ids, out.prompt_logprobs)
                if not prompt_only:
                    ids, lps = ids + [x.token_id for x in c.logprobs], lps + list(c.logprobs)
                lp = await _legacy_logprobs(serving, ids, lps, 0)
            choices.append(CompletionChoice(
                index=p * params.n + c.index, text=prefix + ("" if prompt_only else c.text),
                logprobs=lp, finish_reason=_finish_reason(c.finish_reason, prompt_only)))
    resp = CompletionResponse(id=base, model=serving.model_name, choices=choices,
                              usage=gen.usage(count_completion=not prompt_only))
    return JSONResponse(dump(resp))


def _echoed(prompt_ids: list[int], prompt_lps: list[TokenLogprobs | None] | None
            ) -> tuple[list[int], list[TokenLogprobs | None]]:
    """The prompt's (token ids, logprobs) to prepend to a choice's logprobs; empty without echo."""
    if prompt_lps is None:
        return [], []
    return list(prompt_ids), list(prompt_lps)


def _finish_reason(reason: str | None, prompt_only: bool) -> str | None:
    """With max_tokens=0 the (dropped) token always ends the choice by length, as in vLLM."""
    return "length" if prompt_only and reason is not None and reason != "abort" else reason


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]], cap: int) -> list[str | list[int]]:
    """One entry per prompt: a text or a list of token ids."""
    if isinstance(prompt, str):
        out: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        out = [list(prompt)]  # type: ignore[arg-type]
    else:
        out = list(prompt)  # type: ignore[arg-type]
    if not out:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if len(out) > cap:
        raise APIError(400, f"at most {cap} prompts allowed in one request, got {len(out)}", param="prompt")
    return out


async def _legacy_logprobs(serving: Serving, token_ids: list[int], lps: list[TokenLogprobs | None],
                           offset: int) -> CompletionLogprobs:
    """OpenAI's legacy logprobs of `token_ids`; lps[i] is None for a token with no logprob (the
    echoed prompt's first). text_offset counts from `offset`."""
    ids = sorted(set(token_ids) | {t for lp in lps if lp is not None for t, _ in lp.top})
    text = dict(zip(ids, await serving.token_strings(ids), strict=True))
    out = CompletionLogprobs()
    for tid, lp in zip(token_ids, lps, strict=True):
        tok = text[tid]
        out.tokens.append(tok)
        out.text_offset.append(offset)
        offset += len(tok)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(lp.logprob)
        top = {text[t]: v for t, v in lp.top}
        top.setdefault(tok, lp.logprob)
        out.top_logprobs.append(top)
    return out


async def _stream(serving: Serving, gen: Generation, base: str, echo: list[str] | None,
                  include_usage: bool, prompt_only: bool) -> AsyncIterator[bytes]:
    n = gen.requests[0].params.n
    offsets: dict[int, int] = {}
    try:
        async for d in gen.deltas():
            p = d.index // n
            prefix = echo[p] if echo and d.first else ""
            yield sse(await _chunk(serving, base, d, prefix, gen.requests[p].prompt_token_ids,
                                   offsets, prompt_only))
        if include_usage:
            usage = gen.usage(count_completion=not prompt_only)
            yield sse({"id": base, "object": "text_completion", "created": int(time.time()),
                       "model": serving.model_name, "choices": [], "usage": dump(usage)})
    except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
        yield stream_error_frame(e)
    finally:
        gen.close()
    yield DONE


async def _chunk(serving: Serving, base: str, d: Delta, prefix: str, prompt_ids: list[int],
                 offsets: dict[int, int], prompt_only: bool) -> dict:
    lp = None
    if d.logprobs is not None:
        ids, lps = _echoed(prompt_ids, d.prompt_logprobs)
        if not prompt_only:
            ids, lps = ids + [x.token_id for x in d.logprobs], lps + list(d.logprobs)
        start = offsets.get(d.index, 0)
        lp = await _legacy_logprobs(serving, ids, lps, start)
        offsets[d.index] = start + sum(len(t) for t in lp.tokens)
    choice = CompletionChoice(index=d.index, text=prefix + ("" if prompt_only else d.text),
                              logprobs=lp, finish_reason=_finish_reason(d.finish_reason, prompt_only))
    return {"id": base, "object": "text_completion", "created": int(time.time()),
            "model": serving.model_name, "choices": [dump(choice)]}
