//! `SwiftClient`: requests against one account, with retries, token refresh and typed errors.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use md5::{Digest, Md5};
use rand::Rng;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;

use crate::auth::{Authenticator, Credentials, Token};
use crate::error::{SwiftError, SwiftResult, transient_status};
use crate::tempurl::{TempUrlDigest, sign_temp_url};

/// How hard a request tries before it fails.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Backoff before the second attempt; doubles each time, with jitter.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured.
    pub retry_after_cap: Duration,
    /// Longest one attempt may take.
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            retry_after_cap: Duration::from_secs(30),
            request_timeout: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        // Full jitter: anywhere between half and all of the exponential step.
        let half = exp / 2;
        half + Duration::from_micros(rand::rng().random_range(0..=half.as_micros() as u64))
    }
}

/// What `head_object` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: Option<String>,
    /// Seconds since the Unix epoch.
    pub last_modified: i64,
}

/// What `head_container` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub object_count: u64,
    pub bytes_used: u64,
}

/// One row of a container listing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ListEntry {
    Object {
        name: String,
        bytes: u64,
        hash: String,
        last_modified: String,
    },
    /// A common prefix, when listing with a delimiter.
    Subdir { subdir: String },
}

/// One segment of a Static Large Object manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SloSegment {
    /// Bytes of an existing object (`container/object`), optionally only `range` of them.
    Object {
        container: String,
        object: String,
        /// Size of the whole object (Swift checks it).
        size: u64,
        range: Option<std::ops::Range<u64>>,
    },
    /// Bytes carried inline in the manifest (Swift's data segments).
    Data(Bytes),
}

impl SloSegment {
    fn to_json(&self) -> serde_json::Value {
        match self {
            SloSegment::Object {
                container,
                object,
                size,
                range,
            } => {
                let mut segment = serde_json::json!({
                    "path": format!("/{container}/{object}"),
                    "size_bytes": size,
                });
                if let Some(r) = range {
                    segment["range"] = format!("{}-{}", r.start, r.end.saturating_sub(1)).into();
                }
                segment
            }
            SloSegment::Data(bytes) => {
                use base64::Engine;
                serde_json::json!({ "data": base64::engine::general_purpose::STANDARD.encode(bytes) })
            }
        }
    }
}

/// The outcome of a bulk delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BulkDeleteReport {
    pub deleted: u64,
    pub not_found: u64,
    /// Paths that could not be deleted, with the status Swift gave.
    pub errors: Vec<(String, String)>,
}

/// Objects per bulk-delete request. Swift accepts up to 10,000, but deletes them two at a time
/// while the request waits: at a few dozen deletes a second (three replicas), 10,000 would take
/// minutes and outlast [`RetryPolicy::request_timeout`], failing a delete that succeeds.
const BULK_DELETE_CHUNK: usize = 1000;

/// The most a GET reserves before the body arrives (the largest block size a volume may
/// have); a longer body grows its buffer as it streams in.
const PREALLOCATION_CAP: u64 = 64 << 20;

/// A client of one Swift account.
#[derive(Debug)]
pub struct SwiftClient {
    http: reqwest::Client,
    auth: Authenticator,
    retry: RetryPolicy,
    /// The digest TempURL signatures use (TempURL mode), learnt from `/info` once.
    temp_url_digest: tokio::sync::OnceCell<TempUrlDigest>,
    slo_limits: tokio::sync::OnceCell<SloLimits>,
}

/// What one Static Large Object manifest may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SloLimits {
    /// Object-backed segments (inline data segments do not count).
    pub max_segments: u64,
    /// Bytes of the manifest's JSON.
    pub max_manifest_bytes: u64,
}

impl Default for SloLimits {
    fn default() -> SloLimits {
        SloLimits {
            max_segments: 1000,
            max_manifest_bytes: 8 << 20,
        }
    }
}

/// How long a request's TempURL signature stays valid: beyond any one attempt.
const TEMP_URL_VALIDITY: Duration = Duration::from_secs(3600);

