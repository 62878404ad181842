//! One error type for the whole service, mapped once to GraphQL codes.
use async_graphql::ErrorExtensions;

/// Every way a taskql operation can fail. `Display` is what the client sees.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TaskError {
    #[error("task not found")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    /// A `taskEvents` cursor older than the events the log still keeps.
    #[error("{0}")]
    CursorExpired(String),
    /// The database cannot be reached, or did not answer in time: worth
    /// retrying later. The detail is logged, never shown.
    #[error("the database is unavailable; try again shortly")]
    Unavailable(String),
    /// A change went to the database and its answer never came (the
    /// request's deadline passed, or the connection broke): it may or may
    /// not have been made. The detail is logged, never shown.
    #[error(
        "the database did not answer in time, so this change may or may not have been made: \
         read the task to see. A create repeated with the same idempotencyKey is never made \
         twice; a claim made unseen goes back to the queue when its lease expires"
    )]
    Unconfirmed(String),
    /// The detail is logged, never shown: it may hold a database message.
    #[error("internal server error")]
    Internal(String),
    /// One input of a batched call (`createTasks`, `completeTasks`, …) was
    /// refused; the call wrote nothing. Its code is the input's error's.
    #[error("input {index}: {error}")]
    AtInput { index: usize, error: Box<TaskError> },
}

pub type TaskResult<T> = Result<T, TaskError>;

/// Most characters of a client's input an error message repeats.
pub const MAX_ECHO_CHARS: usize = 100;

/// `input` as an error message may quote it: cut to [`MAX_ECHO_CHARS`].
pub fn echo(input: &str) -> std::borrow::Cow<'_, str> {
    match input.char_indices().nth(MAX_ECHO_CHARS) {
        Some((end, _)) => format!("{}…", &input[..end]).into(),
        None => input.into(),
    }
}

impl TaskError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidInput(message.into())
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::Conflict(message.into())
    }

    /// This error as that of the `index`th input of a batched call.
    pub fn at_input(self, index: usize) -> Self {
        Self::AtInput {
            index,
            error: Box::new(self),
        }
    }

    /// The stable `extensions.code` clients branch on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "NOT_FOUND",
            Self::Conflict(_) => "CONFLICT",
            Self::InvalidInput(_) => "BAD_USER_INPUT",
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::Forbidden(_) => "FORBIDDEN",
            Self::CursorExpired(_) => "CURSOR_EXPIRED",
            Self::Unavailable(_) | Self::Unconfirmed(_) => "SERVICE_UNAVAILABLE",
            Self::Internal(_) => "INTERNAL_SERVER_ERROR",
            Self::AtInput { error, .. } => error.code(),
        }
    }

    /// Whether the database was unreachable or too slow: worth retrying.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unavailable(_) | Self::Unconfirmed(_) => true,
            Self::AtInput { error, .. } => error.is_unavailable(),
            _ => false,
        }
    }
}

impl From<sea_orm::DbErr> for TaskError {
    fn from(err: sea_orm::DbErr) -> Self {
        let detail = err.to_string();
        if crate::db::is_unconfirmed(&err) {
            tracing::warn!(error = %detail, "no answer to a change sent to the database");
            Self::Unconfirmed(detail)
        } else if crate::db::is_unavailable(&err) {
            tracing::warn!(error = %detail, "database unavailable");
            Self::Unavailable(detail)
        } else {
            tracing::error!(error = %detail, "database error");
            Self::Internal(detail)
        }
    }
}

impl ErrorExtensions for TaskError {
    fn extend(&self) -> async_graphql::Error {
        async_graphql::Error::new(self.to_string()).extend_with(|_, e| {
            e.set("code", self.code());
            if let Self::AtInput { index, .. } = self {
                e.set("index", *index as u64);
            }
        })
    }
}
