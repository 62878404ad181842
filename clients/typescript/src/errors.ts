/** One GraphQL error as the server sends it. */
export interface GraphQLErrorShape {
  message: string;
  path?: ReadonlyArray<string | number>;
  locations?: ReadonlyArray<{ line: number; column: number }>;
  extensions?: Record<string, unknown> & { code?: string };
}

/**
 * The codes taskql puts in `extensions.code` (docs/design.md, "Errors"),
 * plus `HTTP_<status>` for an answer that carried no GraphQL error.
 */
export type TaskqlErrorCode =
  | 'CURSOR_EXPIRED'
  | 'UNAUTHENTICATED'
  | 'FORBIDDEN'
  | 'NOT_FOUND'
  | 'BAD_USER_INPUT'
  | 'BAD_REQUEST'
  | 'CONFLICT'
  | 'SERVICE_UNAVAILABLE'
  | 'INTERNAL_SERVER_ERROR'
  | 'PERSISTED_QUERY_NOT_FOUND'
  | 'PERSISTED_QUERY_NOT_SUPPORTED'
  | 'PERSISTED_QUERY_REQUIRED'
  | (string & {});

/**
 * An error the server answered: `code` is the first error's
 * `extensions.code`, `errors` all of them as sent.
 */
export class TaskqlError extends Error {
  override readonly name = 'TaskqlError';
  readonly code: TaskqlErrorCode;
  readonly errors: readonly GraphQLErrorShape[];
  /** The HTTP status, when the error came in an HTTP answer. */
  readonly status: number | undefined;

  constructor(errors: readonly GraphQLErrorShape[], status?: number) {
    const first = errors[0];
    super(first?.message ?? 'taskql answered with an error');
    this.errors = errors;
    this.code = (first?.extensions?.code as string | undefined) ?? 'INTERNAL_SERVER_ERROR';
    this.status = status;
  }

  /** The `extensions` of the first error (`index` in batches, for example). */
  get extensions(): Record<string, unknown> {
    return this.errors[0]?.extensions ?? {};
  }
}

/** What a watch or follower rejects with after `stop()` or an aborted signal. */
export class TaskqlAbortError extends Error {
  override readonly name = 'AbortError';
  constructor(message = 'stopped') {
    super(message);
  }
}

/** Whether `value` is a list of GraphQL errors (as graphql-ws reports them). */
export function isErrorList(value: unknown): value is GraphQLErrorShape[] {
  return (
    Array.isArray(value) &&
    value.length > 0 &&
    value.every((e) => typeof e === 'object' && e !== null && typeof (e as { message?: unknown }).message === 'string')
  );
}