/// One request, rebuilt for every attempt.
struct Call<'a> {
    method: Method,
    /// Path segments below the storage URL (container, then object name split on `/`).
    segments: Vec<&'a str>,
    query: Vec<(&'a str, String)>,
    headers: HeaderMap,
    body: Option<Bytes>,
    what: String,
    /// Longest one attempt may take when shorter than the policy's `request_timeout`.
    attempt_limit: Option<Duration>,
}

/// How long any object request may take before its attempt is abandoned and retried, plus
/// one second per MiB it moves: an attempt stuck on a connection the server will never
/// answer (seen after a proxy pause) is retried long before the caller gives up.
const ATTEMPT_BASE: Duration = Duration::from_secs(15);
const ATTEMPT_MIN_RATE: u64 = 1 << 20;

impl<'a> Call<'a> {
    fn new(method: Method, container: &'a str, object: Option<&'a str>) -> Call<'a> {
        let mut segments = Vec::new();
        if !container.is_empty() {
            segments.push(container);
        }
        if let Some(object) = object {
            segments.extend(object.split('/'));
        }
        let what = match object {
            Some(o) => format!("{method} {container}/{o}"),
            None if container.is_empty() => format!("{method} account"),
            None => format!("{method} {container}"),
        };
        Call {
            method,
            segments,
            query: Vec::new(),
            headers: HeaderMap::new(),
            body: None,
            what,
            attempt_limit: None,
        }
    }

    /// Bounds each attempt by [`ATTEMPT_BASE`] plus the time `bytes` take at
    /// [`ATTEMPT_MIN_RATE`].
    fn moving(mut self, bytes: u64) -> Call<'a> {
        self.attempt_limit =
            Some(ATTEMPT_BASE + Duration::from_secs(bytes.div_ceil(ATTEMPT_MIN_RATE)));
        self
    }

    fn header(mut self, name: &'static str, value: &str) -> SwiftResult<Call<'a>> {
        let value = HeaderValue::from_str(value)
            .map_err(|_| SwiftError::Config(format!("bad header value for {name}")))?;
        self.headers.insert(name, value);
        Ok(self)
    }

    fn query(mut self, name: &'a str, value: impl Into<String>) -> Call<'a> {
        self.query.push((name, value.into()));
        self
    }

    fn body(mut self, body: Bytes) -> Call<'a> {
        self.body = Some(body);
        self
    }
}

fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    let value = resp.headers().get("retry-after")?.to_str().ok()?;
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    httpdate::parse_http_date(value)
        .ok()?
        .duration_since(SystemTime::now())
        .ok()
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    header_str(headers, name).and_then(|v| v.parse().ok())
}

fn last_modified(headers: &HeaderMap) -> i64 {
    header_str(headers, "x-timestamp")
        .and_then(|t| t.split('.').next().and_then(|s| s.parse().ok()))
        .or_else(|| {
            let date = httpdate::parse_http_date(&header_str(headers, "last-modified")?).ok()?;
            Some(date.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs() as i64)
        })
        .unwrap_or(0)
}

/// `/container/object` percent-encoded byte by byte (all but the unreserved characters and the
/// object's `/`), as a bulk-delete body and the `Destination` of a COPY name objects: Swift
/// decodes them, so non-ASCII names and `.`/`..` segments arrive intact.
fn encoded_path(container: &str, object: &str) -> String {
    let mut path = String::with_capacity(container.len() + object.len() + 2);
    for (part, slash_is_separator) in [(container, false), (object, true)] {
        path.push('/');
        for &b in part.as_bytes() {
            if b.is_ascii_alphanumeric()
                || b"-._~".contains(&b)
                || (b == b'/' && slash_is_separator)
            {
                path.push(char::from(b));
            } else {
                path.push_str(&format!("%{b:02X}"));
            }
        }
    }
    path
}

/// MD5 hex of a body, which Swift checks on PUT (its ETag).
fn md5_hex(data: &[u8]) -> String {
    hex::encode(Md5::digest(data))
}

/// [`md5_hex`] of a body, computed off the async worker threads (a few milliseconds per
/// megabyte would stall every other request on that worker).
async fn body_etag(data: &Bytes) -> SwiftResult<String> {
    let data = data.clone();
    tokio::task::spawn_blocking(move || md5_hex(&data))
        .await
        .map_err(|e| SwiftError::Config(format!("checksum worker failed: {e}")))
}

