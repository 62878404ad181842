//! Turns and budgets: what a batch of creates reads, in one statement, to
//! give each create its turn among its owner's tasks and its attempts.

use entity::TaskStatus;
use sea_orm::{ActiveValue::Set, ConnectionTrait, Statement};

use crate::db::Backend;
use crate::error::TaskResult;

use super::Queue;

/// Reads, in one statement, what a batch of creates needs: each owner's
/// last pending turn, the turn being served at each priority, and each
/// type's attempts. The lists travel as JSON text: one parameter each, and
/// the statement stays the same size whatever the batch.
fn batch_facts(backend: Backend) -> String {
    let pending = TaskStatus::Pending.as_str();
    format!(
        "SELECT 'owner' AS kind, value AS name, (SELECT fair_rank FROM tasks \
             WHERE user_id = value AND status = '{pending}' ORDER BY fair_rank DESC LIMIT 1) AS n \
         FROM {owners} \
         UNION ALL \
         SELECT 'priority', CAST(value AS TEXT), (SELECT fair_rank FROM tasks \
             WHERE status = '{pending}' AND priority = CAST(value AS INTEGER) \
             ORDER BY fair_rank LIMIT 1) \
         FROM {priorities} \
         UNION ALL \
         SELECT 'type', task_type, CAST(max_attempts AS BIGINT) FROM task_types \
         WHERE task_type IN (SELECT value FROM {types})",
        owners = backend.json_texts("$1"),
        priorities = backend.json_texts("$2"),
        types = backend.json_texts("$3"),
    )
}

impl Queue {
    /// Gives each create of `batch` (in order) its turn and its budget of
    /// attempts. A turn is one past its owner's last pending turn (or the
    /// owner's previous create in the batch), or the turn being served at
    /// its priority, whichever is later. The budget is the create's own,
    /// else its type's policy, else the default.
    pub(in crate::service) async fn assign<'a>(
        &self,
        batch: impl IntoIterator<Item = &'a mut crate::service::rows::NewRow>,
        in_flight: &std::collections::HashMap<String, i64>,
    ) -> TaskResult<()> {
        self.assign_on(&self.db.reads(), batch, in_flight).await
    }

    /// [`Self::assign`], reading on `conn`: a transaction that holds
    /// SQLite's write lock reads on its own connection, not on one it
    /// would wait for while others wait for its lock.
    pub(in crate::service) async fn assign_on<'a>(
        &self,
        conn: &impl ConnectionTrait,
        batch: impl IntoIterator<Item = &'a mut crate::service::rows::NewRow>,
        in_flight: &std::collections::HashMap<String, i64>,
    ) -> TaskResult<()> {
        use std::collections::{BTreeSet, HashMap};
        let mut batch: Vec<&mut crate::service::rows::NewRow> = batch.into_iter().collect();
        let owners: BTreeSet<&str> = batch
            .iter()
            .map(|c| c.model.user_id.as_ref().as_str())
            .collect();
        let priorities: BTreeSet<i32> = batch.iter().map(|c| *c.model.priority.as_ref()).collect();
        let types: BTreeSet<&str> = batch
            .iter()
            .filter(|c| c.max_attempts.is_none())
            .map(|c| c.model.task_type.as_ref().as_str())
            .collect();
        let json = |names: Vec<String>| serde_json::Value::from(names).to_string();
        let statement = Statement::from_sql_and_values(
            self.db.get_database_backend(),
            batch_facts(self.db.backend()),
            [
                json(owners.iter().map(|o| o.to_string()).collect()).into(),
                json(priorities.iter().map(|p| p.to_string()).collect()).into(),
                json(types.iter().map(|t| t.to_string()).collect()).into(),
            ],
        );
        let mut last_turn = HashMap::new();
        let mut served = HashMap::new();
        let mut budget = HashMap::new();
        for row in conn.query_all_raw(statement).await? {
            let kind: String = row.try_get_by_index(0)?;
            let name: String = row.try_get_by_index(1)?;
            let Some(n) = row.try_get_by_index::<Option<i64>>(2)? else {
                continue;
            };
            match kind.as_str() {
                "owner" => {
                    last_turn.insert(name, n);
                }
                "priority" => {
                    served.insert(name.parse::<i32>().unwrap_or_default(), n);
                }
                _ => {
                    budget.insert(name, n);
                }
            }
        }
        for create in batch.iter_mut() {
            let priority = *create.model.priority.as_ref();
            let owner = create.model.user_id.as_ref().clone();
            let now_served = served.get(&priority).copied().unwrap_or(0);
            let last = match (last_turn.get(&owner), in_flight.get(&owner)) {
                (Some(a), Some(b)) => Some(Ord::max(*a, *b)),
                (a, b) => a.or(b).copied(),
            };
            let turn = last.map_or(now_served, |last| Ord::max(last + 1, now_served));
            last_turn.insert(owner, turn);
            create.model.fair_rank = Set(turn);
            let max_attempts = create.max_attempts.unwrap_or_else(|| {
                budget
                    .get(create.model.task_type.as_ref())
                    .and_then(|n| i32::try_from(*n).ok())
                    .unwrap_or(self.default_max_attempts)
            });
            create.model.max_attempts = Set(max_attempts);
        }
        Ok(())
    }
}
