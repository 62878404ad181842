// Opens taskql's dashboard (/ui) in headless Chromium with a worker token and
// checks that it follows the server live: tasks created, claimed, completed
// and failed through the API show up without a reload; retry and cancel work
// from the page (and a refused action shows the server's error); a user's
// token shows only that user's tasks; an expired token and a server that goes
// away and comes back get clear messages; nothing is loaded from elsewhere.
// Talks to the Rust test on stdin/stdout to restart the server; prints one
// JSON line with what it saw last.
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';
import { graphql } from '../js/shared.mjs';

const base = process.env.TASKQL_URL;
const workerToken = process.env.TASKQL_WORKER_TOKEN;
const tokens = JSON.parse(process.env.TASKQL_USER_TOKENS); // { alice, bob, carol }
const expiredToken = process.env.TASKQL_EXPIRED_TOKEN;
const shots = process.env.SCREENSHOT_DIR;
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const TIMEOUT = 20000;

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
/** Asks the Rust side to do something to the server and waits until it has. */
async function ask(what) {
  console.log(what);
  const { value } = await lines.next();
  if (value !== `${what} done`) throw new Error(`asked ${what}, got ${value}`);
}

const api = (token, query, variables) => graphql(`${base}/graphql`, token, query, variables);
const create = async (user, type, metadata) => (await api(tokens[user],
  'mutation($t: String!, $m: JSON) { createTask(input: {type: $t, metadata: $m}) { id } }',
  { t: type, m: metadata })).createTask.id;
const claim = async (workerId, types) => (await api(workerToken,
  'mutation($w: String, $types: [String!]) { claimTask(workerId: $w, types: $types, leaseSeconds: 300) { id attempts } }',
  { w: workerId, types })).claimTask;
const setStatus = (input) => api(workerToken,
  'mutation($input: UpdateTaskStatusInput!) { updateTaskStatus(input: $input) { id status } }', { input });

