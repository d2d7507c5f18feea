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
