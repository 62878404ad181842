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

/// Every `extensions.code` taskql answers with, in one place: the service's
/// errors ([`TaskError::code`]) and those the transports raise before an
/// operation runs. docs/design.md lists each with its meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    NotFound,
    Conflict,
    BadUserInput,
    Unauthenticated,
    Forbidden,
    CursorExpired,
    ServiceUnavailable,
    InternalServerError,
    /// Not a well-formed GraphQL-over-HTTP request.
    BadRequest,
    PayloadTooLarge,
    RequestTimeout,
    MethodNotAllowed,
    NotAcceptable,
    UnsupportedMediaType,
    PersistedQueryNotFound,
    PersistedQueryNotSupported,
    PersistedQueryRequired,
}

impl ErrorCode {
    pub const ALL: [Self; 17] = [
        Self::NotFound,
        Self::Conflict,
        Self::BadUserInput,
        Self::Unauthenticated,
        Self::Forbidden,
        Self::CursorExpired,
        Self::ServiceUnavailable,
        Self::InternalServerError,
        Self::BadRequest,
        Self::PayloadTooLarge,
        Self::RequestTimeout,
        Self::MethodNotAllowed,
        Self::NotAcceptable,
        Self::UnsupportedMediaType,
        Self::PersistedQueryNotFound,
        Self::PersistedQueryNotSupported,
        Self::PersistedQueryRequired,
    ];

    /// The code as clients see it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "NOT_FOUND",
            Self::Conflict => "CONFLICT",
            Self::BadUserInput => "BAD_USER_INPUT",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden => "FORBIDDEN",
            Self::CursorExpired => "CURSOR_EXPIRED",
            Self::ServiceUnavailable => "SERVICE_UNAVAILABLE",
            Self::InternalServerError => "INTERNAL_SERVER_ERROR",
            Self::BadRequest => "BAD_REQUEST",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::RequestTimeout => "REQUEST_TIMEOUT",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::NotAcceptable => "NOT_ACCEPTABLE",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::PersistedQueryNotFound => "PERSISTED_QUERY_NOT_FOUND",
            Self::PersistedQueryNotSupported => "PERSISTED_QUERY_NOT_SUPPORTED",
            Self::PersistedQueryRequired => "PERSISTED_QUERY_REQUIRED",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotFound => ErrorCode::NotFound,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::InvalidInput(_) => ErrorCode::BadUserInput,
            Self::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::CursorExpired(_) => ErrorCode::CursorExpired,
            Self::Unavailable(_) | Self::Unconfirmed(_) => ErrorCode::ServiceUnavailable,
            Self::Internal(_) => ErrorCode::InternalServerError,
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
            e.set("code", self.code().as_str());
            if let Self::AtInput { index, .. } = self {
                e.set("index", *index as u64);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    /// Each code a client may branch on is explained in docs/design.md's
    /// "Errors" section, and no two variants share a code.
    #[test]
    fn every_code_is_documented_once() {
        let design = include_str!("../docs/design.md");
        let errors = design
            .split("\n## Errors\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/design.md has an Errors section");
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "{code} is two variants' code");
            assert!(
                errors.contains(&format!("| `{code}` |")),
                "docs/design.md's Errors table does not explain {code}"
            );
        }
    }
}
