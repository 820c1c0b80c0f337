"""The upload size cap, as a pure ASGI middleware: 413 before the body is stored.

A declared Content-Length over the cap is refused before a byte of the body is read. A body without
one (chunked) is counted as it streams in and cut off as soon as it passes the cap, so that neither
the multipart parser nor anything after it ever holds more than the cap.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


class BodyTooLarge(Exception):
    """Raised into the app from `receive` when the streamed body passes the cap."""


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)  # uvicorn discards the unread body; nothing of it is kept
            return
        total, cut, started = 0, False, False

        async def counted_receive() -> Message:
            nonlocal total, cut
            if cut:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    cut = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if cut:  # whatever the app makes of the cut-off body (a 400, a 500) is replaced by the 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not cut:
                raise
        if cut and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await send_json(send, 413, f"request body larger than the {self.max_bytes / 1024 / 1024:g} MB upload limit")


async def send_json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A whole response {"detail": ...} from a middleware, before or instead of the app."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *((k.encode(), v.encode()) for k, v in (headers or {}).items())]})
    await send({"type": "http.response.body", "body": body})
