// Runs graphql-http's GraphQL-over-HTTP server audits (the suite behind the
// GraphQL-over-HTTP specification) against taskql's /graphql,
// signed in, and prints ONE JSON line:
//   {"passed": N, "failed": N, "failures": [{"id", "level", "name", "reason"}]}
// `level` is MUST, SHOULD or MAY (the first word of the audit's name). An
// audit that throws instead of failing an assertion counts as failed, with
// the error as its reason. Always exits 0: tests/conformance.rs judges.
//
// Env: TASKQL_URL (base URL, e.g. http://127.0.0.1:8000), TASKQL_TOKEN.
// Run by tests/conformance.rs; install with `npm ci --prefix tests/js`.
import { serverAudits } from 'graphql-http';
import { env } from './shared.mjs';

const url = `${env('TASKQL_URL').replace(/\/+$/, '')}/graphql`;
const TOKEN = env('TASKQL_TOKEN');

/** fetch, with the bearer token on every request the audits make. */
function fetchFn(input, init = {}) {
  const headers = new Headers(init.headers);
  headers.set('authorization', `Bearer ${TOKEN}`);
  return fetch(input, { ...init, headers });
}

const levelOf = (name) => name.split(' ', 1)[0];

let passed = 0;
const failures = [];
for (const audit of serverAudits({ url, fetchFn })) {
  let result;
  try {
    result = await audit.fn();
  } catch (error) {
    result = { id: audit.id, name: audit.name, status: 'error', reason: `audit threw: ${error}` };
  }
  if (result.status === 'ok') {
    passed += 1;
  } else {
    failures.push({
      id: result.id,
      level: levelOf(result.name),
      name: result.name,
      reason: result.reason,
    });
  }
}

console.log(JSON.stringify({ passed, failed: failures.length, failures }));
