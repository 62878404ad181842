// Opens taskql's GraphiQL in headless Chromium as a person would: signs in
// through the printed #token= link, runs a mutation, then runs a subscription
// and watches it reach COMPLETED while a worker finishes the task.
// Prints one JSON line with what the page showed.
import { chromium } from 'playwright-core';

const base = process.env.TASKQL_URL;
const token = process.env.TASKQL_TOKEN;
const workerToken = process.env.TASKQL_WORKER_TOKEN;
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';

const browser = await chromium.launch({
  executablePath,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const result = { externalRequests: [], consoleErrors: [] };
let page;
try {
  page = await browser.newPage();
  page.on('request', (r) => {
    if (!r.url().startsWith(base)) result.externalRequests.push(r.url());
  });
  page.on('console', (m) => { if (m.type() === 'error') result.consoleErrors.push(m.text()); });
  page.on('response', (r) => { if (r.status() >= 400) result.consoleErrors.push(`${r.status()} ${r.url()}`); });
  await page.goto(`${base}/graphql#token=${token}`);
  await page.waitForSelector('.graphiql-container', { timeout: 20000 });
  result.signedInAs = (await page.textContent('#who')).trim();
  result.fragmentCleared = !page.url().includes('token=');

  // Types into the editor like a person (one input event, no auto-closed brackets).
  const setQuery = async (q) => {
    await page.click('.graphiql-query-editor .CodeMirror');
    await page.keyboard.press('Control+A');
    await page.keyboard.press('Delete');
    await page.keyboard.insertText(q);
  };
  const response = () => page.evaluate(() =>
    document.querySelector('.graphiql-response .CodeMirror').CodeMirror.getValue());
  const run = () => page.click('.graphiql-execute-button');

  await setQuery('mutation { createTask(input: {type: "browser.test", metadata: {from: "graphiql"}}) { id status } }');
  await run();
  await page.waitForFunction(() =>
    document.querySelector('.graphiql-response .CodeMirror').CodeMirror.getValue().includes('createTask'),
    null, { timeout: 20000 });
  const created = JSON.parse(await response());
  result.created = created;
  const id = created.data.createTask.id;

  await setQuery(`subscription WatchTask { taskUpdated(id: "${id}") { status progress resultId } }`);
  await run();
  await page.waitForFunction(() => {
    const text = document.querySelector('.graphiql-response .CodeMirror').CodeMirror.getValue();
    return text.includes('taskUpdated') && text.includes('PENDING');
  }, null, { timeout: 20000 });
  result.firstSubscriptionResponse = JSON.parse(await response());

  const update = async (status, extra) => {
    const r = await fetch(`${base}/graphql`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${workerToken}` },
      body: JSON.stringify({
        query: 'mutation($input: UpdateTaskStatusInput!) { updateTaskStatus(input: $input) { status } }',
        variables: { input: { id, status, ...extra } },
      }),
    });
    return r.json();
  };
  await update('PROCESSING', { progress: 60 });
  await page.waitForFunction(() => {
    const text = document.querySelector('.graphiql-response .CodeMirror').CodeMirror.getValue();
    return text.includes('taskUpdated') && text.includes('PROCESSING');
  }, null, { timeout: 20000 });
  await update('COMPLETED', { resultId: 'concept-from-browser' });
  await page.waitForFunction(() => {
    const text = document.querySelector('.graphiql-response .CodeMirror').CodeMirror.getValue();
    return text.includes('taskUpdated') && text.includes('COMPLETED');
  }, null, { timeout: 20000 });
  result.lastSubscriptionResponse = JSON.parse(await response());
  await page.screenshot({ path: process.env.SCREENSHOT || '/tmp/taskql-graphiql.png' });
} catch (err) {
  result.error = String(err && err.stack || err);
  try { result.responseAtError = await page.evaluate(() =>
    document.querySelector('.graphiql-response .CodeMirror').CodeMirror.getValue()); } catch (_) {}
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
