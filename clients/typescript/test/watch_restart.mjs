// Watches one task to its final state while the test kills the server,
// completes the task, and starts a server again at the same address.
//
// Env: TASKQL_URL, TASKQL_USER_TOKEN, TASKQL_TRANSPORT (sse or ws).
// Ready with the task's id once the first state arrived.
import WebSocket from 'ws';
import { createClient } from '../dist/index.js';
import { env, ready, report, within } from './shared.mjs';

let tokenCalls = 0;
const retries = [];
const client = createClient({
  url: env('TASKQL_URL'),
  token: async () => {
    tokenCalls += 1;
    return env('TASKQL_USER_TOKEN');
  },
  transport: env('TASKQL_TRANSPORT'),
  webSocketImpl: WebSocket,
  retry: { initialDelayMs: 50, maxDelayMs: 500 },
  onRetry: ({ attempt, delayMs }) => retries.push({ attempt, delayMs }),
});

const created = await client.createTask({ type: 'image.generate', metadata: { prompt: 'a cat' } });
const states = [];
let callsAtReady = 0;
const watch = client.watchTask(created.id, (task) => {
  states.push({ status: task.status, progress: task.progress, resultId: task.resultId });
  if (states.length === 1) {
    callsAtReady = tokenCalls;
    ready({ id: created.id });
  }
});
const final = await within(watch, 'the final state', 60_000);
await client.close();
report({
  id: created.id,
  final: { id: final.id, status: final.status, resultId: final.resultId },
  states,
  tokenCalls: { atReady: callsAtReady, total: tokenCalls },
  retries: retries.length,
});
