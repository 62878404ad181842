"""The trace context, when OpenTelemetry is installed; nothing without it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

try:
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - depends on what is installed
    _propagate = None  # type: ignore[assignment]
    _trace = None  # type: ignore[assignment]


def inject(headers: dict[str, str]) -> None:
    """Adds the current span's `traceparent` (and `tracestate`) to `headers`.

    Without OpenTelemetry, or outside any recording span, adds nothing.
    """
    if _propagate is not None:
        _propagate.inject(headers)


@contextlib.contextmanager
def task_span(task_type: str, task_id: str, traceparent: str | None) -> Iterator[None]:
    """Runs the body in a span for a task's handler, a child of the trace
    the task was created in (its `traceparent`), so that the handler's own
    spans and the worker's reports join the creator's trace."""
    if _trace is None or _propagate is None:
        yield
        return
    parent = _propagate.extract({"traceparent": traceparent}) if traceparent else None
    tracer = _trace.get_tracer("taskql_worker")
    with tracer.start_as_current_span(
        f"taskql task {task_type}",
        context=parent,
        kind=_trace.SpanKind.CONSUMER,
        attributes={"taskql.task.id": task_id, "taskql.task.type": task_type},
    ):
        yield


def in_span() -> bool:
    """Whether there is a current span whose context a request would carry."""
    return _trace is not None and _trace.get_current_span().get_span_context().is_valid
