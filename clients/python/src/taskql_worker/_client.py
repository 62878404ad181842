"""One GraphQL request at a time over HTTP, with the worker's token."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from . import _trace
from ._transport import LeanTransport

Token = str | Callable[[], str]


class TaskqlError(Exception):
    """The server answered with a GraphQL error the worker cannot handle."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Unreachable(Exception):
    """No answer: the server is down, restarting, or its database is.

    Worth sending again after a pause.
    """


class GraphQLClient:
    """Posts GraphQL operations to `url` with `Authorization: Bearer`.

    `token` is a string, or a callable called before every request, so a
    token it refreshes is the one sent. The current OpenTelemetry span's
    `traceparent` goes along when OpenTelemetry is installed.

    Requests are httpx `Request`s sent straight to the transport (the lean
    one of `_transport` for `http://`, httpx's own for `https://`): the
    client's per-request machinery (URL parsing, cookies, redirects, hooks)
    is of no use to a worker and cost more than the request itself.
    """

    def __init__(self, url: str, token: Token, *, timeout: float, connections: int) -> None:
        self._url = httpx.URL(url)
        self._token = token
        self._timeout = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        self._transport = LeanTransport(max_idle=connections)
        self._fixed = [
            ("host", self._url.netloc.decode("ascii")),
            ("accept", "application/json"),
            ("content-type", "application/json"),
            ("user-agent", "taskql-worker"),
        ]

    async def aclose(self) -> None:
        await self._transport.aclose()

    def _headers(self, length: int) -> list[tuple[str, str]]:
        token = self._token() if callable(self._token) else self._token
        headers = self._fixed + [("authorization", "Bearer " + token), ("content-length", str(length))]
        trace: dict[str, str] = {}
        _trace.inject(trace)
        headers.extend(trace.items())
        return headers

    async def call(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        """The `data` of the answer; raises `TaskqlError` for a GraphQL
        error and `Unreachable` when no usable answer came."""
        content = json.dumps({"query": query, "variables": variables}).encode()
        request = httpx.Request(
            "POST",
            self._url,
            headers=self._headers(len(content)),
            content=content,
            extensions={"timeout": self._timeout},
        )
        try:
            response = await self._transport.handle_async_request(request)
            await response.aread()
        except httpx.TransportError as err:
            raise Unreachable(f"{type(err).__name__}: {err}") from err
        try:
            body = response.json()
        except ValueError as err:
            raise Unreachable(f"HTTP {response.status_code}: not JSON") from err
        if not isinstance(body, dict):
            raise Unreachable(f"HTTP {response.status_code}: unexpected answer")
        errors = body.get("errors")
        if errors:
            first = errors[0] if isinstance(errors, list) and errors else {}
            code = str((first.get("extensions") or {}).get("code") or "UNKNOWN")
            message = str(first.get("message") or "")
            if code == "SERVICE_UNAVAILABLE" or response.status_code >= 500:
                raise Unreachable(f"{code}: {message}")
            raise TaskqlError(code, message)
        if response.status_code >= 500:
            raise Unreachable(f"HTTP {response.status_code}")
        data = body.get("data")
        if not isinstance(data, dict):
            raise Unreachable(f"HTTP {response.status_code}: no data")
        return data
