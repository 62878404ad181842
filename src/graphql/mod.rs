//! The GraphQL API. Resolvers only translate: they take the caller from the
//! request (or connection) data and call `TaskService`.
use std::sync::Arc;
use std::time::Duration;

use async_graphql::{Context, ErrorExtensions, ID, Schema};
use tokio::sync::watch;
use uuid::Uuid;

use crate::auth::CurrentUser;
use crate::error::TaskError;
use crate::service::{TaskService, Worker};

mod error_codes;
mod mutation;
mod query;
mod subscription;
pub mod types;

pub use mutation::MutationRoot;
pub use query::QueryRoot;
pub use subscription::{LiveSubscriptions, StreamReads, SubscriptionCounter, SubscriptionRoot};

pub type TaskSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// Deepest query accepted; GraphiQL's introspection query needs about 13.
pub const MAX_DEPTH: usize = 20;
/// Most expensive query accepted; one `tasks(first: 100)` page with every
/// field of edges and nodes costs about 3000.
pub const MAX_COMPLEXITY: usize = 5000;

/// Who sent a request, as the transport found it. Put in request data by the
/// HTTP handler and in connection data by the websocket handler.
#[derive(Debug, Clone)]
pub enum Caller {
    Anonymous,
    /// A token was sent but did not verify: never treated as anonymous.
    Rejected(String),
    Authenticated(CurrentUser),
}

/// Flips to `true` when the server shuts down; live subscriptions end.
#[derive(Clone)]
pub struct Shutdown(pub watch::Receiver<bool>);

pub fn build_schema(
    service: Arc<dyn TaskService>,
    shutdown: watch::Receiver<bool>,
    live: LiveSubscriptions,
) -> TaskSchema {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .data(service)
        .data(Shutdown(shutdown))
        .data(live)
        .data(StreamReads::default())
        .limit_depth(MAX_DEPTH)
        .limit_complexity(MAX_COMPLEXITY)
        .limit_recursive_depth(32)
        .limit_directives(16)
        .extension(error_codes::ErrorCodes)
        .finish()
}

/// The SDL the server exports, as kept in `schema.graphql`.
pub fn sdl() -> String {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .finish()
        .sdl()
}

pub(crate) fn gql(err: TaskError) -> async_graphql::Error {
    err.extend()
}

pub(crate) fn service<'a>(ctx: &Context<'a>) -> &'a Arc<dyn TaskService> {
    ctx.data_unchecked::<Arc<dyn TaskService>>()
}

/// The authenticated caller, or UNAUTHENTICATED.
pub(crate) fn caller<'a>(ctx: &Context<'a>) -> async_graphql::Result<&'a CurrentUser> {
    match ctx.data_opt::<Caller>() {
        Some(Caller::Authenticated(user)) if user.has_expired() => Err(gql(
            TaskError::Unauthenticated("the token has expired; reconnect with a new one".into()),
        )),
        Some(Caller::Authenticated(user)) => Ok(user),
        Some(Caller::Rejected(why)) => Err(gql(TaskError::Unauthenticated(why.clone()))),
        Some(Caller::Anonymous) | None => Err(gql(TaskError::Unauthenticated(
            "sign in: send 'Authorization: Bearer <token>'".into(),
        ))),
    }
}

/// The caller as a worker (service role), else FORBIDDEN.
pub(crate) fn worker(ctx: &Context<'_>) -> async_graphql::Result<Worker> {
    Worker::new(caller(ctx)?).map_err(gql)
}

pub(crate) fn task_id(id: &ID) -> async_graphql::Result<Uuid> {
    Uuid::parse_str(id.as_str()).map_err(|_| {
        gql(TaskError::invalid(format!(
            "'{}' is not a task id",
            id.as_str()
        )))
    })
}

/// `leaseSeconds` as a duration; the service says which are allowed.
pub(crate) fn lease(seconds: Option<i32>) -> Option<Duration> {
    seconds.map(|s| Duration::from_secs(s.max(0) as u64))
}
