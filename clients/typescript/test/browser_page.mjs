// What the browser scripts share: the client bundled for the browser with
// esbuild (and the React page's bundle), served by a page server of its own
// origin (so CORS is crossed as in production; on loopback, as Chromium
// lets only a loopback page reach loopback addresses), and Debian's
// Chromium, headless, driven by playwright-core.
import { createServer } from 'node:http';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';
import { chromium } from 'playwright-core';

/** `entry` (relative to this folder) bundled for a page, as text. */
export async function bundled(entry, options = {}) {
  const bundle = await esbuild.build({
    entryPoints: [fileURLToPath(new URL(entry, import.meta.url))],
    bundle: true,
    format: 'iife',
    platform: 'browser',
    write: false,
    ...options,
  });
  return bundle.outputFiles[0].text;
}

/**
 * Chromium (at `executablePath`) with the page server running: `page(path)`
 * opens a page of it (`/` has the client as `window.taskql`, `/react` the
 * React page), whose uncaught errors (and console errors, unless
 * `consoleErrors` is false) go to `pageErrors`; `close()` ends both.
 */
export async function launch(executablePath) {
  const script = await bundled('../dist/index.js', { globalName: 'taskql' });
  const reactScript = await bundled('./react_page.mjs', {
    define: { 'process.env.NODE_ENV': '"production"' },
  });
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
  const origin = `http://localhost:${site.address().port}`;
  const browser = await chromium.launch({
    executablePath,
    args: ['--no-sandbox', '--disable-dev-shm-usage'],
  });
  const pageErrors = [];
  return {
    origin,
    pageErrors,
    async page(path = '/', { consoleErrors = true } = {}) {
      const page = await browser.newPage();
      page.on('pageerror', (error) => pageErrors.push(String(error)));
      if (consoleErrors) {
        page.on('console', (message) => {
          if (message.type() === 'error') pageErrors.push(message.text());
        });
      }
      await page.goto(`${origin}${path}`);
      return page;
    },
    async close() {
      await browser.close();
      site.close();
    },
  };
}
