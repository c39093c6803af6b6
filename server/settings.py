"""Server configuration: one validated dataclass, built once from CLI flags and environment variables.

Every limit here answers a request that exceeds it with a 4xx in OpenAI's error shape that names
the limit, never with a silent truncation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

API_KEYS_ENV = "LOGITSPEC_API_KEYS"  # comma-separated; joins the --api-key flags


def keys_from_env(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    raw = (os.environ if environ is None else environ).get(API_KEYS_ENV, "")
    return tuple(k.strip() for k in raw.split(",") if k.strip())


@dataclass(slots=True)
class ServerSettings:
    model_name: str
    max_queue: int = 64
    request_timeout: float = 600.0
    # sessions (suffix indexes that outlive a request): LRU beyond either bound
    max_sessions: int = 256
    session_bytes: int = 512 * 2**20
    # access
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    public_metrics: bool = False  # with api_keys: serve /metrics without a key too
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*": any)
    # request limits
    max_body_bytes: int = 4 * 2**20
    max_prompt_tokens: int | None = None  # None: the context length is the only bound
    max_tokens_cap: int | None = None  # most completion tokens one choice may ask for (and the default)
    max_n: int = 16  # most sequences one request may start (n x prompts)
    max_stop: int = 4  # stop strings per request
    max_stop_length: int = 256  # characters per stop string
    # shutdown: after SIGTERM, seconds running requests get to finish before they are failed
    shutdown_grace: float = 30.0
    # one log line per request (logger "logitspec.access"): method, path, status, seconds, tokens
    access_log: bool = True

    def __post_init__(self):
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        for name in ("max_queue", "max_body_bytes", "max_n", "max_stop_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_sessions", "session_bytes", "max_stop"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_tokens_cap"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when set, got {value}")
        if self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")
        if self.shutdown_grace < 0:
            raise ValueError(f"shutdown_grace must be >= 0, got {self.shutdown_grace}")
        self.api_keys = tuple(self.api_keys)
        for key in self.api_keys:
            if len(key) < 8 or any(c.isspace() or c == "," for c in key):
                raise ValueError("API keys must be at least 8 characters, without spaces or commas")
        self.cors_origins = tuple(self.cors_origins)
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"CORS origin must be '*' or start with http:// or https://, got {origin!r}")
