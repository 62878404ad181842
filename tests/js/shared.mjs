// What the scripts under tests/ share (tests/browser/ui.mjs too, so this
// imports no package): settings from the environment, a time limit on a
// step, GraphQL over HTTP, urql's `subscriptionExchange` over another
// client, and a record of what one `taskUpdated` subscription received.

/** The environment variable `name`, which must be set. */
export const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} must be set`);
  return value;
};

/** `promise`, or a rejection that names `what` once `ms` have passed. */
export function withTimeout(promise, what, ms) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** POSTs an operation to `url` with `token`; its data, or a throw on errors. */
export async function graphql(url, token, query, variables = {}) {
  const response = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify({ query, variables }),
  });
  const body = await response.json();
  if (body.errors) throw new Error(`${query}: ${JSON.stringify(body.errors)}`);
  return body.data;
}

/**
 * urql's `subscriptionExchange` options, forwarding each subscription to
 * `client` (a graphql-ws or a graphql-sse client: they subscribe alike), as
 * urql's docs show.
 */
export const forwardTo = (client) => ({
  forwardSubscription(request) {
    const input = { ...request, query: request.query || '' };
    return {
      subscribe(sink) {
        const unsubscribe = client.subscribe(input, sink);
        return { unsubscribe };
      },
    };
  },
});

/**
 * Records what one `taskUpdated` subscription receives in `seen`: the
 * statuses, the last task, whether it completed, and its errors as
 * `onResultErrors(seen, result)` and `onError(seen, error)` note them;
 * `extra` adds fields to `seen`. `first` resolves on the first message,
 * `done` at the end; `sink` is the observer to subscribe with.
 */
export function taskRecorder({ onResultErrors, onError, extra = {} }) {
  const seen = { statuses: [], last: null, errors: [], ...extra, completed: false };
  let firstResolve;
  let doneResolve;
  const first = new Promise((resolve) => (firstResolve = resolve));
  const done = new Promise((resolve) => (doneResolve = resolve));
  const sink = {
    next(result) {
      onResultErrors(seen, result);
      const task = result.data?.taskUpdated;
      if (task) {
        seen.statuses.push(task.status);
        seen.last = task;
      }
      firstResolve();
    },
    error(error) {
      onError(seen, error);
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