impl SwiftClient {
    pub fn new(credentials: Credentials, retry: RetryPolicy) -> SwiftResult<SwiftClient> {
        let http = reqwest::Client::builder()
            .timeout(retry.request_timeout)
            .pool_max_idle_per_host(64)
            .tcp_keepalive(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|source| SwiftError::Transport {
                what: "building the HTTP client".into(),
                source,
            })?;
        Ok(SwiftClient {
            http,
            auth: Authenticator::new(credentials),
            retry,
            temp_url_digest: tokio::sync::OnceCell::new(),
            slo_limits: tokio::sync::OnceCell::new(),
        })
    }

    /// The strongest digest the cluster accepts for TempURLs: SHA-256, or SHA-1 where `/info`
    /// lists only that. Without `/info` (disabled or unreachable), SHA-256.
    async fn temp_url_digest(&self) -> TempUrlDigest {
        *self
            .temp_url_digest
            .get_or_init(|| async {
                let allowed = match self.info().await {
                    Ok(info) => info["tempurl"]["allowed_digests"].clone(),
                    Err(e) => {
                        tracing::warn!(error = %e, "no /info: signing TempURLs with SHA-256");
                        return TempUrlDigest::Sha256;
                    }
                };
                let offers = |name: &str| {
                    allowed
                        .as_array()
                        .is_some_and(|list| list.iter().any(|d| d == name))
                };
                if !offers("sha256") && offers("sha1") {
                    TempUrlDigest::Sha1
                } else {
                    TempUrlDigest::Sha256
                }
            })
            .await
    }

    /// Adds a TempURL signature for `call` to `url`. Only object requests can be signed.
    async fn sign(&self, url: &mut Url, key: &str, call: &Call<'_>) -> SwiftResult<()> {
        if call.segments.len() < 2 {
            return Err(SwiftError::Unauthorized(format!(
                "{}: a TempURL key signs object requests only; listings and container or \
                 account requests need account credentials",
                call.what
            )));
        }
        self.sign_url(url, key, call.method.as_str(), TEMP_URL_VALIDITY)
            .await;
        Ok(())
    }

    /// Appends the TempURL signature of `method` on `url`'s object, valid for `validity`.
    async fn sign_url(&self, url: &mut Url, key: &str, method: &str, validity: Duration) {
        let digest = self.temp_url_digest().await;
        let expires = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(validity)
            .as_secs();
        // Swift checks the signature against the decoded path.
        let path = percent_encoding::percent_decode_str(url.path()).decode_utf8_lossy();
        let signature = sign_temp_url(key.as_bytes(), method, &path, expires, digest);
        let query = match url.query() {
            Some(q) if !q.is_empty() => format!("{q}&{signature}"),
            _ => signature,
        };
        url.set_query(Some(&query));
    }

    fn url(token: &Token, call: &Call<'_>) -> SwiftResult<Url> {
        // A URL cannot carry these segments: they would be resolved away (even percent-encoded),
        // and the request would silently address another object.
        if call.segments.iter().any(|s| matches!(*s, "." | "..")) {
            return Err(SwiftError::Config(format!(
                "{}: a '.' or '..' path segment cannot be sent in a URL",
                call.what
            )));
        }
        let mut url = Url::parse(&token.storage_url).map_err(|e| {
            SwiftError::Config(format!("bad storage URL {}: {e}", token.storage_url))
        })?;
        url.path_segments_mut()
            .map_err(|()| SwiftError::Config("storage URL cannot have a path".into()))?
            .pop_if_empty()
            .extend(&call.segments);
        if !call.query.is_empty() {
            url.query_pairs_mut().extend_pairs(call.query.iter());
        }
        Ok(url)
    }

