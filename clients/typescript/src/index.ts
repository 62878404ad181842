export {
  FINAL_STATUSES,
  TaskqlClient,
  createClient,
  type ClientOptions,
  type CreateTaskInput,
  type EventFollower,
  type FollowOptions,
  type RetryInfo,
  type RetryOptions,
  type Task,
  type TaskEvent,
  type TaskPage,
  type TaskStatus,
  type TaskWatch,
  type TasksFilter,
  type TokenSource,
  type Transport,
  type WatchOptions,
} from './client.js';
export { TaskqlAbortError, TaskqlError, type GraphQLErrorShape, type TaskqlErrorCode } from './errors.js';
/** The typed documents and every type generated from the schema, for use with any GraphQL client. */
export * as graphql from './generated/graphql.js';
