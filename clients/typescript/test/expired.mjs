// A cursor the server pruned: without onExpired the follower ends with the
// CURSOR_EXPIRED TaskqlError; with it, onExpired is called and the follower
// goes on live.
//
// Env: TASKQL_URL, TASKQL_USER_TOKEN. Ready with a cursor once it has one;
// goes on when the test (having pruned the log past it) says go.
import { createClient } from '../dist/index.js';
import { described, env, go, ready, report, within } from './shared.mjs';

const client = createClient({ url: env('TASKQL_URL'), token: env('TASKQL_USER_TOKEN') });

/** Follows from `after` until `done(events)`, creating probes meanwhile. */
async function firstEvents(after, options = {}) {
  const events = [];
  let wake;
  const follower = client.followEvents(
    after,
    (event) => {
      events.push({ cursor: event.cursor, kind: event.kind, type: event.task.type });
      wake?.();
    },
    options,
  );
  for (let i = 0; i < 100 && !events.some((e) => e.type === 'probe.live'); i++) {
    await client.createTask({ type: 'probe.live', metadata: { i } });
    await new Promise((resolve) => {
      wake = resolve;
      setTimeout(resolve, 100);
    });
  }
  return { follower, events };
}

const before = await within(firstEvents(null), 'a first event');
before.follower.stop();
const cursor = before.events[0].cursor;
ready({ cursor });
await go();

const out = {};
try {
  await within(client.followEvents(cursor, () => {}).done, 'CURSOR_EXPIRED', 15_000);
  out.withoutOnExpired = { thrown: false };
} catch (error) {
  out.withoutOnExpired = { thrown: true, ...described(error) };
}
const expiries = [];
const after = await within(
  firstEvents(cursor, { onExpired: (error) => expiries.push(described(error)) }),
  'events after the expiry',
);
out.expiries = expiries;
out.liveAfterExpiry = after.events.some((e) => e.type === 'probe.live');
out.replayedOld = after.events.some((e) => e.cursor === cursor);
after.follower.stop();
out.stoppedDone = await after.follower.done.then(
  () => 'resolved',
  (error) => error.name,
);
await client.close();
report(out);
