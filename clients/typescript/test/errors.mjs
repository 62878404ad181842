// Errors as a user of the client meets them: each a TaskqlError with the
// server's extensions.code, over HTTP and on both subscription transports.
//
// Env: TASKQL_URL, TASKQL_USER_TOKEN.
import { randomUUID } from 'node:crypto';
import WebSocket from 'ws';
import { TaskqlError, createClient } from '../dist/index.js';
import { described, env, report, within } from './shared.mjs';

const url = env('TASKQL_URL');
const token = env('TASKQL_USER_TOKEN');
const sse = createClient({ url, token });
const ws = createClient({ url, token, transport: 'ws', webSocketImpl: WebSocket });
const anonymous = createClient({ url });

async function caught(what) {
  try {
    await what();
    return { thrown: false };
  } catch (error) {
    return { thrown: true, ...described(error), instanceOf: error instanceof TaskqlError };
  }
}

const out = {};
out.missingTask = await caught(() => sse.task(randomUUID()));
out.notAnId = await caught(() => sse.task('not-a-uuid'));
out.badType = await caught(() => sse.createTask({ type: 'Not A Type!' }));
out.cancelMissing = await caught(() => sse.cancelTask(randomUUID()));
out.anonymous = await caught(() => anonymous.task(randomUUID()));
out.watchMissingSse = await caught(() => within(sse.watchTask(randomUUID()), 'watch over sse'));
out.watchMissingWs = await caught(() => within(ws.watchTask(randomUUID()), 'watch over ws'));
out.badCursor = await caught(() => within(sse.followEvents('not-a-cursor', () => {}).done, 'a refused cursor'));
// A task that exists, read back, then a cancelled one's watch ends CANCELLED.
const task = await sse.createTask({ type: 'image.generate' });
await sse.cancelTask(task.id);
const cancelled = await within(ws.watchTask(task.id), 'a cancelled task');
out.cancelled = { status: cancelled.status, id: cancelled.id === task.id };
// stop() ends a watch of a task that is still PENDING.
const pending = await sse.createTask({ type: 'image.generate' });
const states = [];
const watch = sse.watchTask(pending.id, (task) => {
  states.push(task.status);
  watch.stop();
});
out.stopped = { ...(await caught(() => within(watch, 'a stopped watch'))), states };
// An onEvent that throws ends the follower with its error: the event is
// not delivered again (as a dropped connection's would be).
for (const [name, client] of [['sse', sse], ['ws', ws]]) {
  let calls = 0;
  let probed;
  const follower = client.followEvents(null, () => {
    calls += 1;
    throw new Error(`the caller's own ${name} error`);
  });
  // The stream starts live: events come from creates after it listens.
  const probing = (async () => {
    for (let i = 0; i < 50 && calls === 0; i++) {
      probed = await client.createTask({ type: 'probe.throw' });
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  const ended = await caught(() => within(follower.done, `a follower whose onEvent threw (${name})`));
  await probing;
  // Time in which a redelivery would have come.
  await new Promise((r) => setTimeout(r, 500));
  out[`throwingOnEvent_${name}`] = { message: ended.message, calls, cursor: follower.cursor, probed: Boolean(probed) };
}
await sse.close();
await ws.close();
report(out);
