// Pages of tasks through the client: `tasks` one page at a time, and
// `allTasks` over every page, with a status filter too.
//
// Env: TASKQL_URL, TASKQL_USER_TOKEN.
import { createClient } from '../dist/index.js';
import { env, report } from './shared.mjs';

const client = createClient({ url: env('TASKQL_URL'), token: env('TASKQL_USER_TOKEN') });
const created = [];
for (let i = 0; i < 23; i++) {
  created.push((await client.createTask({ type: 'paged', metadata: { i } })).id);
}
const cancelled = [created[2], created[11], created[20]];
for (const id of cancelled) await client.cancelTask(id);

const pages = [];
let after = null;
for (;;) {
  const page = await client.tasks({ type: 'paged', first: 10, after });
  pages.push({ ids: page.tasks.map((t) => t.id), hasNextPage: page.hasNextPage });
  if (!page.hasNextPage) break;
  after = page.endCursor;
}
const all = [];
for await (const task of client.allTasks({ type: 'paged', first: 10 })) all.push(task.id);
const onlyCancelled = [];
for await (const task of client.allTasks({ status: ['CANCELLED'], first: 2 })) onlyCancelled.push(task.id);
report({ created, cancelled, pages, all, onlyCancelled });
