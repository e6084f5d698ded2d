"""What the rating server refuses before its routes or its database see a request.

- `TextGuard` (ASGI): a NUL byte, or bytes that are not UTF-8, in the path, the query string (percent-encoded or
  raw) or a header is a 400. PostgreSQL cannot store a NUL in text (its driver raises, a 500 with a traceback, where
  SQLite simply found no such token) and no rater's browser sends one; checking the request once, here, covers
  every route, including ones added later.
- `HeaderDeadlineProtocol` (uvicorn's httptools protocol): a request's head and body must arrive within
  `header_timeout` seconds of its first byte, and a new connection must send that first byte within the same time.
  uvicorn itself arms no timer on a fresh connection and cancels its keep-alive timer on any byte received, so a
  client that sends a partial header (or one byte a minute) held its connection for ever: 3,000 such connections
  stayed open for minutes. A client cut off gets a 408 and the connection is closed; requests in flight are not
  touched (the deadline ends once the whole request has arrived). Together with uvicorn's `limit_concurrency`
  (503 beyond a number of connections) this bounds what slow clients can hold.
"""

from __future__ import annotations

import asyncio
from typing import Optional
from urllib.parse import unquote_to_bytes

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 1000


def bad_text(raw: bytes, percent_encoded: bool = True) -> bool:
    """True for bytes holding a NUL, or not UTF-8, once percent-decoded (`+` is a space in a query string)."""
    data = unquote_to_bytes(raw.replace(b"+", b" ")) if percent_encoded else raw
    if b"\x00" in data:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def clean_text(value: Optional[str]) -> bool:
    """A str that a database can store as it is: no NUL, no lone surrogate (what `surrogateescape` makes of bad bytes)."""
    if value is None:
        return True
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class TextGuard:
    """ASGI middleware: 400 for a request with a NUL or non-UTF-8 bytes in its path, query string or a header value."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            where = self._bad_field(scope)
            if where is not None:
                return await self._refuse(send, where)
        return await self.app(scope, receive, send)

    @staticmethod
    def _bad_field(scope) -> Optional[str]:
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        if bad_text(raw_path) or not clean_text(scope["path"]):
            return "path"
        if bad_text(scope.get("query_string", b"")):
            return "query string"
        for name, value in scope.get("headers", ()):
            if bad_text(value, percent_encoded=False):
                return f"header {name.decode('latin-1')}"
        return None

    @staticmethod
    async def _refuse(send, where: str) -> None:
        body = f'{{"detail": "the request\'s {where} holds a NUL byte or bytes that are not UTF-8"}}'.encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's arrival (see the module docstring).
    `header_timeout` is a class attribute: uvicorn builds the protocol itself, from the class; `with_timeout`
    makes a subclass with another value."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT

    @classmethod
    def with_timeout(cls, seconds: float) -> type["HeaderDeadlineProtocol"]:
        if seconds == cls.header_timeout:
            return cls
        return type("HeaderDeadlineProtocol", (cls,), {"header_timeout": float(seconds), "__module__": cls.__module__,
                                                         "__qualname__": f"HeaderDeadlineProtocol.with_timeout({seconds})"})

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._deadline: Optional[asyncio.TimerHandle] = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        # The first byte of a request on a kept-alive connection starts its deadline; an idle kept-alive connection
        # is uvicorn's keep-alive timeout's to close.
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()
        super().data_received(data)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no response begun: say why before closing
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 35\r\n"
                                 b"connection: close\r\n\r\nrequest not received within timeout")
        self.transport.close()
