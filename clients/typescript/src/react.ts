import { createContext, createElement, useContext, useEffect, useState, type ReactNode } from 'react';

import type { Task, TaskqlClient } from './client.js';
import { TaskqlAbortError } from './errors.js';

const ClientContext = createContext<TaskqlClient | null>(null);

/** Makes `client` the one `useTask` uses below it. */
export function TaskqlProvider(props: { client: TaskqlClient; children?: ReactNode }) {
  return createElement(ClientContext.Provider, { value: props.client }, props.children);
}

/** The client of the nearest `TaskqlProvider`. */
export function useTaskqlClient(): TaskqlClient {
  const client = useContext(ClientContext);
  if (!client) throw new Error('useTask needs a <TaskqlProvider client={…}> above it, or a client argument');
  return client;
}

export interface UseTaskResult {
  /** The task's latest state; undefined until the first arrives. */
  task: Task | undefined;
  /** Whether that state is final (COMPLETED, FAILED or CANCELLED). */
  done: boolean;
  /** The error the server answered (a TaskqlError: NOT_FOUND, …). */
  error: Error | undefined;
}

/**
 * The live state of task `id`, through `client.watchTask`: reconnects on
 * drops, stops when the component unmounts or `id` changes. Pass null to
 * watch nothing.
 */
export function useTask(id: string | null | undefined, client?: TaskqlClient): UseTaskResult {
  const fromContext = useContext(ClientContext);
  const active = client ?? fromContext;
  if (!active) throw new Error('useTask needs a <TaskqlProvider client={…}> above it, or a client argument');
  const [state, setState] = useState<UseTaskResult>({ task: undefined, done: false, error: undefined });
  useEffect(() => {
    setState({ task: undefined, done: false, error: undefined });
    if (!id) return undefined;
    const watch = active.watchTask(id, (task) => setState({ task, done: false, error: undefined }));
    watch.then(
      (task) => setState({ task, done: true, error: undefined }),
      (error: unknown) => {
        if (!(error instanceof TaskqlAbortError)) {
          setState((s) => ({ ...s, error: error instanceof Error ? error : new Error(String(error)) }));
        }
      },
    );
    return () => watch.stop();
  }, [active, id]);
  return state;
}
