import type { TypedDocumentNode } from '@graphql-typed-document-node/core';
import { print } from 'graphql';
import { createClient as createSseClient, type Client as SseClient } from 'graphql-sse';
import { createClient as createWsClient, type Client as WsClient } from 'graphql-ws';

import { TaskqlAbortError, TaskqlError, isErrorList, type GraphQLErrorShape } from './errors.js';
import {
  CancelTaskDocument,
  CreateTaskDocument,
  DeleteTaskDocument,
  RetryTaskDocument,
  TaskDocument,
  TaskEventsDocument,
  TaskUpdatedDocument,
  TasksDocument,
  type CreateTaskInput,
  type TaskEventsSubscription,
  type TaskFieldsFragment,
  type TaskStatus,
  type TasksQueryVariables,
} from './generated/graphql.js';

/** A task as the client reads it (every field of `TaskFields`). */
export type Task = TaskFieldsFragment;
/** One change event of `taskEvents`: `cursor`, `kind` and the task after it. */
export type TaskEvent = TaskEventsSubscription['taskEvents'];
export type { CreateTaskInput, TaskStatus };

/** The statuses a task never leaves by itself. */
export const FINAL_STATUSES: ReadonlySet<TaskStatus> = new Set(['COMPLETED', 'FAILED', 'CANCELLED']);

/** A token, or a function asked for one on every request and every (re)connect. */
export type TokenSource = string | (() => string | Promise<string>);

/** How subscriptions travel: Server-Sent Events (graphql-sse) or websockets (graphql-ws). */
export type Transport = 'sse' | 'ws';

/** Waits between reconnects: `initialDelayMs × factor^n`, at most `maxDelayMs`, each a random point in its upper half. */
export interface RetryOptions {
  initialDelayMs?: number;
  maxDelayMs?: number;
  factor?: number;
}

/** Told before each reconnect of a subscription. */
export interface RetryInfo {
  /** What ended the last connection. */
  error: unknown;
  /** 1 for the first reconnect after a connection delivered something. */
  attempt: number;
  delayMs: number;
}

export interface ClientOptions {
  /** The server (`http://127.0.0.1:8000`) or its GraphQL endpoint (`…/graphql`). */
  url: string;
  token?: TokenSource;
  /** For subscriptions; `sse` by default. */
  transport?: Transport;
  /** The websocket endpoint; by default the endpoint's `/ws` under `ws:`/`wss:`. */
  wsUrl?: string;
  /** A WebSocket class where there is no global one (Node 20: the `ws` package). */
  webSocketImpl?: unknown;
  /** fetch to use; the global one by default. */
  fetch?: typeof fetch;
  retry?: RetryOptions;
  onRetry?: (info: RetryInfo) => void;
}

export interface TasksFilter {
  status?: TaskStatus[];
  type?: string;
  /** A worker's filter by owner. */
  userId?: string;
  /** Page size, 1 to 100. */
  first?: number;
  /** The `endCursor` of the page before. */
  after?: string | null;
}

export interface TaskPage {
  tasks: Task[];
  hasNextPage: boolean;
  /** Pass as `after` for the next page. */
  endCursor: string | null;
}

export interface WatchOptions {
  /** Stops the watch as `stop()` does. */
  signal?: AbortSignal;
}

/** A watch: a Promise of the task's final state, and `stop()`. */
export interface TaskWatch extends Promise<Task> {
  /** Stops watching; the promise then rejects with a `TaskqlAbortError` (name `AbortError`). */
  stop(): void;
}

export interface FollowOptions {
  signal?: AbortSignal;
  /**
   * Called when the cursor to resume from was pruned (`CURSOR_EXPIRED`):
   * events were lost, so read the tasks again (`tasks`). The follower has
   * already started again without a cursor, live from now, before this is
   * called. Without `onExpired`, the follower ends and `done` rejects with the
   * `CURSOR_EXPIRED` TaskqlError.
   */
  onExpired?: (error: TaskqlError) => void;
}

/** A running `followEvents`. */
export interface EventFollower {
  /** The cursor of the last event delivered (what it resumes after). */
  readonly cursor: string | null;
  /**
   * Rejects with what ended the follower: `TaskqlAbortError` after `stop()`,
   * an error the server gave, or the error `onEvent` threw.
   */
  readonly done: Promise<void>;
  stop(): void;
}

interface Sink<T> {
  next(value: { data?: T | null; errors?: readonly GraphQLErrorShape[] }): void;
  error(error: unknown): void;
  complete(): void;
}

