//! The SQL the two databases write differently, in one place: the service
//! states what it wants (a minute of a column, the elements of a JSON list,
//! a lock that skips what others hold) and this module writes it for the
//! backend.
//!
//! Most statements are built with sea-query, which writes each backend's
//! text itself. The rest are text with `$1`, `$2`, … placeholders, bound in
//! order through [`Binds`]: PostgreSQL numbers them so, and sqlx reads the
//! same numbers on SQLite. Statuses are bound, or written from
//! `TaskStatus::as_str()`, never typed out.
use sea_orm::sea_query::{Order, SelectStatement};
use sea_orm::{Statement, Value};

use super::Backend;

/// The order claims take a type's runnable tasks in: higher priority
/// first, then the owners' turns, then the earliest runnable, then the
/// oldest id. The claim statements and a task's place in line both use it.
pub const CLAIM_ORDER: [(&str, Order); 4] = [
    ("priority", Order::Desc),
    ("fair_rank", Order::Asc),
    ("run_at", Order::Asc),
    ("id", Order::Asc),
];

/// [`CLAIM_ORDER`] as SQL text (an `ORDER BY` list).
pub fn claim_order() -> String {
    CLAIM_ORDER
        .iter()
        .map(|(column, order)| match order {
            Order::Desc => format!("{column} DESC"),
            _ => (*column).to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Orders `select` by [`CLAIM_ORDER`].
pub fn order_by_claim(select: &mut SelectStatement) {
    for (column, order) in CLAIM_ORDER {
        select.order_by(sea_orm::sea_query::Alias::new(column), order);
    }
}

/// The parameters of a statement written as text, numbered as they are
/// added (`$1`, `$2`, …).
#[derive(Debug, Default)]
pub struct Binds(Vec<Value>);

impl Binds {
    /// Binds `value`; its placeholder.
    pub fn bind(&mut self, value: impl Into<Value>) -> String {
        self.0.push(value.into());
        format!("${}", self.0.len())
    }

    /// `sql` with these parameters, for `backend`.
    pub fn statement(self, backend: Backend, sql: impl Into<String>) -> Statement {
        Statement::from_sql_and_values(backend.sea_orm(), sql.into(), self.0)
    }
}

impl Backend {
    /// The minute since the epoch of a timestamp column.
    pub fn minute_of(self, column: &str) -> String {
        match self {
            Self::Postgres => format!("floor(extract(epoch FROM {column}) / 60)::bigint"),
            Self::Sqlite => format!("(CAST(strftime('%s', {column}) AS INTEGER) / 60)"),
        }
    }

    /// Milliseconds from one timestamp column to another, as a float.
    pub fn millis_between(self, from: &str, to: &str) -> String {
        match self {
            Self::Postgres => format!("(extract(epoch FROM {to} - {from}) * 1000)::float8"),
            Self::Sqlite => format!("((julianday({to}) - julianday({from})) * 86400000.0)"),
        }
    }

    /// A `FROM` item with one row per element of the JSON array of texts in
    /// `placeholder`, in a column named `value`: a list of any length
    /// travels as one parameter, and the statement stays the same.
    pub fn json_texts(self, placeholder: &str) -> String {
        match self {
            Self::Postgres => format!("json_array_elements_text({placeholder}::json) AS value"),
            Self::Sqlite => format!("json_each({placeholder})"),
        }
    }

    /// `MATERIALIZED ` where a common table expression must be computed
    /// once, before the statement's other parts read it (PostgreSQL would
    /// otherwise inline it); nothing on SQLite, which has one writer.
    pub fn materialized(self) -> &'static str {
        match self {
            Self::Postgres => "MATERIALIZED ",
            Self::Sqlite => "",
        }
    }

    /// ` FOR UPDATE SKIP LOCKED` where concurrent claims lock rows and pass
    /// each other's; nothing on SQLite, where the claim holds the one write
    /// lock.
    pub fn skip_locked(self) -> &'static str {
        match self {
            Self::Postgres => " FOR UPDATE SKIP LOCKED",
            Self::Sqlite => "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text and the builder take tasks in one order.
    #[test]
    fn the_claim_order_is_one_order() {
        assert_eq!(claim_order(), "priority DESC, fair_rank, run_at, id");
        let mut select = sea_orm::sea_query::Query::select();
        select
            .column(sea_orm::sea_query::Alias::new("id"))
            .from(sea_orm::sea_query::Alias::new("tasks"));
        order_by_claim(&mut select);
        let sql = select.to_string(sea_orm::sea_query::PostgresQueryBuilder);
        assert!(
            sql.ends_with(r#"ORDER BY "priority" DESC, "fair_rank" ASC, "run_at" ASC, "id" ASC"#),
            "{sql}"
        );
    }
}
