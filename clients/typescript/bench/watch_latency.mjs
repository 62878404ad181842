// How soon watchTask delivers a task's final state after it is committed.
//
// For each of TASKS tasks (CONCURRENCY at a time): create it as a user,
// watch it with the client, and once the watch holds its first state, move
// it PROCESSING then COMPLETED as a worker over HTTP. Two latencies per task:
//
// - after the answer: from the moment the completing mutation's HTTP answer
//   reaches this process (the commit is before it) to the moment onChange
//   gets COMPLETED. Negative when the event came first.
// - after updatedAt: from the task's `updatedAt` as the server wrote it in
//   the completing statement (before its commit; same machine, same clock,
//   read to the millisecond) to the delivery, by Date.now(). An upper bound
//   of the delay after the commit.
//
// Env: TASKQL_URL (http://127.0.0.1:8000), TASKQL_USER_TOKEN,
// TASKQL_WORKER_TOKEN, TASKS (1000), CONCURRENCY (8), TRANSPORT (sse or ws).
// bench/run.sh starts a release server and runs this.
import { performance } from 'node:perf_hooks';
import WebSocket from 'ws';
import { createClient } from '../dist/index.js';

const url = process.env.TASKQL_URL ?? 'http://127.0.0.1:8000';
const userToken = process.env.TASKQL_USER_TOKEN;
const workerToken = process.env.TASKQL_WORKER_TOKEN;
if (!userToken || !workerToken) throw new Error('set TASKQL_USER_TOKEN and TASKQL_WORKER_TOKEN');
const tasks = Number(process.env.TASKS ?? 1000);
const concurrency = Number(process.env.CONCURRENCY ?? 8);
const transport = process.env.TRANSPORT ?? 'sse';

const client = createClient({ url, token: userToken, transport, webSocketImpl: WebSocket });
const UPDATE = 'mutation($input: UpdateTaskStatusInput!) { updateTaskStatus(input: $input) { status updatedAt } }';

async function asWorker(input) {
  const response = await fetch(client.url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${workerToken}` },
    body: JSON.stringify({ query: UPDATE, variables: { input } }),
  });
  const body = await response.json();
  if (body.errors) throw new Error(JSON.stringify(body.errors));
  return body.data.updateTaskStatus;
}

async function one(i) {
  const task = await client.createTask({ type: 'bench.watch', metadata: { i } });
  let answeredAt;
  let deliveredAt;
  let deliveredWall;
  let started;
  const first = new Promise((resolve) => (started = resolve));
  const watch = client.watchTask(task.id, (state) => {
    if (state.status === 'COMPLETED') {
      deliveredAt = performance.now();
      deliveredWall = Date.now();
    }
    started();
  });
  await first;
  await asWorker({ id: task.id, status: 'PROCESSING' });
  await asWorker({ id: task.id, status: 'COMPLETED', resultId: `bench-${i}` });
  answeredAt = performance.now();
  const final = await watch;
  return {
    afterAnswer: deliveredAt - answeredAt,
    afterUpdatedAt: deliveredWall - Date.parse(final.updatedAt),
  };
}

const results = [];
let next = 0;
const began = performance.now();
await Promise.all(
  Array.from({ length: concurrency }, async () => {
    while (next < tasks) {
      const i = next++;
      results.push(await one(i));
    }
  }),
);
const seconds = (performance.now() - began) / 1000;
await client.close();

function percentiles(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const at = (p) => sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
  const round = (v) => Math.round(v * 100) / 100;
  return { p50: round(at(50)), p90: round(at(90)), p99: round(at(99)), max: round(sorted[sorted.length - 1]) };
}
const summary = {
  tasks: results.length,
  concurrency,
  transport,
  seconds: Math.round(seconds * 10) / 10,
  afterAnswerMs: percentiles(results.map((r) => r.afterAnswer)),
  afterUpdatedAtMs: percentiles(results.map((r) => r.afterUpdatedAt)),
  within50msAfterUpdatedAt: results.filter((r) => r.afterUpdatedAt <= 50).length,
};
console.log(JSON.stringify(summary));
