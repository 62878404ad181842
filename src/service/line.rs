//! A pending task's place in its type's line: how many runnable tasks of
//! its type a worker would claim before it, and when it should start.
//!
//! - **Position** counts, in claim order (see `queue`), the runnable tasks
//!   of the task's type up to and including it: 1 is the next one a worker
//!   claiming that type takes. Only a `PENDING` task whose `run_at` has
//!   passed and that waits on no dependency has one. A paused type keeps
//!   its order, so its tasks keep their positions.
//! - **Start** is `now + position / rate`, where the rate is how fast the
//!   type's tasks were claimed lately: the last [`RATE_SAMPLE`] first
//!   claims (by `started_at`) within [`RATE_WINDOW`]. No claims in that
//!   window, or a paused type, give no estimate.
//!
//! One task's place is one statement. Watchers of a task (`taskUpdated`)
//! share a [`Line`] per type instead: once a second it ranks the type's
//! whole line in one statement and every watcher reads its place from
//! that, so a thousand watchers cost one statement a second, not a
//! thousand.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use entity::TaskStatus;
use sea_orm::{ConnectionTrait, Statement, Value};
use tokio::sync::watch;
use uuid::Uuid;

use super::queue::{Queue, RateLimit};
use super::rates;
use crate::auth::CurrentUser;
use crate::db::Db;
use crate::error::TaskResult;

/// Claims the rate is taken over, at most (the latest).
pub const RATE_SAMPLE: u64 = 100;
/// How far back claims count toward the rate.
pub const RATE_WINDOW: chrono::TimeDelta = chrono::TimeDelta::minutes(15);
/// How often a shared line is ranked again.
pub const TICK: Duration = Duration::from_secs(1);

/// Where a pending task stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Place {
    /// 1 is the next task of its type a worker would claim.
    pub position: i64,
    pub estimated_start_at: Option<DateTime<Utc>>,
}

/// How fast a line moves: the rate its tasks were claimed at lately, and
/// its type's rate limit with the tokens its bucket holds now.
#[derive(Debug, Clone, Copy, Default)]
struct Pace {
    rate: Option<f64>,
    limit: Option<(RateLimit, f64)>,
}

/// When the `position`th task of a line moving at `pace` starts: at the
/// rate claims went lately, and no sooner than its type's rate limit lets
/// that many claims through.
fn estimate(at: DateTime<Utc>, position: i64, pace: Pace) -> Option<DateTime<Utc>> {
    let rate = pace.rate.filter(|rate| *rate > 0.0)?;
    let mut seconds = position as f64 / rate;
    if let Some((limit, tokens)) = pace.limit
        && let Some(wait) = rates::wait_for_tokens(&limit, tokens, position)
    {
        seconds = seconds.max(wait);
    }
    let wait = chrono::TimeDelta::milliseconds((seconds * 1000.0) as i64);
    at.checked_add_signed(wait)
}

/// Claims per second of `task_type` lately; `None` without claims.
async fn claim_rate(db: &Db, task_type: &str, at: DateTime<Utc>) -> TaskResult<Option<f64>> {
    // The latest first claims, newest first, from `tasks_type_started_idx`.
    let sql = format!(
        "SELECT COUNT(*) AS n, MIN(started_at) AS since FROM \
         (SELECT started_at FROM tasks WHERE type = $1 AND started_at > $2 \
          ORDER BY started_at DESC LIMIT {RATE_SAMPLE}) AS recent"
    );
    let row = db
        .reads()
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            [task_type.into(), (at - RATE_WINDOW).into()],
        ))
        .await?;
    let Some(row) = row else { return Ok(None) };
    let n: i64 = row.try_get("", "n")?;
    let since: Option<DateTime<Utc>> = row.try_get("", "since")?;
    Ok(since.and_then(|since| {
        // The claims happened between `since` and now: n of them in that span,
        // at least a second so one claim just now is not an infinite rate.
        let span = (at - since).as_seconds_f64().max(1.0);
        (n > 0).then(|| n as f64 / span)
    }))
}

/// The pace `task_type`'s line moves at, for an estimated start: none
/// while the type is paused.
async fn start_pace(
    db: &Db,
    queue: &Queue,
    task_type: &str,
    at: DateTime<Utc>,
) -> TaskResult<Pace> {
    let policy = queue.policy(task_type).await?;
    if policy.paused {
        return Ok(Pace::default());
    }
    let limit = match policy.rate_limit {
        // A limit per key paces each key's tasks, not the line.
        Some(limit) if !limit.per_key => Some((
            limit,
            rates::tokens_now(&db.reads(), task_type, &limit, at).await?,
        )),
        _ => None,
    };
    Ok(Pace {
        rate: claim_rate(db, task_type, at).await?,
        limit,
    })
}

/// The status of the tasks in a line, bound as a parameter.
const PENDING: &str = TaskStatus::Pending.as_str();

