//! OpenStack Swift client for cloudfs.
//!
//! Knows Swift's HTTP API and nothing of file systems: authentication (tempauth / v1,
//! Keystone v3 password and application credentials, or a pre-authenticated storage URL and
//! token), objects (ranged GET, PUT with an MD5 check, create-only PUT, HEAD, DELETE, COPY),
//! containers (create, HEAD, paged listings), bulk delete, `/info` capabilities and TempURL
//! signing. Every request retries transient failures (of authentication too) with jittered
//! exponential backoff and refreshes an expired token once.

mod auth;
mod client;
mod error;
mod tempurl;

pub use auth::{Credentials, KeystoneAuth, parse_credentials_file};
pub use client::{
    BulkDeleteReport, ContainerInfo, ListEntry, ObjectInfo, RetryPolicy, SloLimits, SloSegment,
    SwiftClient,
};
pub use error::{SwiftError, SwiftResult};
pub use tempurl::{TempUrlDigest, sign_temp_url};