/** The taskql API, typed from the server's schema. */
export class TaskqlClient {
  readonly url: string;
  readonly wsUrl: string;
  readonly transport: Transport;
  private readonly tokenSource: TokenSource | undefined;
  private readonly fetchImpl: typeof fetch;
  private readonly retry: Required<RetryOptions>;
  private readonly onRetry: ((info: RetryInfo) => void) | undefined;
  private readonly webSocketImpl: unknown;
  private sse: SseClient | undefined;
  private ws: WsClient | undefined;

  constructor(options: ClientOptions) {
    const base = options.url.replace(/\/+$/, '');
    this.url = /\/graphql$/.test(base) ? base : `${base}/graphql`;
    this.wsUrl = options.wsUrl ?? `${this.url.replace(/^http/, 'ws')}/ws`;
    this.transport = options.transport ?? 'sse';
    this.tokenSource = options.token;
    this.fetchImpl = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
    this.retry = {
      initialDelayMs: options.retry?.initialDelayMs ?? 250,
      maxDelayMs: options.retry?.maxDelayMs ?? 10_000,
      factor: options.retry?.factor ?? 2,
    };
    this.onRetry = options.onRetry;
    this.webSocketImpl = options.webSocketImpl;
  }

  /** The current token (the token function is called each time). */
  async token(): Promise<string | undefined> {
    const source = this.tokenSource;
    return typeof source === 'function' ? await source() : source;
  }

  private async authorization(): Promise<Record<string, string>> {
    const token = await this.token();
    return token ? { authorization: `Bearer ${token}` } : {};
  }

  /**
   * Runs one query or mutation over HTTP; its `data`, or a `TaskqlError`
   * carrying the first error's `extensions.code`.
   */
  async request<TData, TVariables extends Record<string, unknown>>(
    document: TypedDocumentNode<TData, TVariables>,
    variables: TVariables,
  ): Promise<TData> {
    const response = await this.fetchImpl(this.url, {
      method: 'POST',
      headers: {
        'content-type': 'application/json',
        accept: 'application/graphql-response+json, application/json',
        ...(await this.authorization()),
      },
      body: JSON.stringify({ query: text(document), variables }),
    });
    let body: { data?: TData | null; errors?: GraphQLErrorShape[] } | undefined;
    try {
      body = (await response.json()) as typeof body;
    } catch {
      body = undefined;
    }
    if (body?.errors?.length) {
      throw new TaskqlError(body.errors, response.status);
    }
    if (!response.ok || !body?.data) {
      throw new TaskqlError(
        [{ message: `taskql answered HTTP ${response.status}`, extensions: { code: `HTTP_${response.status}` } }],
        response.status,
      );
    }
    return body.data;
  }

  /** Starts tracking a task; it begins PENDING. */
  async createTask(input: CreateTaskInput): Promise<Task> {
    return (await this.request(CreateTaskDocument, { input })).createTask;
  }

  /** One of your tasks; `NOT_FOUND` (a TaskqlError) when it is absent or not yours. */
  async task(id: string): Promise<Task> {
    const { task } = await this.request(TaskDocument, { id });
    if (!task) {
      throw new TaskqlError([{ message: 'task not found', extensions: { code: 'NOT_FOUND' } }]);
    }
    return task;
  }

  /** One page of your tasks, newest first. */
  async tasks(filter: TasksFilter = {}): Promise<TaskPage> {
    const variables: TasksQueryVariables = {
      status: filter.status ?? null,
      type: filter.type ?? null,
      userId: filter.userId ?? null,
      first: filter.first ?? null,
      after: filter.after ?? null,
    };
    const { tasks } = await this.request(TasksDocument, variables);
    return { tasks: tasks.nodes, hasNextPage: tasks.pageInfo.hasNextPage, endCursor: tasks.pageInfo.endCursor };
  }

  /** Every task the filter selects, page after page: `for await (const task of client.allTasks())`. */
  async *allTasks(filter: Omit<TasksFilter, 'after'> = {}): AsyncGenerator<Task, void, undefined> {
    let after: string | null = null;
    for (;;) {
      const page: TaskPage = await this.tasks({ ...filter, after });
      yield* page.tasks;
      if (!page.hasNextPage || !page.endCursor) return;
      after = page.endCursor;
    }
  }

  /** Cancels a PENDING or PROCESSING task. */
  async cancelTask(id: string): Promise<Task> {
    return (await this.request(CancelTaskDocument, { id })).cancelTask;
  }

  /** Puts a FAILED or CANCELLED task back to PENDING. */
  async retryTask(id: string): Promise<Task> {
    return (await this.request(RetryTaskDocument, { id })).retryTask;
  }

