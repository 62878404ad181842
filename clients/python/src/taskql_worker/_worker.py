"""The worker: claims tasks under a lease, runs their handlers, heartbeats
for every task it holds in one call, and reports each result fenced by the
attempt its claim returned."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import math
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

from . import _trace
from ._client import GraphQLClient, TaskqlError, Token, Unreachable

log = logging.getLogger("taskql_worker")

JSON = Union[dict[str, Any], list[Any], str, int, float, bool]
"""Any JSON value but null."""

Handler = Callable[["TaskContext"], Any]
H = TypeVar("H", bound=Handler)

# Codes that mean: this task is no longer ours (cancelled, finished,
# claimed again, deleted). Stop working on it and never report it again.
_GONE = ("CONFLICT", "NOT_FOUND")

_TASK_FIELDS = "id type attempts maxAttempts metadata traceparent"
_CLAIM = (
    "mutation TaskqlClaim($types: [String!], $lease: Int, $worker: String) {"
    " claimTask(types: $types, leaseSeconds: $lease, workerId: $worker) { %s } }" % _TASK_FIELDS
)
_CLAIM_MANY = (
    "mutation TaskqlClaimMany($types: [String!], $limit: Int!, $lease: Int, $worker: String) {"
    " claimTasks(types: $types, limit: $limit, leaseSeconds: $lease, workerId: $worker)"
    " { %s } }" % _TASK_FIELDS
)
_HEARTBEAT_MANY = (
    "mutation TaskqlHeartbeat($input: [HeartbeatTaskInput!]!, $lease: Int) {"
    " heartbeatTasks(input: $input, leaseSeconds: $lease) { id error { code message } } }"
)
_COMPLETE_MANY = (
    "mutation TaskqlComplete($input: [CompleteTaskInput!]!) {"
    " completeTasks(input: $input) { id error { code message } } }"
)
_UPDATE = (
    "mutation TaskqlReport($input: UpdateTaskStatusInput!) {"
    " updateTaskStatus(input: $input) { id status } }"
)
_BATCH_LIMIT = 100


@dataclass(frozen=True)
class Result:
    """What a handler may return to complete its task with both a result id
    and a JSON result (either may be left out)."""

    result_id: str | None = None
    result: JSON | None = None


class Retry(Exception):
    """Raised by a handler: the task failed, but is worth another try.

    The task goes back to PENDING after its type's backoff while it has
    attempts left (FAILED for good after the last one).
    """


class CancelFlag:
    """Set when the task is no longer this worker's: cancelled, finished
    elsewhere, or claimed again after the lease ran out; or when the worker
    stops before the handler finished.

    `is_set()` anywhere; `wait(timeout)` blocks a sync handler's thread;
    `await flag.wait_async()` in an async handler (which is also cancelled).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._event = threading.Event()
        self._async = asyncio.Event()
        self._loop = loop
        self.reason: str | None = None

    def is_set(self) -> bool:
        return self._event.is_set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until set or `timeout` seconds passed; whether it is set."""
        return self._event.wait(timeout)

    async def wait_async(self) -> None:
        await self._async.wait()

    def _set(self, reason: str) -> None:
        if self._event.is_set():
            return
        self.reason = reason
        self._event.set()
        self._async.set()


class TaskContext:
    """What a handler gets: the claimed task and a way to report progress."""

    def __init__(self, task: dict[str, Any], worker_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.id: str = str(task["id"])
        self.type: str = str(task["type"])
        metadata = task.get("metadata")
        self.metadata: dict[str, Any] = metadata if isinstance(metadata, dict) else {}
        self.attempt: int = int(task["attempts"])
        max_attempts = task.get("maxAttempts")
        self.max_attempts: int | None = int(max_attempts) if max_attempts is not None else None
        self.traceparent: str | None = task.get("traceparent")
        self.worker_id = worker_id
        self.cancelled = CancelFlag(loop)
        self._progress: int | None = None

    def progress(self, percent: int) -> None:
        """Records progress (0 to 100); the next heartbeat carries it."""
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise ValueError(f"progress must be an int from 0 to 100, not {percent!r}")
        self._progress = percent

    @property
    def last_progress(self) -> int | None:
        return self._progress

    def __repr__(self) -> str:
        return f"TaskContext(id={self.id!r}, type={self.type!r}, attempt={self.attempt})"


@dataclass(frozen=True)
class WorkerEvent:
    """Something the worker did or learned, for logs and metrics.

    `kind` is one of: `claimed`; `report` (a report about to be sent, its
    status in `detail`); `completed`, `failed`, `retried` (a report
    the server accepted); `refused` (a report the server refused: the task
    was no longer this attempt's); `lost` (a heartbeat said the task is no
    longer ours: its handler is stopped and nothing more is reported);
    `released` (given back at shutdown); `unreachable` (a request got no
    answer; it is sent again after a pause); `error` (any other error).
    """

    kind: str
    task_id: str | None = None
    attempt: int | None = None
    detail: str = ""


@dataclass
class RunSummary:
    """Counts of a run, by what the server accepted."""

    completed: int = 0
    failed: int = 0
    retried: int = 0
    refused: int = 0
    lost: int = 0
    released: int = 0


@dataclass(eq=False)
class _Held:
    ctx: TaskContext
    task: asyncio.Task[None] | None = None
    lost: bool = False
    abandoned: bool = False
    # The handler is done and its report is on its way: no more heartbeats;
    # the report's answer says whether the task was still ours.
    reporting: bool = False
    # A sync handler is running in a thread: cancelling the task would only
    # stop waiting for it (the thread runs on, holding its slot's place).
    in_thread: bool = False

    @property
    def attempt(self) -> int:
        return self.ctx.attempt


@dataclass(eq=False)
class _Completion:
    held: _Held
    result_id: str | None
    result: JSON | None
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Worker:
    """A taskql worker.

    ```python
    worker = Worker("http://127.0.0.1:8000/graphql", token, concurrency=8)

    @worker.task("concept.image")
    async def image(ctx: TaskContext) -> Result:
        ctx.progress(50)
        return Result(result_id=f"img-{ctx.id}", result={"width": 1024})

    worker.run()
    ```

    - `token`: a service-role token, or a callable returning one (called
      before every request).
    - `types`: the task types to claim; by default those with a handler.
    - `concurrency`: handlers running at once.
    - `batch`: tasks one claim may take (`claimTask` at 1, `claimTasks`
      over 1). Completions waiting at the same time go together in one
      `completeTasks`; a handler that ran inside a recording OpenTelemetry
      span reports alone (`updateTaskStatus`), carrying its `traceparent`.
    - `lease_seconds`: the lease asked for at the claim and each heartbeat;
      heartbeats go every `heartbeat_seconds` (a third of the lease by
      default), one `heartbeatTasks` for every task held.
    - `shutdown_grace`: how long `stop()` (SIGTERM, SIGINT) lets running
      handlers finish; then they are cancelled and their tasks given back.
    - `exit_when_idle`: stop when a claim finds nothing, instead of polling
      every `idle_poll` seconds.
    - `max_backoff`: the longest pause between tries while the server does
      not answer.
    """

    def __init__(
        self,
        url: str,
        token: Token,
        *,
        types: Iterable[str] | None = None,
        concurrency: int = 4,
        batch: int = 1,
        lease_seconds: int = 60,
        heartbeat_seconds: float | None = None,
        worker_id: str | None = None,
        shutdown_grace: float = 30.0,
        idle_poll: float = 1.0,
        exit_when_idle: bool = False,
        max_backoff: float = 10.0,
        request_timeout: float = 15.0,
        on_event: Callable[[WorkerEvent], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not 1 <= batch <= _BATCH_LIMIT:
            raise ValueError(f"batch must be from 1 to {_BATCH_LIMIT}")
        if not 1 <= lease_seconds <= 3600:
            raise ValueError("lease_seconds must be from 1 to 3600")
        self.url = url
        self._token = token
        self._types = list(types) if types is not None else None
        self.concurrency = concurrency
        self.batch = batch
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds or max(0.1, lease_seconds / 3)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.shutdown_grace = shutdown_grace
        self.idle_poll = idle_poll
        self.exit_when_idle = exit_when_idle
        self.max_backoff = max_backoff
        self.request_timeout = request_timeout
        self.on_event = on_event
        self.summary = RunSummary()
        self._handlers: dict[str, Handler] = {}
        self._held: dict[str, _Held] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._slots: asyncio.Event | None = None
        self._free = 0
        self._client: GraphQLClient | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._completions: list[_Completion] = []
        self._completions_ready: asyncio.Event | None = None
        self._stop_requested = False
        self._spawned: set[asyncio.Task[None]] = set()
        self._drain_started = 0.0

    # -- registration ------------------------------------------------------

    def task(self, task_type: str) -> Callable[[H], H]:
        """Registers the decorated function (sync or async, taking a
        `TaskContext`) as the handler of `task_type`.

        Its return value completes the task: `None` (nothing), a `str` (the
        `resultId`), a `Result` (a result id and/or a JSON result), or any
        other JSON value (the `result`). Raising fails it (FAILED, the
        exception's message as the reason); raising `Retry` asks for
        another try.
        """

        def register(handler: H) -> H:
            if task_type in self._handlers:
                raise ValueError(f"a handler for {task_type!r} is registered already")
            self._handlers[task_type] = handler
            return handler

        return register

    # -- running -----------------------------------------------------------

    def run(self) -> RunSummary:
        """Runs until stopped: SIGTERM or SIGINT (handled here) stop
        claiming, let running handlers finish within `shutdown_grace`, and
        return; a second signal stops at once."""
        return asyncio.run(self.run_async(handle_signals=True))

    def stop(self) -> None:
        """Stops claiming and lets running handlers finish within
        `shutdown_grace`. Safe to call from a signal handler of the loop;
        from another thread use `loop.call_soon_threadsafe(worker.stop)`."""
        self._stop_requested = True
        if self._stopping is not None:
            self._stopping.set()
        if self._slots is not None:
            self._slots.set()

    async def run_async(self, *, handle_signals: bool = False) -> RunSummary:
        """Runs in the current event loop until `stop()` (or, with
        `exit_when_idle`, until nothing is left to claim)."""
        if not self._handlers:
            raise ValueError("no handler registered: use @worker.task(type)")
        types = self._types if self._types is not None else sorted(self._handlers)
        missing = [t for t in types if t not in self._handlers]
        if missing:
            raise ValueError(f"no handler for the types {missing}")
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._slots = asyncio.Event()
        self._free = self.concurrency
        self._completions_ready = asyncio.Event()
        self._client = GraphQLClient(
            self.url,
            self._token,
            timeout=self.request_timeout,
            connections=self.concurrency + 4,
        )
        self._executor = ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="taskql-handler"
        )
        if self._stop_requested:
            self._stopping.set()
        signals = self._install_signals() if handle_signals else []
        background = [
            asyncio.create_task(self._heartbeat_loop(), name="taskql-heartbeats"),
            asyncio.create_task(self._completion_loop(), name="taskql-completions"),
        ]
        claimers = [
            asyncio.create_task(self._claim_loop(types), name=f"taskql-claimer-{n}")
            for n in range(max(1, math.ceil(self.concurrency / self.batch)))
        ]
        try:
            await asyncio.gather(*claimers)
            await self._drain()
        finally:
            for task in claimers + background:
                task.cancel()
            await asyncio.gather(*claimers, *background, return_exceptions=True)
            for sig in signals:
                self._loop.remove_signal_handler(sig)
            await self._client.aclose()
            self._executor.shutdown(wait=False)
        return self.summary

    def _install_signals(self) -> list[signal.Signals]:
        assert self._loop is not None
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.add_signal_handler(sig, self._on_signal)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        return installed

    def _on_signal(self) -> None:
        if self._stop_requested:
            log.warning("second signal: stopping now")
            self.shutdown_grace = 0
        else:
            log.info("stopping: no new claims, waiting up to %.0f s for running tasks", self.shutdown_grace)
        self.stop()

    def _emit(self, kind: str, held: _Held | None = None, detail: str = "") -> None:
        if self.on_event is None:
            return
        event = WorkerEvent(
            kind,
            held.ctx.id if held else None,
            held.attempt if held else None,
            detail,
        )
        try:
            self.on_event(event)
        except Exception:  # a hook's failure never stops the worker
            log.exception("on_event raised")

    # -- claiming ----------------------------------------------------------

    async def _take_slots(self) -> int:
        """Waits for a free slot; takes up to `batch` free ones. 0 when stopping."""
        assert self._slots is not None
        while self._free == 0 and not self._stopping_now():
            self._slots.clear()
            await self._slots.wait()
        if self._stopping_now():
            return 0
        taken = min(self._free, self.batch)
        self._free -= taken
        return taken

    def _stopping_now(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    def _give_slots(self, n: int) -> None:
        if n > 0:
            assert self._slots is not None
            self._free += n
            self._slots.set()

    async def _claim_loop(self, types: list[str]) -> None:
        backoff = _Backoff(self.max_backoff)
        while not self._stopping_now():
            wanted = await self._take_slots()
            if wanted == 0:
                return
            try:
                tasks = await self._claim(types, wanted)
            except Unreachable as err:
                self._give_slots(wanted)
                self._emit("unreachable", detail=f"claim: {err}")
                await self._pause(backoff.next())
                continue
            except TaskqlError as err:
                self._give_slots(wanted)
                log.error("claim refused: %s", err)
                self._emit("error", detail=f"claim: {err}")
                await self._pause(backoff.next())
                continue
            backoff.reset()
            self._give_slots(wanted - len(tasks))
            for task in tasks:
                self._start(task)
            if not tasks:
                if self.exit_when_idle:
                    return
                await self._pause(self.idle_poll)

    async def _claim(self, types: list[str], wanted: int) -> list[dict[str, Any]]:
        assert self._client is not None
        variables: dict[str, Any] = {
            "types": types,
            "lease": self.lease_seconds,
            "worker": self.worker_id,
        }
        if self.batch == 1:
            data = await self._client.call(_CLAIM, variables)
            task = data.get("claimTask")
            return [task] if isinstance(task, dict) else []
        variables["limit"] = wanted
        data = await self._client.call(_CLAIM_MANY, variables)
        tasks = data.get("claimTasks")
        return [t for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else []

    async def _pause(self, seconds: float) -> None:
        """Sleeps `seconds`, or less when the worker is stopping."""
        assert self._stopping is not None
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    # -- running a task ----------------------------------------------------

    def _start(self, task: dict[str, Any]) -> None:
        assert self._loop is not None
        held = _Held(TaskContext(task, self.worker_id, self._loop))
        self._held[held.ctx.id] = held
        self._emit("claimed", held)
        held.task = self._loop.create_task(self._run(held))

    async def _run(self, held: _Held) -> None:
        ctx = held.ctx
        handler = self._handlers.get(ctx.type)
        try:
            if handler is None:
                await self._report_failure(held, f"no handler for type {ctx.type!r}", retryable=False)
                return
            with _trace.task_span(ctx.type, ctx.id, ctx.traceparent):
                try:
                    outcome = await self._call(handler, held)
                except asyncio.CancelledError:
                    if held.lost or held.abandoned:
                        return
                    raise
                except Retry as err:
                    held.reporting = True
                    if not (held.lost or held.abandoned):
                        await self._report_failure(held, _reason(err), retryable=True)
                    return
                except Exception as err:
                    held.reporting = True
                    if not (held.lost or held.abandoned):
                        await self._report_failure(held, _reason(err), retryable=False)
                    return
                held.reporting = True
                if held.lost or held.abandoned:
                    return
                await self._report_success(held, outcome)
        except asyncio.CancelledError:
            if not (held.lost or held.abandoned):
                raise
        finally:
            if self._held.get(ctx.id) is held:
                del self._held[ctx.id]
            self._give_slots(1)

    async def _call(self, handler: Handler, held: _Held) -> Any:
        ctx = held.ctx
        if inspect.iscoroutinefunction(handler):
            return await handler(ctx)
        assert self._loop is not None and self._executor is not None
        run = functools.partial(contextvars.copy_context().run, handler, ctx)
        held.in_thread = True
        try:
            outcome = await self._loop.run_in_executor(self._executor, run)
        finally:
            held.in_thread = False
        if inspect.isawaitable(outcome):
            # An async handler behind a callable that is not a coroutine
            # function (a partial, an object with an async __call__): it
            # runs on the loop now, and can be cancelled like any other.
            if held.lost or held.abandoned:
                if inspect.iscoroutine(outcome):
                    outcome.close()
                raise asyncio.CancelledError
            return await outcome
        return outcome

    # -- reporting ---------------------------------------------------------

    async def _report_success(self, held: _Held, outcome: Any) -> None:
        if outcome is None:
            result_id, result = None, None
        elif isinstance(outcome, Result):
            result_id, result = outcome.result_id, outcome.result
        elif isinstance(outcome, str):
            result_id, result = outcome, None
        else:
            result_id, result = None, outcome
        if not _trace.in_span():
            # Completions waiting at the same time go in one completeTasks.
            completion = _Completion(held, result_id, result)
            self._completions.append(completion)
            assert self._completions_ready is not None
            self._completions_ready.set()
            await completion.done
            return
        report: dict[str, Any] = {
            "id": held.ctx.id,
            "status": "COMPLETED",
            "expectedAttempt": held.attempt,
        }
        if result_id is not None:
            report["resultId"] = result_id
        if result is not None:
            report["result"] = result
        try:
            refusal = await self._send_report(held, report)
        except _Lost:
            return
        if refusal is None:
            self.summary.completed += 1
            self._emit("completed", held)
        else:
            await self._after_refused_completion(held, refusal)

    async def _after_refused_completion(self, held: _Held, refusal: TaskqlError | None) -> None:
        if refusal is None or held.lost:
            return
        if refusal.code in _GONE:
            self.summary.refused += 1
            self._emit("refused", held, str(refusal))
        else:
            # The server would not take this result (too large, not JSON
            # it accepts, …): the task fails with the server's reason.
            await self._report_failure(held, f"the result was refused: {refusal.message}", retryable=False)

    async def _report_failure(self, held: _Held, reason: str, *, retryable: bool) -> None:
        report: dict[str, Any] = {
            "id": held.ctx.id,
            "status": "FAILED",
            "errorMessage": reason,
            "expectedAttempt": held.attempt,
        }
        if retryable:
            report["retryable"] = True
        try:
            refusal = await self._send_report(held, report)
        except _Lost:
            return
        if refusal is None:
            if retryable:
                self.summary.retried += 1
                self._emit("retried", held, reason)
            else:
                self.summary.failed += 1
                self._emit("failed", held, reason)
        elif not held.lost:
            self.summary.refused += 1
            self._emit("refused", held, str(refusal))

    async def _send_report(self, held: _Held, report: dict[str, Any]) -> TaskqlError | None:
        """Sends `updateTaskStatus` until the server answers: `None` when it
        was accepted, the server's error when refused. Raises `_Lost` when
        the task is lost meanwhile: nothing more is sent for it."""
        assert self._client is not None
        backoff = _Backoff(self.max_backoff)
        while True:
            if held.lost:
                raise _Lost
            self._emit("report", held, str(report["status"]))
            try:
                await self._client.call(_UPDATE, {"input": report})
                return None
            except TaskqlError as err:
                return err
            except Unreachable as err:
                self._emit("unreachable", held, f"report: {err}")
                await asyncio.sleep(backoff.next())

    async def _completion_loop(self) -> None:
        """Sends the completions waiting, up to 100 at a time, in one
        `completeTasks`: while one call is out, the next ones gather."""
        assert self._completions_ready is not None and self._client is not None
        backoff = _Backoff(self.max_backoff)
        while True:
            await self._completions_ready.wait()
            self._completions_ready.clear()
            while self._completions:
                pending = [c for c in self._completions[:_BATCH_LIMIT]]
                del self._completions[: len(pending)]
                skipped = [c for c in pending if c.held.lost]
                for c in skipped:
                    _resolve(c.done)
                sending = [c for c in pending if not c.held.lost]
                if not sending:
                    continue
                items = []
                for c in sending:
                    item: dict[str, Any] = {"id": c.held.ctx.id, "expectedAttempt": c.held.attempt}
                    if c.result_id is not None:
                        item["resultId"] = c.result_id
                    if c.result is not None:
                        item["result"] = c.result
                    items.append(item)
                for c in sending:
                    self._emit("report", c.held, "COMPLETED")
                try:
                    data = await self._client.call(_COMPLETE_MANY, {"input": items})
                except Unreachable as err:
                    self._emit("unreachable", detail=f"completeTasks: {err}")
                    self._completions[:0] = sending
                    await asyncio.sleep(backoff.next())
                    continue
                except TaskqlError as err:
                    # The whole call was refused (a result the server will
                    # not take, say): send each on its own to learn which.
                    log.warning("completeTasks refused (%s); reporting one by one", err)
                    for c in sending:
                        self._loop_spawn(self._complete_alone(c))
                    continue
                backoff.reset()
                answers = data.get("completeTasks")
                answers = answers if isinstance(answers, list) else []
                for c, answer in zip(sending, answers):
                    error = answer.get("error") if isinstance(answer, dict) else None
                    if error:
                        refusal = TaskqlError(str(error.get("code")), str(error.get("message")))
                        self._loop_spawn(self._refused_then_resolve(c, refusal))
                    else:
                        self.summary.completed += 1
                        self._emit("completed", c.held)
                        _resolve(c.done)
                for c in sending[len(answers) :]:
                    _resolve(c.done)

    def _loop_spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coroutine)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    async def _refused_then_resolve(self, c: _Completion, refusal: TaskqlError) -> None:
        try:
            await self._after_refused_completion(c.held, refusal)
        finally:
            _resolve(c.done)

    async def _complete_alone(self, c: _Completion) -> None:
        report: dict[str, Any] = {
            "id": c.held.ctx.id,
            "status": "COMPLETED",
            "expectedAttempt": c.held.attempt,
        }
        if c.result_id is not None:
            report["resultId"] = c.result_id
        if c.result is not None:
            report["result"] = c.result
        try:
            refusal = await self._send_report(c.held, report)
            if refusal is None:
                self.summary.completed += 1
                self._emit("completed", c.held)
            else:
                await self._after_refused_completion(c.held, refusal)
        except _Lost:
            pass
        finally:
            _resolve(c.done)

    # -- heartbeats --------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            held = [h for h in self._held.values() if not (h.lost or h.reporting)]
            for start in range(0, len(held), _BATCH_LIMIT):
                await self._heartbeat(held[start : start + _BATCH_LIMIT])

    async def _heartbeat(self, held: list[_Held]) -> None:
        assert self._client is not None
        items: list[dict[str, Any]] = []
        for h in held:
            item: dict[str, Any] = {"id": h.ctx.id, "expectedAttempt": h.attempt}
            if h.ctx.last_progress is not None:
                item["progress"] = h.ctx.last_progress
            items.append(item)
        try:
            data = await self._client.call(_HEARTBEAT_MANY, {"input": items, "lease": self.lease_seconds})
        except Unreachable as err:
            self._emit("unreachable", detail=f"heartbeatTasks: {err}")
            return
        except TaskqlError as err:
            log.error("heartbeatTasks refused: %s", err)
            self._emit("error", detail=f"heartbeatTasks: {err}")
            return
        answers = data.get("heartbeatTasks")
        for h, answer in zip(held, answers if isinstance(answers, list) else []):
            error = answer.get("error") if isinstance(answer, dict) else None
            if error and str(error.get("code")) in _GONE:
                self._lose(h, f"{error.get('code')}: {error.get('message')}")
            elif error:
                log.warning("heartbeat of %s: %s", h.ctx.id, error)

    def _lose(self, held: _Held, reason: str) -> None:
        """The task is no longer ours: stop its handler, never report it."""
        if held.lost or held.reporting:
            return
        held.lost = True
        self.summary.lost += 1
        self._emit("lost", held, reason)
        held.ctx.cancelled._set(reason)
        if self._held.get(held.ctx.id) is not held:
            return  # its handler is done already
        if held.task is not None and not held.in_thread:
            held.task.cancel()

    # -- shutdown ----------------------------------------------------------

    async def _drain(self) -> None:
        """Waits for running handlers within the grace period; then stops
        them and gives their tasks back."""
        self._drain_started = time.monotonic()
        while self._held:
            running = [h.task for h in self._held.values() if h.task is not None]
            if not running:
                break
            if not self._stop_requested:
                # Idle with `exit_when_idle`: the tasks held run to their end.
                await asyncio.wait(running)
                continue
            left = self._drain_started + self.shutdown_grace - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait(running, timeout=min(0.1, left))
        # A handler that returned has its report on its way (a completion
        # may wait for the next completeTasks): it lands, never released.
        reporting = [
            h.task for h in self._held.values() if h.reporting and not h.lost and h.task is not None
        ]
        if reporting:
            await asyncio.wait(reporting, timeout=self.request_timeout)
        for held in list(self._held.values()):
            if held.lost or held.abandoned or held.reporting:
                continue
            held.abandoned = True
            held.ctx.cancelled._set("the worker stopped")
            if held.task is not None:
                held.task.cancel()
            report = {
                "id": held.ctx.id,
                "status": "FAILED",
                "errorMessage": "the worker stopped before the task finished",
                "retryable": True,
                "expectedAttempt": held.attempt,
            }
            try:
                assert self._client is not None
                self._emit("report", held, "FAILED")
                await self._client.call(_UPDATE, {"input": report})
                self.summary.released += 1
                self._emit("released", held)
            except (TaskqlError, Unreachable) as err:
                self._emit("error", held, f"release: {err}")


class _Lost(Exception):
    """The task was lost while its report waited: nothing is sent."""


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _reason(err: BaseException) -> str:
    text = str(err)
    return text if text else type(err).__name__


class _Backoff:
    """0.1 s, doubling to `cap`, with jitter."""

    def __init__(self, cap: float) -> None:
        self._cap = cap
        self._next = 0.1

    def next(self) -> float:
        delay = min(self._next, self._cap)
        self._next = min(self._next * 2, self._cap)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._next = 0.1
