// The graphql-sse client (distinct connections mode, its default) set up as
// its README tells a user to: `createClient({ url, headers })`, the token in
// `headers`. It runs a query, then follows a task with `taskUpdated`; urql's
// `subscriptionExchange` follows the same task over another graphql-sse
// client, as urql's docs show. tests/subscriptions/sse.rs moves the task on and completes
// it. Prints ONE JSON line with what each saw.
//
// Writes `ready` to stderr once both subscriptions hold the task's first
// state: the Rust side waits for that line before it moves the task on.
//
// Env: TASKQL_URL (base URL), TASKQL_TOKEN, TASKQL_TASK_ID.
import { cacheExchange, createClient as createUrql, fetchExchange, subscriptionExchange } from '@urql/core';
import { createClient } from 'graphql-sse';
import { onEnd, pipe, subscribe } from 'wonka';
import { env, forwardTo, taskRecorder, withTimeout as within } from './shared.mjs';

const URL = `${env('TASKQL_URL').replace(/\/+$/, '')}/graphql`;
const TOKEN = env('TASKQL_TOKEN');
const TASK_ID = env('TASKQL_TASK_ID');
const STEP_TIMEOUT_MS = 20_000;

const TASK = 'query Task($id: ID!) { task(id: $id) { id status } }';
const WATCH = `subscription Watch($id: ID!) {
  taskUpdated(id: $id) { id status progress resultId }
}`;

const sseClient = () =>
  createClient({ url: URL, headers: { Authorization: `Bearer ${TOKEN}` }, retryAttempts: 0 });

const withTimeout = (promise, what) => within(promise, what, STEP_TIMEOUT_MS);

const describe = (error) => ({
  message: String(error?.message ?? error).slice(0, 300),
  codes: (error?.graphQLErrors ?? []).map((e) => e.extensions?.code ?? null),
});

const report = {};

// A query: one result, then the stream completes.
try {
  const results = [];
  for await (const result of sseClient().iterate({ query: TASK, variables: { id: TASK_ID } })) {
    results.push(result);
  }
  report.query = { data: results[0]?.data ?? null, results: results.length };
} catch (error) {
  report.query = { error: describe(error) };
}

// A bad token: refused before any event.
const refused = await fetch(URL, {
  method: 'POST',
  headers: { accept: 'text/event-stream', 'content-type': 'application/json', authorization: 'Bearer nope' },
  body: JSON.stringify({ query: WATCH, variables: { id: TASK_ID } }),
});
report.refused = { status: refused.status, body: await refused.json() };

const follower = () =>
  taskRecorder({
    onResultErrors(seen, result) {
      if (result.errors?.length || result.error) seen.errors.push(describe(result.error ?? result.errors[0]));
    },
    onError(seen, error) {
      seen.errors.push(describe(error));
    },
  });

// graphql-sse's own client.
const direct = follower();
const disposeDirect = sseClient().subscribe({ query: WATCH, variables: { id: TASK_ID } }, direct.sink);

// urql over graphql-sse.
const forUrql = sseClient();
const urql = createUrql({
  url: URL,
  fetchOptions: () => ({ headers: { authorization: `Bearer ${TOKEN}` } }),
  exchanges: [
    cacheExchange,
    fetchExchange,
    subscriptionExchange(forwardTo(forUrql)),
  ],
});
const viaUrql = follower();
const { unsubscribe } = pipe(
  urql.subscription(WATCH, { id: TASK_ID }),
  onEnd(() => viaUrql.sink.complete()),
  subscribe((result) => {
    // When the server completes, urql repeats the last result with
    // `hasNext: false`: that is no message of the server's.
    if (result.hasNext === false) return;
    viaUrql.sink.next(result);
  }),
);

try {
  await withTimeout(Promise.all([direct.first, viaUrql.first]), 'the first states');
  process.stderr.write('ready\n');
  await withTimeout(Promise.all([direct.done, viaUrql.done]), 'the subscriptions to complete');
} catch (error) {
  report.failure = String(error);
}
report.graphqlSse = direct.seen;
report.urql = viaUrql.seen;
disposeDirect();
unsubscribe();
console.log(JSON.stringify(report));
process.exit(0);
