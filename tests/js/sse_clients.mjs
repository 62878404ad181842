// The graphql-sse client (distinct connections mode, its default) set up as
// its README tells a user to: `createClient({ url, headers })`, the token in
// `headers`. It runs a query, then follows a task with `taskUpdated`; urql's
// `subscriptionExchange` follows the same task over another graphql-sse
// client, as urql's docs show. tests/sse.rs moves the task on and completes
// it. Prints ONE JSON line with what each saw.
//
// Writes `ready` to stderr once both subscriptions hold the task's first
// state: the Rust side waits for that line before it moves the task on.
//
// Env: TASKQL_URL (base URL), TASKQL_TOKEN, TASKQL_TASK_ID.
import { cacheExchange, createClient as createUrql, fetchExchange, subscriptionExchange } from '@urql/core';
import { createClient } from 'graphql-sse';
import { onEnd, pipe, subscribe } from 'wonka';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} must be set`);
  return value;
};
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

function withTimeout(promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), STEP_TIMEOUT_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

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

function follower() {
  const seen = { statuses: [], last: null, errors: [], completed: false };
  let firstResolve;
  let doneResolve;
  const first = new Promise((resolve) => (firstResolve = resolve));
  const done = new Promise((resolve) => (doneResolve = resolve));
  const sink = {
    next(result) {
      if (result.errors?.length || result.error) seen.errors.push(describe(result.error ?? result.errors[0]));
      const task = result.data?.taskUpdated;
      if (task) {
        seen.statuses.push(task.status);
        seen.last = task;
      }
      firstResolve();
    },
    error(error) {
      seen.errors.push(describe(error));
      firstResolve();
      doneResolve();
    },
    complete() {
      seen.completed = true;
      firstResolve();
      doneResolve();
    },
  };
  return { seen, first, done, sink };
}

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
    subscriptionExchange({
      forwardSubscription(request) {
        const input = { ...request, query: request.query || '' };
        return {
          subscribe(sink) {
            const unsubscribe = forUrql.subscribe(input, sink);
            return { unsubscribe };
          },
        };
      },
    }),
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