const browser = await chromium.launch({
  executablePath,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const result = { externalRequests: [], consoleErrors: [], steps: [] };
const step = (name, detail) => result.steps.push(detail === undefined ? name : { [name]: detail });
const watch = (page) => {
  page.on('request', (r) => { if (!r.url().startsWith(base)) result.externalRequests.push(r.url()); });
  page.on('websocket', (ws) => {
    if (new URL(ws.url()).host !== new URL(base).host) result.externalRequests.push(ws.url());
  });
  page.on('console', (m) => { if (m.type() === 'error' && !/ERR_CONNECTION_REFUSED|WebSocket|Failed to load resource/.test(m.text())) result.consoleErrors.push(m.text()); });
  page.on('dialog', (dialog) => dialog.accept());
};
const count = (page, status) => page.textContent(`#counts [data-status="${status}"] .n`);
const waitCount = (page, status, n) => page.waitForFunction(([s, want]) => {
  const node = document.querySelector(`#counts [data-status="${s}"] .n`);
  return node && node.textContent === String(want);
}, [status, n], { timeout: TIMEOUT });
const rowStatus = (page, id, status) => page.waitForSelector(`#tasks tr[data-id="${id}"][data-status="${status}"]`, { timeout: TIMEOUT });
const rowIds = (page) => page.$$eval('#tasks tbody tr[data-id]', (rows) => rows.map((r) => r.dataset.id));
const live = (page) => page.waitForSelector('#conn[data-state="live"]', { timeout: TIMEOUT });

let page;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  // What the dashboard asks over its events socket, and how often it reads the list.
  const subscribes = [];
  let listReads = 0;
  page.on('websocket', (ws) => ws.on('framesent', (frame) => {
    try {
      const msg = JSON.parse(frame.payload);
      if (msg.type === 'subscribe') subscribes.push(msg.payload.variables || {});
    } catch (_) { /* not JSON */ }
  }));
  page.on('request', (r) => { if ((r.postData() || '').includes('query Tasks(')) listReads += 1; });
  watch(page);

  // 1. Signed in as a worker through the link; the token leaves the address bar.
  await page.goto(`${base}/ui#token=${workerToken}`);
  await live(page);
  await waitCount(page, 'PENDING', 0);
  result.fragmentCleared = !page.url().includes('token=');
  result.who = (await page.textContent('#who')).trim();
  await page.waitForSelector('#empty:not([hidden])', { timeout: TIMEOUT });
  result.emptyMessage = (await page.textContent('#empty')).trim();
  result.emptyOldest = (await page.textContent('#oldest')).trim();
  step('empty');

  // 2. Tasks created through the API appear, and the counts follow, without a reload.
  const alices = [];
  for (let i = 0; i < 3; i += 1) alices.push(await create('alice', 'image.render', { prompt: `a red fox #${i}`, size: '1024x1024' }));
  const bobs = [await create('bob', 'text.summarize', { doc: 'q3-report.pdf' }), await create('bob', 'text.summarize', { doc: 'notes.md' })];
  const carols = [await create('carol', 'audio.transcribe', { file: 'call-17.wav', lang: 'en' })];
  await waitCount(page, 'PENDING', 6);
  await page.waitForFunction(() => document.querySelectorAll('#tasks tbody tr[data-id]').length === 6, null, { timeout: TIMEOUT });
  result.listAfterCreates = await rowIds(page);
  result.userColumn = await page.isVisible('#tasks thead .user-col');
  step('created');

  // 3. A worker claims and completes one, fails another: the rows move.
  const first = await claim('gpu-1', ['image.render']);
  await rowStatus(page, first.id, 'PROCESSING');
  await waitCount(page, 'PROCESSING', 1);
  await setStatus({ id: first.id, status: 'PROCESSING', progress: 60, expectedAttempt: first.attempts });
  await setStatus({ id: first.id, status: 'COMPLETED', resultId: 'render-001', expectedAttempt: first.attempts });
  await rowStatus(page, first.id, 'COMPLETED');
  await waitCount(page, 'COMPLETED', 1);
  const failing = await claim('cpu-2', ['text.summarize']);
  await setStatus({ id: failing.id, status: 'FAILED', errorMessage: 'the document could not be parsed', expectedAttempt: failing.attempts });
  await rowStatus(page, failing.id, 'FAILED');
  await waitCount(page, 'FAILED', 1);
  result.completedId = first.id;
  result.failedId = failing.id;
  // Something still running, for the workers table and the screenshots.
  const running = await claim('gpu-1', ['image.render']);
  await api(workerToken, 'mutation($id: ID!) { heartbeatTask(id: $id, progress: 35, leaseSeconds: 300) { id } }', { id: running.id });
  await rowStatus(page, running.id, 'PROCESSING');
  await page.waitForFunction(() => document.querySelector('#workers tbody').textContent.includes('gpu-1'), null, { timeout: TIMEOUT });
  result.workersTable = (await page.textContent('#workers tbody')).trim();
  await page.waitForFunction(() => document.querySelector('#durations tbody').textContent.includes('image.render'), null, { timeout: TIMEOUT });
  step('worker');

  // 4. Retry the failed task and cancel a pending one from the page.
  await page.click(`#tasks tr[data-id="${failing.id}"]`);
  await page.waitForSelector('#detail:not([hidden])', { timeout: TIMEOUT });
  await page.waitForFunction(() => document.querySelector('#d-metadata').textContent.includes('q3-report.pdf'), null, { timeout: TIMEOUT });
  result.detailError = await page.textContent('#d-fields');
  await page.click('#d-retry');
  await rowStatus(page, failing.id, 'PENDING');
  await page.waitForSelector('#detail[data-status="PENDING"]', { timeout: TIMEOUT });
  result.retriedFields = await page.textContent('#d-fields');
  result.retried = await api(workerToken, 'query($id: ID!) { task(id: $id) { status attempts errorMessage } }', { id: failing.id });
  // Retrying it again is refused: the page shows the server's CONFLICT.
  await page.click('#d-retry');
  await page.waitForSelector('#d-error:not([hidden])', { timeout: TIMEOUT });
  result.refusal = (await page.textContent('#d-error')).trim();
  await page.click('#d-close');
  const toCancel = carols[0];
  await page.click(`#tasks tr[data-id="${toCancel}"]`);
  await page.waitForSelector(`#detail:not([hidden])`, { timeout: TIMEOUT });
  await page.waitForFunction((id) => document.querySelector('#d-id').textContent === id, toCancel, { timeout: TIMEOUT });
  await page.click('#d-cancel');
  await rowStatus(page, toCancel, 'CANCELLED');
  await waitCount(page, 'CANCELLED', 1);
  result.cancelled = await api(workerToken, 'query($id: ID!) { task(id: $id) { status } }', { id: toCancel });
  await page.click('#d-close');
  // A filter: only FAILED/… by status, then back.
  await page.selectOption('#f-status', 'CANCELLED');
  await page.waitForFunction(() => document.querySelectorAll('#tasks tbody tr[data-id]').length === 1, null, { timeout: TIMEOUT });
  result.filteredCancelled = await rowIds(page);
  await page.click('#f-clear');
  await page.waitForFunction(() => document.querySelectorAll('#tasks tbody tr[data-id]').length === 6, null, { timeout: TIMEOUT });
  result.counts = {};
  for (const s of ['PENDING', 'PROCESSING', 'COMPLETED', 'FAILED', 'CANCELLED']) result.counts[s] = await count(page, s);
  step('actions');

  // Screenshots: laptop, dark, phone (with the detail open on the phone).
  if (shots) {
    await page.click(`#tasks tr[data-id="${first.id}"]`);
    await page.waitForFunction(() => document.querySelector('#d-metadata').textContent.includes('fox'), null, { timeout: TIMEOUT });
    await page.click('#d-close');
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.screenshot({ path: `${shots}/dashboard.png`, fullPage: true });
    await page.emulateMedia({ colorScheme: 'dark' });
    await page.screenshot({ path: `${shots}/dashboard-dark.png`, fullPage: true });
    await page.emulateMedia({ colorScheme: 'light' });
    const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
    const phonePage = await phone.newPage();
    watch(phonePage);
    await phonePage.goto(`${base}/ui#token=${workerToken}`);
    await live(phonePage);
    await waitCount(phonePage, 'PENDING', Number(result.counts.PENDING));
    await phonePage.waitForSelector('#tasks tbody tr[data-id]', { timeout: TIMEOUT });
    await phonePage.screenshot({ path: `${shots}/dashboard-phone.png`, fullPage: true });
    await phone.close();
    step('screenshots');
  }

  // 5. A user's token shows only that user's tasks (and no user column).
  const userContext = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const userPage = await userContext.newPage();
  watch(userPage);
  await userPage.goto(`${base}/ui#token=${tokens.alice}`);
  await live(userPage);
  await userPage.waitForFunction(() => document.querySelectorAll('#tasks tbody tr[data-id]').length > 0, null, { timeout: TIMEOUT });
  await userPage.waitForFunction(() => document.querySelector('#counts [data-status="TOTAL"] .n')?.textContent === '3', null, { timeout: TIMEOUT });
  result.userRows = await rowIds(userPage);
  result.alices = alices;
  result.userWho = (await userPage.textContent('#who')).trim();
  result.userColumnForUser = await userPage.isVisible('#tasks thead .user-col');
  // Bob's new task never shows on alice's page; alice's does, live.
  await create('bob', 'text.summarize', { doc: 'late.md' });
  const late = await create('alice', 'image.render', { prompt: 'late' });
  await userPage.waitForSelector(`#tasks tr[data-id="${late}"]`, { timeout: TIMEOUT });
  result.userRowsAfter = await rowIds(userPage);
  result.alices.push(late);
  await userContext.close();
  step('user');

  // 6. An expired token: a clear message, no data.
  const expiredContext = await browser.newContext();
  const expiredPage = await expiredContext.newPage();
  watch(expiredPage);
  await expiredPage.goto(`${base}/ui#token=${expiredToken}`);
  await expiredPage.waitForSelector('#notice:not([hidden])', { timeout: TIMEOUT });
  result.expiredNotice = (await expiredPage.textContent('#notice')).trim();
  result.expiredConn = await expiredPage.getAttribute('#conn', 'data-state');
  await expiredContext.close();
  step('expired');

  // 7. The server goes away and comes back: the page says so, reconnects by
  // itself, and is live again (a task made after the restart shows up).
  await ask('stop');
  await page.waitForFunction(() => document.querySelector('#notice').textContent.includes('does not answer'), null, { timeout: TIMEOUT });
  result.awayNotice = (await page.textContent('#notice')).trim();
  result.awayConn = await page.getAttribute('#conn', 'data-state');
  await ask('start');
  await live(page);
  await page.waitForSelector('#notice', { state: 'hidden', timeout: TIMEOUT });
  const listReadsBefore = listReads;
  const afterRestart = await create('carol', 'audio.transcribe', { file: 'after-restart.wav' });
  await page.waitForSelector(`#tasks tr[data-id="${afterRestart}"]`, { timeout: TIMEOUT });
  result.afterRestart = afterRestart;
  // It resumed from the last event it had, rather than reloading the list.
  result.firstSubscribeAfter = subscribes[0] ? subscribes[0].after : 'none';
  result.resumedAfter = subscribes[subscribes.length - 1].after;
  result.listReadsOnResume = listReads - listReadsBefore;
  step('restart');

  // 8. A chain: the waiting step shows what it waits for; once the step
  // before completed, its result, and the chain done before it.
  const render = await create('carol', 'video.render', { scene: 'intro' });
  const encode = (await api(tokens.carol,
    'mutation($on: [ID!]) { createTask(input: {type: "video.encode", dependsOn: $on}) { id } }',
    { on: [render] })).createTask.id;
  await page.click(`#tasks tr[data-id="${encode}"]`);
  await page.waitForFunction((id) => document.querySelector('#d-id').textContent === id
    && !document.querySelector('#d-chain-box').hidden, encode, { timeout: TIMEOUT });
  result.chainWaiting = (await page.textContent('#d-chain-summary')).trim();
  result.chainBefore = (await page.textContent('#d-before')).trim();
  await page.click('#d-close');
  const renderClaim = await claim('gpu-2', ['video.render']);
  await setStatus({ id: renderClaim.id, status: 'COMPLETED', result: { frames: 240, url: 'intro.mp4' }, expectedAttempt: renderClaim.attempts });
  await rowStatus(page, render, 'COMPLETED');
  await page.click(`#tasks tr[data-id="${render}"]`);
  await page.waitForFunction(() => document.querySelector('#d-result').textContent.includes('intro.mp4'), null, { timeout: TIMEOUT });
  result.chainResult = (await page.textContent('#d-result')).trim();
  result.chainAfter = (await page.textContent('#d-after')).trim();
  // From the step before, the link opens the one after: ready to run.
  await page.click(`#d-after li[data-id="${encode}"] button`);
  await page.waitForFunction((id) => document.querySelector('#d-id').textContent === id, encode, { timeout: TIMEOUT });
  await page.waitForFunction(() => document.querySelector('#d-chain-summary').textContent.startsWith('1 of 1'), null, { timeout: TIMEOUT });
  result.chainDone = (await page.textContent('#d-chain-summary')).trim();
  await page.click('#d-close');
  step('chain');
} catch (err) {
  result.error = String((err && err.stack) || err);
  try { result.noticeAtError = await page.textContent('#notice'); } catch (_) { /* gone */ }
  try { result.connAtError = await page.textContent('#conn'); } catch (_) { /* gone */ }
  try { if (shots) await page.screenshot({ path: `${shots}/dashboard-error.png`, fullPage: true }); } catch (_) { /* gone */ }
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
process.exit(0);
