"""A table of invalid or malformed requests: each gets the right 4xx in OpenAI's error shape,
with no traceback or memory address, and the server keeps serving afterwards."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from serverutil import API_KEY, ServerProcess

pytestmark = pytest.mark.slow
_OK = {"prompt": "Hello", "max_tokens": 2}
_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@dataclass
class Case:
    name: str
    status: int
    body: Any = None
    raw: bytes | None = None
    path: str = "/v1/completions"
    method: str = "POST"
    param: str | None = None
    key: str | None = API_KEY
    says: list[str] = field(default_factory=list)
    """Substrings the error message must contain."""


def comp(**changes: Any) -> dict[str, Any]:
    return {**_OK, **changes}


def chat(**changes: Any) -> dict[str, Any]:
    return {**_CHAT, **changes}


CASES = [
    Case("bad json", 400, raw=b'{"prompt": "x",'),
    Case("invalid utf-8", 400, raw=b'{"prompt": "\xff\xfe"}'),
    Case("empty body", 400, raw=b""),
    Case("non-object body", 400, body=[1, 2, 3]),
    Case("string body", 400, body="hello"),
    Case("missing prompt", 400, body={"max_tokens": 3}, param="prompt"),
    Case("prompt wrong type", 400, body=comp(prompt=5), param="prompt"),
    Case("prompt nested too deep", 400, body=comp(prompt=[[[1]]]), param="prompt"),
    Case("empty prompt list", 400, body=comp(prompt=[]), param="prompt"),
    Case("empty text prompt", 400, body=comp(prompt=""), param="prompt"),
    Case("max_tokens string", 400, body=comp(max_tokens="8"), param="max_tokens"),
    Case("max_tokens zero", 400, body=comp(max_tokens=0), param="max_tokens"),
    Case("max_tokens negative", 400, body=comp(max_tokens=-3), param="max_tokens"),
    Case("max_tokens huge", 400, body=comp(max_tokens=10**30), param="max_tokens"),
    Case("temperature negative", 400, body=comp(temperature=-1), param="temperature"),
    Case("temperature NaN", 400, raw=b'{"prompt": "x", "temperature": NaN}', param="temperature"),
    Case("top_p out of range", 400, body=comp(top_p=1.5), param="top_p"),
    Case("top_k negative", 400, body=comp(top_k=-5), param="top_k"),
    Case("presence_penalty out of range", 400, body=comp(presence_penalty=5), param="presence_penalty"),
    Case("repetition_penalty zero", 400, body=comp(repetition_penalty=0), param="repetition_penalty"),
    Case("min_tokens over max_tokens", 400, body=comp(min_tokens=5, max_tokens=2), param="min_tokens"),
    Case("seed float", 400, body=comp(seed=1.5), param="seed"),
    Case("stream not a bool", 400, body=comp(stream="yes"), param="stream"),
    Case("n zero", 400, body=comp(n=0), param="n"),
    Case("n huge", 400, body=comp(n=1000), param="n"),
    Case("too many stops", 400, body=comp(stop=["a", "b", "c", "d", "e"]), param="stop"),
    Case("empty stop string", 400, body=comp(stop=[""]), param="stop"),
    Case("logprobs too many", 400, body=comp(logprobs=50), param="logprobs"),
    Case("logit_bias (unsupported)", 400, body=comp(logit_bias={"5": 10}), param="logit_bias"),
    Case("json response_format (unsupported)", 400, body=comp(response_format={"type": "json_object"}),
         param="response_format"),
    Case("best_of > 1 (unsupported)", 400, body=comp(best_of=3), param="best_of"),
    Case("max_tokens zero with echo, logprobs too many", 400,
         body=comp(echo=True, max_tokens=0, logprobs=21), param="logprobs"),
    Case("too many prompts", 400, body=comp(prompt=["x"] * 65), param="prompt"),
    Case("bad token id", 400, body=comp(prompt=[1, 2, 10**6]), param="prompt", says=["1000000"]),
    Case("negative token id", 400, body=comp(prompt=[1, -2]), param="prompt"),
    Case("prompt over the context", 400, body=comp(prompt=[1] * 600), says=["512", "600"]),
    Case("prompt + max_tokens over the context", 400, body=comp(prompt=[1] * 100, max_tokens=500),
         param="max_tokens", says=["512", "600", "100", "500"]),
    Case("unknown model", 404, body=comp(model="gpt-9"), param="model", says=["gpt-9"]),
    Case("oversize body", 413, body=comp(prompt="x" * (70 << 10))),
    Case("missing API key", 401, body=comp(), key=None),
    Case("wrong API key", 401, body=comp(), key="wrong-key"),
    Case("metrics need the key", 401, path="/metrics", method="GET", key=None),
    Case("unknown route", 404, body={}, path="/v1/nothing"),
    Case("wrong method", 405, path="/v1/completions", method="GET"),
    Case("chat tools (unsupported)", 400, body=chat(tools=[{"type": "function", "function": {"name": "f"}}]),
         path="/v1/chat/completions", param="tools"),
    Case("chat empty messages", 400, body=chat(messages=[]), path="/v1/chat/completions", param="messages"),
    Case("chat bad role", 400, body=chat(messages=[{"role": "wizard", "content": "x"}]),
         path="/v1/chat/completions", param="messages.role"),
    Case("chat content wrong type", 400, body=chat(messages=[{"role": "user", "content": 7}]),
         path="/v1/chat/completions", param="messages.content"),
    Case("chat top_logprobs without logprobs", 400, body=chat(top_logprobs=2),
         path="/v1/chat/completions", param="top_logprobs"),
    Case("chat unknown model", 404, body=chat(model="nope"), path="/v1/chat/completions", param="model"),
    Case("tokenize neither prompt nor messages", 400, body={}, path="/tokenize"),
    Case("detokenize bad id", 400, body={"tokens": [-1]}, path="/detokenize", param="tokens"),
]


def _send(server: ServerProcess, case: Case) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if case.key is not None:
        headers["Authorization"] = f"Bearer {case.key}"
    content = case.raw if case.raw is not None else (
        json.dumps(case.body).encode() if case.body is not None else None)
    return httpx.request(case.method, server.base_url + case.path, content=content, headers=headers,
                         timeout=30)


def _check_error_shape(resp: httpx.Response, case: Case) -> None:
    assert resp.status_code == case.status, (case.name, resp.status_code, resp.text)
    text = resp.text
    assert "Traceback" not in text and not re.search(r"0x[0-9a-fA-F]{6,}", text), text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if case.param is not None:
        assert err["param"] == case.param, (case.name, err)
    for s in case.says:
        assert s in err["message"], (case.name, err["message"])


def test_bad_request_table(shared_server: ServerProcess) -> None:
    assert len(CASES) >= 25
    failures = []
    for case in CASES:
        try:
            _check_error_shape(_send(shared_server, case), case)
        except AssertionError as e:
            failures.append(f"{case.name}: {e}")
    assert not failures, "\n".join(failures)
    # The server is unharmed: a normal request still answers correctly.
    with shared_server.client() as c:
        out = c.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 3,
                                              "temperature": 0})
        assert out.status_code == 200 and out.json()["choices"][0]["text"].strip().startswith("Paris")
        assert c.get("/health").status_code == 200


def test_chunked_oversize_body_is_413(shared_server: ServerProcess) -> None:
    def body():  # type: ignore[no-untyped-def]
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(shared_server.base_url + "/v1/completions", content=body(), timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_health_needs_no_key(shared_server: ServerProcess) -> None:
    assert httpx.get(shared_server.base_url + "/health", timeout=10).status_code == 200