    /// Sends `call`, retrying transient failures and refreshing a rejected token once.
    /// Returns any response that is not transient (the caller maps its status).
    async fn send(&self, call: &Call<'_>) -> SwiftResult<reqwest::Response> {
        let mut refreshed = false;
        let mut attempt = 0;
        loop {
            let last = attempt + 1 >= self.retry.attempts;
            let token = match self.auth.token(&self.http).await {
                Ok(token) => token,
                Err(e) if e.is_transient() && !last => {
                    tracing::debug!(what = %call.what, error = %e, "retrying authentication");
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                    attempt += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut url = Self::url(&token, call)?;
            let signing_key = self.auth.temp_url_key();
            if let Some(key) = signing_key {
                self.sign(&mut url, key, call).await?;
            }
            let mut request = self
                .http
                .request(call.method.clone(), url)
                .headers(call.headers.clone());
            if let Some(limit) = call.attempt_limit {
                request = request.timeout(limit.min(self.retry.request_timeout));
            }
            if signing_key.is_none() {
                request = request.header("X-Auth-Token", &token.value);
            }
            if let Some(body) = &call.body {
                // Explicit, because an empty body would otherwise go without one, and Swift
                // answers 411 to a PUT without a Content-Length.
                request = request
                    .header(reqwest::header::CONTENT_LENGTH, body.len())
                    .body(body.clone());
            }
            let wait = match request.send().await {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    if refreshed || !self.auth.invalidate(&token).await {
                        return Err(SwiftError::Unauthorized(call.what.clone()));
                    }
                    refreshed = true;
                    continue;
                }
                Ok(resp) if transient_status(resp.status().as_u16()) && !last => {
                    tracing::debug!(what = %call.what, status = %resp.status(), "retrying");
                    retry_after(&resp)
                        .map(|d| d.min(self.retry.retry_after_cap))
                        .unwrap_or_else(|| self.retry.backoff(attempt))
                }
                Ok(resp) if transient_status(resp.status().as_u16()) => {
                    if matches!(resp.status().as_u16(), 429 | 498) {
                        return Err(SwiftError::Throttled {
                            what: call.what.clone(),
                        });
                    }
                    return Err(Self::http_error(call, resp).await);
                }
                Ok(resp) => return Ok(resp),
                Err(e) if !last => {
                    tracing::debug!(what = %call.what, error = %e, "retrying");
                    self.retry.backoff(attempt)
                }
                Err(e) if e.is_timeout() => {
                    return Err(SwiftError::TimedOut {
                        what: call.what.clone(),
                        limit: self.retry.request_timeout,
                    });
                }
                Err(source) => {
                    return Err(SwiftError::Transport {
                        what: call.what.clone(),
                        source,
                    });
                }
            };
            attempt += 1;
            tokio::time::sleep(wait).await;
        }
    }

    async fn http_error(call: &Call<'_>, resp: reqwest::Response) -> SwiftError {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        match status {
            StatusCode::NOT_FOUND => SwiftError::NotFound(call.what.clone()),
            StatusCode::PRECONDITION_FAILED => SwiftError::PreconditionFailed(call.what.clone()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                SwiftError::Unauthorized(call.what.clone())
            }
            _ => SwiftError::Http {
                status: status.as_u16(),
                what: call.what.clone(),
                body: body.chars().take(300).collect(),
            },
        }
    }

