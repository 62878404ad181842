//! Rate limits: a token bucket per rate-limited type, or per type and
//! concurrency key. A bucket holds at most `count` tokens and gains
//! `count / period_seconds` a second; a claim takes one. A bucket with
//! less than one token makes its tasks not runnable until it refills.
//!
//! Buckets are read and written only inside a claim's transaction, after
//! the type's policy row is locked (PostgreSQL) or with SQLite's write lock
//! held: the claims of a rate-limited type take turns, and each sees the
//! tokens the one before took. A claim that cannot take a limited type
//! (not in reach, not locked) skips it; claims of other types never read a
//! bucket.
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use entity::Task;
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict, Query};

use super::queue::RateLimit;
use crate::error::TaskResult;

/// `task_rate_buckets`.
fn table() -> Alias {
    Alias::new("task_rate_buckets")
}

/// The bucket of a task: its type, and its key when the limit is per key
/// (a task without a key shares the bucket of the empty key).
fn bucket_of(task_type: &str, key: Option<&str>, limit: &RateLimit) -> (String, String) {
    let key = if limit.per_key { key.unwrap_or("") } else { "" };
    (task_type.to_owned(), key.to_owned())
}

/// Tokens of a bucket that had `tokens` at `then`, at `at`.
fn refilled(limit: &RateLimit, tokens: f64, then: DateTime<Utc>, at: DateTime<Utc>) -> f64 {
    let elapsed = (at - then).as_seconds_f64().max(0.0);
    let per_second = f64::from(limit.count) / f64::from(limit.period_seconds);
    (tokens + elapsed * per_second).min(f64::from(limit.count))
}

/// The buckets of the rate-limited types one claim may take, as of `at`.
pub(super) struct Buckets {
    at: DateTime<Utc>,
    limits: HashMap<String, RateLimit>,
    /// The buckets read or taken from, by (type, key): their tokens, and
    /// as of when (`at`, or a later time another instance's clock wrote).
    tokens: HashMap<(String, String), (f64, DateTime<Utc>)>,
    taken: HashSet<(String, String)>,
}

/// What a claim must skip for want of tokens.
#[derive(Debug, Default)]
pub struct Empty {
    /// Types whose one bucket is empty.
    pub types: Vec<String>,
    /// (type, key) of empty buckets per key.
    pub keys: Vec<(String, String)>,
}

impl Buckets {
    /// The buckets of `limits`' types, read on `conn` (the claim's
    /// transaction, which holds their types' locks).
    pub(super) async fn read(
        conn: &impl ConnectionTrait,
        limits: HashMap<String, RateLimit>,
        at: DateTime<Utc>,
    ) -> TaskResult<Self> {
        let mut buckets = Self {
            at,
            limits,
            tokens: HashMap::new(),
            taken: HashSet::new(),
        };
        if buckets.limits.is_empty() {
            return Ok(buckets);
        }
        // A bucket not taken from for a whole period is full again: only
        // the others are read, however many keys a type has had.
        let longest = buckets
            .limits
            .values()
            .map(|limit| limit.period_seconds)
            .max()
            .unwrap_or(0);
        let mut select = Query::select();
        select
            .columns([
                Alias::new("task_type"),
                Alias::new("bucket_key"),
                Alias::new("tokens"),
                Alias::new("refilled_at"),
            ])
            .from(table())
            .and_where(Expr::col(Alias::new("task_type")).is_in(buckets.limits.keys().cloned()))
            .and_where(
                Expr::col(Alias::new("refilled_at"))
                    .gt(at - chrono::Duration::seconds(i64::from(longest))),
            );
        let statement = conn.get_database_backend().build(&select);
        for row in conn.query_all_raw(statement).await? {
            let task_type: String = row.try_get_by_index(0)?;
            let key: String = row.try_get_by_index(1)?;
            let tokens: f64 = row.try_get_by_index(2)?;
            let then: DateTime<Utc> = row.try_get_by_index(3)?;
            let Some(limit) = buckets.limits.get(&task_type) else {
                continue;
            };
            // A limit for the whole type reads only its own bucket: rows of
            // keys are left from when it was per key.
            if !limit.per_key && !key.is_empty() {
                continue;
            }
            let now = refilled(limit, tokens, then, at);
            buckets
                .tokens
                .insert((task_type, key), (now, Ord::max(then, at)));
        }
        Ok(buckets)
    }

    fn tokens(&self, bucket: &(String, String)) -> f64 {
        match self.tokens.get(bucket) {
            Some((tokens, _)) => *tokens,
            // A bucket never taken from is full.
            None => self
                .limits
                .get(&bucket.0)
                .map_or(f64::MAX, |limit| f64::from(limit.count)),
        }
    }