  /** Deletes a task, whatever its status. */
  async deleteTask(id: string): Promise<boolean> {
    return (await this.request(DeleteTaskDocument, { id })).deleteTask;
  }

  /**
   * Watches a task until it is COMPLETED, FAILED or CANCELLED: `onChange`
   * gets each state (the current one first; a state repeated after a
   * reconnect is not given twice), and the returned promise resolves with the
   * final one. A dropped connection is retried with backoff, for ever: the
   * subscription's first message is the task's current state, so a final
   * state reached while disconnected still arrives. It rejects with a
   * `TaskqlError` the server gives (`NOT_FOUND`: the task is absent, not
   * yours, or was deleted), `TaskqlAbortError` after `stop()`, or the
   * error `onChange` threw (which ends the watch).
   */
  watchTask(id: string, onChange?: (task: Task) => void, options: WatchOptions = {}): TaskWatch {
    let last: string | undefined;
    let finalTask: Task | undefined;
    const run = this.resilient<{ taskUpdated: Task }>({
      document: TaskUpdatedDocument as TypedDocumentNode<{ taskUpdated: Task }, Record<string, unknown>>,
      variables: () => ({ id }),
      signal: options.signal,
      onData: (data) => {
        const task = data.taskUpdated;
        const seen = JSON.stringify(task);
        if (seen !== last) {
          last = seen;
          onChange?.(task);
        }
        if (FINAL_STATUSES.has(task.status)) {
          finalTask = task;
          return 'done';
        }
        return 'more';
      },
      onServerError: (error) => error,
    });
    const promise = run.done.then(() => finalTask as Task) as TaskWatch;
    promise.catch(() => {});
    promise.stop = run.stop;
    return promise;
  }

  /**
   * Follows every change of your tasks (every user's, for a worker) after
   * `after` (an event's cursor; null: from now on). It keeps the cursor of
   * the last event it delivered and resumes after it on every reconnect, so
   * nothing is missed and nothing comes twice. See `onExpired` for a cursor
   * the server no longer keeps. An `onEvent` that throws ends the follower
   * (`done` rejects with its error); the cursor stays at the event before.
   */
  followEvents(after: string | null, onEvent: (event: TaskEvent) => void, options: FollowOptions = {}): EventFollower {
    let cursor = after;
    const run = this.resilient<{ taskEvents: TaskEvent }>({
      document: TaskEventsDocument as TypedDocumentNode<{ taskEvents: TaskEvent }, Record<string, unknown>>,
      variables: () => ({ after: cursor }),
      signal: options.signal,
      onData: (data) => {
        onEvent(data.taskEvents);
        cursor = data.taskEvents.cursor;
        return 'more';
      },
      onServerError: (error) => {
        if (error.code !== 'CURSOR_EXPIRED' || !options.onExpired) return error;
        cursor = null;
        queueMicrotask(() => options.onExpired?.(error));
        return 'restart';
      },
    });
    run.done.catch(() => {});
    return {
      get cursor() {
        return cursor;
      },
      done: run.done,
      stop: run.stop,
    };
  }

  /** Closes the transports' shared connections. */
  async close(): Promise<void> {
    this.sse?.dispose();
    await this.ws?.dispose();
    this.sse = undefined;
    this.ws = undefined;
  }