    /// Sends `call` and fails on any status but 2xx.
    async fn expect_success(&self, call: &Call<'_>) -> SwiftResult<reqwest::Response> {
        let resp = self.send(call).await?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(Self::http_error(call, resp).await)
        }
    }

    async fn body_bytes(call: &Call<'_>, resp: reqwest::Response) -> SwiftResult<Bytes> {
        resp.bytes().await.map_err(|source| SwiftError::Transport {
            what: call.what.clone(),
            source,
        })
    }

    /// Reads an object, or the byte range `start..end` of it (clamped to its end).
    pub async fn get_object(
        &self,
        container: &str,
        object: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> SwiftResult<Bytes> {
        self.get_object_into(container, object, range, Vec::with_capacity)
            .await
            .map(Bytes::from)
    }

    /// [`get_object`](Self::get_object) into a buffer of the caller's: `buffer(length)` gives
    /// an empty one with room for the body's announced length (a caller may reuse buffers).
    pub async fn get_object_into(
        &self,
        container: &str,
        object: &str,
        range: Option<std::ops::Range<u64>>,
        buffer: impl FnOnce(usize) -> Vec<u8>,
    ) -> SwiftResult<Vec<u8>> {
        let mut call = Call::new(Method::GET, container, Some(object));
        if let Some(r) = &range {
            if r.end <= r.start {
                return Ok(Vec::new());
            }
            call = call
                .header("Range", &format!("bytes={}-{}", r.start, r.end - 1))?
                .moving(r.end - r.start);
        }
        let mut resp = self.send(&call).await?;
        match resp.status() {
            StatusCode::RANGE_NOT_SATISFIABLE => Ok(Vec::new()),
            s if s.is_success() => {
                // The announced length only sizes the first allocation, and never past what
                // this call can expect: a server announcing more than it sends (or a huge
                // object read whole) must not reserve memory up front.
                let expected = range
                    .as_ref()
                    .map_or(PREALLOCATION_CAP, |r| r.end - r.start);
                let announced = resp.content_length().unwrap_or(0);
                let mut body = buffer(announced.min(expected).min(PREALLOCATION_CAP) as usize);
                let transport = |source| SwiftError::Transport {
                    what: call.what.clone(),
                    source,
                };
                while let Some(chunk) = resp.chunk().await.map_err(transport)? {
                    body.extend_from_slice(&chunk);
                }
                Ok(body)
            }
            _ => Err(Self::http_error(&call, resp).await),
        }
    }

    /// Writes an object; Swift checks the body against its MD5.
    pub async fn put_object(&self, container: &str, object: &str, data: Bytes) -> SwiftResult<()> {
        let call = Call::new(Method::PUT, container, Some(object))
            .header("ETag", &body_etag(&data).await?)?
            .moving(data.len() as u64)
            .body(data);
        self.expect_success(&call).await.map(|_| ())
    }

    /// Writes an object only if none exists under that name (`If-None-Match: *`); `Ok(false)`
    /// when one does. A retried attempt that finds its own earlier write counts as success.
    pub async fn put_object_if_absent(
        &self,
        container: &str,
        object: &str,
        data: Bytes,
    ) -> SwiftResult<bool> {
        let etag = body_etag(&data).await?;
        let call = Call::new(Method::PUT, container, Some(object))
            .header("ETag", &etag)?
            .header("If-None-Match", "*")?
            .moving(data.len() as u64)
            .body(data);
        let resp = self.send(&call).await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::PRECONDITION_FAILED => {
                // Either someone else's object, or our own first attempt whose answer was lost.
                // Identical bytes mean an identical object, so either way ours is in place.
                let existing = self.head_object(container, object).await?;
                Ok(existing.and_then(|o| o.etag).is_some_and(|e| e == etag))
            }
            _ => Err(Self::http_error(&call, resp).await),
        }
    }

    /// Size, ETag and age of an object; `None` when it does not exist.
    pub async fn head_object(
        &self,
        container: &str,
        object: &str,
    ) -> SwiftResult<Option<ObjectInfo>> {
        let call = Call::new(Method::HEAD, container, Some(object)).moving(0);
        let resp = self.send(&call).await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let h = resp.headers();
                Ok(Some(ObjectInfo {
                    size: header_u64(h, "content-length").unwrap_or(0),
                    etag: header_str(h, "etag").map(|e| e.trim_matches('"').to_owned()),
                    last_modified: last_modified(h),
                }))
            }
            _ => Err(Self::http_error(&call, resp).await),
        }
    }

    /// Deletes an object; a missing object is not an error.
    pub async fn delete_object(&self, container: &str, object: &str) -> SwiftResult<()> {
        self.delete(Call::new(Method::DELETE, container, Some(object)).moving(0))
            .await
    }

    /// Sends a DELETE; a missing target is not an error.
    async fn delete(&self, call: Call<'_>) -> SwiftResult<()> {
        let resp = self.send(&call).await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(()),
            s if s.is_success() => Ok(()),
            _ => Err(Self::http_error(&call, resp).await),
        }
    }

    /// Server-side copy of `container/object` to `dest_container/dest_object`.
    pub async fn copy_object(
        &self,
        container: &str,
        object: &str,
        dest_container: &str,
        dest_object: &str,
    ) -> SwiftResult<()> {
        let destination = encoded_path(dest_container, dest_object);
        let call = Call::new(
            Method::from_bytes(b"COPY").map_err(|_| SwiftError::Config("COPY method".into()))?,
            container,
            Some(object),
        )
        .header("Destination", &destination)?;
        self.expect_success(&call).await.map(|_| ())
    }

    /// Writes a Static Large Object: a manifest whose GET returns its segments' bytes in
    /// order (no data is copied). Swift checks every object segment exists with that size.
    /// `delete_object` of the manifest removes the manifest only, never its segments.
    pub async fn put_slo_manifest(
        &self,
        container: &str,
        object: &str,
        segments: &[SloSegment],
    ) -> SwiftResult<()> {
        let manifest: Vec<serde_json::Value> = segments.iter().map(SloSegment::to_json).collect();
        let body = serde_json::to_vec(&manifest).map_err(|e| SwiftError::BadResponse {
            what: "encoding an SLO manifest".into(),
            reason: e.to_string(),
        })?;
        let call = Call::new(Method::PUT, container, Some(object))
            .query("multipart-manifest", "put")
            .header("Content-Type", "application/json")?
            .body(Bytes::from(body));
        self.expect_success(&call).await.map(|_| ())
    }

    /// The stored manifest of a Static Large Object (its JSON segment list), not its bytes.
    pub async fn get_slo_manifest(
        &self,
        container: &str,
        object: &str,
    ) -> SwiftResult<serde_json::Value> {
        let call =
            Call::new(Method::GET, container, Some(object)).query("multipart-manifest", "get");
        let resp = self.expect_success(&call).await?;
        let body = Self::body_bytes(&call, resp).await?;
        serde_json::from_slice(&body).map_err(|e| SwiftError::BadResponse {
            what: call.what.clone(),
            reason: e.to_string(),
        })
    }

    /// Creates a container (no error if it exists).
    pub async fn create_container(&self, container: &str) -> SwiftResult<()> {
        let call = Call::new(Method::PUT, container, None);
        self.expect_success(&call).await.map(|_| ())
    }

    /// Deletes an empty container; a missing one is not an error. Swift refuses (409, as
    /// `SwiftError::Http`) to delete a container that still holds objects.
    pub async fn delete_container(&self, container: &str) -> SwiftResult<()> {
        self.delete(Call::new(Method::DELETE, container, None))
            .await
    }

    /// Sets the account's `Temp-URL-Key` (`X-Account-Meta-Temp-URL-Key`), the secret that
    /// [`sign_temp_url`](crate::sign_temp_url) signs with; it replaces any earlier key, so URLs
    /// signed with that one stop working; an empty key removes it. Needs an account
    /// administrator's token.
    pub async fn set_temp_url_key(&self, key: &str) -> SwiftResult<()> {
        let call = Call::new(Method::POST, "", None).header("X-Account-Meta-Temp-URL-Key", key)?;
        self.expect_success(&call).await.map(|_| ())
    }

    /// Sets a container's `Temp-URL-Key` (`X-Container-Meta-Temp-URL-Key`): URLs signed with
    /// it reach that container's objects only, which makes it the key to hand to a consumer
    /// of one pool. An empty key removes it.
    pub async fn set_container_temp_url_key(&self, container: &str, key: &str) -> SwiftResult<()> {
        let call = Call::new(Method::POST, container, None)
            .header("X-Container-Meta-Temp-URL-Key", key)?;
        self.expect_success(&call).await.map(|_| ())
    }

    /// Object count and bytes of a container; `None` when it does not exist.
    pub async fn head_container(&self, container: &str) -> SwiftResult<Option<ContainerInfo>> {
        let call = Call::new(Method::HEAD, container, None);
        let resp = self.send(&call).await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(Some(ContainerInfo {
                object_count: header_u64(resp.headers(), "x-container-object-count").unwrap_or(0),
                bytes_used: header_u64(resp.headers(), "x-container-bytes-used").unwrap_or(0),
            })),
            _ => Err(Self::http_error(&call, resp).await),
        }
    }

    /// One page of a container listing: names after `marker` starting with `prefix`.
    pub async fn list_objects(
        &self,
        container: &str,
        prefix: &str,
        marker: Option<&str>,
        limit: usize,
        delimiter: Option<char>,
    ) -> SwiftResult<Vec<ListEntry>> {
        let mut call = Call::new(Method::GET, container, None)
            .query("format", "json")
            .query("prefix", prefix)
            .query("limit", limit.clamp(1, 10_000).to_string());
        if let Some(marker) = marker {
            call = call.query("marker", marker);
        }
        if let Some(d) = delimiter {
            call = call.query("delimiter", d.to_string());
        }
        let resp = self.expect_success(&call).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(Vec::new());
        }
        let body = Self::body_bytes(&call, resp).await?;
        serde_json::from_slice(&body).map_err(|e| SwiftError::BadResponse {
            what: call.what.clone(),
            reason: e.to_string(),
        })
    }

    /// Deletes many objects, 1,000 per request (the `bulk` middleware).
    pub async fn bulk_delete(
        &self,
        container: &str,
        objects: &[String],
    ) -> SwiftResult<BulkDeleteReport> {
        let mut report = BulkDeleteReport::default();
        for chunk in objects.chunks(BULK_DELETE_CHUNK) {
            let mut body = String::new();
            for object in chunk {
                body.push_str(&encoded_path(container, object));
                body.push('\n');
            }
            let call = Call::new(Method::POST, "", None)
                .query("bulk-delete", "")
                .header("Content-Type", "text/plain")?
                .header("Accept", "application/json")?
                .body(Bytes::from(body));
            let resp = self.expect_success(&call).await?;
            let raw = Self::body_bytes(&call, resp).await?;
            let parsed: serde_json::Value =
                serde_json::from_slice(&raw).map_err(|e| SwiftError::BadResponse {
                    what: call.what.clone(),
                    reason: e.to_string(),
                })?;
            report.deleted += parsed["Number Deleted"].as_u64().unwrap_or(0);
            report.not_found += parsed["Number Not Found"].as_u64().unwrap_or(0);
            let errors = parsed["Errors"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            for error in errors {
                report.errors.push((
                    error[0].as_str().unwrap_or_default().to_owned(),
                    error[1].as_str().unwrap_or_default().to_owned(),
                ));
            }
            // The HTTP status is sent before the work is done; the real outcome is in the body.
            // A failure that names no object (a malformed or oversized request) fails the call.
            let outcome = parsed["Response Status"].as_str().unwrap_or_default();
            let status: u16 = outcome
                .split_whitespace()
                .next()
                .and_then(|code| code.parse().ok())
                .unwrap_or(200);
            if errors.is_empty() && !(200..300).contains(&status) {
                return Err(SwiftError::Http {
                    status,
                    what: call.what.clone(),
                    body: parsed["Response Body"]
                        .as_str()
                        .unwrap_or(outcome)
                        .to_owned(),
                });
            }
        }
        Ok(report)
    }

    /// The cluster's capabilities (`GET /info` at the proxy's root).
    pub async fn info(&self) -> SwiftResult<serde_json::Value> {
        let token = self.auth.token(&self.http).await?;
        let mut url = Url::parse(&token.storage_url)
            .map_err(|e| SwiftError::Config(format!("bad storage URL: {e}")))?;
        url.set_path("/info");
        url.set_query(None);
        let what = "GET /info".to_owned();
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|source| SwiftError::Transport {
                what: what.clone(),
                source,
            })?;
        if !resp.status().is_success() {
            return Err(SwiftError::Http {
                status: resp.status().as_u16(),
                what,
                body: String::new(),
            });
        }
        resp.json()
            .await
            .map_err(|source| SwiftError::Transport { what, source })
    }

    /// The URL of `container/object` (a request to it needs a token).
    pub async fn object_url(&self, container: &str, object: &str) -> SwiftResult<String> {
        let token = self.auth.token(&self.http).await?;
        Ok(Self::url(&token, &Call::new(Method::GET, container, Some(object)))?.to_string())
    }

    /// A URL that GETs `container/object` without credentials for `validity`: a TempURL signed
    /// with the key these credentials carry, else the container's `Temp-URL-Key`, else the
    /// account's.
    pub async fn temp_url(
        &self,
        container: &str,
        object: &str,
        validity: Duration,
    ) -> SwiftResult<String> {
        let key = match self.auth.temp_url_key() {
            Some(key) => key.to_owned(),
            None => self.stored_temp_url_key(container).await?.ok_or_else(|| {
                SwiftError::Config(format!(
                    "neither container {container} nor the account has a Temp-URL-Key to sign \
                     a TempURL with; set one (X-Container-Meta-Temp-URL-Key)"
                ))
            })?,
        };
        let token = self.auth.token(&self.http).await?;
        let mut url = Self::url(&token, &Call::new(Method::GET, container, Some(object)))?;
        self.sign_url(&mut url, &key, "GET", validity).await;
        Ok(url.to_string())
    }

    /// The `Temp-URL-Key` of the container, or else of the account, if either has one.
    async fn stored_temp_url_key(&self, container: &str) -> SwiftResult<Option<String>> {
        for (call, header) in [
            (
                Call::new(Method::HEAD, container, None),
                "x-container-meta-temp-url-key",
            ),
            (
                Call::new(Method::HEAD, "", None),
                "x-account-meta-temp-url-key",
            ),
        ] {
            let resp = self.expect_success(&call).await?;
            if let Some(key) = header_str(resp.headers(), header).filter(|k| !k.is_empty()) {
                return Ok(Some(key));
            }
        }
        Ok(None)
    }

    /// The cluster's limits on one SLO manifest, from `/info` (Swift's defaults without it).
    pub async fn slo_limits(&self) -> SloLimits {
        *self
            .slo_limits
            .get_or_init(|| async {
                let defaults = SloLimits::default();
                match self.info().await {
                    Ok(info) => SloLimits {
                        max_segments: info["slo"]["max_manifest_segments"]
                            .as_u64()
                            .unwrap_or(defaults.max_segments),
                        max_manifest_bytes: info["slo"]["max_manifest_size"]
                            .as_u64()
                            .unwrap_or(defaults.max_manifest_bytes),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "no /info: assuming Swift's default SLO limits");
                        defaults
                    }
                }
            })
            .await
    }

    /// Whether requests are signed with a TempURL key (object requests only) rather than
    /// carrying a token.
    pub fn signs_temp_urls(&self) -> bool {
        self.auth.temp_url_key().is_some()
    }

    /// The storage URL (`…/v1/AUTH_account`) the client works against.
    pub async fn storage_url(&self) -> SwiftResult<String> {
        Ok(self.auth.token(&self.http).await?.storage_url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_capped() {
        let policy = RetryPolicy::default();
        for attempt in 0..20 {
            let d = policy.backoff(attempt);
            assert!(d <= policy.max_backoff, "{attempt}: {d:?}");
            let floor = (policy.base_backoff * (1 << attempt.min(16))).min(policy.max_backoff) / 2;
            assert!(d >= floor, "{attempt}: {d:?} < {floor:?}");
        }
    }

    #[test]
    fn bulk_paths_are_percent_encoded() {
        assert_eq!(encoded_path("c", "dir/a b%?.txt"), "/c/dir/a%20b%25%3F.txt");
        assert_eq!(encoded_path("c/x", "./é/../"), "/c%2Fx/./%C3%A9/../");
    }

    #[test]
    fn listing_rows_parse() {
        let rows: Vec<ListEntry> = serde_json::from_str(
            r#"[{"name":"a/b","bytes":3,"hash":"x","last_modified":"2026-01-01T00:00:00.000000","content_type":"t"},
                {"subdir":"c/"}]"#,
        )
        .expect("parse");
        assert!(matches!(&rows[0], ListEntry::Object { name, bytes: 3, .. } if name == "a/b"));
        assert_eq!(
            rows[1],
            ListEntry::Subdir {
                subdir: "c/".into()
            }
        );
    }
}
