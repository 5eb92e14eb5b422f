"""POST /v1/chat/completions: messages rendered with the chat template, plain or streamed.

Streaming follows OpenAI: the first chunk of each choice carries `delta.role`, later chunks
carry content, the last its finish_reason; with `stream_options.include_usage`, a final
chunk with no choices carries the usage.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from turbollm.core.plan import TokenLogprobs
from turbollm.engine.async_engine import EngineRequest
from turbollm.server.errors import APIError, stream_error_frame
from turbollm.server.generation import Generation
from turbollm.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    TopLogprob,
    dump,
)
from turbollm.server.serving import Serving
from turbollm.server.streaming import DONE, SSE_HEADERS, sse, until_disconnected


async def create_chat_completion(serving: Serving, request: Request,
                                 body: ChatCompletionRequest) -> Response:
    serving.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = serving.sampling_params(body, max_tokens, logprobs)
    ids = await serving.render_chat(body.messages, body.add_generation_prompt)
    if params.max_tokens is None:  # OpenAI's default: up to the context
        serving.check_context(len(ids), params.clone(max_tokens=1))
    else:
        serving.check_context(len(ids), params)
    base = f"chatcmpl-{uuid.uuid4().hex}"
    gen = Generation(serving, [EngineRequest(base, ids, params)])
    await gen.__aenter__()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(serving, gen, base, include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(gen.close))
    try:
        (out,) = await until_disconnected(request, gen.final())
    finally:
        gen.close()
    choices = [
        ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                   logprobs=await _chat_logprobs(serving, c.logprobs) if c.logprobs is not None else None,
                   finish_reason=c.finish_reason)
        for c in out.outputs
    ]
    resp = ChatCompletionResponse(id=base, model=serving.model_name, choices=choices, usage=gen.usage())
    return JSONResponse(dump(resp))


async def _chat_logprobs(serving: Serving, lps: list[TokenLogprobs]) -> ChatLogprobs:
    ids = sorted({lp.token_id for lp in lps} | {t for lp in lps for t, _ in lp.top})
    text = dict(zip(ids, await serving.token_strings(ids), strict=True))

    def entry(t: int, v: float) -> TopLogprob:
        return TopLogprob(token=text[t], logprob=v, bytes=list(text[t].encode()))

    content = [
        ChatTokenLogprob(token=text[lp.token_id], logprob=lp.logprob,
                         bytes=list(text[lp.token_id].encode()),
                         top_logprobs=[entry(t, v) for t, v in lp.top])
        for lp in lps
    ]
    return ChatLogprobs(content=content)


async def _stream(serving: Serving, gen: Generation, base: str, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(choices: list[ChatChunkChoice], usage: bool = False) -> bytes:
        c = dump(ChatCompletionChunk(id=base, model=serving.model_name, choices=choices,
                                     usage=gen.usage() if usage else None))
        for ch in c["choices"]:  # OpenAI sends only the delta fields that are set
            ch["delta"] = {k: v for k, v in ch["delta"].items() if v is not None}
        return sse(c)

    try:
        async for d in gen.deltas():
            if d.first:
                yield chunk([ChatChunkChoice(index=d.index, delta=ChatDelta(role="assistant", content=""))])
            lp = await _chat_logprobs(serving, d.logprobs) if d.logprobs else None
            if d.text or lp is not None or d.finish_reason is not None:
                yield chunk([ChatChunkChoice(index=d.index, delta=ChatDelta(content=d.text or None),
                                             logprobs=lp, finish_reason=d.finish_reason)])
        if include_usage:
            yield chunk([], usage=True)
    except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
        yield stream_error_frame(e)
    finally:
        gen.close()
    yield DONE
