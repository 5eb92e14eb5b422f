"""Admission control and graceful shutdown of a real server process."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from serverutil import ServerProcess, launch

pytestmark = pytest.mark.slow
PROMPT = "Write a long story about a dragon. Once upon a time"


class _Streamer(threading.Thread):
    """Streams one completion in the background; records frames and the first-frame event."""

    def __init__(self, server: ServerProcess, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.server, self.max_tokens = server, max_tokens
        self.first = threading.Event()
        self.frames: list[str] = []
        self.status: int | None = None

    def run(self) -> None:
        body = {"prompt": PROMPT, "max_tokens": self.max_tokens, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", self.server.base_url + "/v1/completions", json=body, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.frames.append(line[6:])
                    self.first.set()
        self.first.set()

    def finish_reason(self) -> str | None:
        payloads = [json.loads(f) for f in self.frames if f != "[DONE]"]
        return [p["choices"][0]["finish_reason"] for p in payloads if p.get("choices")][-1]


@pytest.fixture()
def server() -> ServerProcess:
    s = launch("--max-num-seqs", "1", "--max-queue", "1", "--shutdown-timeout", "60")
    yield s  # type: ignore[misc]
    s.stop()


def test_queue_cap_503_then_sigterm_drains_and_exits_0(server: ServerProcess) -> None:
    running = _Streamer(server, 40)
    running.start()
    assert running.first.wait(60) and running.status == 200
    waiting = _Streamer(server, 4)  # max_num_seqs=1: this one waits in the queue
    waiting.start()
    deadline = time.monotonic() + 10
    while True:  # until the engine has queued it (its add is asynchronous)
        page = httpx.get(server.base_url + "/metrics", timeout=10).text
        if "turbollm:num_requests_waiting 1.0" in page or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    full = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert full.status_code == 503 and full.headers.get("retry-after")
    assert full.json()["error"]["code"] == "queue_full"

    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    status = 0
    while time.monotonic() < deadline:  # draining starts on the loop right after the signal
        status = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x"}, timeout=30).status_code
        if status == 503:
            break
        time.sleep(0.05)
    assert status == 503
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 503
    running.join(60)
    waiting.join(60)
    assert running.frames[-1] == "[DONE]" and running.finish_reason() == "length"
    assert waiting.frames[-1] == "[DONE]" and waiting.finish_reason() == "length"
    assert server.proc.wait(30) == 0


def test_sigterm_past_shutdown_timeout_ends_streams_with_error_frame() -> None:
    """In-flight work that outlives --shutdown-timeout is aborted: an error frame, [DONE], exit 0."""
    server = launch("--shutdown-timeout", "1")
    try:
        long = _Streamer(server, 4000)  # far more tokens than 1 s allows on the CPU
        long.start()
        assert long.first.wait(60) and long.status == 200
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        long.join(60)
        assert server.proc.wait(30) == 0
        assert time.monotonic() - started < 20
        assert long.frames[-1] == "[DONE]"
        errors = [json.loads(f) for f in long.frames[:-1] if "error" in json.loads(f)]
        assert errors, "the aborted stream must end with an error frame"
        err = errors[-1]["error"]
        assert set(err) >= {"message", "type", "param", "code"} and "Traceback" not in err["message"]
    finally:
        server.stop()
