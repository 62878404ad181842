"""Tasks per second of the Python worker against the Rust example worker.

Both work no-op tasks at the same concurrency and batch setting against one
release `taskql` server on a fresh SQLite database, in alternating rounds,
each round timing one worker process from its start until it exits when
nothing is left (`exit_when_idle`). Which goes first alternates by round. From the repository root, after
`cargo build --release --bin taskql --example worker`:

    clients/python/.venv/bin/python clients/python/bench/bench.py \
        --tasks 4000 --rounds 3 --concurrency 8 --batch 1

It prints each round and, last, one JSON line with the median tasks/s of
each, their ratio python / rust, and the ratio of each round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[3]
SECRET = "taskql-bench-secret-0123456789abcdef"


def start_server(binary: Path, database: str, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKQL_")}
    env.update(
        DATABASE_URL=database,
        TASKQL_JWT_SECRET=SECRET,
        TASKQL_LISTEN=f"127.0.0.1:{port}",
        RUST_LOG="warn",
    )
    server = subprocess.Popen([str(binary), "serve"], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.kill()
    raise SystemExit("the server did not start")


def token(binary: Path, user: str, role: str | None) -> str:
    args = [str(binary), "token", "--user", user]
    if role:
        args += ["--role", role]
    env = dict(os.environ, TASKQL_JWT_SECRET=SECRET)
    return subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout.strip()


def create(url: str, owner: str, task_type: str, n: int) -> None:
    with httpx.Client(timeout=60) as http:
        for start in range(0, n, 1000):
            inputs = [{"type": task_type} for _ in range(min(1000, n - start))]
            body = http.post(
                url,
                json={
                    "query": "mutation($i: [CreateTaskInput!]!) { createTasks(inputs: $i) { id } }",
                    "variables": {"i": inputs},
                },
                headers={"authorization": f"Bearer {owner}"},
            ).json()
            if "errors" in body:
                raise SystemExit(f"createTasks: {body['errors']}")


def left(url: str, worker: str, task_type: str) -> int:
    """Tasks of `task_type` still pending or processing (at most 100)."""
    query = "query($t: String) { tasks(first: 100, type: $t, status: [PENDING, PROCESSING]) { nodes { id } } }"
    body = httpx.post(
        url,
        json={"query": query, "variables": {"t": task_type}},
        headers={"authorization": f"Bearer {worker}"},
    ).json()
    return len(body["data"]["tasks"]["nodes"])


def timed(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_python_worker(url: str, worker_token: str, task_type: str, concurrency: int, batch: int) -> None:
    """The Python worker with a no-op handler, until nothing is left."""
    from taskql_worker import TaskContext, Worker

    worker = Worker(
        url,
        worker_token,
        types=[task_type],
        concurrency=concurrency,
        batch=batch,
        lease_seconds=30,
        exit_when_idle=True,
    )

    @worker.task(task_type)
    async def noop(ctx: TaskContext) -> None:
        return None

    summary = asyncio.run(worker.run_async())
    print(json.dumps(vars(summary)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--port", type=int, default=18431)
    parser.add_argument("--server", type=Path, default=ROOT / "target/release/taskql")
    parser.add_argument("--rust-worker", type=Path, default=ROOT / "target/release/examples/worker")
    parser.add_argument("--python-worker", nargs=3, metavar=("URL", "TYPE", "TOKEN_ENV"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.python_worker:
        url, task_type, token_env = args.python_worker
        run_python_worker(url, os.environ[token_env], task_type, args.concurrency, args.batch)
        return

    with tempfile.TemporaryDirectory() as tmp:
        database = f"sqlite://{tmp}/bench.db?mode=rwc"
        server = start_server(args.server, database, args.port)
        try:
            url = f"http://127.0.0.1:{args.port}/graphql"
            owner = token(args.server, "bench-owner", None)
            worker = token(args.server, "bench-worker", "service_role")
            env = dict(os.environ, TASKQL_TOKEN=worker)
            rust_command = [
                str(args.rust_worker),
                "--url", url,
                "--concurrency", str(args.concurrency),
                "--batch", str(args.batch),
                "--steps", "0",
                "--step-ms", "0",
                "--exit-when-idle",
            ]
            python_command = [
                sys.executable,
                __file__,
                "--concurrency", str(args.concurrency),
                "--batch", str(args.batch),
                "--python-worker", url, "TYPE", "TASKQL_TOKEN",
            ]
            rates: dict[str, list[float]] = {"rust": [], "python": []}
            for round_ in range(1, args.rounds + 1):
                # Alternate which goes first: the database grows, and the
                # machine's load changes, round by round.
                order = ("rust", "python") if round_ % 2 else ("python", "rust")
                for name in order:
                    task_type = f"bench.{name}.{round_}"
                    create(url, owner, task_type, args.tasks)
                    if name == "rust":
                        command = rust_command + ["--types", task_type]
                    else:
                        command = python_command[:-2] + [task_type, "TASKQL_TOKEN"]
                    seconds = timed(command, env)
                    remaining = left(url, worker, task_type)
                    if remaining != 0:
                        raise SystemExit(f"{name} left {remaining} tasks of {task_type}")
                    rate = args.tasks / seconds
                    rates[name].append(rate)
                    print(f"round {round_}: {name:6} {args.tasks} tasks in {seconds:.2f} s = {rate:.0f} tasks/s", flush=True)
            rust = statistics.median(rates["rust"])
            python = statistics.median(rates["python"])
            ratios = [p / r for p, r in zip(rates["python"], rates["rust"])]
            print(
                json.dumps(
                    {
                        "tasks": args.tasks,
                        "rounds": args.rounds,
                        "concurrency": args.concurrency,
                        "batch": args.batch,
                        "rust_tasks_per_s": round(rust),
                        "python_tasks_per_s": round(python),
                        "ratio": round(python / rust, 3),
                        "ratio_per_round": [round(r, 3) for r in ratios],
                        "median_ratio_per_round": round(statistics.median(ratios), 3),
                    }
                )
            )
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
