"""Abuse limits: request body size (an ASGI middleware, before anything is parsed) and per-tenant rates."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException

from post.service.errors import ApiError

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class BodyTooLarge(StarletteHTTPException):
    """Raised while a body is being read past its limit (FastAPI passes HTTP exceptions on unchanged)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over {limit} bytes.")


class BodyLimit:
    """Answer 413 ``body_too_large`` to a body over its limit: ``max_upload`` on the upload route, else ``max_body``.

    Checks Content-Length first and then counts the bytes actually received (a chunked or lying
    client is cut off at the limit, never buffered past it).
    """

    def __init__(self, app: ASGIApp, *, max_body: int, max_upload: int, upload_path: str) -> None:
        self.app, self.max_body, self.max_upload, self.upload_path = app, max_body, max_upload, upload_path

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_upload if scope["path"] == self.upload_path else self.max_body
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _send_error(send, ApiError("body_too_large", f"the request body is over {limit} bytes."))
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send_error(send, ApiError("body_too_large", f"the request body is over {limit} bytes."))


async def _send_error(send: Callable[[Message], Awaitable[None]], err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RateLimiter:
    """A token bucket per tenant: ``rate`` requests per second on average, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, tenant_id: str) -> None:
        """Take one token for ``tenant_id`` or raise ``rate_limited`` with the seconds until one is free."""
        if self.rate <= 0:
            return
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(tenant_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[tenant_id] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / self.rate)
                raise ApiError("rate_limited", f"over {self.rate:g} requests per second for this key; slow down.",
                               retry_after=max(1, wait))
            self._buckets[tenant_id] = (tokens - 1.0, now)
