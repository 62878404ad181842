use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_graphql::{Context, ID, Result, Subscription};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Semaphore, watch};

use super::types::{Task, TaskEvent};
use super::{Shutdown, current_user, graphql_error, service, task_id};
use crate::auth::CurrentUser;
use crate::error::{TaskError, TaskResult};
use crate::events::{TaskEventKind, Topic, TopicReceiver};
use crate::service::TaskService;

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

/// Bounds the `taskUpdated` reads in flight at once (kept in schema data).
/// Each read waiting for a pooled connection holds a ~15 KiB query future;
/// when thousands of streams start (or re-read after a listener reconnect)
/// together, that peak fragments the heap and stays resident. The pool
/// serves only a few reads at a time anyway, so the rest wait here, small.
#[derive(Clone)]
pub struct StreamReads(Arc<Semaphore>);

impl Default for StreamReads {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(16)))
    }
}

impl StreamReads {
    async fn read(
        &self,
        service: &Arc<dyn TaskService>,
        task_id: uuid::Uuid,
        user: &CurrentUser,
    ) -> TaskResult<entity::Task> {
        // Never closed, so a permit always comes.
        let _permit = self.0.acquire().await;
        service.get_task(task_id, user).await
    }

    /// The user's tasks changed since `from`, page by page (a catch-up of
    /// many thousands of streams queues here like their reads do). A failed
    /// page is retried a few times before the catch-up gives up.
    async fn changed_since(
        &self,
        service: &Arc<dyn TaskService>,
        user: &CurrentUser,
        mut from: chrono::DateTime<chrono::Utc>,
    ) -> TaskResult<Vec<entity::Task>> {
        let mut changed = Vec::new();
        let mut after = None;
        for _ in 0..CATCH_UP_PAGES {
            let mut attempt = 0;
            let page = loop {
                let result = {
                    let _permit = self.0.acquire().await;
                    service
                        .get_tasks_changed_since(user, from, after, CATCH_UP_LIMIT)
                        .await
                };
                match result {
                    Ok(page) => break page,
                    Err(err) if attempt < 3 => {
                        attempt += 1;
                        tracing::warn!(user = %user.id, error = %err, attempt, "taskEvents catch-up failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
                    }
                    Err(err) => return Err(err),
                }
            };
            let full = page.len() as u64 == CATCH_UP_LIMIT;
            let last = page.last().map(|task| (task.updated_at, task.id));
            changed.extend(page);
            match last {
                // The next page starts past the last row by (time, id), so a
                // bulk change of more than a page at one instant is read whole.
                Some((at, id)) if full => {
                    from = at;
                    after = Some(id);
                }
                _ => break,
            }
        }
        Ok(changed)
    }
}

enum Step {
    Event(Arc<crate::events::TaskEvent>),
    /// Events may have been missed (the stream fell behind, or the listener
    /// was away): read the current state from the table.
    Reread,
    Stop,
}

async fn next_step(
    events: &mut TopicReceiver,
    resyncs: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
) -> Step {
    tokio::select! {
        event = events.recv() => match event {
            Ok(event) => Step::Event(event),
            Err(RecvError::Lagged(_)) => Step::Reread,
            Err(RecvError::Closed) => Step::Stop,
        },
        changed = resyncs.changed() => match changed {
            Ok(()) => Step::Reread,
            Err(_) => Step::Stop,
        },
        _ = shutdown.wait_for(|down| *down) => Step::Stop,
    }
}

#[Subscription(name = "Subscription")]
impl SubscriptionRoot {
    /// The task's current state, then every change in order; completes after
    /// a terminal state or a deletion.
    async fn task_updated(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> Result<impl Stream<Item = Result<Task>> + use<>> {
        let user = current_user(ctx)?.clone();
        let task_id = task_id(&id)?;
        let service = service(ctx).clone();
        let mut shutdown = ctx.data_unchecked::<Shutdown>().0.clone();
        let slot = take_slot(ctx)?;
        // Listen before reading, so a change committed in between is not lost;
        // events at or below the version read are dropped as duplicates.
        let mut events = service.events().subscribe(Topic::Task(task_id));
        let mut resyncs = service.events().resyncs();
        let reads = ctx.data_opt::<StreamReads>().cloned().unwrap_or_default();
        let current = reads
            .read(&service, task_id, &user)
            .await
            .map_err(graphql_error)?;
        Ok(async_stream::stream! {
            let _slot = slot;
            let mut last = current.version;
            let finished = current.status.is_terminal();
            yield Ok(Task::from(current));
            if finished {
                return;
            }
            loop {
                let step = next_step(&mut events, &mut resyncs, &mut shutdown).await;
                let task = match step {
                    Step::Stop => return,
                    Step::Event(event) if event.kind == TaskEventKind::Deleted => return,
                    Step::Event(event) => event.task.clone(),
                    Step::Reread => match reads.read(&service, task_id, &user).await {
                        Ok(task) => task,
                        Err(TaskError::NotFound) => return,
                        Err(err) => {
                            yield Err(graphql_error(err));
                            return;
                        }
                    },
                };
                if task.version <= last {
                    continue;
                }
                last = task.version;
                let finished = task.status.is_terminal();
                yield Ok(Task::from(task));
                if finished {
                    return;
                }
            }
        })
    }

    /// Every create, update and delete of the caller's tasks; for a worker,
    /// of every user's tasks.
    async fn task_events(
        &self,
        ctx: &Context<'_>,
    ) -> Result<impl Stream<Item = TaskEvent> + use<>> {
        let user = current_user(ctx)?.clone();
        let service = service(ctx).clone();
        let mut shutdown = ctx.data_unchecked::<Shutdown>().0.clone();
        let slot = take_slot(ctx)?;
        // A worker sees every task, so its stream carries every user's changes.
        let topic = if user.is_service {
            Topic::All
        } else {
            Topic::User(user.id.clone())
        };
        let mut events = service.events().subscribe(topic);
        let mut resyncs = service.events().resyncs();
        let mut seen = SeenVersions::since(chrono::Utc::now());
        let reads = ctx.data_opt::<StreamReads>().cloned().unwrap_or_default();
        Ok(async_stream::stream! {
            let _slot = slot;
            loop {
                let step = next_step(&mut events, &mut resyncs, &mut shutdown).await;
                match step {
                    Step::Stop => return,
                    Step::Event(event) => {
                        if seen.is_new(&event) {
                            yield TaskEvent::from(event.as_ref());
                        }
                    }
                    Step::Reread => {
                        // A little before the newest change seen (clocks of
                        // instances differ), but nothing from before this
                        // subscription began.
                        let from = (seen.newest - chrono::Duration::seconds(5)).max(seen.started);
                        match reads.changed_since(&service, &user, from).await {
                            Ok(tasks) => {
                                for task in tasks {
                                    let kind = if task.version == 1 {
                                        TaskEventKind::Created
                                    } else {
                                        TaskEventKind::Updated
                                    };
                                    let event = crate::events::TaskEvent { kind, task };
                                    if seen.is_new(&event) {
                                        yield TaskEvent::from(&event);
                                    }
                                }
                            }
                            Err(err) => {
                                tracing::warn!(user = %user.id, error = %err, "taskEvents could not catch up");
                            }
                        }
                    }
                }
            }
        })
    }
}

/// Changes one page of a `taskEvents` catch-up holds.
const CATCH_UP_LIMIT: u64 = 1000;
/// Pages a catch-up reads at most.
const CATCH_UP_PAGES: usize = 20;
/// Tasks whose last version a `taskEvents` stream remembers.
const SEEN_CAPACITY: usize = 10_000;

/// The last version a `taskEvents` stream sent per task, so a catch-up never
/// repeats a change the stream already sent.
struct SeenVersions {
    versions: std::collections::HashMap<uuid::Uuid, i64>,
    started: chrono::DateTime<chrono::Utc>,
    newest: chrono::DateTime<chrono::Utc>,
}

impl SeenVersions {
    fn since(start: chrono::DateTime<chrono::Utc>) -> Self {
        Self {
            versions: Default::default(),
            started: start,
            newest: start,
        }
    }

    fn is_new(&mut self, event: &crate::events::TaskEvent) -> bool {
        let task = &event.task;
        if event.kind == TaskEventKind::Deleted {
            self.versions.remove(&task.id);
            return true;
        }
        if self
            .versions
            .get(&task.id)
            .is_some_and(|&v| v >= task.version)
        {
            return false;
        }
        if self.versions.len() >= SEEN_CAPACITY {
            // Forgetting risks a repeated change after a catch-up, never a lost one.
            self.versions.clear();
        }
        self.versions.insert(task.id, task.version);
        self.newest = self.newest.max(task.updated_at);
        true
    }
}
