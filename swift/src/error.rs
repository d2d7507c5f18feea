//! `SwiftError`: typed failures, so callers never parse strings.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SwiftError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    #[error("throttled by Swift on {what} (still after retries)")]
    Throttled { what: String },
    #[error("Swift answered {status} to {what}: {body}")]
    Http {
        status: u16,
        what: String,
        body: String,
    },
    #[error("cannot reach Swift for {what}: {source}")]
    Transport {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("request {what} took longer than {limit:?}")]
    TimedOut { what: String, limit: Duration },
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("invalid Swift configuration: {0}")]
    Config(String),
    #[error("Swift sent a response cloudfs cannot read for {what}: {reason}")]
    BadResponse { what: String, reason: String },
}

pub type SwiftResult<T> = Result<T, SwiftError>;

/// Statuses worth retrying: timeouts, throttling (429, and 498 from Swift's ratelimit) and
/// server errors.
pub(crate) fn transient_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 498 | 500..=599)
}

impl SwiftError {
    /// A short, stable name of the kind of error (for metrics labels).
    pub fn kind(&self) -> &'static str {
        match self {
            SwiftError::NotFound(_) => "not_found",
            SwiftError::Unauthorized(_) => "unauthorized",
            SwiftError::PreconditionFailed(_) => "precondition_failed",
            SwiftError::Throttled { .. } => "throttled",
            SwiftError::Http { .. } => "http",
            SwiftError::Transport { .. } => "transport",
            SwiftError::TimedOut { .. } => "timed_out",
            SwiftError::Auth(_) => "auth",
            SwiftError::Config(_) => "config",
            SwiftError::BadResponse { .. } => "bad_response",
        }
    }

    /// Whether trying again later may succeed (an unreachable or overloaded server).
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            SwiftError::Transport { .. }
            | SwiftError::TimedOut { .. }
            | SwiftError::Throttled { .. } => true,
            SwiftError::Http { status, .. } => transient_status(*status),
            _ => false,
        }
    }
}
