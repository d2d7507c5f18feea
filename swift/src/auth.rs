//! Authentication: how a client gets a storage URL and a token, and keeps the token fresh.
//!
//! One token is cached per client and shared by all requests; when it nears expiry or a
//! request gets a 401, the next caller refreshes it while the others wait for that refresh
//! (one auth request, however many requests were waiting).

use std::fmt;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::error::{SwiftError, SwiftResult, transient_status};

/// How to authenticate.
#[derive(Clone)]
pub enum Credentials {
    /// tempauth / v1: `X-Auth-User` and `X-Auth-Key` against `auth_url`.
    V1 {
        auth_url: String,
        user: String,
        key: String,
    },
    /// Keystone v3, by password or application credential.
    Keystone(KeystoneAuth),
    /// A pre-authenticated storage URL and token (used as they are; never refreshed).
    Token { storage_url: String, token: String },
    /// A storage URL and the account's (or container's) TempURL key: every object request is
    /// signed with the key instead of carrying a token. Grants object GET/HEAD/PUT/DELETE only
    /// (no listings, no container or account requests), so it suits read-only consumers.
    TempUrl { storage_url: String, key: String },
}

/// Keystone v3 parameters.
#[derive(Clone, Default)]
pub struct KeystoneAuth {
    pub auth_url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub user_domain_name: Option<String>,
    pub project_name: Option<String>,
    pub project_domain_name: Option<String>,
    pub application_credential_id: Option<String>,
    pub application_credential_secret: Option<String>,
    pub region_name: Option<String>,
    /// `public` unless set.
    pub interface: Option<String>,
}

const REDACTED: &str = "<redacted>";

impl Credentials {
    /// Credentials from the keys the OpenStack tools use (environment variables, a
    /// credentials file, or a Kubernetes Secret all carry the same names):
    /// `ST_AUTH`/`ST_USER`/`ST_KEY` (v1); `OS_AUTH_URL` with `OS_USERNAME`/`OS_PASSWORD`
    /// (+ `OS_PROJECT_NAME`, `OS_USER_DOMAIN_NAME`, `OS_PROJECT_DOMAIN_NAME`) or
    /// `OS_APPLICATION_CREDENTIAL_ID`/`_SECRET` (Keystone v3, optional `OS_REGION_NAME`,
    /// `OS_INTERFACE`); or `OS_STORAGE_URL` with `OS_AUTH_TOKEN` (pre-authenticated) or
    /// `OS_TEMP_URL_KEY` (TempURL signing, object requests only).
    pub fn from_keys(get: impl Fn(&str) -> Option<String>) -> SwiftResult<Credentials> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        if let Some(storage_url) = get("OS_STORAGE_URL") {
            if let Some(token) = get("OS_AUTH_TOKEN") {
                return Ok(Credentials::Token { storage_url, token });
            }
            if let Some(key) = get("OS_TEMP_URL_KEY") {
                return Ok(Credentials::TempUrl { storage_url, key });
            }
        }
        if let Some(auth_url) = get("ST_AUTH") {
            let (Some(user), Some(key)) = (get("ST_USER"), get("ST_KEY")) else {
                return Err(SwiftError::Config(
                    "ST_AUTH is set but ST_USER or ST_KEY is missing".into(),
                ));
            };
            return Ok(Credentials::V1 {
                auth_url,
                user,
                key,
            });
        }
        if let Some(auth_url) = get("OS_AUTH_URL") {
            let keystone = KeystoneAuth {
                auth_url,
                username: get("OS_USERNAME"),
                password: get("OS_PASSWORD"),
                user_domain_name: get("OS_USER_DOMAIN_NAME"),
                project_name: get("OS_PROJECT_NAME"),
                project_domain_name: get("OS_PROJECT_DOMAIN_NAME"),
                application_credential_id: get("OS_APPLICATION_CREDENTIAL_ID"),
                application_credential_secret: get("OS_APPLICATION_CREDENTIAL_SECRET"),
                region_name: get("OS_REGION_NAME"),
                interface: get("OS_INTERFACE"),
            };
            keystone_body(&keystone)?;
            return Ok(Credentials::Keystone(keystone));
        }
        Err(SwiftError::Config(
            "no Swift credentials: set ST_AUTH/ST_USER/ST_KEY, OS_AUTH_URL with a user or an \
             application credential, or OS_STORAGE_URL with OS_AUTH_TOKEN or OS_TEMP_URL_KEY"
                .into(),
        ))
    }

    /// Credentials from the text of a credentials file (see [`parse_credentials_file`]).
    pub fn from_file_contents(text: &str) -> SwiftResult<Credentials> {
        let map = parse_credentials_file(text)?;
        Credentials::from_keys(|k| map.get(k).cloned())
    }
}

