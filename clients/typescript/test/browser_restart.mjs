// watch_restart.mjs in headless Chromium: a page of another origin watches
// one task to its final state while the test kills the server, completes
// the task, and starts a server again at the same address.
//
// Env: TASKQL_URL, TASKQL_USER_TOKEN, TASKQL_TRANSPORT (sse or ws), CHROMIUM.
// Ready with the task's id once the page has the task's first state.
import { launch } from './browser_page.mjs';
import { env, ready, report, within } from './shared.mjs';

const chromium = await launch(env('CHROMIUM'));
let outcome;
try {
  // Requests fail while no server runs, and Chromium logs each: only
  // uncaught errors count here.
  const page = await chromium.page('/', { consoleErrors: false });
  await page.exposeFunction('holdsFirstState', (id) => ready({ id }));
  outcome = await within(
    page.evaluate(
      async ({ url, token, transport }) => {
        let tokenCalls = 0;
        let retries = 0;
        const client = window.taskql.createClient({
          url,
          token: async () => {
            tokenCalls += 1;
            return token;
          },
          transport,
          retry: { initialDelayMs: 50, maxDelayMs: 500 },
          onRetry: () => {
            retries += 1;
          },
        });
        const created = await client.createTask({ type: 'image.generate', metadata: { prompt: 'a cat' } });
        const states = [];
        let callsAtReady = 0;
        const final = await client.watchTask(created.id, (task) => {
          states.push({ status: task.status, progress: task.progress, resultId: task.resultId });
          if (states.length === 1) {
            callsAtReady = tokenCalls;
            window.holdsFirstState(created.id);
          }
        });
        await client.close();
        return {
          id: created.id,
          origin: location.origin,
          final: { id: final.id, status: final.status, resultId: final.resultId },
          states,
          tokenCalls: { atReady: callsAtReady, total: tokenCalls },
          retries,
        };
      },
      { url: env('TASKQL_URL'), token: env('TASKQL_USER_TOKEN'), transport: env('TASKQL_TRANSPORT') },
    ),
    'the final state in the page',
    60_000,
  );
} finally {
  await chromium.close();
}
report({ ...outcome, pageErrors: chromium.pageErrors });