    /// The buckets with less than a token now.
    pub(super) fn empty(&self) -> Empty {
        let mut empty = Empty::default();
        for (bucket, (tokens, _)) in &self.tokens {
            if *tokens >= 1.0 {
                continue;
            }
            match self.limits.get(&bucket.0) {
                Some(limit) if limit.per_key => empty.keys.push(bucket.clone()),
                Some(_) => empty.types.push(bucket.0.clone()),
                None => {}
            }
        }
        empty.types.sort();
        empty.keys.sort();
        empty
    }

    /// Takes a token for each of `claimed` whose type is rate-limited.
    pub(super) fn take(&mut self, claimed: &[Task]) {
        for task in claimed {
            let Some(limit) = self.limits.get(&task.task_type) else {
                continue;
            };
            let bucket = bucket_of(&task.task_type, task.concurrency_key.as_deref(), limit);
            let left = self.tokens(&bucket) - 1.0;
            let as_of = self
                .tokens
                .get(&bucket)
                .map_or(self.at, |(_, as_of)| *as_of);
            self.tokens.insert(bucket.clone(), (left, as_of));
            self.taken.insert(bucket);
        }
    }

    /// Writes the buckets taken from, on `conn`.
    pub(super) async fn write(&self, conn: &impl ConnectionTrait) -> TaskResult<()> {
        if self.taken.is_empty() {
            return Ok(());
        }
        let mut insert = Query::insert();
        insert
            .into_table(table())
            .columns([
                Alias::new("task_type"),
                Alias::new("bucket_key"),
                Alias::new("tokens"),
                Alias::new("refilled_at"),
            ])
            .on_conflict(
                OnConflict::columns([Alias::new("task_type"), Alias::new("bucket_key")])
                    .update_columns([Alias::new("tokens"), Alias::new("refilled_at")])
                    .to_owned(),
            );
        for bucket in &self.taken {
            let (tokens, as_of) = self.tokens.get(bucket).copied().unwrap_or((0.0, self.at));
            insert.values_panic([
                bucket.0.clone().into(),
                bucket.1.clone().into(),
                tokens.into(),
                // Never back in time: another instance's clock may be ahead.
                as_of.into(),
            ]);
        }
        conn.execute_raw(conn.get_database_backend().build(&insert))
            .await?;
        Ok(())
    }
}

/// A claim's condition that its candidate (`tasks`) is not of an empty
/// bucket.
pub(super) fn not_empty(empty: &Empty) -> Option<sea_orm::Condition> {
    if empty.types.is_empty() && empty.keys.is_empty() {
        return None;
    }
    let mut condition = sea_orm::Condition::all();
    if !empty.types.is_empty() {
        condition = condition.add(
            Expr::col((entity::Tasks, entity::tasks::Column::TaskType))
                .is_not_in(empty.types.iter().cloned()),
        );
    }
    for (task_type, key) in &empty.keys {
        let of_key = Expr::col((entity::Tasks, entity::tasks::Column::TaskType))
            .eq(task_type.as_str())
            .and(
                Expr::col((entity::Tasks, entity::tasks::Column::ConcurrencyKey))
                    .if_null("")
                    .eq(key.as_str()),
            );
        condition = condition.add(of_key.not());
    }
    Some(condition)
}

/// The tokens the type-wide bucket of `task_type` holds at `at`.
pub(super) async fn tokens_now(
    conn: &impl ConnectionTrait,
    task_type: &str,
    limit: &RateLimit,
    at: DateTime<Utc>,
) -> TaskResult<f64> {
    let limits = HashMap::from([(task_type.to_owned(), *limit)]);
    let buckets = Buckets::read(conn, limits, at).await?;
    Ok(buckets.tokens(&(task_type.to_owned(), String::new())))
}

/// When `position` more claims of a type limited by `limit`, whose bucket
/// holds `tokens` now, can have been made: `None` when it has them.
pub fn wait_for_tokens(limit: &RateLimit, tokens: f64, position: i64) -> Option<f64> {
    let short = position as f64 - tokens;
    (short > 0.0).then(|| short * f64::from(limit.period_seconds) / f64::from(limit.count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_count() {
        let limit = RateLimit {
            count: 5,
            period_seconds: 1,
            per_key: false,
        };
        let then = Utc::now();
        let later = |ms| then + chrono::Duration::milliseconds(ms);
        assert_eq!(refilled(&limit, 0.0, then, later(200)), 1.0);
        assert_eq!(refilled(&limit, 0.0, then, later(600)), 3.0);
        assert_eq!(refilled(&limit, 4.0, then, later(10_000)), 5.0);
        assert_eq!(wait_for_tokens(&limit, 2.0, 2), None);
        assert_eq!(wait_for_tokens(&limit, 2.0, 7), Some(1.0));
    }
}
