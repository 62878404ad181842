//! Live updates, all of them: the change log the triggers write and this
//! instance's reader of it (`changelog`), the in-process bus the reader
//! publishes on (`bus`), the PostgreSQL LISTEN that wakes the reader when
//! another instance wrote (`listener`), and here the streams behind
//! `taskUpdated` and `taskEvents`: the current state first, then the
//! changes, deduplicated, with catch-up from the log. Transports and
//! resolvers only convert what these streams yield.
use std::sync::Arc;

use entity::{Task, TaskStatus, Tasks};
use futures::stream::BoxStream;
use sea_orm::{ConnectionTrait, EntityTrait, QueryFilter, QueryTrait};
use tokio::sync::Semaphore;
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use self::bus::{TaskEvent, TaskEventKind, Topic};
use self::changelog::{Changelog, Horizon};
use super::Watched;
use super::line::{Following, Lines, Place};
use super::pages::visible_to;
use super::rows::rows_of;
use crate::auth::CurrentUser;
use crate::db::{Db, deadline};
use crate::error::{TaskError, TaskResult};

pub mod bus;
pub mod changelog;
pub mod listener;

/// Reads of the database that streams make at once, at most. Each read
/// waiting for a pooled connection holds a ~15 KiB query future; when
/// thousands of streams start (or replay) together, that peak fragments the
/// heap and stays resident. The pool serves only a few reads at a time
/// anyway, so the rest wait here, small.
const STREAM_READS: usize = 16;
/// Times a stream tries one read of the log before it gives up with the error.
const READ_TRIES: u32 = 3;

#[derive(Clone)]
pub struct Watch {
    db: Db,
    log: Changelog,
    lines: Lines,
    reads: Arc<Semaphore>,
}

impl Watch {
    pub fn new(db: Db, log: Changelog, lines: Lines) -> Self {
        Self {
            db,
            log,
            lines,
            reads: Arc::new(Semaphore::new(STREAM_READS)),
        }
    }

    /// With `placed`, follows the task in its type's line while it is
    /// pending, and reads its place now: `None` without `placed`, or if that
    /// read failed (the reader may ask again).
    async fn follow(
        &self,
        placed: bool,
        user: &CurrentUser,
        task: &Task,
        following: &mut Option<Following>,
    ) -> Option<Option<Place>> {
        if !placed {
            return None;
        }
        if task.status != TaskStatus::Pending {
            *following = None;
            return Some(None);
        }
        if following.is_none() {
            *following = Some(self.lines.follow(&task.task_type, task.id));
        }
        match self.by_deadline(self.lines.place(user, task.id)).await {
            Ok(place) => Some(place),
            Err(err) => {
                tracing::warn!(error = %err, task = %task.id, "reading a task's place failed");
                None
            }
        }
    }

    /// Runs one of a stream's reads (its start, or a read for one event)
    /// to end within `TASKQL_REQUEST_TIMEOUT` from now, as a request does
    /// (see `crate::db::deadline`): the stream itself waits for changes as
    /// long as it likes.
    async fn by_deadline<T>(&self, read: impl Future<Output = TaskResult<T>>) -> TaskResult<T> {
        deadline::within(self.db.settings().request_timeout, read)
            .await
            .unwrap_or_else(|_| {
                Err(TaskError::Unavailable(
                    "a subscription's read passed its deadline".into(),
                ))
            })
    }

    /// The task if `user` may see it (see [`visible_to`]).
    async fn read_task(&self, task_id: Uuid, user: &CurrentUser) -> TaskResult<Task> {
        // Never closed, so a permit always comes.
        let _permit = self.reads.acquire().await;
        let select = Tasks::find_by_id(task_id)
            .filter(visible_to(user))
            .build(self.db.get_database_backend());
        rows_of(&self.db.reads(), select)
            .await?
            .pop()
            .ok_or(TaskError::NotFound)
    }

