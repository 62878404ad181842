// The client in headless Chromium: bundled for the browser with esbuild,
// loaded by a page of another origin (so CORS is crossed as in production),
// it creates and reads a task, watches it to COMPLETED over Server-Sent
// Events and over websockets while this script completes it as a worker,
// and meets a NOT_FOUND as a TaskqlError.
//
// Env: TASKQL_URL, TASKQL_USER_TOKEN, TASKQL_WORKER_TOKEN, CHROMIUM.
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';
import { chromium } from 'playwright-core';
import { env, graphql, report, within } from './shared.mjs';

const url = env('TASKQL_URL');
const workerToken = env('TASKQL_WORKER_TOKEN');
const PAGE = 'http://app.test/';

const bundle = await esbuild.build({
  entryPoints: [fileURLToPath(new URL('../dist/index.js', import.meta.url))],
  bundle: true,
  format: 'iife',
  globalName: 'taskql',
  platform: 'browser',
  write: false,
});
const script = bundle.outputFiles[0].text;

const browser = await chromium.launch({
  executablePath: env('CHROMIUM'),
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const pageErrors = [];
let outcome;
try {
  const page = await browser.newPage();
  page.on('pageerror', (error) => pageErrors.push(String(error)));
  page.on('console', (message) => {
    if (message.type() === 'error') pageErrors.push(message.text());
  });
  await page.route(PAGE, (route) =>
    route.fulfill({ contentType: 'text/html', body: '<!doctype html><title>taskql client</title><p>client test</p>' }),
  );
  await page.goto(PAGE);
  await page.addScriptTag({ content: script });
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
  outcome = result;
} finally {
  await browser.close();
}
report({ ...outcome, pageErrors });
