"""The worker the tests in tests/python run: the taskql_worker package with
handlers for the tests' task types, configured from the environment.

It runs until SIGTERM (or, with EXIT_WHEN_IDLE=1, until nothing is left),
then prints one JSON line on stdout: the run's summary, how many times
each task's handler ran, what the cancelled handlers saw, and the worker's
events in the order they happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from taskql_worker import Result, Retry, TaskContext, Worker, WorkerEvent

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

lock = threading.Lock()
runs: dict[str, int] = {}
cancel_seen: dict[str, str] = {}
events: list[list[Any]] = []
token_calls = 0


def token() -> str:
    global token_calls
    with lock:
        token_calls += 1
    return os.environ["TASKQL_TOKEN"]


def record(event: WorkerEvent) -> None:
    with lock:
        events.append([event.kind, event.task_id, event.attempt, event.detail])


def ran(ctx: TaskContext) -> None:
    with lock:
        runs[ctx.id] = runs.get(ctx.id, 0) + 1


worker = Worker(
    os.environ["TASKQL_URL"],
    token,
    types=os.environ["TYPES"].split(","),
    concurrency=int(os.environ.get("CONCURRENCY", "8")),
    batch=int(os.environ.get("BATCH", "1")),
    lease_seconds=int(os.environ.get("LEASE_SECONDS", "10")),
    heartbeat_seconds=float(os.environ.get("HEARTBEAT_SECONDS", "0.5")),
    shutdown_grace=float(os.environ.get("SHUTDOWN_GRACE", "10")),
    idle_poll=0.1,
    max_backoff=0.5,
    exit_when_idle=os.environ.get("EXIT_WHEN_IDLE") == "1",
    worker_id="py-test",
    on_event=record,
)


def done(ctx: TaskContext) -> Result:
    return Result(result_id=f"done-{ctx.id}", result={"n": ctx.metadata.get("n"), "attempt": ctx.attempt})


@worker.task("py.work")
async def work(ctx: TaskContext) -> Result:
    ran(ctx)
    ctx.progress(50)
    await asyncio.sleep(ctx.metadata.get("ms", 0) / 1000)
    return done(ctx)


@worker.task("py.work.sync")
def work_sync(ctx: TaskContext) -> Result:
    ran(ctx)
    ctx.progress(50)
    time.sleep(ctx.metadata.get("ms", 0) / 1000)
    return done(ctx)


@worker.task("py.hold")
async def hold(ctx: TaskContext) -> str:
    """Runs until cancelled: its task is cancelled under it."""
    ran(ctx)
    ctx.progress(10)
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        with lock:
            cancel_seen[ctx.id] = f"async handler cancelled, flag {ctx.cancelled.is_set()}: {ctx.cancelled.reason}"
        raise
    return "too-late"


@worker.task("py.hold.sync")
def hold_sync(ctx: TaskContext) -> str:
    """Waits on ctx.cancelled in its thread, then returns as if done."""
    ran(ctx)
    ctx.progress(10)
    if ctx.cancelled.wait(60):
        with lock:
            cancel_seen[ctx.id] = f"sync handler saw the flag: {ctx.cancelled.reason}"
    return "too-late"


@worker.task("py.fail")
def fail(ctx: TaskContext) -> None:
    ran(ctx)
    raise ValueError(ctx.metadata["reason"])


@worker.task("py.flaky")
async def flaky(ctx: TaskContext) -> str:
    ran(ctx)
    if ctx.attempt == 1:
        raise Retry("not yet: try again")
    return f"flaky-{ctx.attempt}"


@worker.task("py.slow")
async def slow(ctx: TaskContext) -> str:
    ran(ctx)
    ctx.progress(5)
    await asyncio.sleep(ctx.metadata["seconds"])
    return "slow-done"


print("ready", file=sys.stderr, flush=True)
started = time.monotonic()
summary = worker.run()
print(
    json.dumps(
        {
            "summary": vars(summary),
            "runs": runs,
            "cancel_seen": cancel_seen,
            "events": events,
            "token_calls": token_calls,
            "seconds": time.monotonic() - started,
        }
    ),
    flush=True,
)