/// The place of one task (if `owner` owns it, when given), or `None`
/// unless it is runnable and pending.
async fn place_of(
    db: &Db,
    queue: &Queue,
    task_id: Uuid,
    owner: Option<&str>,
) -> TaskResult<Option<Place>> {
    let at = super::clock::now();
    // Tasks ahead at a higher priority, plus tasks ahead or itself at its
    // own: two ranges of `tasks_type_claim_idx`.
    let sql = "SELECT w.type AS type, \
         (SELECT COUNT(*) FROM tasks t WHERE t.status = $3 AND t.priority > w.priority \
            AND t.type = w.type AND t.run_at <= $2 AND t.waiting_on = 0) \
         + (SELECT COUNT(*) FROM tasks t WHERE t.status = $3 AND t.priority = w.priority \
            AND (t.fair_rank, t.run_at, t.id) <= (w.fair_rank, w.run_at, w.id) \
            AND t.type = w.type AND t.run_at <= $2 AND t.waiting_on = 0) AS position \
         FROM tasks w WHERE w.id = $1 AND w.status = $3 AND w.run_at <= $2 AND w.waiting_on = 0";
    let mut values: Vec<Value> = vec![task_id.into(), at.into(), PENDING.into()];
    let sql = match owner {
        Some(owner) => {
            values.push(owner.into());
            format!("{sql} AND w.user_id = $4")
        }
        None => sql.to_owned(),
    };
    let row = db
        .reads()
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            values,
        ))
        .await?;
    let Some(row) = row else { return Ok(None) };
    let task_type: String = row.try_get("", "type")?;
    let position: i64 = row.try_get("", "position")?;
    let rate = start_pace(db, queue, &task_type, at).await?;
    Ok(Some(Place {
        position,
        estimated_start_at: estimate(at, position, rate),
    }))
}

/// The places of every runnable pending task of `task_type` among `ids`.
async fn rank(
    db: &Db,
    queue: &Queue,
    task_type: &str,
    ids: &[Uuid],
) -> TaskResult<HashMap<Uuid, Place>> {
    let at = super::clock::now();
    let sql = format!(
        "SELECT id FROM tasks WHERE status = $3 AND type = $1 AND run_at <= $2 \
         AND waiting_on = 0 ORDER BY {}",
        crate::db::dialect::claim_order()
    );
    let values: [Value; 3] = [task_type.into(), at.into(), PENDING.into()];
    let rows = db
        .reads()
        .query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            values,
        ))
        .await?;
    let rate = start_pace(db, queue, task_type, at).await?;
    let wanted: std::collections::HashSet<&Uuid> = ids.iter().collect();
    let mut places = HashMap::with_capacity(ids.len());
    for (i, row) in rows.iter().enumerate() {
        let id: Uuid = row.try_get("", "id")?;
        if wanted.contains(&id) {
            let position = i as i64 + 1;
            places.insert(
                id,
                Place {
                    position,
                    estimated_start_at: estimate(at, position, rate),
                },
            );
        }
    }
    Ok(places)
}

/// The places a line last computed, by task; `None` before its first rank.
type Places = Option<Arc<HashMap<Uuid, Place>>>;

/// One type's line, ranked once a tick for everyone who follows a task in it.
struct Line {
    /// Followed tasks, with how many follow each.
    followed: Mutex<HashMap<Uuid, usize>>,
    places: watch::Sender<Places>,
}

/// The lines being followed now, by type.
#[derive(Clone)]
pub struct Lines {
    db: Db,
    queue: Arc<Queue>,
    lines: Arc<Mutex<HashMap<String, Weak<Line>>>>,
}

/// A follower's hold on one task in its line; following ends with it.
pub struct Following {
    line: Arc<Line>,
    task_id: Uuid,
    places: watch::Receiver<Places>,
}

impl Following {
    /// The task's place as last ranked: `None` before the first rank,
    /// `Some(None)` when it was not runnable and pending then.
    pub fn place(&self) -> Option<Option<Place>> {
        let places = self.places.borrow();
        places
            .as_ref()
            .map(|places| places.get(&self.task_id).copied())
    }

    /// Waits for the next ranking.
    pub async fn changed(&mut self) {
        if self.places.changed().await.is_err() {
            // The line cannot end while we hold it; never wake again.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut followed = lock(&self.line.followed);
        if let Some(n) = followed.get_mut(&self.task_id) {
            *n -= 1;
            if *n == 0 {
                followed.remove(&self.task_id);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here leaves the map whole.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Lines {
    pub fn new(db: Db, queue: Arc<Queue>) -> Self {
        Self {
            db,
            queue,
            lines: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The place of one task now, if `user` may see it.
    pub async fn place(&self, user: &CurrentUser, task_id: Uuid) -> TaskResult<Option<Place>> {
        let owner = (!user.is_service).then_some(user.id.as_str());
        place_of(&self.db, &self.queue, task_id, owner).await
    }

    /// Follows `task_id` in `task_type`'s line; the line is ranked once a
    /// tick while anyone follows a task in it.
    pub fn follow(&self, task_type: &str, task_id: Uuid) -> Following {
        let mut lines = lock(&self.lines);
        let line = match lines.get(task_type).and_then(Weak::upgrade) {
            Some(line) => line,
            None => {
                let line = Arc::new(Line {
                    followed: Mutex::new(HashMap::new()),
                    places: watch::channel(None).0,
                });
                lines.insert(task_type.to_owned(), Arc::downgrade(&line));
                tokio::spawn(
                    self.clone()
                        .rank_while_followed(task_type.to_owned(), Arc::downgrade(&line)),
                );
                line
            }
        };
        *lock(&line.followed).entry(task_id).or_default() += 1;
        Following {
            places: line.places.subscribe(),
            line,
            task_id,
        }
    }

    /// Ranks the line once a tick until nobody follows it.
    async fn rank_while_followed(self, task_type: String, line: Weak<Line>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(line) = line.upgrade() else { break };
            let ids: Vec<Uuid> = lock(&line.followed).keys().copied().collect();
            if ids.is_empty() {
                continue;
            }
            match rank(&self.db, &self.queue, &task_type, &ids).await {
                Ok(places) => {
                    line.places.send_replace(Some(Arc::new(places)));
                }
                // The next tick tries again; watchers keep the last places.
                Err(err) => tracing::warn!(error = %err, task_type, "ranking a line failed"),
            }
        }
        let mut lines = lock(&self.lines);
        if lines
            .get(&task_type)
            .is_some_and(|weak| weak.strong_count() == 0)
        {
            lines.remove(&task_type);
        }
    }
}
