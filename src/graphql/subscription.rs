use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_graphql::{Context, ID, Result, Subscription};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};

use super::types::{Task, TaskEvent};
use super::{Shutdown, current_user, graphql_error, service, task_id};
use crate::error::{TaskError, TaskResult};

pub struct SubscriptionRoot;

/// Live subscriptions: one per websocket connection (with its limit), and
/// one for the whole server (for /metrics).
#[derive(Clone, Default)]
pub struct SubscriptionCounter {
    pub active: Arc<AtomicUsize>,
    pub limit: usize,
}

/// Holds one place in each counter for as long as a stream lives.
struct Slot(Vec<Arc<AtomicUsize>>);

impl Drop for Slot {
    fn drop(&mut self) {
        for counter in &self.0 {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Server-wide gauge of live subscriptions, kept in schema data.
#[derive(Clone, Default)]
pub struct LiveSubscriptions(pub Arc<AtomicUsize>);

fn take_slot(ctx: &Context<'_>) -> Result<Slot> {
    let mut slot = Slot(Vec::new());
    if let Some(connection) = ctx.data_opt::<SubscriptionCounter>() {
        let now = connection.active.fetch_add(1, Ordering::Relaxed) + 1;
        slot.0.push(connection.active.clone());
        if now > connection.limit {
            return Err(graphql_error(TaskError::invalid(format!(
                "this connection already runs {} subscriptions, the most allowed; \
                 open another connection or stop some",
                connection.limit
            ))));
        }
    }
    if let Some(server) = ctx.data_opt::<LiveSubscriptions>() {
        server.0.fetch_add(1, Ordering::Relaxed);
        slot.0.push(server.0.clone());
    }
    Ok(slot)
}

/// A service stream as the API sends it: each item converted, errors with
/// their code, ended when the server shuts down, holding `slot` while it lives.
fn live<T, U: Send + 'static>(
    ctx: &Context<'_>,
    stream: BoxStream<'static, TaskResult<T>>,
    slot: Slot,
    convert: fn(T) -> U,
) -> impl Stream<Item = Result<U>> + Send + 'static + use<T, U>
where
    T: Send + 'static,
{
    let mut shutdown = ctx.data_unchecked::<Shutdown>().0.clone();
    stream
        .take_until(async move {
            let _ = shutdown.wait_for(|down| *down).await;
        })
        .map(move |item| {
            let _slot = &slot;
            item.map(convert).map_err(graphql_error)
        })
}

#[Subscription(name = "Subscription")]
impl SubscriptionRoot {
    /// The task's current state, then every change in order; completes after
    /// a terminal state or a deletion. A subscription that selects
    /// `queuePosition` or `estimatedStartAt` also gets the task again each
    /// time its position moves while it is PENDING, at most once a second.
    async fn task_updated(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> Result<impl Stream<Item = Result<Task>> + use<>> {
        let user = current_user(ctx)?;
        let task_id = task_id(&id)?;
        let slot = take_slot(ctx)?;
        // Only a subscription that asks for the place follows the line.
        let fields = ctx.look_ahead();
        let placed =
            fields.field("queuePosition").exists() || fields.field("estimatedStartAt").exists();
        let stream = service(ctx)
            .watch_task(user, task_id, placed)
            .await
            .map_err(graphql_error)?;
        Ok(live(ctx, stream, slot, Task::from))
    }

    /// Every create, update and delete of the caller's tasks; for a worker,
    /// of every user's tasks. With `after` (the `cursor` of an event received
    /// earlier), first every such event after it, in order, then live: a
    /// client that reconnects misses nothing. A cursor older than the events
    /// kept (`TASKQL_EVENT_RETENTION`) is `CURSOR_EXPIRED`.
    async fn task_events(
        &self,
        ctx: &Context<'_>,
        after: Option<String>,
    ) -> Result<impl Stream<Item = Result<TaskEvent>> + use<>> {
        let user = current_user(ctx)?;
        let slot = take_slot(ctx)?;
        let stream = service(ctx)
            .watch_events(user, after.as_deref())
            .await
            .map_err(graphql_error)?;
        Ok(live(ctx, stream, slot, TaskEvent::from))
    }
}
