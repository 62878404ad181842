// The client in headless Chromium: bundled for the browser with esbuild,
// loaded by a page of another origin (so CORS is crossed as in production),
// it creates and reads a task, watches it to COMPLETED over Server-Sent
// Events and over websockets while this script completes it as a worker,
// and meets a NOT_FOUND as a TaskqlError; then useTask in a React page.
//
// Env: TASKQL_URL, TASKQL_USER_TOKEN, TASKQL_WORKER_TOKEN, CHROMIUM.
import { createServer } from 'node:http';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';
import { chromium } from 'playwright-core';
import { env, graphql, report, within } from './shared.mjs';

const url = env('TASKQL_URL');
const workerToken = env('TASKQL_WORKER_TOKEN');

const bundle = await esbuild.build({
  entryPoints: [fileURLToPath(new URL('../dist/index.js', import.meta.url))],
  bundle: true,
  format: 'iife',
  globalName: 'taskql',
  platform: 'browser',
  write: false,
});
const script = bundle.outputFiles[0].text;
const reactBundle = await esbuild.build({
  entryPoints: [fileURLToPath(new URL('./react_page.mjs', import.meta.url))],
  bundle: true,
  format: 'iife',
  platform: 'browser',
  define: { 'process.env.NODE_ENV': '"production"' },
  write: false,
});
const reactScript = reactBundle.outputFiles[0].text;

// The page's own server: another origin than taskql's (so CORS is
// crossed), on loopback too, as Chromium lets only a loopback page reach
// loopback addresses.
const site = createServer((request, response) => {
  if (request.url === '/client.js' || request.url === '/react.js') {
    response.writeHead(200, { 'content-type': 'text/javascript' });
    response.end(request.url === '/client.js' ? script : reactScript);
  } else if (request.url === '/react') {
    response.writeHead(200, { 'content-type': 'text/html' });
    response.end('<!doctype html><title>taskql react</title><script src="/react.js"></script>');
  } else {
    response.writeHead(200, { 'content-type': 'text/html' });
    response.end('<!doctype html><title>taskql client</title><script src="/client.js"></script>');
  }
});
await new Promise((resolve) => site.listen(0, 'localhost', resolve));
const PAGE = `http://localhost:${site.address().port}/`;

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
  await page.goto(PAGE);
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
  const react = await browser.newPage();
  react.on('pageerror', (error) => pageErrors.push(String(error)));
  await react.goto(`${PAGE}react`);
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
  await browser.close();
  site.close();
}
report({ ...outcome, pageErrors });
