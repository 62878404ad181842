// Follows one task with two real JavaScript clients -- `graphql-ws` (the
// reference graphql-transport-ws client) and `subscriptions-transport-ws`
// (the legacy graphql-ws protocol) -- while it drives the task to COMPLETED
// over HTTP as a worker would, then prints what each client saw as JSON.
//
// Env: TASKQL_HTTP_URL, TASKQL_WS_URL, TASKQL_USER_TOKEN, TASKQL_WORKER_TOKEN.
// Run by tests/subscriptions/watch.rs; install with `npm ci --prefix tests/js`.
import { createClient } from 'graphql-ws';
import { SubscriptionClient } from 'subscriptions-transport-ws';
import WebSocket from 'ws';
import { env, graphql, taskRecorder, withTimeout as within } from './shared.mjs';

const HTTP_URL = env('TASKQL_HTTP_URL');
const WS_URL = env('TASKQL_WS_URL');
const USER_TOKEN = env('TASKQL_USER_TOKEN');
const WORKER_TOKEN = env('TASKQL_WORKER_TOKEN');
const STEP_TIMEOUT_MS = 15_000;

const WATCH = `subscription Watch($id: ID!) {
  taskUpdated(id: $id) { id status progress resultId }
}`;

const gql = (token, query, variables) => graphql(`${HTTP_URL}/graphql`, token, query, variables);

const withTimeout = (promise, what) => within(promise, what, STEP_TIMEOUT_MS);

/** Records what one subscription receives; `first` and `done` resolve as it goes. */
const recorder = () =>
  taskRecorder({
    extra: { codes: [] },
    onResultErrors(seen, result) {
      for (const error of result.errors ?? []) {
        seen.errors.push(error.message);
        seen.codes.push(error.extensions?.code ?? null);
      }
    },
    onError(seen, error) {
      // graphql-ws: an array of GraphQL errors or a CloseEvent; legacy: errors.
      const list = Array.isArray(error) ? error : [error];
      for (const e of list) {
        seen.errors.push(e?.message ?? `closed ${e?.code} ${e?.reason ?? ''}`);
        seen.codes.push(e?.extensions?.code ?? null);
      }
    },
  });

const report = {};
const created = await gql(
  USER_TOKEN,
  'mutation($input: CreateTaskInput!) { createTask(input: $input) { id } }',
  { input: { type: 'image.generate', metadata: { prompt: 'a cat' } } },
);
const id = created.createTask.id;

const modern = createClient({
  url: WS_URL,
  webSocketImpl: WebSocket,
  connectionParams: { Authorization: `Bearer ${USER_TOKEN}` },
  retryAttempts: 0,
});
const legacy = new SubscriptionClient(
  WS_URL,
  { connectionParams: { Authorization: `Bearer ${USER_TOKEN}` }, reconnect: false },
  WebSocket,
);

const viaModern = recorder();
const unsubscribeModern = modern.subscribe({ query: WATCH, variables: { id } }, viaModern.sink);
const viaLegacy = recorder();
const legacySubscription = legacy
  .request({ query: WATCH, variables: { id } })
  .subscribe(viaLegacy.sink);

try {
  // Both hold the current state before the worker moves the task on.
  await withTimeout(Promise.all([viaModern.first, viaLegacy.first]), 'the first state');
  const update = 'mutation($input: UpdateTaskStatusInput!) { updateTaskStatus(input: $input) { status } }';
  await gql(WORKER_TOKEN, update, { input: { id, status: 'PROCESSING', progress: 50 } });
  await gql(WORKER_TOKEN, update, { input: { id, status: 'COMPLETED', resultId: 'concept-js' } });
  await withTimeout(Promise.all([viaModern.done, viaLegacy.done]), 'the final state');
} catch (error) {
  report.failure = String(error);
}
report.graphqlWs = viaModern.seen;
report.subscriptionsTransportWs = viaLegacy.seen;
unsubscribeModern();
legacySubscription.unsubscribe();

// Without a token the operation fails with UNAUTHENTICATED and no data.
const anonymous = createClient({ url: WS_URL, webSocketImpl: WebSocket, retryAttempts: 0 });
const viaAnonymous = recorder();
anonymous.subscribe({ query: WATCH, variables: { id } }, viaAnonymous.sink);
try {
  await withTimeout(viaAnonymous.done, 'the anonymous subscription to end');
} catch (error) {
  report.failure ??= String(error);
}
report.graphqlWsWithoutToken = viaAnonymous.seen;

await Promise.all([modern.dispose(), anonymous.dispose()]);
legacy.close();
console.log(JSON.stringify(report));
