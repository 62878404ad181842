// The client in headless Chromium: bundled for the browser with esbuild,
// loaded by a page of another origin (so CORS is crossed as in production),
// it creates and reads a task, watches it to COMPLETED over Server-Sent
// Events and over websockets while this script completes it as a worker,
// and meets a NOT_FOUND as a TaskqlError; then useTask in a React page.
//
// Env: TASKQL_URL, TASKQL_USER_TOKEN, TASKQL_WORKER_TOKEN, CHROMIUM.
import { launch } from './browser_page.mjs';
import { env, graphql, report, within } from './shared.mjs';

const url = env('TASKQL_URL');
const workerToken = env('TASKQL_WORKER_TOKEN');
const chromium = await launch(env('CHROMIUM'));
const { pageErrors } = chromium;
let outcome;
try {
  const page = await chromium.page('/');
  // The worker's side: moves a watched task on once the page holds its first state.
  const update = 'mutation($input: UpdateTaskStatusInput!) { updateTaskStatus(input: $input) { status } }';
  await page.exposeFunction('advance', async (id, resultId) => {
    await graphql(`${url}/graphql`, workerToken, update, { input: { id, status: 'PROCESSING', progress: 40 } });
    await graphql(`${url}/graphql`, workerToken, update, { input: { id, status: 'COMPLETED', resultId } });
  });
  const result = await within(
    page.evaluate(
      async ({ url, token }) => {
        const { createClient, TaskqlError } = window.taskql;
        const out = { origin: location.origin, transports: {} };
        for (const transport of ['sse', 'ws']) {
          const client = createClient({ url, token, transport });
          const created = await client.createTask({ type: 'image.generate', metadata: { prompt: transport } });
          const read = await client.task(created.id);
          const states = [];
          const final = await client.watchTask(created.id, (task) => {
            states.push(task.status);
            if (states.length === 1) window.advance(created.id, `concept-${transport}`);
          });
          out.transports[transport] = {
            created: { id: created.id, status: created.status, type: created.type },
            read: { id: read.id, status: read.status, metadata: read.metadata },
            states,
            final: { id: final.id, status: final.status, resultId: final.resultId },
          };
          await client.close();
        }
        try {
          await createClient({ url, token }).task(crypto.randomUUID());
          out.missing = { thrown: false };
        } catch (error) {
          out.missing = { thrown: true, code: error.code, isTaskqlError: error instanceof TaskqlError };
        }
        return out;
      },
      { url, token: env('TASKQL_USER_TOKEN') },
    ),
    'the page',
    60_000,
  );
  // useTask in React: one task to COMPLETED, and a task that does not exist.
  const react = await chromium.page('/react', { consoleErrors: false });
  const token = env('TASKQL_USER_TOKEN');
  const created = await graphql(`${url}/graphql`, token, 'mutation { createTask(input: { type: "react.watch" }) { id } }', {});
  const id = created.createTask.id;
  const missing = crypto.randomUUID();
  await react.evaluate(({ url, token, ids }) => window.renderTasks(url, token, ids), { url, token, ids: [id, missing] });
  const status = (which) => react.locator(`#status-${which}`);
  const text = async (which, expected) => {
    await status(which).filter({ hasText: expected }).waitFor({ timeout: 20_000 });
    return status(which).textContent();
  };
  const reactSeen = { pending: await text(id, 'PENDING') };
  await graphql(`${url}/graphql`, workerToken, update, { input: { id, status: 'PROCESSING' } });
  reactSeen.processing = await text(id, 'PROCESSING');
  await graphql(`${url}/graphql`, workerToken, update, { input: { id, status: 'COMPLETED', resultId: 'concept-react' } });
  reactSeen.completed = await text(id, 'COMPLETED');
  reactSeen.missing = await text(missing, 'error');
  outcome = { ...result, react: reactSeen };
} finally {
  await chromium.close();
}
report({ ...outcome, pageErrors });