  /**
   * Runs a subscription until `onData` says done, reconnecting with backoff
   * after anything but an error the server answered (`onServerError` decides
   * those: an error ends it; 'restart' subscribes again at once).
   */
  private resilient<T>(spec: {
    document: TypedDocumentNode<T, Record<string, unknown>>;
    variables: () => Record<string, unknown>;
    signal: AbortSignal | undefined;
    onData: (data: T) => 'more' | 'done';
    onServerError: (error: TaskqlError) => TaskqlError | 'restart';
  }): { done: Promise<void>; stop: () => void } {
    let settled = false;
    let generation = 0;
    let cancel: (() => void) | undefined;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let failures = 0;
    let resolve!: () => void;
    let reject!: (error: unknown) => void;
    const done = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    const finish = (error?: unknown) => {
      if (settled) return;
      settled = true;
      generation++;
      clearTimeout(timer);
      cancel?.();
      cancel = undefined;
      spec.signal?.removeEventListener('abort', stop);
      if (error === undefined) resolve();
      else reject(error);
    };
    const stop = () => finish(new TaskqlAbortError());
    const reconnect = (error: unknown) => {
      if (settled) return;
      generation++;
      cancel?.();
      cancel = undefined;
      failures++;
      const { initialDelayMs, maxDelayMs, factor } = this.retry;
      const ceiling = Math.min(maxDelayMs, initialDelayMs * factor ** (failures - 1));
      const delayMs = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
      this.onRetry?.({ error, attempt: failures, delayMs });
      timer = setTimeout(connect, delayMs);
    };
    const serverError = (error: TaskqlError) => {
      if (error.code === 'SERVICE_UNAVAILABLE' || (error.code === 'UNAUTHENTICATED' && typeof this.tokenSource === 'function')) {
        reconnect(error);
        return;
      }
      const next = spec.onServerError(error);
      if (next === 'restart') {
        generation++;
        cancel?.();
        cancel = undefined;
        connect();
      } else {
        finish(next);
      }
    };
    const connect = () => {
      if (settled) return;
      const mine = ++generation;
      const current = () => mine === generation && !settled;
      cancel = this.subscribeOnce(spec.document, spec.variables(), {
        next: (result) => {
          if (!current()) return;
          if (result.errors?.length) {
            serverError(new TaskqlError(result.errors));
            return;
          }
          if (!result.data) return;
          failures = 0;
          let next: 'more' | 'done';
          try {
            next = spec.onData(result.data);
          } catch (error) {
            // The caller's callback threw: that ends the run, with its
            // error, rather than reaching the transport (which would take
            // it for a dropped connection and deliver the event again).
            finish(error);
            return;
          }
          if (next === 'done') finish();
        },
        error: (error) => {
          if (!current()) return;
          const known = asServerError(error);
          if (known) serverError(known);
          else reconnect(error);
        },
        complete: () => {
          // Ended without a final state: the server shut down, or the task
          // was deleted (subscribing again then answers NOT_FOUND).
          if (current()) reconnect(new Error('the subscription ended'));
        },
      });
    };
    if (spec.signal?.aborted) {
      stop();
    } else {
      spec.signal?.addEventListener('abort', stop);
      connect();
    }
    return { done, stop };
  }

  private subscribeOnce<T>(
    document: TypedDocumentNode<T, Record<string, unknown>>,
    variables: Record<string, unknown>,
    sink: Sink<T>,
  ): () => void {
    const request = { query: text(document), variables };
    if (this.transport === 'ws') {
      return this.wsClient().subscribe<T>(request, sink as Parameters<WsClient['subscribe']>[1]);
    }
    return this.sseClient().subscribe<T>(request, sink as Parameters<SseClient['subscribe']>[1]);
  }

  private sseClient(): SseClient {
    this.sse ??= createSseClient({
      url: this.url,
      headers: () => this.authorization(),
      fetchFn: this.fetchImpl,
      retryAttempts: 0,
    });
    return this.sse;
  }

  private wsClient(): WsClient {
    this.ws ??= createWsClient({
      url: this.wsUrl,
      connectionParams: async () => {
        const token = await this.token();
        return token ? { Authorization: `Bearer ${token}` } : {};
      },
      lazy: true,
      retryAttempts: 0,
      shouldRetry: () => false,
      ...(this.webSocketImpl ? { webSocketImpl: this.webSocketImpl } : {}),
    });
    return this.ws;
  }
}

/** A client: `createClient({ url, token })`. */
export function createClient(options: ClientOptions): TaskqlClient {
  return new TaskqlClient(options);
}

const printed = new WeakMap<object, string>();

function text(document: TypedDocumentNode<unknown, never> | TypedDocumentNode<never, never>): string {
  let query = printed.get(document);
  if (query === undefined) {
    query = print(document);
    printed.set(document, query);
  }
  return query;
}

/** An error the server answered, from what a transport reports; undefined for a dropped connection. */
function asServerError(error: unknown): TaskqlError | undefined {
  if (isErrorList(error)) return new TaskqlError(error);
  // graphql-sse: an HTTP answer that is not a stream (401 with the error in JSON, 503).
  const response = (error as { response?: { status?: unknown } } | null)?.response;
  if (typeof response?.status === 'number') {
    if (response.status === 401) {
      return new TaskqlError([{ message: 'unauthenticated', extensions: { code: 'UNAUTHENTICATED' } }], 401);
    }
    return undefined;
  }
  // graphql-ws: close 4403, the token was refused or expired.
  const code = (error as { code?: unknown } | null)?.code;
  if (code === 4403) {
    const reason = (error as { reason?: unknown }).reason;
    return new TaskqlError([
      { message: typeof reason === 'string' && reason ? reason : 'forbidden', extensions: { code: 'UNAUTHENTICATED' } },
    ]);
  }
  return undefined;
}
