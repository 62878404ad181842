// Follows the user's task events across a killed server, in Node (see
// follow_core.mjs).
//
// Env: TASKQL_URL, TASKQL_USER_TOKEN, TASKQL_USER_TOKEN_2 (what the token
// function returns from its second call on), TASKQL_TRANSPORT.
// Ready with the cursor of the first event delivered (a probe it created).
import WebSocket from 'ws';
import { followAcrossRestart } from './follow_core.mjs';
import { env, ready, report, within } from './shared.mjs';

report(
  await followAcrossRestart({
    url: env('TASKQL_URL'),
    token: env('TASKQL_USER_TOKEN'),
    refreshedToken: env('TASKQL_USER_TOKEN_2'),
    transport: env('TASKQL_TRANSPORT'),
    webSocketImpl: WebSocket,
    ready,
    within,
  }),
);