    /// The task's current state, then every change in order; ends after a
    /// terminal state or a deletion. With `placed`, while the task is
    /// pending, its place in line too: the task again whenever its position
    /// moves, at most once a tick. `NOT_FOUND` if the user may not see it.
    pub async fn task(
        &self,
        user: CurrentUser,
        task_id: Uuid,
        placed: bool,
    ) -> TaskResult<BoxStream<'static, TaskResult<Watched>>> {
        // Listen before reading, so a change committed in between is not
        // lost; events at or below the version read are dropped as repeats.
        // Every change committed after the read is past the position the
        // reader had published by then, so it will be published.
        let mut events = self.log.bus().subscribe(Topic::Task(task_id));
        let current = self
            .by_deadline(async {
                self.log.published().await?;
                self.read_task(task_id, &user).await
            })
            .await?;
        let watch = self.clone();
        Ok(Box::pin(async_stream::stream! {
            let mut following = None;
            let place = watch.follow(placed, &user, &current, &mut following).await;
            // The position last sent; `None` when the place was left to the reader.
            let mut sent = place.map(|place| place.map(|p| p.position));
            let mut last = current.clone();
            let finished = current.status.is_terminal();
            yield Ok(Watched { task: current, place });
            if finished {
                return;
            }
            loop {
                let moved = async {
                    match following.as_mut() {
                        Some(following) => following.changed().await,
                        None => std::future::pending().await,
                    }
                };
                // `yield` cannot stand inside `select!`: it says which woke.
                let received = tokio::select! {
                    received = events.recv() => Some(received),
                    () = moved => None,
                };
                let Some(received) = received else {
                    // A task that left the line did so by a change, which
                    // its event tells; a rank only moves it within.
                    if let Some(Some(place)) = following.as_ref().and_then(Following::place)
                        && sent != Some(Some(place.position))
                    {
                        sent = Some(Some(place.position));
                        yield Ok(Watched { task: last.clone(), place: Some(Some(place)) });
                    }
                    continue;
                };
                let task = match received {
                    Ok(event) if event.kind == TaskEventKind::Deleted => return,
                    Ok(event) => event.task.clone(),
                    // Fell behind its buffer: the current state says where it is.
                    Err(RecvError::Lagged(_)) => match watch.by_deadline(watch.read_task(task_id, &user)).await {
                        Ok(task) => task,
                        Err(TaskError::NotFound) => return,
                        Err(err) => {
                            yield Err(err);
                            return;
                        }
                    },
                    Err(RecvError::Closed) => return,
                };
                if task.version <= last.version {
                    continue;
                }
                let place = watch.follow(placed, &user, &task, &mut following).await;
                sent = place.map(|place| place.map(|p| p.position));
                last = task.clone();
                let finished = task.status.is_terminal();
                yield Ok(Watched { task, place });
                if finished {
                    return;
                }
            }
        }))
    }

    /// Every change of the tasks `user` may see (their own; every user's for
    /// a worker), in log order. With `after` (a cursor of an earlier event),
    /// first every such change past it, then live with no gap and no repeat.
    pub async fn events(
        &self,
        user: CurrentUser,
        after: Option<&str>,
    ) -> TaskResult<BoxStream<'static, TaskResult<TaskEvent>>> {
        let after = after.map(changelog::decode_cursor).transpose()?;
        let (topic, owner) = if user.is_service {
            (Topic::All, None)
        } else {
            (Topic::User(user.id.clone()), Some(user.id.clone()))
        };
        // Listen first: everything published from here on is received, and
        // everything before was committed, so a replay reads it.
        let mut events = self.log.bus().subscribe(topic);
        let mut last = self
            .by_deadline(async {
                // Everything past this the reader publishes, and we receive.
                let published = self.log.published().await?;
                match after {
                    Some(pos) => {
                        check_cursor(pos, changelog::horizon(&self.db).await?)?;
                        Ok(pos)
                    }
                    None => Ok(published),
                }
            })
            .await?;
        let mut replaying = after.is_some();
        let watch = self.clone();
        Ok(Box::pin(async_stream::stream! {
            loop {
                if replaying {
                    match watch.by_deadline(watch.replay_page(last, owner.as_deref())).await {
                        Ok((page, full)) => {
                            for event in page {
                                last = event.pos;
                                yield Ok(event);
                            }
                            replaying = full;
                        }
                        Err(err) => {
                            yield Err(err);
                            return;
                        }
                    }
                    continue;
                }
                match events.recv().await {
                    Ok(event) => {
                        // At or below `last`: already replayed.
                        if event.pos > last {
                            last = event.pos;
                            yield Ok(event.as_ref().clone());
                        }
                    }
                    // Fell behind its buffer: read what it missed from the log.
                    Err(RecvError::Lagged(_)) => replaying = true,
                    Err(RecvError::Closed) => return,
                }
            }
        }))
    }

    /// The next page of events past `after` for `owner` (every user's when
    /// `None`), and whether it was full. `CURSOR_EXPIRED` when the log was
    /// pruned past `after`, checked after the read, so a prune racing it is
    /// seen.
    async fn replay_page(
        &self,
        after: i64,
        owner: Option<&str>,
    ) -> TaskResult<(Vec<TaskEvent>, bool)> {
        let mut tries = 0;
        loop {
            let read = async {
                let _permit = self.reads.acquire().await;
                let page = changelog::read(&self.db, after, owner, changelog::PAGE).await?;
                let horizon = changelog::horizon(&self.db).await?;
                Ok::<_, TaskError>((page, horizon))
            };
            match read.await {
                Ok((page, horizon)) => {
                    check_cursor(after, horizon)?;
                    let full = page.len() as u64 == changelog::PAGE;
                    return Ok((page, full));
                }
                Err(err) if tries + 1 < READ_TRIES && matches!(err, TaskError::Unavailable(_)) => {
                    tries += 1;
                    tracing::warn!(error = %err, tries, "a taskEvents replay read failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(200 << tries)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// A cursor must be within what the log keeps.
fn check_cursor(pos: i64, horizon: Horizon) -> TaskResult<()> {
    if pos < horizon.pruned_through {
        return Err(TaskError::CursorExpired(
            "the events after this cursor are no longer kept; read the tasks again with `tasks` \
             and subscribe without `after`"
                .into(),
        ));
    }
    if pos > horizon.head {
        return Err(TaskError::invalid(
            "after is a cursor past the newest event; it was not returned by this server's taskEvents",
        ));
    }
    Ok(())
}
