"""POST /v1/completions: text or token-id prompts (one or many), plain or streamed.

Logprobs use OpenAI's legacy shape (tokens, token_logprobs, top_logprobs, text_offset).
`echo` prepends the prompt text; `echo` together with `logprobs` needs prompt logprobs,
which the engine does not compute yet, so that combination is refused with a 400.
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
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs needs prompt logprobs, which this server does not "
                       "compute yet", param="echo")
    prompts = _prompt_list(body.prompt, serving.options.max_prompts)
    params = serving.sampling_params(body, body.max_tokens, body.logprobs)
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
        return StreamingResponse(_stream(serving, gen, base, echo, include_usage),
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
            lp = (await _legacy_logprobs(serving, c.logprobs, len(prefix))
                  if c.logprobs is not None else None)
            choices.append(CompletionChoice(index=p * params.n + c.index, text=prefix + c.text,
                                            logprobs=lp, finish_reason=c.finish_reason))
    resp = CompletionResponse(id=base, model=serving.model_name, choices=choices, usage=gen.usage())
    return JSONResponse(dump(resp))


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


async def _legacy_logprobs(serving: Serving, lps: list[TokenLogprobs], offset: int) -> CompletionLogprobs:
    """OpenAI's legacy logprobs; text_offset counts from `offset` (the echoed prompt)."""
    ids = sorted({lp.token_id for lp in lps} | {t for lp in lps for t, _ in lp.top})
    text = dict(zip(ids, await serving.token_strings(ids), strict=True))
    out = CompletionLogprobs()
    for lp in lps:
        tok = text[lp.token_id]
        out.tokens.append(tok)
        out.token_logprobs.append(lp.logprob)
        top = {text[t]: v for t, v in lp.top}
        top.setdefault(tok, lp.logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(tok)
    return out


async def _stream(serving: Serving, gen: Generation, base: str, echo: list[str] | None,
                  include_usage: bool) -> AsyncIterator[bytes]:
    n = gen.requests[0].params.n
    offsets: dict[int, int] = {}
    try:
        async for d in gen.deltas():
            yield sse(await _chunk(serving, base, d, echo[d.index // n] if echo and d.first else "",
                                   offsets))
        if include_usage:
            yield sse({"id": base, "object": "text_completion", "created": int(time.time()),
                       "model": serving.model_name, "choices": [], "usage": dump(gen.usage())})
    except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
        yield stream_error_frame(e)
    finally:
        gen.close()
    yield DONE


async def _chunk(serving: Serving, base: str, d: Delta, prefix: str, offsets: dict[int, int]) -> dict:
    lp = None
    if d.logprobs is not None:
        start = offsets.get(d.index, len(prefix))
        lp = await _legacy_logprobs(serving, d.logprobs, start)
        offsets[d.index] = start + sum(len(t) for t in lp.tokens)
    choice = CompletionChoice(index=d.index, text=prefix + d.text, logprobs=lp,
                              finish_reason=d.finish_reason)
    return {"id": base, "object": "text_completion", "created": int(time.time()),
            "model": serving.model_name, "choices": [dump(choice)]}