/// Parses a credentials file: `KEY=value` lines (an optional `export ` prefix and quotes are
/// accepted; `#` starts a comment), with the keys of [`Credentials::from_keys`].
pub fn parse_credentials_file(
    text: &str,
) -> SwiftResult<std::collections::HashMap<String, String>> {
    let mut map = std::collections::HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            let start = line.split_whitespace().next().unwrap_or_default();
            return Err(SwiftError::Config(format!(
                "credentials line without '=': {start}…"
            )));
        };
        let value = value.trim().trim_matches('"').trim_matches('\'');
        map.insert(key.trim().to_owned(), value.to_owned());
    }
    Ok(map)
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::V1 { auth_url, user, .. } => f
                .debug_struct("V1")
                .field("auth_url", auth_url)
                .field("user", user)
                .field("key", &REDACTED)
                .finish(),
            Credentials::Keystone(k) => k.fmt(f),
            Credentials::Token { storage_url, .. } => f
                .debug_struct("Token")
                .field("storage_url", storage_url)
                .field("token", &REDACTED)
                .finish(),
            Credentials::TempUrl { storage_url, .. } => f
                .debug_struct("TempUrl")
                .field("storage_url", storage_url)
                .field("key", &REDACTED)
                .finish(),
        }
    }
}

impl fmt::Debug for KeystoneAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keystone")
            .field("auth_url", &self.auth_url)
            .field("username", &self.username)
            .field("project_name", &self.project_name)
            .field("application_credential_id", &self.application_credential_id)
            .field("secrets", &REDACTED)
            .finish()
    }
}

/// A token and the storage URL it is valid for.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub(crate) storage_url: String,
    pub(crate) value: String,
    refresh_at: Option<Instant>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("storage_url", &self.storage_url)
            .field("value", &REDACTED)
            .finish()
    }
}

/// When to refresh a token that expires in `life`: a minute early, or at 90% of a short life.
fn refresh_deadline(life: Duration) -> Instant {
    let margin = Duration::from_secs(60).min(life / 10);
    Instant::now() + life.saturating_sub(margin)
}

#[derive(Debug)]
pub(crate) struct Authenticator {
    credentials: Credentials,
    current: Mutex<Option<Token>>,
}

impl Authenticator {
    pub(crate) fn new(credentials: Credentials) -> Authenticator {
        Authenticator {
            credentials,
            current: Mutex::new(None),
        }
    }

    /// A valid token, fetching a new one when there is none or it is about to expire.
    pub(crate) async fn token(&self, http: &reqwest::Client) -> SwiftResult<Token> {
        let mut current = self.current.lock().await;
        if let Some(token) = current.as_ref()
            && token.refresh_at.is_none_or(|at| Instant::now() < at)
        {
            return Ok(token.clone());
        }
        let mut fresh = self.authenticate(http).await?;
        if current.as_ref().is_some_and(|old| old.value == fresh.value) {
            // The server handed back the token it issued before (tempauth does until it has
            // expired): refreshing early again would only fetch it again, ever more often as
            // its life shrinks. Keep it until Swift rejects it, then a refresh gets a new one.
            tracing::debug!("authentication returned the current token; using it until rejected");
            fresh.refresh_at = None;
        }
        tracing::debug!(storage_url = %fresh.storage_url, "authenticated");
        *current = Some(fresh.clone());
        Ok(fresh)
    }

