// The event follower of follow_events.mjs and browser_follow.mjs, the same
// in Node and in a page: follows the user's task events while the test kills
// the server, makes changes with it down, starts it again at the same
// address and makes more; ends at the first event of a task of type
// `marker.done`. `ready` is told the cursor of the first event delivered
// (a probe it created), once it holds it.
import { createClient } from '../dist/index.js';

export async function followAcrossRestart({ url, token, refreshedToken, transport, webSocketImpl, ready, within }) {
  let tokenCalls = 0;
  let retries = 0;
  const client = createClient({
    url,
    token: () => {
      tokenCalls += 1;
      return tokenCalls === 1 ? token : refreshedToken;
    },
    transport,
    webSocketImpl,
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
  const callsAtReady = tokenCalls;
  await ready({ cursor: start.cursor, delivered: events.length, callsAtReady });
  await within(markerSeen, 'the marker event', 90_000);
  follower.stop();
  await client.close();
  return {
    events,
    cursor: follower.cursor,
    tokenCalls: { atReady: callsAtReady, total: tokenCalls },
    retries,
  };
}
