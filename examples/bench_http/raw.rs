//! The raw side of examples/bench_http.rs: the statements taskql's service
//! sends, sent straight through sqlx, for each workload.
use std::time::Duration;

use rand::Rng;
use sea_orm::sqlx::query::Query;
use sea_orm::sqlx::{self, Encode, PgConnection, SqliteConnection, Type};
use uuid::Uuid;

use super::{BoxError, Fixture, STATUSES, Side, TYPES, Workload};

/// The statements taskql's service sends, sent straight through sqlx on
/// a connection of each client's own (as pgbench does: no pool, so no
/// pings on checkout or return).
pub(super) enum RawConn {
    Postgres(PgConnection),
    Sqlite(SqliteConnection),
}

const RAW_INSERT_PG: &str = "INSERT INTO tasks (id, user_id, type, status, metadata, attempts, run_at, \
     created_at, updated_at, version) VALUES ($1, $2, $3, 'pending', $4, 0, $5, $5, $5, 1) RETURNING *";
const RAW_INSERT_NOTIFY_PG: &str = "WITH changed AS (INSERT INTO tasks (id, user_id, type, status, \
     metadata, attempts, run_at, created_at, updated_at, version) \
     VALUES ($1, $2, $3, 'pending', $4, 0, $5, $5, $5, 1) RETURNING *) \
     SELECT changed.* FROM changed CROSS JOIN LATERAL \
     (SELECT pg_notify('taskql_bench_raw', to_jsonb(changed)::text)) AS notice";
const RAW_INSERT_SQLITE: &str = "INSERT INTO tasks (id, user_id, type, status, metadata, attempts, run_at, \
     created_at, updated_at, version) VALUES (?1, ?2, ?3, 'pending', ?4, 0, ?5, ?5, ?5, 1) RETURNING *";
const RAW_LIST_PG: &str = "SELECT * FROM tasks WHERE user_id = $1 AND status IN ($2) \
     ORDER BY created_at DESC, id DESC LIMIT 11";
const RAW_LIST_SQLITE: &str = "SELECT * FROM tasks WHERE user_id = ?1 AND status IN (?2) \
     ORDER BY created_at DESC, id DESC LIMIT 11";
const RAW_GET_PG: &str = "SELECT * FROM tasks WHERE id = $1";
const RAW_GET_SQLITE: &str = "SELECT * FROM tasks WHERE id = ?1";

/// The raw insert of `rows` tasks in one statement, `RETURNING *`.
fn insert_many(rows: usize, postgres: bool) -> String {
    let p = |n: usize| {
        if postgres {
            format!("${n}")
        } else {
            format!("?{n}")
        }
    };
    let values: Vec<String> = (0..rows)
        .map(|r| {
            let at = p(r * 5 + 5);
            format!(
                "({}, {}, {}, 'pending', {}, 0, {at}, {at}, {at}, 1)",
                p(r * 5 + 1),
                p(r * 5 + 2),
                p(r * 5 + 3),
                p(r * 5 + 4)
            )
        })
        .collect();
    format!(
        "INSERT INTO tasks (id, user_id, type, status, metadata, attempts, run_at, created_at, \
         updated_at, version) VALUES {} RETURNING *",
        values.join(", ")
    )
}

/// A task as the raw insert writes it.
struct NewRow<'a> {
    id: Uuid,
    owner: &'a str,
    task_type: &'a str,
    metadata: &'a serde_json::Value,
    now: chrono::DateTime<chrono::Utc>,
}

impl<'a> NewRow<'a> {
    /// `query` (an insert) with this row's values bound to its parameters,
    /// in their order, on either database.
    fn bind<'q, DB>(&self, query: Query<'q, DB, DB::Arguments>) -> Query<'q, DB, DB::Arguments>
    where
        DB: sqlx::Database,
        Uuid: Encode<'a, DB> + Type<DB>,
        &'a str: Encode<'a, DB> + Type<DB>,
        &'a serde_json::Value: Encode<'a, DB> + Type<DB>,
        chrono::DateTime<chrono::Utc>: Encode<'a, DB> + Type<DB>,
    {
        query
            .bind(self.id)
            .bind(self.owner)
            .bind(self.task_type)
            .bind(self.metadata)
            .bind(self.now)
    }
}

