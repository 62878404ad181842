// taskql's operations dashboard: plain JavaScript on taskql's own GraphQL
// API. Queries and mutations go over HTTP; live changes come from the
// `taskEvents` subscription over a small graphql-transport-ws client below.
// The token stays in this browser (localStorage) and goes out only in the
// Authorization header and in connection_init. Every value from the server
// is put into the page as text, never as HTML.
'use strict';

const PAGE_SIZE = 25;
const TOKEN_KEY = 'taskql-token';
const STATS_EVERY_MS = 1000; // refetch taskStats after events at most this often
const STATS_REFRESH_MS = 15000; // and anyway, so ages and minutes move on
const STATUSES = ['PENDING', 'PROCESSING', 'COMPLETED', 'FAILED', 'CANCELLED'];
const TASK_FIELDS = 'id type status progress attempts resultId errorMessage userId workerId leaseExpiresAt createdAt updatedAt startedAt completedAt';
// A task's place in its chain: what it waits for, and what waits for it.
const CHAIN_FIELDS = 'waitingOn { id } dependencies { id type status } dependents { id type status }';
// A pending task's place in its type's line: one statement per task, so the
// detail panel asks for it, not the list.
const PLACE_FIELDS = 'queuePosition estimatedStartAt';
const STATS_QUERY = `query Stats {
  taskStats {
    byStatus { status count }
    byType { type pending processing completed failed cancelled }
    throughput(minutes: 60) { at created completed failed }
    durations { type waitP50Ms waitP95Ms runP50Ms runP95Ms runP99Ms }
    oldestPendingAgeSeconds
    workers { workerId tasks nextLeaseExpiry }
  }
}`;
const TASKS_QUERY = `query Tasks($status: [TaskStatus!], $type: String, $user: String, $after: String) {
  tasks(status: $status, type: $type, userId: $user, first: ${PAGE_SIZE}, after: $after) {
    edges { cursor node { ${TASK_FIELDS} } }
    pageInfo { hasNextPage endCursor }
  }
}`;
const EVENTS_SUBSCRIPTION = `subscription Events($after: String) { taskEvents(after: $after) { cursor kind task { ${TASK_FIELDS} } } }`;

const $ = (id) => document.getElementById(id);

/** An element with text (never HTML) and attributes. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'text') node.textContent = value;
    else if (key === 'class') node.className = value;
    else if (key.startsWith('data-')) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

// ---- sign-in ----------------------------------------------------------

const fromFragment = new URLSearchParams(window.location.hash.slice(1)).get('token');
if (fromFragment) {
  localStorage.setItem(TOKEN_KEY, fromFragment);
  history.replaceState(null, '', window.location.pathname);
}
let token = (localStorage.getItem(TOKEN_KEY) || '').trim();

function claimsOf(jwt) {
  try {
    return JSON.parse(atob(jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')));
  } catch (_) {
    return null;
  }
}

const state = {
  claims: null,
  // The page cannot know the server's configured service role: it assumes
  // the default, and learns otherwise as soon as it sees another user's task.
  worker: false,
  signedIn: false,
  stats: null,
  statsAt: 0,
  filters: { status: '', type: '', user: '' },
  cursors: [null], // the `after` of each page seen so far
  page: 0,
  rows: [], // tasks shown, newest first
  hasNext: false,
  missed: 0, // new matching tasks while on an older page
  detail: null, // the task open in the detail panel
};

// ---- messages ----------------------------------------------------------

let noticeKind = null;
function notice(kind, text) {
  noticeKind = kind;
  const box = $('notice');
  box.hidden = !text;
  box.textContent = text || '';
}
function clearNotice(kind) {
  if (noticeKind === kind) notice(null, '');
}

function setConn(stateName, text) {
  const conn = $('conn');
  conn.dataset.state = stateName;
  conn.textContent = text;
}

class ApiError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function unauthenticated(message) {
  state.signedIn = false;
  live.stop();
  setConn('expired', 'signed out');
  notice('auth', `Your token is not accepted: ${message}. Paste a new one above ` +
    '(taskql token --user dashboard --role service_role --ttl 7d), or open the link taskql printed at start.');
}

function unreachable() {
  setConn('off', 'server unreachable');
  notice('server', 'taskql does not answer. The page reconnects by itself when the server is back.');
}

// ---- GraphQL over HTTP -------------------------------------------------

async function gql(query, variables = {}) {
  let response;
  try {
    response = await fetch('/graphql', {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
      body: JSON.stringify({ query, variables }),
    });
  } catch (_) {
    unreachable();
    throw new ApiError('UNREACHABLE', 'the server does not answer');
  }
  let body;
  try {
    body = await response.json();
  } catch (_) {
    if (response.status >= 500) unreachable();
    throw new ApiError(`HTTP_${response.status}`, `the server answered ${response.status}`);
  }
  clearNotice('server');
  if (body.errors && body.errors.length) {
    const first = body.errors[0];
    const code = (first.extensions && first.extensions.code) || 'ERROR';
    if (code === 'UNAUTHENTICATED') unauthenticated(first.message);
    throw new ApiError(code, first.message);
  }
  return body.data;
}

// ---- graphql-transport-ws ----------------------------------------------

/**
 * One websocket carrying `taskEvents`, reconnecting with backoff. It keeps
 * the cursor of the last event it received and resumes from it after a
 * reconnect, so the server replays what changed meanwhile instead of the
 * page reloading everything.
 */
