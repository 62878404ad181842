// follow_events.mjs in headless Chromium: a page of another origin follows
// the user's task events across a killed server (see follow_core.mjs).
//
// Env: TASKQL_URL, TASKQL_USER_TOKEN, TASKQL_USER_TOKEN_2, TASKQL_TRANSPORT,
// CHROMIUM. Ready with the cursor of the first event delivered.
import { bundled, launch } from './browser_page.mjs';
import { env, ready, report, within } from './shared.mjs';

const follow = await bundled('./follow_core.mjs', { globalName: 'follow' });
const chromium = await launch(env('CHROMIUM'));
let outcome;
try {
  // Requests fail while no server runs, and Chromium logs each: only
  // uncaught errors count here.
  const page = await chromium.page('/', { consoleErrors: false });
  await page.addScriptTag({ content: follow });
  await page.exposeFunction('ready', (info) => ready(info));
  outcome = await within(
    page.evaluate(
      (args) =>
        window.follow.followAcrossRestart({
          ...args,
          ready: window.ready,
          within: (promise, what, ms = 30_000) =>
            Promise.race([
              promise,
              new Promise((_, reject) =>
                setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms),
              ),
            ]),
        }),
      {
        url: env('TASKQL_URL'),
        token: env('TASKQL_USER_TOKEN'),
        refreshedToken: env('TASKQL_USER_TOKEN_2'),
        transport: env('TASKQL_TRANSPORT'),
      },
    ),
    'the marker event in the page',
    120_000,
  );
  outcome.origin = await page.evaluate(() => location.origin);
} finally {
  await chromium.close();
}
report({ ...outcome, pageErrors: chromium.pageErrors });
