//! The API's pages of tasks: which tasks a caller sees, the `tasks` list
//! (newest first) and its cursors.
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use entity::tasks::Column;
use entity::{Task, Tasks};
use sea_orm::sea_query::Order;
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Select};
use uuid::Uuid;

use super::{MAX_PAGE_SIZE, TaskFilter, TaskPage, validate};
use crate::auth::CurrentUser;
use crate::error::{TaskError, TaskResult};

/// The tasks `user` may see and act on: their own, or any for a worker (a
/// caller with the service role). Every read and change on a caller's
/// behalf is narrowed by it.
pub fn visible_to(user: &CurrentUser) -> Condition {
    if user.is_service {
        Condition::all()
    } else {
        Condition::all().add(Column::UserId.eq(user.id.as_str()))
    }
}

/// The select of one page of `tasks`: `first` + 1 rows, so that
/// [`page_of`] can tell whether another page follows.
pub fn select(
    user: &CurrentUser,
    filter: &TaskFilter,
    first: u64,
    after: Option<&str>,
) -> TaskResult<Select<Tasks>> {
    if first == 0 || first > MAX_PAGE_SIZE {
        return Err(TaskError::invalid(format!(
            "first must be between 1 and {MAX_PAGE_SIZE}"
        )));
    }
    let mut query = Tasks::find().filter(visible_to(user));
    if !filter.statuses.is_empty() {
        // Five statuses at most, however often a client repeats them.
        let mut wanted = filter.statuses.clone();
        wanted.sort_by_key(|s| s.as_str());
        wanted.dedup();
        query = query.filter(Column::Status.is_in(wanted.iter().map(|s| s.as_str())));
    }
    if let Some(task_type) = &filter.task_type {
        validate::task_type(task_type)?;
        query = query.filter(Column::TaskType.eq(task_type.as_str()));
    }
    if let Some(owner) = &filter.user_id {
        validate::label("userId", owner, validate::MAX_USER_ID_LEN)?;
        query = query.filter(Column::UserId.eq(owner.as_str()));
    }
    if let Some(cursor) = after {
        let (created_at, id) = decode_cursor(cursor)?;
        query = query.filter(
            Condition::any().add(Column::CreatedAt.lt(created_at)).add(
                Condition::all()
                    .add(Column::CreatedAt.eq(created_at))
                    .add(Column::Id.lt(id)),
            ),
        );
    }
    Ok(query
        .order_by(Column::CreatedAt, Order::Desc)
        .order_by(Column::Id, Order::Desc)
        .limit(first + 1))
}

/// The page of the rows [`select`] read.
pub fn page_of(mut tasks: Vec<Task>, first: u64) -> TaskPage {
    let has_next_page = tasks.len() as u64 > first;
    tasks.truncate(first as usize);
    let edges = tasks
        .into_iter()
        .map(|task| (encode_cursor(&task), task))
        .collect();
    TaskPage {
        edges,
        has_next_page,
    }
}

fn encode_cursor(task: &Task) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}:{}",
        task.created_at.timestamp_micros(),
        task.id
    ))
}

fn decode_cursor(cursor: &str) -> TaskResult<(DateTime<Utc>, Uuid)> {
    let bad = || TaskError::invalid("after is not a cursor returned by tasks");
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (micros, id) = text.split_once(':').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let created_at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    let id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok((created_at, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let at = super::super::clock::now();
        let id = Uuid::now_v7();
        let encoded = URL_SAFE_NO_PAD.encode(format!("{}:{}", at.timestamp_micros(), id));
        assert_eq!(decode_cursor(&encoded).unwrap(), (at, id));
        for bad in [
            "",
            "!!!",
            "bm90IGEgY3Vyc29y",
            &URL_SAFE_NO_PAD.encode("1:nope"),
        ] {
            assert!(matches!(
                decode_cursor(bad),
                Err(TaskError::InvalidInput(_))
            ));
        }
    }
}
