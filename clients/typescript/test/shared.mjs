// What the test scripts share. Each is started by a Rust test of
// tests/typescript against a real taskql; it prints its JSON report as the
// last line on stdout, `ready <json>` on stderr when it holds what the test
// waits for, and reads `go` lines on stdin when the test says so.
import { createInterface } from 'node:readline';

export function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

/** Tells the test this script is ready, with what it should know. */
export function ready(info = {}) {
  process.stderr.write(`ready ${JSON.stringify(info)}\n`);
}

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/** Waits for the test's next line on stdin. */
export async function go() {
  const { value, done } = await lines.next();
  if (done) throw new Error('stdin closed before the test said go');
  return value;
}

export function within(promise, what, ms = 30_000) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export function report(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
  process.exit(0);
}

/** A GraphQL request as a plain client would send it (for the worker's side). */
export async function graphql(url, token, query, variables) {
  const response = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify({ query, variables }),
  });
  const body = await response.json();
  if (body.errors) throw new Error(JSON.stringify(body.errors));
  return body.data;
}

/** An error as the report shows it. */
export function described(error) {
  return {
    name: error?.name ?? null,
    code: error?.code ?? null,
    message: String(error?.message ?? error),
    isTaskqlError: error?.constructor?.name === 'TaskqlError',
  };
}
