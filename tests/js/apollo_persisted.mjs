// Apollo Client with its persisted-queries link, set up as Apollo's docs
// show (`PersistedQueryLink` with a SHA-256 function, before `HttpLink`):
// once as it comes (hashes over POST), once with `useGETForHashedQueries`.
// Each runs its query twice; a fetch that only observes records what
// went out and whether the server said PersistedQueryNotFound. Prints ONE
// JSON line. Run by tests/api/persisted.rs.
//
// Env: TASKQL_URL (base URL), TASKQL_TOKEN, TASKQL_TASK_ID.
import { createHash } from 'node:crypto';
import { ApolloClient, ApolloLink, HttpLink, InMemoryCache, gql } from '@apollo/client';
import { PersistedQueryLink } from '@apollo/client/link/persisted-queries';
import { env } from './shared.mjs';

const URL_BASE = env('TASKQL_URL').replace(/\/+$/, '');
const TOKEN = env('TASKQL_TOKEN');
const TASK_ID = env('TASKQL_TASK_ID');

const TASK = gql`
  query Task($id: ID!) {
    task(id: $id) {
      id
      status
    }
  }
`;

// Another document for the GET run: the POST run registered TASK already.
const TASK_GET = gql`
  query TaskOverGet($id: ID!) {
    task(id: $id) {
      id
      type
    }
  }
`;

const sha256 = (text) => createHash('sha256').update(text).digest('hex');

async function run(query, options) {
  const requests = [];
  async function recordingFetch(input, init) {
    const method = init?.method ?? 'GET';
    let sent = {};
    if (method === 'GET') {
      const url = new URL(String(input));
      sent = {
        query: url.searchParams.get('query'),
        extensions: JSON.parse(url.searchParams.get('extensions') ?? '{}'),
      };
    } else {
      sent = JSON.parse(init.body);
    }
    const response = await fetch(input, init);
    const text = await response.clone().text();
    requests.push({
      method,
      status: response.status,
      hasQuery: Boolean(sent.query),
      hasHash: Boolean(sent.extensions?.persistedQuery?.sha256Hash),
      notFound: text.includes('PERSISTED_QUERY_NOT_FOUND'),
    });
    return response;
  }
  const client = new ApolloClient({
    cache: new InMemoryCache(),
    link: ApolloLink.from([
      new PersistedQueryLink({ sha256, ...options }),
      new HttpLink({
        uri: `${URL_BASE}/graphql`,
        fetch: recordingFetch,
        headers: { authorization: `Bearer ${TOKEN}` },
      }),
    ]),
  });
  const seen = { requests };
  try {
    const first = await client.query({ query, variables: { id: TASK_ID }, fetchPolicy: 'network-only' });
    seen.first = first.data ?? null;
    const second = await client.query({ query, variables: { id: TASK_ID }, fetchPolicy: 'network-only' });
    seen.second = second.data ?? null;
  } catch (error) {
    seen.error = String(error?.message ?? error).slice(0, 500);
  }
  return seen;
}

const report = {
  post: await run(TASK, {}),
  get: await run(TASK_GET, { useGETForHashedQueries: true }),
};
console.log(JSON.stringify(report));
