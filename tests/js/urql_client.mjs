// urql's client set up as its docs tell a user to: `cacheExchange` and
// `fetchExchange` with their defaults (so a short query goes out as a GET,
// `preferGetMethod: 'within-url-limit'`), the token in `fetchOptions`, and
// `subscriptionExchange` over a `graphql-ws` client with the token in
// `connectionParams`. It queries one task, then follows it with `taskUpdated`
// until the server completes the subscription, while tests/conformance.rs
// completes the task as a worker would. Prints ONE JSON line with what it saw.
//
// Writes `ready` to stderr once the subscription holds the task's first state:
// the Rust side waits for that line before it moves the task on.
//
// Env: TASKQL_URL (base URL), TASKQL_WS_URL, TASKQL_TOKEN, TASKQL_TASK_ID.
// Run by tests/conformance.rs; install with `npm ci --prefix tests/js`.
import { cacheExchange, createClient, fetchExchange, subscriptionExchange } from '@urql/core';
import { createClient as createWsClient } from 'graphql-ws';
import { onEnd, pipe, subscribe } from 'wonka';
import WebSocket from 'ws';
import { env, forwardTo, taskRecorder, withTimeout as within } from './shared.mjs';

const URL_BASE = env('TASKQL_URL').replace(/\/+$/, '');
const WS_URL = env('TASKQL_WS_URL');
const TOKEN = env('TASKQL_TOKEN');
const TASK_ID = env('TASKQL_TASK_ID');
const STEP_TIMEOUT_MS = 15_000;

const TASK = `query Task($id: ID!) { task(id: $id) { id type status resultId } }`;
const WATCH = `subscription Watch($id: ID!) {
  taskUpdated(id: $id) { id status progress resultId }
}`;

// Only observes: what urql sent (method) and what came back, for the report.
const requests = [];
async function recordingFetch(input, init) {
  const response = await fetch(input, init);
  requests.push({
    method: init?.method ?? 'GET',
    status: response.status,
    contentType: response.headers.get('content-type'),
  });
  return response;
}

const wsClient = createWsClient({
  url: WS_URL,
  webSocketImpl: WebSocket,
  connectionParams: { Authorization: `Bearer ${TOKEN}` },
  retryAttempts: 0,
});

const client = createClient({
  url: `${URL_BASE}/graphql`,
  fetch: recordingFetch,
  fetchOptions: () => ({ headers: { authorization: `Bearer ${TOKEN}` } }),
  exchanges: [
    cacheExchange,
    fetchExchange,
    subscriptionExchange(forwardTo(wsClient)),
  ],
});

const withTimeout = (promise, what) => within(promise, what, STEP_TIMEOUT_MS);

// A network error's message can be a whole HTML page: keep its start.
const clip = (text) => (text.length > 300 ? `${text.slice(0, 300)}…` : text);

/** What a CombinedError says, flattened for JSON. */
const describeError = (error) =>
  error && {
    message: clip(error.message),
    networkError: error.networkError ? clip(String(error.networkError)) : null,
    codes: error.graphQLErrors.map((e) => e.extensions?.code ?? null),
  };

const report = {};

try {
  const result = await withTimeout(client.query(TASK, { id: TASK_ID }).toPromise(), 'the query');
  report.query = { data: result.data ?? null, error: describeError(result.error) };
} catch (error) {
  report.query = { data: null, error: { message: String(error) } };
}
report.query.requests = [...requests];

const { seen, first, done, sink } = taskRecorder({
  extra: { closingStatus: null },
  onResultErrors(seen, result) {
    if (result.error) seen.errors.push(describeError(result.error));
  },
  onError(seen, error) {
    seen.errors.push(describeError(error));
  },
});
const { unsubscribe } = pipe(
  client.subscription(WATCH, { id: TASK_ID }),
  onEnd(() => sink.complete()),
  subscribe((result) => {
    // When the server completes, urql repeats the last result with
    // `hasNext: false`: that is no message of the server's.
    if (result.hasNext === false) {
      seen.closingStatus = result.data?.taskUpdated?.status ?? null;
      return;
    }
    sink.next(result);
  }),
);

try {
  await withTimeout(first, 'the first state');
  process.stderr.write('ready\n');
  await withTimeout(done, 'the subscription to complete');
} catch (error) {
  report.failure = String(error);
}
report.subscription = seen;
unsubscribe();
await wsClient.dispose();
console.log(JSON.stringify(report));
