"""Server options: where to listen, who may call, and the caps that stop one request from
taking the server down. Frozen; built once by `turbollm serve` (or a test) before start."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerOptions:
    """HTTP server: where it listens, who may call, and per-request caps."""

    host: str = "127.0.0.1"
    """Address to bind (loopback unless told otherwise)."""
    port: int = 8000
    """TCP port to listen on."""
    api_key: str | None = None
    """If set, every route except /health needs `Authorization: Bearer <key>`."""
    served_model_name: str | None = None
    """Model name clients must send (default: the model file or directory name)."""
    chat_template: str | None = None
    """A Jinja chat template file overriding the model's own."""
    max_queue: int | None = None
    """Most requests waiting for the engine; past it, 503 with Retry-After."""
    shutdown_timeout: float = 30.0
    """Seconds SIGTERM waits for in-flight requests before aborting them."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (413 above it)."""
    max_n: int = 16
    """Largest `n` (completions per prompt)."""
    max_prompts: int = 64
    """Most prompts in one /v1/completions request."""
    max_stop: int = 16
    """Most stop strings in one request."""
    max_stop_len: int = 256
    """Longest stop string, in characters."""
    max_logprobs: int = 20
    """Largest `logprobs` / `top_logprobs`."""
    log_level: str = "warning"
    """uvicorn's log level."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_n", "max_prompts", "max_stop", "max_stop_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if not 0 <= self.max_logprobs <= 20:
            raise ValueError(f"max_logprobs must be in [0, 20], got {self.max_logprobs}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
