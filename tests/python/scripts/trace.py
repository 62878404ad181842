"""What the worker sends as trace context, seen on the wire.

The worker talks to the real server through a forwarding proxy that notes
each request's operation and `traceparent` header. First with the
OpenTelemetry API but no SDK (no span is recording: nothing may be sent),
then with an SDK tracer provider, the worker running inside a span. Prints
one JSON line: the requests seen in each run and the spans' ids.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any

import httpx
from opentelemetry import trace

from taskql_worker import TaskContext, Worker

SERVER = httpx.URL(os.environ["TASKQL_URL"])
OWNER = os.environ["TASKQL_OWNER_TOKEN"]
seen: list[tuple[str, str | None]] = []


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def proxy(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
    """Forwards one client connection, noting each request it carries."""
    server_reader, server_writer = await asyncio.open_connection(SERVER.host, SERVER.port)
    answers = asyncio.create_task(pipe(server_reader, client_writer))
    try:
        while True:
            head = await client_reader.readuntil(b"\r\n\r\n")
            headers = dict(
                (name.strip().lower(), value.strip())
                for name, _, value in (line.decode().partition(":") for line in head.split(b"\r\n")[1:] if line)
            )
            body = await client_reader.readexactly(int(headers.get("content-length", "0")))
            match = re.search(r"(?:query|mutation) (\w+)", json.loads(body)["query"])
            seen.append((match.group(1) if match else "?", headers.get("traceparent")))
            server_writer.write(head + body)
            await server_writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        server_writer.close()
        await answers


def create(task_type: str) -> None:
    body = httpx.post(
        str(SERVER),
        json={"query": "mutation($t: String!) { createTask(input: {type: $t}) { id } }", "variables": {"t": task_type}},
        headers={"authorization": f"Bearer {OWNER}"},
    ).json()
    assert "errors" not in body, body


async def run(port: int, task_type: str) -> dict[str, Any]:
    """Works one task through the proxy; what was sent and what the handler saw."""
    seen.clear()
    create(task_type)
    handler_span: dict[str, str] = {}
    worker = Worker(
        f"http://127.0.0.1:{port}/graphql",
        os.environ["TASKQL_TOKEN"],
        concurrency=1,
        idle_poll=0.1,
        exit_when_idle=True,
    )

    @worker.task(task_type)
    async def handler(ctx: TaskContext) -> str:
        context = trace.get_current_span().get_span_context()
        handler_span["trace_id"] = f"{context.trace_id:032x}"
        handler_span["span_id"] = f"{context.span_id:016x}"
        return "traced"

    await worker.run_async()
    return {"requests": list(seen), "handler": handler_span}


async def main() -> None:
    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    plain = await run(port, "py.plain")

    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("the worker") as span:
        context = span.get_span_context()
        traced = await run(port, "py.traced")
    traced["outer"] = {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
    server.close()
    print(json.dumps({"plain": plain, "traced": traced}), flush=True)


asyncio.run(main())
