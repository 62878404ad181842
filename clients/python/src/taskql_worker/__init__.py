"""taskql-worker: a worker library for taskql.

Claims tasks under a lease, runs a handler per task type (sync or async),
heartbeats for every task it holds in one call, and reports each result
fenced by the attempt its claim returned. See the package's README.
"""

from ._client import TaskqlError, Unreachable
from ._worker import (
    JSON,
    CancelFlag,
    Result,
    Retry,
    RunSummary,
    TaskContext,
    Worker,
    WorkerEvent,
)

__all__ = [
    "JSON",
    "CancelFlag",
    "Result",
    "Retry",
    "RunSummary",
    "TaskContext",
    "TaskqlError",
    "Unreachable",
    "Worker",
    "WorkerEvent",
]
__version__ = "0.1.0"