impl RawConn {
    pub(super) async fn connect(url: &str) -> Result<Self, BoxError> {
        use sqlx::Connection;
        if url.starts_with("sqlite:") {
            use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
            let options: SqliteConnectOptions = url.parse()?;
            let options = options
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30));
            Ok(Self::Sqlite(
                SqliteConnection::connect_with(&options).await?,
            ))
        } else {
            let conn = PgConnection::connect(url).await?;
            // As the server's pool does: without it, a statement of more
            // than 16 KiB waits 40 ms for the database's delayed ACK.
            let options: sqlx::postgres::PgConnectOptions = url.parse()?;
            taskql::db::no_delay_to(options.get_port());
            Ok(Self::Postgres(conn))
        }
    }

    pub(super) async fn statement(
        &mut self,
        side: Side,
        workload: Workload,
        fixture: &Fixture,
        rng: &mut impl Rng,
    ) -> Result<(), BoxError> {
        let user = rng.random_range(0..fixture.tokens.len());
        let owner = format!("user-{}", user + 1);
        let now = chrono::Utc::now();
        match workload {
            Workload::Create => {
                let metadata = serde_json::json!({ "source": "bench", "priority": rng.random_range(1..=5), "tags": ["bench"] });
                let task_type = TYPES[rng.random_range(0..3)];
                let row = NewRow {
                    id: Uuid::now_v7(),
                    owner: &owner,
                    task_type,
                    metadata: &metadata,
                    now,
                };
                match self {
                    Self::Postgres(conn) => {
                        let sql = match side {
                            Side::RawNotify => RAW_INSERT_NOTIFY_PG,
                            _ => RAW_INSERT_PG,
                        };
                        row.bind(sqlx::query(sql)).fetch_one(conn).await?;
                    }
                    Self::Sqlite(conn) => {
                        row.bind(sqlx::query(RAW_INSERT_SQLITE))
                            .fetch_one(conn)
                            .await?;
                    }
                }
            }
            Workload::CreateBatch => {
                let metadata: Vec<serde_json::Value> = (0..fixture.batch)
                    .map(|_| serde_json::json!({ "source": "bench", "priority": rng.random_range(1..=5), "tags": ["bench"] }))
                    .collect();
                let rows: Vec<NewRow> = metadata
                    .iter()
                    .map(|metadata| NewRow {
                        id: Uuid::now_v7(),
                        owner: &owner,
                        task_type: TYPES[rng.random_range(0..3)],
                        metadata,
                        now,
                    })
                    .collect();
                // Only placeholders are written into it; every value is bound.
                let sql = insert_many(rows.len(), matches!(self, Self::Postgres(_)));
                let inserted = match self {
                    Self::Postgres(conn) => {
                        let query = rows
                            .iter()
                            .fold(sqlx::query(sqlx::AssertSqlSafe(sql.as_str())), |q, row| {
                                row.bind(q)
                            });
                        query.fetch_all(conn).await?.len()
                    }
                    Self::Sqlite(conn) => {
                        let query = rows
                            .iter()
                            .fold(sqlx::query(sqlx::AssertSqlSafe(sql.as_str())), |q, row| {
                                row.bind(q)
                            });
                        query.fetch_all(conn).await?.len()
                    }
                };
                if inserted != rows.len() {
                    return Err(
                        format!("raw batch insert: {inserted} of {} rows", rows.len()).into(),
                    );
                }
            }
            Workload::List => {
                let status = STATUSES[rng.random_range(0..5)].as_str();
                let rows = match self {
                    Self::Postgres(conn) => sqlx::query(RAW_LIST_PG)
                        .bind(&owner)
                        .bind(status)
                        .fetch_all(conn)
                        .await?
                        .len(),
                    Self::Sqlite(conn) => sqlx::query(RAW_LIST_SQLITE)
                        .bind(&owner)
                        .bind(status)
                        .fetch_all(conn)
                        .await?
                        .len(),
                };
                if rows == 0 {
                    return Err(format!("raw list: no {status} tasks of {owner}").into());
                }
            }
            Workload::Get => {
                let (id, _) = fixture.sample[rng.random_range(0..fixture.sample.len())];
                let found = match self {
                    Self::Postgres(conn) => sqlx::query(RAW_GET_PG)
                        .bind(id)
                        .fetch_optional(conn)
                        .await?
                        .is_some(),
                    Self::Sqlite(conn) => sqlx::query(RAW_GET_SQLITE)
                        .bind(id)
                        .fetch_optional(conn)
                        .await?
                        .is_some(),
                };
                if !found {
                    return Err(format!("raw get: task {id} not found").into());
                }
            }
            Workload::Stats | Workload::WorkerStats => {
                return Err("taskStats has no raw counterpart".into());
            }
        }
        Ok(())
    }
}
