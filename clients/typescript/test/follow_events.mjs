// Follows the user's task events while the test kills the server, makes
// changes with it down, starts it again at the same address and makes more;
// ends at the first event of a task of type `marker.done`.
//
// Env: TASKQL_URL, TASKQL_USER_TOKEN, TASKQL_USER_TOKEN_2 (what the token
// function returns from its second call on), TASKQL_TRANSPORT.
// Ready with the cursor of the first event delivered (a probe it created).
import WebSocket from 'ws';
import { createClient } from '../dist/index.js';
import { env, ready, report, within } from './shared.mjs';

let tokenCalls = 0;
let retries = 0;
const client = createClient({
  url: env('TASKQL_URL'),
  token: () => {
    tokenCalls += 1;
    return tokenCalls === 1 ? env('TASKQL_USER_TOKEN') : env('TASKQL_USER_TOKEN_2');
  },
  transport: env('TASKQL_TRANSPORT'),
  webSocketImpl: WebSocket,
  retry: { initialDelayMs: 50, maxDelayMs: 500 },
  onRetry: () => {
    retries += 1;
  },
});

const events = [];
let first;
const firstEvent = new Promise((resolve) => (first = resolve));
let marker;
const markerSeen = new Promise((resolve) => (marker = resolve));
const follower = client.followEvents(null, (event) => {
  events.push({ cursor: event.cursor, kind: event.kind, id: event.task.id, type: event.task.type, status: event.task.status });
  first(event);
  if (event.task.type === 'marker.done') marker(event);
});
// Without a cursor the stream starts live; probes until one is delivered.
const probing = (async () => {
  for (let i = 0; i < 100 && events.length === 0; i++) {
    await client.createTask({ type: 'probe', metadata: { i } });
    await Promise.race([firstEvent, new Promise((r) => setTimeout(r, 100))]);
  }
})();
const start = await within(firstEvent, 'the first event');
await probing;
ready({ cursor: start.cursor, delivered: events.length, callsAtReady: tokenCalls });
const callsAtReady = tokenCalls;
await within(markerSeen, 'the marker event', 90_000);
follower.stop();
await client.close();
report({
  events,
  cursor: follower.cursor,
  tokenCalls: { atReady: callsAtReady, total: tokenCalls },
  retries,
});
