"""Serve options: --served-model-name and --chat-template change what clients see."""

from __future__ import annotations

import httpx
import pytest
from serverutil import launch

pytestmark = pytest.mark.slow


def test_served_name_and_chat_template(tmp_path) -> None:  # type: ignore[no-untyped-def]
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    server = launch("--served-model-name", "my-model", "--chat-template", str(template))
    try:
        url = server.base_url
        assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]] == ["my-model"]
        other = httpx.post(url + "/v1/completions", json={"model": "SmolLM2", "prompt": "x"}, timeout=30)
        assert other.status_code == 404 and other.json()["error"]["param"] == "model"
        msgs = [{"role": "user", "content": "hello there"}]
        chat_ids = httpx.post(url + "/tokenize", json={"model": "my-model", "messages": msgs}, timeout=30).json()
        text_ids = httpx.post(url + "/tokenize", json={"prompt": "[user] hello there\n",
                                                       "add_special_tokens": False}, timeout=30).json()
        assert chat_ids["tokens"] == text_ids["tokens"]
        ok = httpx.post(url + "/v1/chat/completions", timeout=60,
                        json={"model": "my-model", "messages": msgs, "max_tokens": 3, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["model"] == "my-model"
        assert ok.json()["usage"]["prompt_tokens"] == len(text_ids["tokens"])
    finally:
        server.stop()