    /// The TempURL key requests are signed with, in TempURL mode.
    pub(crate) fn temp_url_key(&self) -> Option<&str> {
        match &self.credentials {
            Credentials::TempUrl { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Drops `rejected` (a token Swift answered 401 to), unless it was already replaced.
    /// Returns whether a refresh can help.
    pub(crate) async fn invalidate(&self, rejected: &Token) -> bool {
        if matches!(
            self.credentials,
            Credentials::Token { .. } | Credentials::TempUrl { .. }
        ) {
            return false;
        }
        let mut current = self.current.lock().await;
        if current.as_ref() == Some(rejected) {
            *current = None;
        }
        true
    }

    async fn authenticate(&self, http: &reqwest::Client) -> SwiftResult<Token> {
        match &self.credentials {
            Credentials::Token { storage_url, token } => Ok(Token {
                storage_url: storage_url.trim_end_matches('/').to_owned(),
                value: token.clone(),
                refresh_at: None,
            }),
            Credentials::TempUrl { storage_url, .. } => Ok(Token {
                storage_url: storage_url.trim_end_matches('/').to_owned(),
                value: String::new(),
                refresh_at: None,
            }),
            Credentials::V1 {
                auth_url,
                user,
                key,
            } => v1(http, auth_url, user, key).await,
            Credentials::Keystone(k) => keystone(http, k).await,
        }
    }
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn transport(what: &str) -> impl FnOnce(reqwest::Error) -> SwiftError {
    let what = what.to_owned();
    move |source| SwiftError::Transport { what, source }
}

/// An authentication endpoint's failure status: a transient one (an overloaded or restarting
/// server) as `SwiftError::Http`, so requests retry it; any other as `SwiftError::Auth`.
fn auth_failure(url: &str, status: reqwest::StatusCode) -> SwiftError {
    if transient_status(status.as_u16()) {
        SwiftError::Http {
            status: status.as_u16(),
            what: format!("authentication at {url}"),
            body: String::new(),
        }
    } else {
        SwiftError::Auth(format!("{url} answered {status}"))
    }
}

async fn v1(http: &reqwest::Client, auth_url: &str, user: &str, key: &str) -> SwiftResult<Token> {
    let resp = http
        .get(auth_url)
        .header("X-Auth-User", user)
        .header("X-Auth-Key", key)
        .send()
        .await
        .map_err(transport("v1 authentication"))?;
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(SwiftError::Unauthorized(format!(
            "{auth_url} refused user {user} ({status})"
        )));
    }
    if !status.is_success() {
        return Err(auth_failure(auth_url, status));
    }
    let (Some(storage_url), Some(value)) = (
        header(&resp, "x-storage-url"),
        header(&resp, "x-auth-token"),
    ) else {
        return Err(SwiftError::Auth(format!(
            "{auth_url} sent no X-Storage-Url / X-Auth-Token"
        )));
    };
    let life = header(&resp, "x-auth-token-expires")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    Ok(Token {
        storage_url: storage_url.trim_end_matches('/').to_owned(),
        value,
        refresh_at: life.map(refresh_deadline),
    })
}

fn keystone_body(k: &KeystoneAuth) -> SwiftResult<Value> {
    if let (Some(id), Some(secret)) = (
        &k.application_credential_id,
        &k.application_credential_secret,
    ) {
        return Ok(json!({"auth": {"identity": {
            "methods": ["application_credential"],
            "application_credential": {"id": id, "secret": secret}
        }}}));
    }
    let (Some(user), Some(password)) = (&k.username, &k.password) else {
        return Err(SwiftError::Config(
            "Keystone needs a username and password or an application credential id and secret"
                .into(),
        ));
    };
    let user_domain = k.user_domain_name.as_deref().unwrap_or("Default");
    let mut body = json!({"auth": {"identity": {
        "methods": ["password"],
        "password": {"user": {"name": user, "domain": {"name": user_domain}, "password": password}}
    }}});
    if let Some(project) = &k.project_name {
        let project_domain = k.project_domain_name.as_deref().unwrap_or("Default");
        body["auth"]["scope"] =
            json!({"project": {"name": project, "domain": {"name": project_domain}}});
    }
    Ok(body)
}

/// The object-store endpoint in a Keystone v3 token's catalog.
fn object_store_endpoint(catalog: &Value, k: &KeystoneAuth) -> Option<String> {
    let interface = k.interface.as_deref().unwrap_or("public");
    catalog
        .as_array()?
        .iter()
        .filter(|service| service["type"] == "object-store")
        .flat_map(|service| service["endpoints"].as_array().into_iter().flatten())
        .find(|e| {
            e["interface"] == interface
                && k.region_name
                    .as_deref()
                    .is_none_or(|r| e["region_id"] == r || e["region"] == r)
        })
        .and_then(|e| e["url"].as_str().map(str::to_owned))
}

async fn keystone(http: &reqwest::Client, k: &KeystoneAuth) -> SwiftResult<Token> {
    let url = format!("{}/auth/tokens", k.auth_url.trim_end_matches('/'));
    let resp = http
        .post(&url)
        .json(&keystone_body(k)?)
        .send()
        .await
        .map_err(transport("Keystone authentication"))?;
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Err(SwiftError::Unauthorized(format!(
            "{url} refused the credentials"
        )));
    }
    if !status.is_success() {
        return Err(auth_failure(&url, status));
    }
    let value = header(&resp, "x-subject-token")
        .ok_or_else(|| SwiftError::Auth(format!("{url} sent no X-Subject-Token")))?;
    let body: Value = resp.json().await.map_err(transport("Keystone token"))?;
    let storage_url = object_store_endpoint(&body["token"]["catalog"], k).ok_or_else(|| {
        SwiftError::Auth("the Keystone catalog has no object-store endpoint for this region".into())
    })?;
    let life = body["token"]["expires_at"]
        .as_str()
        .and_then(|s| humantime::parse_rfc3339(s).ok())
        .and_then(|at| at.duration_since(std::time::SystemTime::now()).ok());
    Ok(Token {
        storage_url: storage_url.trim_end_matches('/').to_owned(),
        value,
        refresh_at: life.map(refresh_deadline),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let creds = Credentials::V1 {
            auth_url: "http://127.0.0.1/auth/v1.0".into(),
            user: "test:tester".into(),
            key: "s3cr3t".into(),
        };
        let shown = format!("{creds:?}");
        assert!(!shown.contains("s3cr3t") && shown.contains("test:tester"));
        let keystone = Credentials::Keystone(KeystoneAuth {
            password: Some("pw-value".into()),
            application_credential_secret: Some("app-secret".into()),
            ..KeystoneAuth::default()
        });
        let shown = format!("{keystone:?}");
        assert!(!shown.contains("pw-value") && !shown.contains("app-secret"));
        let temp_url = Credentials::TempUrl {
            storage_url: "http://127.0.0.1/v1/AUTH_a".into(),
            key: "url-key".into(),
        };
        let shown = format!("{temp_url:?}");
        assert!(!shown.contains("url-key") && shown.contains("AUTH_a"));
    }

    #[test]
    fn credentials_come_from_the_openstack_keys() {
        let v1 = Credentials::from_file_contents(
            "# Swift\nexport ST_AUTH=http://127.0.0.1:8080/auth/v1.0\nST_USER='test:tester'\nST_KEY=\"testing\"\n",
        )
        .expect("v1");
        assert!(
            matches!(v1, Credentials::V1 { ref user, ref key, .. } if user == "test:tester" && key == "testing")
        );
        let app = Credentials::from_file_contents(
            "OS_AUTH_URL=http://k/v3\nOS_APPLICATION_CREDENTIAL_ID=id\nOS_APPLICATION_CREDENTIAL_SECRET=s\n",
        )
        .expect("app credential");
        assert!(matches!(app, Credentials::Keystone(_)));
        let signed = Credentials::from_file_contents(
            "OS_STORAGE_URL=http://s/v1/AUTH_a\nOS_TEMP_URL_KEY=k\n",
        )
        .expect("TempURL key");
        assert!(matches!(signed, Credentials::TempUrl { ref key, .. } if key == "k"));
        assert!(Credentials::from_file_contents("OS_STORAGE_URL=http://s/v1/AUTH_a\n").is_err());
        assert!(Credentials::from_file_contents("OS_AUTH_URL=http://k/v3\n").is_err());
        assert!(Credentials::from_file_contents("ST_AUTH=http://x\n").is_err());
        assert!(Credentials::from_file_contents("garbage line").is_err());
        assert!(Credentials::from_file_contents("").is_err());
    }

    #[test]
    fn keystone_timestamps_parse() {
        let t = humantime::parse_rfc3339("2026-11-25T12:00:00.000000Z").expect("parse");
        let secs = t
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after epoch")
            .as_secs();
        assert_eq!(secs, 1_795_608_000);
    }

    #[test]
    fn catalog_lookup_picks_the_public_object_store() {
        let catalog = json!([
            {"type": "identity", "endpoints": [{"interface": "public", "url": "http://id"}]},
            {"type": "object-store", "endpoints": [
                {"interface": "internal", "region_id": "r1", "url": "http://internal"},
                {"interface": "public", "region_id": "r2", "url": "http://r2"},
                {"interface": "public", "region_id": "r1", "url": "http://r1"}
            ]}
        ]);
        let mut k = KeystoneAuth::default();
        assert_eq!(
            object_store_endpoint(&catalog, &k).as_deref(),
            Some("http://r2")
        );
        k.region_name = Some("r1".into());
        assert_eq!(
            object_store_endpoint(&catalog, &k).as_deref(),
            Some("http://r1")
        );
    }
}