class Live {
  constructor() {
    this.socket = null;
    this.attempt = 0;
    this.timer = null;
    this.stopped = true;
    this.cursor = null;
  }

  start() {
    this.stop();
    this.stopped = false;
    this.cursor = null;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      socket.onclose = null;
      socket.close(1000, 'bye');
    }
  }

  connect() {
    const url = new URL('/graphql/ws', window.location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    setConn('connecting', this.attempt ? 'reconnecting…' : 'connecting…');
    const socket = new WebSocket(url, 'graphql-transport-ws');
    this.socket = socket;
    const send = (message) => socket.readyState === WebSocket.OPEN && socket.send(JSON.stringify(message));
    socket.onopen = () => send({ type: 'connection_init', payload: { Authorization: `Bearer ${token}` } });
    socket.onmessage = (message) => {
      let msg;
      try { msg = JSON.parse(message.data); } catch (_) { return; }
      switch (msg.type) {
        case 'connection_ack':
          this.attempt = 0;
          setConn('live', 'live');
          clearNotice('server');
          send({
            id: 'events',
            type: 'subscribe',
            payload: { query: EVENTS_SUBSCRIPTION, variables: { after: this.cursor } },
          });
          // The first time, or when there is nothing to resume from: read
          // everything. A resumed stream replays what changed meanwhile.
          if (!this.cursor) refreshAll();
          break;
        case 'next': {
          const payload = msg.payload || {};
          const error = (payload.errors && payload.errors[0]) || null;
          if (error) {
            this.failed(error);
          } else if (payload.data && payload.data.taskEvents) {
            this.cursor = payload.data.taskEvents.cursor;
            onEvent(payload.data.taskEvents);
          }
          break;
        }
        case 'error':
          this.failed((msg.payload && msg.payload[0]) || {});
          break;
        case 'complete':
          // The server ended the stream (it is shutting down): start over.
          socket.close(1000, 'stream ended');
          break;
        case 'ping':
          send({ type: 'pong' });
          break;
        default:
          break;
      }
    };
    socket.onclose = (event) => {
      if (this.socket !== socket || this.stopped) return;
      this.socket = null;
      if (event.code === 4403) {
        unauthenticated(event.reason || 'the token has expired');
        return;
      }
      // 0.5 s, 1 s, 2 s … up to 30 s, with jitter so many pages do not
      // come back at the same instant.
      const delay = Math.min(30000, 500 * 2 ** this.attempt) * (0.75 + Math.random() / 2);
      this.attempt += 1;
      if (this.attempt > 1) unreachable();
      setConn('reconnecting', `reconnecting in ${Math.ceil(delay / 1000)} s`);
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }
}
/** An error on the events stream. */
Live.prototype.failed = function failed(error) {
  const code = error.extensions && error.extensions.code;
  if (code === 'UNAUTHENTICATED') {
    unauthenticated(error.message);
  } else if (code === 'CURSOR_EXPIRED' || code === 'BAD_USER_INPUT') {
    // Too far behind to replay (or a cursor of another database): start
    // over from now on a new socket, and read everything again.
    this.cursor = null;
    if (this.socket) this.socket.close(1000, 'starting over');
  } else {
    notice('live', `Live updates failed: ${error.message || 'unknown error'}`);
  }
};
const live = new Live();

// ---- formatting --------------------------------------------------------

function duration(ms) {
  if (ms === null || ms === undefined) return '–';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${Math.round(s % 60)}s`;
  const h = Math.floor(m / 60);
  return h < 48 ? `${h}h ${m % 60}m` : `${Math.floor(h / 24)}d ${h % 24}h`;
}

function ago(iso) {
  if (!iso) return '–';
  const ms = Date.now() - Date.parse(iso);
  if (ms < 0) return `in ${duration(-ms)}`;
  if (ms < 1000) return 'just now';
  return `${duration(ms)} ago`;
}

function stamp(iso) {
  return iso ? new Date(iso).toLocaleString() : '–';
}

const shortId = (id) => `…${id.slice(-8)}`;

// ---- overview ----------------------------------------------------------

let statsTimer = null;
let statsInFlight = false;
/** Refetches taskStats now, or as soon as a second has passed since the last. */
function scheduleStats() {
  if (statsTimer) return;
  const wait = Math.max(0, state.statsAt + STATS_EVERY_MS - Date.now());
  statsTimer = setTimeout(async () => {
    statsTimer = null;
    if (statsInFlight) { scheduleStats(); return; }
    statsInFlight = true;
    state.statsAt = Date.now();
    try { await loadStats(); } catch (_) { /* shown by gql */ } finally { statsInFlight = false; }
  }, wait);
}

async function loadStats() {
  if (!state.signedIn) return;
  const data = await gql(STATS_QUERY);
  state.stats = data.taskStats;
  state.statsFetched = Date.now();
  renderStats();
  renderEmpty();
}

function renderStats() {
  const stats = state.stats;
  if (!stats) return;
  const total = stats.byStatus.reduce((sum, s) => sum + s.count, 0);
  const cards = $('counts');
  cards.replaceChildren(
    ...stats.byStatus.map((s) => el('button', { type: 'button', class: 'card', 'data-status': s.status, title: `Show ${s.status} tasks`,
      onclick: () => setFilters({ ...state.filters, status: s.status }) },
    el('span', { class: 'label', text: s.status.toLowerCase() }), el('span', { class: 'n', text: s.count.toLocaleString() }))),
    el('div', { class: 'card', 'data-status': 'TOTAL' },
      el('span', { class: 'label', text: 'total' }), el('span', { class: 'n', text: total.toLocaleString() })),
  );
  renderChart(stats.throughput);
  renderOldest();

  const rowsOr = (tbody, rows, columns, none) => {
    tbody.replaceChildren(...(rows.length ? rows : [el('tr', {}, el('td', { class: 'none', colSpan: columns, text: none }))]));
  };
  rowsOr($('workers').tBodies[0], stats.workers.map((w) => el('tr', {},
    el('td', { text: w.workerId }), el('td', { class: 'num', text: w.tasks }),
    el('td', { text: ago(w.nextLeaseExpiry), title: stamp(w.nextLeaseExpiry) }))), 3, 'no worker holds a lease');
  rowsOr($('durations').tBodies[0], stats.durations.map((d) => el('tr', {},
    el('td', { text: d.type }),
    ...[d.waitP50Ms, d.waitP95Ms, d.runP50Ms, d.runP95Ms, d.runP99Ms].map((v) => el('td', { class: 'num', text: duration(v) })))),
  6, 'no task finished in the last hour');
  rowsOr($('bytype').tBodies[0], stats.byType.map((t) => el('tr', {},
    el('td', { text: t.type }),
    ...['pending', 'processing', 'completed', 'failed', 'cancelled'].map((k) => el('td', { class: 'num', text: t[k].toLocaleString() })))),
  6, 'no tasks yet');
  $('types').replaceChildren(...stats.byType.map((t) => el('option', { value: t.type })));
}

function renderOldest() {
  const stats = state.stats;
  if (!stats) return;
  const age = stats.oldestPendingAgeSeconds;
  $('oldest').textContent = age === null ? 'nothing is pending'
    : duration(age * 1000 + (Date.now() - state.statsFetched));
}

const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Created, completed and failed per minute, as lines. */
function renderChart(points) {
  // Drawn at the size it is shown, so lines and labels keep their shape.
  const width = Math.max(240, Math.round($('chart').clientWidth || 600)); const height = 180;
  const left = 34; const right = 8; const top = 10; const bottom = 22;
  const max = Math.max(1, ...points.flatMap((p) => [p.created, p.completed, p.failed]));
  const x = (i) => left + (i * (width - left - right)) / Math.max(1, points.length - 1);
  const y = (v) => top + (height - top - bottom) * (1 - v / max);
  const chart = svg('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': `Tasks per minute over the last ${points.length} minutes` });
  chart.append(svg('line', { class: 'axis', x1: left, y1: y(0), x2: width - right, y2: y(0) }));
  chart.append(svg('line', { class: 'axis', x1: left, y1: y(max), x2: width - right, y2: y(max) }));
  chart.append(svg('text', { x: left - 4, y: y(max) + 4, 'text-anchor': 'end' }, String(max)));
  chart.append(svg('text', { x: left - 4, y: y(0) + 4, 'text-anchor': 'end' }, '0'));
  const n = points.length;
  for (const [i, label] of [[0, `-${n}m`], [Math.floor((n - 1) / 2), `-${Math.ceil(n / 2)}m`], [n - 1, 'now']]) {
    chart.append(svg('text', { x: x(i), y: height - 6, 'text-anchor': i === 0 ? 'start' : i === n - 1 ? 'end' : 'middle' }, label));
  }
  for (const key of ['created', 'completed', 'failed']) {
    const line = svg('polyline', { class: `line ${key}`, points: points.map((p, i) => `${x(i).toFixed(1)},${y(p[key]).toFixed(1)}`).join(' ') });
    line.append(svg('title', {}, `${key}: ${points.reduce((sum, p) => sum + p[key], 0)} in ${n} minutes`));
    chart.append(line);
  }
  $('chart').replaceChildren(chart);
}

// ---- task list ---------------------------------------------------------

function matches(task) {
  const f = state.filters;
  return (!f.status || task.status === f.status) && (!f.type || task.type === f.type)
    && (!f.user || task.userId === f.user);
}

/** Newest first, as `tasks` orders them. */
function newerFirst(a, b) {
  if (a.createdAt !== b.createdAt) return Date.parse(b.createdAt) - Date.parse(a.createdAt) || (a.createdAt < b.createdAt ? 1 : -1);
  return a.id < b.id ? 1 : -1;
}

function learnRole(tasks) {
  if (!state.worker && state.claims && tasks.some((t) => t.userId !== state.claims.sub)) {
    state.worker = true;
    renderWho();
  }
}

async function loadPage() {
  if (!state.signedIn) return;
  const f = state.filters;
  const data = await gql(TASKS_QUERY, {
    status: f.status ? [f.status] : null, type: f.type || null, user: f.user || null,
    after: state.cursors[state.page],
  });
  const page = data.tasks;
  state.rows = page.edges.map((e) => e.node);
  state.hasNext = page.pageInfo.hasNextPage;
  state.cursors[state.page + 1] = page.pageInfo.endCursor;
  state.missed = 0;
  learnRole(state.rows);
  renderRows();
}

function renderRows(flashId) {
  const tbody = $('tasks').tBodies[0];
  tbody.replaceChildren(...state.rows.map((t) => {
    const row = el('tr', { 'data-id': t.id, 'data-status': t.status, class: t.id === flashId ? 'flash' : undefined,
      onclick: () => openDetail(t.id) },
    el('td', { class: 'mono narrow-hide', text: shortId(t.id), title: t.id }),
    el('td', { text: t.type }),
    el('td', {}, el('span', { class: 'status', text: t.status })),
    el('td', { class: 'wide' }, t.progress === null ? '–' : el('progress', { max: 100, value: t.progress, title: `${t.progress}%` })),
    el('td', { class: 'num wide', text: t.attempts }),
    state.worker ? el('td', { class: 'user-col', text: t.userId }) : null,
    el('td', { class: 'wide', text: t.workerId || '–' }),
    el('td', { text: ago(t.createdAt), title: stamp(t.createdAt) }),
    el('td', { class: 'wide', text: ago(t.updatedAt), title: stamp(t.updatedAt) }));
    return row;
  }));
  for (const th of document.querySelectorAll('#tasks .user-col')) th.hidden = !state.worker;
  $('newer').disabled = state.page === 0;
  $('older').disabled = !state.hasNext;
  $('page').textContent = `page ${state.page + 1}`;
  $('fresh').textContent = state.missed ? `· ${state.missed} new on page 1` : '';
  renderEmpty();
}

function renderEmpty() {
  const empty = $('empty');
  const total = state.stats ? state.stats.byStatus.reduce((sum, s) => sum + s.count, 0) : null;
  if (state.rows.length) {
    empty.hidden = true;
  } else if (total === 0) {
    empty.hidden = false;
    empty.textContent = 'No tasks yet. They appear here, live, as soon as they are created: for example with '
      + 'mutation { createTask(input: {type: "demo"}) { id } } in GraphiQL at /graphql.';
  } else {
    empty.hidden = false;
    empty.textContent = 'No task matches these filters.';
  }
}

/** A change from `taskEvents`: patch the list, the detail, and the counts. */
function onEvent(event) {
  if (!event) return;
  const task = event.task;
  learnRole([task]);
  const at = state.rows.findIndex((t) => t.id === task.id);
  let flash = null;
  if (event.kind === 'DELETED') {
    if (at >= 0) state.rows.splice(at, 1);
  } else if (at >= 0) {
    if (matches(task)) { state.rows[at] = task; flash = task.id; } else state.rows.splice(at, 1);
  } else if (matches(task)) {
    const last = state.rows[state.rows.length - 1];
    const onThisPage = state.page === 0
      ? (!last || state.rows.length < PAGE_SIZE || newerFirst(task, last) < 0)
      : false;
    if (onThisPage) {
      state.rows.push(task);
      state.rows.sort(newerFirst);
      if (state.rows.length > PAGE_SIZE) { state.rows.length = PAGE_SIZE; state.hasNext = true; }
      flash = task.id;
    } else if (event.kind === 'CREATED') {
      state.missed += 1;
    }
  }
  renderRows(flash);
  if (state.detail && state.detail.id === task.id) {
    if (event.kind === 'DELETED') showDetail(null, 'This task was deleted.');
    else showDetail({ ...state.detail, ...task });
  }
  scheduleStats();
}

function setFilters(filters) {
  state.filters = filters;
  $('f-status').value = filters.status;
  $('f-type').value = filters.type;
  $('f-user').value = filters.user;
  state.cursors = [null];
  state.page = 0;
  loadPage().catch(() => {});
}

// ---- detail ------------------------------------------------------------

async function openDetail(id) {
  $('d-error').hidden = true;
  try {
    const data = await gql(`query Task($id: ID!) { task(id: $id) { ${TASK_FIELDS} ${PLACE_FIELDS} metadata result ${CHAIN_FIELDS} } }`, { id });
    showDetail(data.task);
  } catch (error) {
    showDetail(state.rows.find((t) => t.id === id) || null, `${error.code}: ${error.message}`);
  }
}

function showDetail(task, message) {
  const panel = $('detail');
  if (!task) {
    state.detail = null;
    if (message) { $('d-error').hidden = false; $('d-error').textContent = message; } else panel.hidden = true;
    return;
  }
  state.detail = task;
  panel.hidden = false;
  panel.dataset.status = task.status;
  $('d-id').textContent = task.id;
  const field = (name, value, title) => [el('dt', { text: name }), el('dd', { text: value, title })];
  $('d-fields').replaceChildren(
    ...field('status', task.status),
    ...field('type', task.type),
    ...field('user', task.userId),
    ...field('progress', task.progress === null ? '–' : `${task.progress}%`),
    ...field('in line', inLine(task), task.estimatedStartAt ? stamp(task.estimatedStartAt) : undefined),
    ...field('attempts', String(task.attempts)),
    ...field('worker', task.workerId || '–'),
    ...field('lease expires', task.leaseExpiresAt ? `${stamp(task.leaseExpiresAt)} (${ago(task.leaseExpiresAt)})` : '–'),
    ...field('result id', task.resultId || '–'),
    ...field('error', task.errorMessage || '–'),
    ...field('created', stamp(task.createdAt)),
    ...field('started', stamp(task.startedAt)),
    ...field('completed', stamp(task.completedAt)),
    ...field('updated', stamp(task.updatedAt)),
  );
  $('d-metadata').textContent = task.metadata === undefined ? '…' : JSON.stringify(task.metadata, null, 2);
  $('d-result').textContent = task.result === undefined ? '…' : (task.result === null ? '–' : JSON.stringify(task.result, null, 2));
  renderChain(task);
  if (message) { $('d-error').hidden = false; $('d-error').textContent = message; }
}

// The tasks before and after this one in its chain, each with its status,
// at a glance; a click opens one. Hidden for a task in no chain.
function renderChain(task) {
  const before = task.dependencies || [];
  const after = task.dependents || [];
  $('d-chain-box').hidden = before.length === 0 && after.length === 0;
  const waiting = new Set((task.waitingOn || []).map((t) => t.id));
  const link = (t) => el('li', { 'data-id': t.id, 'data-status': t.status },
    el('button', { type: 'button', class: 'link', title: t.id, onclick: () => openDetail(t.id) },
      el('span', { class: 'status', text: t.status }), ` ${t.type} `, el('span', { class: 'mono', text: shortId(t.id) })),
    waiting.has(t.id) ? el('span', { class: 'muted', text: ' waited for' }) : null);
  const done = before.filter((t) => t.status === 'COMPLETED').length;
  $('d-chain-summary').textContent = before.length === 0
    ? `${after.length} task(s) wait for this one`
    : `${done} of ${before.length} before it completed${waiting.size ? `; waits for ${waiting.size}` : ''}`;
  $('d-before').replaceChildren(...before.map(link));
  $('d-after').replaceChildren(...after.map(link));
}

// "#3 of its type, starts in about 40 s" for a pending task; '–' otherwise.
function inLine(task) {
  if (task.queuePosition === null || task.queuePosition === undefined) return '–';
  const position = `#${task.queuePosition} of its type`;
  if (!task.estimatedStartAt) return position;
  const seconds = Math.max(0, Math.round((Date.parse(task.estimatedStartAt) - Date.now()) / 1000));
  return `${position}, starts in about ${seconds < 90 ? `${seconds} s` : `${Math.round(seconds / 60)} min`}`;
}

async function act(name, confirmText, mutation) {
  const task = state.detail;
  if (!task || !window.confirm(confirmText)) return;
  $('d-error').hidden = true;
  try {
    const data = await gql(mutation, { id: task.id });
    const changed = data && Object.values(data)[0];
    if (changed && typeof changed === 'object') showDetail({ ...task, ...changed });
    else showDetail(null);
    loadPage().catch(() => {});
    scheduleStats();
  } catch (error) {
    $('d-error').hidden = false;
    $('d-error').textContent = `${name} refused: ${error.code}: ${error.message}`;
  }
}

// ---- wiring ------------------------------------------------------------

function renderWho() {
  const c = state.claims;
  $('who').textContent = !c ? 'not signed in' : `as ${c.sub || c.role || '?'}${state.worker ? ' (worker: every user\'s tasks)' : ''}`;
  $('f-user-label').hidden = !state.worker;
}

async function refreshAll() {
  await Promise.allSettled([loadStats(), loadPage()]);
}

function signIn(newToken) {
  token = newToken.trim();
  localStorage.setItem(TOKEN_KEY, token);
  $('token').value = token;
  state.claims = token ? claimsOf(token) : null;
  state.worker = Boolean(state.claims && state.claims.role === 'service_role');
  state.signedIn = Boolean(token);
  state.rows = [];
  state.stats = null;
  renderWho();
  clearNotice('auth');
  if (!token) {
    live.stop();
    setConn('off', 'signed out');
    notice('auth', 'Paste a token above, or open the dashboard link taskql printed at start.');
    return;
  }
  if (state.claims && state.claims.exp && state.claims.exp * 1000 < Date.now()) {
    unauthenticated('the token has expired');
    return;
  }
  state.cursors = [null];
  state.page = 0;
  live.start(); // its connection_ack loads the stats and the first page
}

document.addEventListener('DOMContentLoaded', () => {
  $('tokenbar').addEventListener('submit', (event) => { event.preventDefault(); signIn($('token').value); });
  $('filters').addEventListener('submit', (event) => {
    event.preventDefault();
    setFilters({ status: $('f-status').value, type: $('f-type').value.trim(), user: state.worker ? $('f-user').value.trim() : '' });
  });
  $('f-status').addEventListener('change', () => $('filters').requestSubmit());
  $('f-clear').addEventListener('click', () => setFilters({ status: '', type: '', user: '' }));
  $('older').addEventListener('click', () => { state.page += 1; loadPage().catch(() => { state.page -= 1; }); });
  $('newer').addEventListener('click', () => { state.page = Math.max(0, state.page - 1); loadPage().catch(() => {}); });
  $('d-close').addEventListener('click', () => { state.detail = null; $('detail').hidden = true; });
  document.addEventListener('keydown', (event) => { if (event.key === 'Escape') $('d-close').click(); });
  $('d-cancel').addEventListener('click', () => act('Cancel', 'Cancel this task?',
    `mutation Cancel($id: ID!) { cancelTask(id: $id) { ${TASK_FIELDS} } }`));
  $('d-retry').addEventListener('click', () => act('Retry', 'Retry this task? It goes back to PENDING as new.',
    `mutation Retry($id: ID!) { retryTask(id: $id) { ${TASK_FIELDS} ${PLACE_FIELDS} } }`));
  $('d-delete').addEventListener('click', () => act('Delete', 'Delete this task for good?',
    'mutation Delete($id: ID!) { deleteTask(id: $id) }'));
  // Ages and lease countdowns move on between events; stats refresh too.
  setInterval(() => { renderOldest(); if (state.rows.length) renderRows(); }, 5000);
  window.addEventListener('resize', () => { if (state.stats) renderChart(state.stats.throughput); });
  setInterval(() => { if (state.signedIn && live.socket) scheduleStats(); }, STATS_REFRESH_MS);
  signIn(token);
});
