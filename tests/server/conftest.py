"""Fixtures: real `turbollm serve` processes on 127.0.0.1 for the server tests.

Each module starts the servers it needs once and reuses them; every server is bound to
loopback and stopped (SIGTERM, then SIGKILL) at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from serverutil import API_KEY, ServerProcess, launch


@pytest.fixture(scope="module")
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Factory for servers that live as long as the test module."""
    started: list[ServerProcess] = []

    def start(*args: str, api_key: str | None = None) -> ServerProcess:
        s = launch(*args, api_key=api_key)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def shared_server() -> Iterator[ServerProcess]:
    """One server with an API key and a short context, shared by the API tests."""
    s = launch("--max-model-len", "512", "--max-body-bytes", str(64 << 10), "--max-n", "8",
               "--max-stop", "4", api_key=API_KEY)
    yield s
    s.stop()


