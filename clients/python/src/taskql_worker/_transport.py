"""A lean HTTP/1.1 transport for httpx, for plain `http://` servers.

httpx's default transport (httpcore over anyio) costs about ten times the
CPU of the request itself per call; a worker makes a call or more per task,
so that is most of its time. This one keeps idle keep-alive connections,
writes each request in one write, and reads responses framed by
`Content-Length` or chunked. `https://` goes through httpx's own transport.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

# The server closes a connection idle for TASKQL_HEADER_TIMEOUT (10 s by
# default); one idle longer than this is not used again.
_MAX_IDLE = 4.0
_MAX_HEAD = 64 * 1024


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def usable(self) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and time.monotonic() - self.idle_since < _MAX_IDLE
        )

    def close(self) -> None:
        self.writer.close()


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_idle: int) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._max_idle = max_idle
        self._fallback: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport()
            return await self._fallback.handle_async_request(request)
        timeouts: dict[str, Any] = request.extensions.get("timeout") or {}
        host = request.url.host
        port = request.url.port or 80
        body = await request.aread()
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)]
        for name, value in request.headers.raw:
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"\r\n")
        payload = b"".join(head) + body

        connection = await self._connect(request, host, port, timeouts.get("connect"))
        try:
            connection.writer.write(payload)
            await _within(connection.writer.drain(), timeouts.get("write"), httpx.WriteTimeout, request)
            status, headers, content, reusable = await _within(
                _read_response(connection.reader, request.method == "HEAD"),
                timeouts.get("read"),
                httpx.ReadTimeout,
                request,
            )
        except httpx.TransportError:
            connection.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
            connection.close()
            raise httpx.ReadError(f"{type(err).__name__}: {err}", request=request) from err
        except BaseException:
            connection.close()
            raise
        if reusable:
            self._release((host, port), connection)
        else:
            connection.close()
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content), request=request)

    async def _connect(
        self, request: httpx.Request, host: str, port: int, timeout: float | None
    ) -> _Connection:
        idle = self._idle.get((host, port))
        while idle:
            connection = idle.pop()
            if connection.usable():
                return connection
            connection.close()
        try:
            reader, writer = await _within(
                asyncio.open_connection(host, port, limit=_MAX_HEAD),
                timeout,
                httpx.ConnectTimeout,
                request,
            )
        except OSError as err:
            raise httpx.ConnectError(f"{type(err).__name__}: {err}", request=request) from err
        return _Connection(reader, writer)

    def _release(self, key: tuple[str, int], connection: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self._max_idle:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        if self._fallback is not None:
            await self._fallback.aclose()


async def _within(
    awaitable: Any, timeout: float | None, error: type[httpx.TimeoutException], request: httpx.Request
) -> Any:
    """`awaitable`, or `error` after `timeout` seconds. `asyncio.timeout`
    where there is one: `wait_for` makes a task of each call."""
    try:
        if timeout is None:
            return await awaitable
        if _timeout is not None:
            async with _timeout(timeout):
                return await awaitable
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError as err:
        raise error(f"no answer within {timeout} s", request=request) from err


_timeout = getattr(asyncio, "timeout", None)


async def _read_response(
    reader: asyncio.StreamReader, head_only: bool
) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    """The status, headers, body and whether the connection may be reused."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    status = int(rest[:3])
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = False
    close = version != b"HTTP/1.1"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip(), value.strip()
        headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            length = int(value)
        elif lower == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif lower == b"connection":
            close = close or b"close" in value.lower()
    if head_only or status in (204, 304) or 100 <= status < 200:
        return status, headers, b"", not close
    if chunked:
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                # Trailers, if any, up to the blank line.
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, headers, b"".join(parts), not close
    if length is not None:
        return status, headers, await reader.readexactly(length), not close
    return status, headers, await reader.read(), False
