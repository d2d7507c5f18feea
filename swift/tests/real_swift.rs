//! `SwiftClient` against a real Swift (tempauth, tempurl, slo and bulk middleware):
//!
//! ```sh
//! bash tests/swift/swift.sh start
//! eval "$(bash tests/swift/swift.sh env)"
//! cargo test -p cloudfs-swift --test real_swift
//! ```
//!
//! Without `ST_AUTH`/`ST_USER`/`ST_KEY` (and `ST2_USER`/`ST2_KEY`) every test fails. Each test
//! works in containers of its own, emptied and deleted when it ends, pass or fail. Fake HTTP
//! servers and TCP forwarders on 127.0.0.1 stand between the client and Swift where a test
//! needs to count requests or inject failures; the token-expiry test starts a second Swift
//! with a 3-second token life and stops it when it ends.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cloudfs_swift::{
    Credentials, ListEntry, RetryPolicy, SloSegment, SwiftClient, SwiftError, SwiftResult,
    TempUrlDigest, sign_temp_url,
};
use futures::StreamExt;
use futures::future::join_all;
use md5::{Digest, Md5};
use rand::RngCore;
use reqwest::{StatusCode, Url};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

// ---- the Swift under test -----------------------------------------------------------------

fn env(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not set: these tests need the local test Swift; run\n    \
                 bash tests/swift/swift.sh start && eval \"$(bash tests/swift/swift.sh env)\"\n\
                 in the repository root, then run the tests again"
            )
        })
}

/// A tempauth user.
#[derive(Clone)]
struct User {
    name: String,
    key: String,
}

/// `ST_USER`, an administrator of the `test` account.
fn user() -> User {
    User {
        name: env("ST_USER"),
        key: env("ST_KEY"),
    }
}

/// `ST2_USER`, an administrator of another account.
fn user2() -> User {
    User {
        name: env("ST2_USER"),
        key: env("ST2_KEY"),
    }
}

fn v1(auth_url: &str, user: &User) -> Credentials {
    Credentials::V1 {
        auth_url: auth_url.to_owned(),
        user: user.name.clone(),
        key: user.key.clone(),
    }
}

fn credentials() -> Credentials {
    v1(&env("ST_AUTH"), &user())
}

fn client_with(credentials: Credentials, retry: RetryPolicy) -> SwiftClient {
    SwiftClient::new(credentials, retry).expect("build a Swift client")
}

fn client_for(credentials: Credentials) -> SwiftClient {
    client_with(credentials, RetryPolicy::default())
}

/// Retries that give up fast, for tests of what happens when they are exhausted.
fn quick_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        base_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..RetryPolicy::default()
    }
}

/// `http://host:port` of a URL.
fn origin(url: &str) -> String {
    let url = Url::parse(url).expect("a valid URL");
    url.origin().ascii_serialization()
}

/// The address a URL points at.
fn socket_addr(url: &str) -> SocketAddr {
    let url = Url::parse(url).expect("a valid URL");
    let host = url.host_str().expect("a URL with a host");
    let port = url.port_or_known_default().expect("a URL with a port");
    format!("{host}:{port}")
        .parse()
        .expect("an IP address, as the test Swift uses")
}

/// A storage URL and token from a plain v1 login, for `Credentials::Token`.
async fn v1_login(auth_url: &str, user: &User) -> (String, String) {
    let resp = reqwest::Client::new()
        .get(auth_url)
        .header("X-Auth-User", &user.name)
        .header("X-Auth-Key", &user.key)
        .send()
        .await
        .expect("v1 login");
    assert!(resp.status().is_success(), "v1 login: {}", resp.status());
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("v1 login answered no {name}"))
    };
    (header("x-storage-url"), header("x-auth-token"))
}

fn unique(tag: &str) -> String {
    format!("cloudfs-test-{tag}-{:08x}", rand::random::<u32>())
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    rand::rng().fill_bytes(&mut data);
    data
}

fn md5_hex(data: &[u8]) -> String {
    hex::encode(Md5::digest(data))
}

fn unix_now() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH);
    i64::try_from(now.expect("clock after 1970").as_secs()).expect("a sane clock")
}

/// Every page of a listing, `limit` names at a time.
async fn list_pages(
    client: &SwiftClient,
    container: &str,
    limit: usize,
) -> SwiftResult<Vec<Vec<String>>> {
    let mut pages = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let rows = client
            .list_objects(container, "", marker.as_deref(), limit, None)
            .await?;
        let names: Vec<String> = rows.into_iter().map(entry_name).collect();
        let Some(last) = names.last() else {
            return Ok(pages);
        };
        marker = Some(last.clone());
        pages.push(names);
    }
}

fn entry_name(entry: ListEntry) -> String {
    match entry {
        ListEntry::Object { name, .. } => name,
        ListEntry::Subdir { subdir } => subdir,
    }
}

/// Runs all `requests` at once and fails on the first error.
async fn all_succeed<T>(
    what: &str,
    requests: impl IntoIterator<Item: Future<Output = SwiftResult<T>>>,
) {
    for (i, result) in join_all(requests).await.into_iter().enumerate() {
        if let Err(e) = result {
            panic!("{what}: request {i} failed: {e}");
        }
    }
}

/// A container of its own for one test; emptied and deleted when dropped (pass or fail).
struct Scratch {
    client: SwiftClient,
    name: String,
    credentials: Credentials,
}

impl Scratch {
    async fn new(tag: &str) -> Scratch {
        let credentials = credentials();
        let scratch = Scratch {
            client: client_for(credentials.clone()),
            name: unique(tag),
            credentials,
        };
        scratch
            .client
            .create_container(&scratch.name)
            .await
            .expect("create the test container");
        scratch
    }

    async fn put(&self, object: &str, data: impl Into<Bytes>) {
        self.client
            .put_object(&self.name, object, data.into())
            .await
            .unwrap_or_else(|e| panic!("PUT {object}: {e}"));
    }

    async fn get(&self, object: &str) -> Bytes {
        self.client
            .get_object(&self.name, object, None)
            .await
            .unwrap_or_else(|e| panic!("GET {object}: {e}"))
    }
}

async fn empty_and_delete(client: &SwiftClient, container: &str) -> SwiftResult<()> {
    let names = list_pages(client, container, 10_000).await?.concat();
    if !names.is_empty() {
        client.bulk_delete(container, &names).await?;
    }
    client.delete_container(container).await
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // The test's runtime may be shutting down (or the thread unwinding): clean up from a
        // thread and runtime of our own.
        let credentials = self.credentials.clone();
        let name = self.name.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the cleanup");
            let client = client_with(credentials, quick_retries(3));
            runtime.block_on(empty_and_delete(&client, &name))
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cleanup of container {}: {e}", self.name),
            Err(_) => eprintln!("cleanup of container {} panicked", self.name),
        }
    }
}

// ---- fake servers -------------------------------------------------------------------------

/// One request as a fake server read it.
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Response {
    fn status(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }
}

/// Serves HTTP/1.1 on a free port of 127.0.0.1, one request per connection.
async fn serve<H, F>(handler: H) -> SocketAddr
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a fake server");
    let addr = listener.local_addr().expect("fake server address");
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &*handler).await {
                    eprintln!("fake server: {e}");
                }
            });
        }
    });
    addr
}

async fn answer<H, F>(stream: TcpStream, handler: &H) -> std::io::Result<()>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let mut words = line.split_whitespace();
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return Ok(());
    };
    let mut request = Request {
        method: method.to_owned(),
        target: target.to_owned(),
        headers: Vec::new(),
        body: Vec::new(),
    };
    loop {
        line.clear();
        reader.read_line(&mut line).await?;
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        request
            .headers
            .push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length = request
        .headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse::<usize>().ok())
        .unwrap_or(0);
    request.body.resize(length, 0);
    tokio::io::AsyncReadExt::read_exact(&mut reader, &mut request.body).await?;
    let is_head = request.method == "HEAD";
    let response = handler(request).await;
    let status = StatusCode::from_u16(response.status).expect("a valid status");
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nConnection: close\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Whatever")
    );
    if !response.headers.iter().any(|(n, _)| n == "content-length") {
        head.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
    }
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = reader.into_inner();
    stream.write_all(head.as_bytes()).await?;
    if !is_head {
        stream.write_all(&response.body).await?;
    }
    stream.shutdown().await
}

/// Headers a proxy does not pass on.
const HOP_BY_HOP: &[&str] = &["host", "connection", "keep-alive", "transfer-encoding"];

/// How a [`Front`] treats the requests it gets.
#[derive(Default)]
struct Script {
    /// Answer this many first requests with `fail_status` instead of forwarding them.
    fail_first: usize,
    fail_status: u16,
    /// A `Retry-After` (seconds) for those answers.
    retry_after: Option<u64>,
    /// Hold each forwarded request this long (to widen race windows).
    delay: Duration,
    /// Response headers not passed back.
    drop_headers: &'static [&'static str],
    /// Response headers replaced (or added).
    set_headers: &'static [(&'static str, &'static str)],
}

/// A fake server in front of the real Swift that counts the requests it gets and follows a
/// [`Script`].
struct Front {
    base: String,
    requests: Arc<AtomicUsize>,
}

impl Front {
    async fn start(target: &str, script: Script) -> Front {
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&requests);
        let script = Arc::new(script);
        let target = origin(target);
        let http = reqwest::Client::new();
        let addr = serve(move |request| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let (script, target, http) = (Arc::clone(&script), target.clone(), http.clone());
            async move {
                if n < script.fail_first {
                    let mut response = Response::status(script.fail_status);
                    if let Some(secs) = script.retry_after {
                        response
                            .headers
                            .push(("Retry-After".into(), secs.to_string()));
                    }
                    return response;
                }
                tokio::time::sleep(script.delay).await;
                let mut response = forward(&http, &target, request, &script).await;
                for (name, value) in script.set_headers {
                    response
                        .headers
                        .retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                    response.headers.push((name.to_string(), value.to_string()));
                }
                response
            }
        })
        .await;
        Front {
            base: format!("http://{addr}"),
            requests,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn forward(
    http: &reqwest::Client,
    target: &str,
    request: Request,
    script: &Script,
) -> Response {
    let method = reqwest::Method::from_bytes(request.method.as_bytes()).expect("an HTTP method");
    let mut upstream = http.request(method, format!("{target}{}", request.target));
    for (name, value) in &request.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            upstream = upstream.header(name, value);
        }
    }
    let resp = match upstream.send().await {
        Ok(resp) => resp,
        Err(e) => {
            eprintln!("front: forwarding failed: {e}");
            return Response::status(502);
        }
    };
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .filter(|(name, _)| {
            !HOP_BY_HOP.contains(&name.as_str()) && !script.drop_headers.contains(&name.as_str())
        })
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_owned())))
        .collect();
    let body = resp.bytes().await.unwrap_or_default();
    Response {
        status,
        headers,
        body,
    }
}

/// A port of 127.0.0.1 that refuses connections for `down_for`, then forwards them to `target`.
fn late_forwarder(target: SocketAddr, down_for: Duration) -> SocketAddr {
    // Nothing listens on the port once this listener is dropped: connections are refused.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    tokio::spawn(async move {
        tokio::time::sleep(down_for).await;
        let listener = TcpListener::bind(addr)
            .await
            .expect("listen on the port again");
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

// ---- authentication -------------------------------------------------------------------------

#[tokio::test]
async fn v1_auth_and_rejected_credentials() {
    let auth_url = env("ST_AUTH");
    let client = client_for(credentials());
    let storage_url = client.storage_url().await.expect("v1 authentication");
    assert!(storage_url.contains("/v1/AUTH_"), "{storage_url}");
    client
        .head_container("cloudfs-test-surely-missing")
        .await
        .expect("an authenticated HEAD");

    // A wrong key: refused at the first auth request, not retried.
    let front = Front::start(&auth_url, Script::default()).await;
    let wrong = User {
        key: "not-the-key".into(),
        ..user()
    };
    let client = client_for(v1(&format!("{}/auth/v1.0", front.base), &wrong));
    let err = client
        .head_container("anything")
        .await
        .expect_err("a wrong key");
    assert!(matches!(err, SwiftError::Unauthorized(_)), "{err:?}");
    assert_eq!(front.requests(), 1, "auth requests for a wrong key");

    // A bogus pre-authenticated token cannot be refreshed: Unauthorized after one request.
    let front = Front::start(&storage_url, Script::default()).await;
    let path = Url::parse(&storage_url)
        .expect("storage URL")
        .path()
        .to_owned();
    let client = client_for(Credentials::Token {
        storage_url: format!("{}{path}", front.base),
        token: "AUTH_tk00000000000000000000000000000000".into(),
    });
    let err = client
        .head_container("anything")
        .await
        .expect_err("a bogus token");
    assert!(matches!(err, SwiftError::Unauthorized(_)), "{err:?}");
    assert_eq!(front.requests(), 1, "requests with a bogus token");
}

/// tempauth hands back the current token until it expires, telling how little life it has left:
/// the client must not ask again and again in a token's last moments.
#[tokio::test]
async fn a_reissued_token_is_kept_until_rejected() {
    let front = Front::start(
        &env("ST_AUTH"),
        Script {
            set_headers: &[("X-Auth-Token-Expires", "0")],
            ..Script::default()
        },
    )
    .await;
    let client = client_for(v1(&format!("{}/auth/v1.0", front.base), &user()));
    for _ in 0..20 {
        client
            .head_container("cloudfs-test-surely-missing")
            .await
            .expect("an authenticated HEAD");
    }
    // The login, then one refresh, which brings back the same token.
    assert_eq!(front.requests(), 2, "auth requests");
}

/// Token life of the second Swift, in seconds.
const SHORT_TOKEN_LIFE: u64 = 5;

/// How long a token of the second Swift lasts at the least: tempauth keeps it in memcached for
/// its life cut to whole seconds, and memcached, whose clock ticks once a second, may drop an
/// entry up to a second early.
const SHORTEST_TOKEN_LIFE: Duration = Duration::from_secs(SHORT_TOKEN_LIFE - 2);

/// A second Swift of its own (own state directory and ports) with a short token life, stopped
/// and deleted when dropped.
struct SecondSwift {
    state: PathBuf,
    port: u16,
}

impl SecondSwift {
    fn start(token_life: u64) -> SecondSwift {
        let swift = SecondSwift {
            state: std::env::temp_dir().join(unique("second-swift")),
            port: free_port_block(5),
        };
        let status = swift
            .script(60)
            .arg("start")
            .env("SWIFT_TOKEN_LIFE", token_life.to_string())
            .env("SWIFT_STORAGE", "dir")
            .status()
            .expect("run tests/swift/swift.sh");
        assert!(status.success(), "starting a second Swift failed: {status}");
        swift
    }

    /// `swift.sh` for this instance (never the main one), killed after `timeout` seconds.
    fn script(&self, timeout: u32) -> Command {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/swift/swift.sh");
        let mut command = Command::new("timeout");
        command
            .arg(timeout.to_string())
            .arg("bash")
            .arg(script)
            .env("SWIFT_STATE_DIR", &self.state)
            .env("SWIFT_PORT", self.port.to_string());
        for var in [
            "SWIFT_ACCOUNT_PORT",
            "SWIFT_CONTAINER_PORT",
            "SWIFT_OBJECT_PORT",
            "SWIFT_MEMCACHE_PORT",
            "SWIFT_WORKERS",
            "SWIFT_UPDATERS",
        ] {
            command.env_remove(var);
        }
        command
    }

    fn auth_url(&self) -> String {
        format!("http://127.0.0.1:{}/auth/v1.0", self.port)
    }
}

impl Drop for SecondSwift {
    fn drop(&mut self) {
        match self.script(60).args(["stop", "--purge"]).status() {
            Ok(status) if status.success() => {}
            other => eprintln!("stopping the second Swift in {:?}: {other:?}", self.state),
        }
    }
}

/// The first of `n` consecutive free ports of 127.0.0.1, below the kernel's ephemeral range
/// (32768 and up here), so that no outgoing connection of a concurrent test takes one of them
/// between this check and the servers binding them.
fn free_port_block(n: u16) -> u16 {
    for _ in 0..50 {
        let first = 20_000 + rand::random::<u16>() % 10_000;
        let free =
            (first..first + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return first;
        }
    }
    panic!("no block of {n} free ports found");
}

/// Keeps requests flowing across several token lives: every refresh is transparent, and
/// tempauth handing back the current token does not make the client ask again and again.
async fn refresh_ahead_of_expiry(auth_url: String, user: User) {
    let front = Front::start(&auth_url, Script::default()).await;
    let client = client_for(v1(&format!("{}/auth/v1.0", front.base), &user));
    let container = unique("tokens-ahead");
    client
        .create_container(&container)
        .await
        .expect("create a container");
    let lives = 1.5;
    let until = Instant::now() + Duration::from_secs_f64(SHORT_TOKEN_LIFE as f64 * lives);
    let mut bursts = 0;
    while Instant::now() < until {
        all_succeed(
            "a burst across token lives",
            (0..8).map(|_| client.head_container(&container)),
        )
        .await;
        bursts += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let auths = front.requests();
    eprintln!("{bursts} bursts of 8 requests over {lives} token lives: {auths} auth requests");
    // Per token: one login, one early refresh (which tempauth answers with the same token),
    // one more after Swift rejects the expired token. 1.5 lives (7.5 s) of tokens that last 3 s
    // at the least (`SHORTEST_TOKEN_LIFE`) touch 3 tokens at the most: at most 9 auth
    // requests, against the hundreds of requests an auth storm would make.
    assert!((3..=9).contains(&auths), "{auths} auth requests");
    client
        .delete_container(&container)
        .await
        .expect("delete the container");
}

/// Without an expiry time from the auth server, an expired token is noticed by Swift's 401 and
/// replaced; however many requests wait for the replacement, one auth request serves them.
async fn refresh_on_rejection(auth_url: String, user: User) {
    let front = Front::start(
        &auth_url,
        Script {
            delay: Duration::from_millis(300),
            drop_headers: &["x-auth-token-expires"],
            ..Script::default()
        },
    )
    .await;
    let client = client_for(v1(&format!("{}/auth/v1.0", front.base), &user));
    let container = unique("tokens-401");
    let started = Instant::now();
    all_succeed(
        "32 requests waiting for the first token",
        (0..32).map(|_| client.create_container(&container)),
    )
    .await;
    let first = front.requests();
    // On a loaded host the burst can outlast the token's short life: the requests still
    // running then are rejected, and one more auth request replaces the token for them.
    let outlived = started.elapsed() >= SHORTEST_TOKEN_LIFE;
    assert!(
        first == 1 || (outlived && first == 2),
        "{first} auth requests for the first token, the burst taking {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(SHORT_TOKEN_LIFE * 1000 + 500)).await;
    all_succeed(
        "32 requests with an expired token",
        (0..32).map(|_| client.head_container(&container)),
    )
    .await;
    assert_eq!(
        front.requests(),
        first + 1,
        "auth requests after the token expired"
    );
    client
        .delete_container(&container)
        .await
        .expect("delete the container");
}

#[test]
fn expiring_tokens_are_refreshed_once_for_all_requests() {
    let (user, user2) = (user(), user2());
    let swift = SecondSwift::start(SHORT_TOKEN_LIFE);
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    // Two users, so that tempauth's per-user token reuse keeps the scenarios apart.
    runtime.block_on(async {
        tokio::join!(
            refresh_ahead_of_expiry(swift.auth_url(), user2),
            refresh_on_rejection(swift.auth_url(), user),
        )
    });
}

// ---- objects --------------------------------------------------------------------------------

#[tokio::test]
async fn objects_round_trip() {
    let s = Scratch::new("objects").await;
    let (c, container) = (&s.client, s.name.as_str());
    let small = random_bytes(1000);
    let big = random_bytes(20 << 20);
    let every_byte: Vec<u8> = (0..=255).collect();
    for (name, data) in [
        ("small", &small),
        ("big", &big),
        ("empty", &Vec::new()),
        ("every-byte", &every_byte),
    ] {
        let started = unix_now();
        s.put(name, data.clone()).await;
        assert_eq!(s.get(name).await, data.as_slice(), "{name}");
        let info = c
            .head_object(container, name)
            .await
            .expect("HEAD")
            .expect("an object just written");
        assert_eq!(info.size, data.len() as u64, "{name}");
        assert_eq!(info.etag.as_deref(), Some(md5_hex(data).as_str()), "{name}");
        assert!(
            (started - 5..=unix_now() + 5).contains(&info.last_modified),
            "{name}: last_modified {} at {started}",
            info.last_modified
        );
    }

    let ranged = |name: &'static str, range: std::ops::Range<u64>| async move {
        c.get_object(container, name, Some(range.clone()))
            .await
            .unwrap_or_else(|e| panic!("GET {name} {range:?}: {e}"))
    };
    assert_eq!(ranged("small", 0..10).await, small[..10]);
    assert_eq!(ranged("small", 400..600).await, small[400..600]);
    assert_eq!(ranged("small", 990..1000).await, small[990..]);
    assert_eq!(ranged("small", 995..5000).await, small[995..], "clamped");
    assert!(ranged("small", 1000..1010).await.is_empty(), "at the end");
    assert!(ranged("small", 5000..6000).await.is_empty(), "past the end");
    assert!(ranged("small", 10..10).await.is_empty(), "empty range");
    assert!(ranged("empty", 0..10).await.is_empty(), "empty object");
    let mib = 1 << 20;
    assert_eq!(
        ranged("big", 7 * mib + 3..9 * mib + 5).await,
        big[7 * mib as usize + 3..9 * mib as usize + 5]
    );

    c.delete_object(container, "small").await.expect("DELETE");
    assert!(
        c.head_object(container, "small")
            .await
            .expect("HEAD")
            .is_none()
    );
    let err = c
        .get_object(container, "small", None)
        .await
        .expect_err("a deleted object");
    assert!(matches!(err, SwiftError::NotFound(_)), "{err:?}");
    c.delete_object(container, "small")
        .await
        .expect("deleting a missing object is fine");
}

/// Names that need escaping in URLs, headers and bulk requests.
const AWKWARD_NAMES: &[&str] = &[
    "with space.bin",
    "ünïcødé/日本語/ファイル 🦀",
    "100% sure",
    "a%2Fb stays one segment",
    "what?query=1&x=2",
    "hash#fragment",
    "plus+sign;semicolon,comma'quote\"",
    "dir/sub/leaf",
    "double//slash",
    "trailing/",
];

#[tokio::test]
async fn awkward_object_names_and_copies() {
    let s = Scratch::new("names").await;
    let other = Scratch::new("names-copies").await;
    let (c, container) = (&s.client, s.name.as_str());
    for (i, name) in AWKWARD_NAMES.iter().enumerate() {
        let data = format!("{i}: {name}");
        s.put(name, data.clone()).await;
        assert_eq!(s.get(name).await, data.as_bytes(), "{name}");
        let info = c.head_object(container, name).await.expect("HEAD");
        assert_eq!(info.map(|i| i.size), Some(data.len() as u64), "{name}");

        let copy = format!("copies/{name}");
        c.copy_object(container, name, container, &copy)
            .await
            .unwrap_or_else(|e| panic!("COPY {name}: {e}"));
        assert_eq!(s.get(&copy).await, data.as_bytes(), "copy of {name}");
        c.copy_object(container, name, &other.name, name)
            .await
            .unwrap_or_else(|e| panic!("COPY {name} to another container: {e}"));
        assert_eq!(
            other.get(name).await,
            data.as_bytes(),
            "{name} in another container"
        );
    }
    let listed: BTreeSet<String> = list_pages(c, container, 1000)
        .await
        .expect("list")
        .concat()
        .into_iter()
        .collect();
    let expected: BTreeSet<String> = AWKWARD_NAMES
        .iter()
        .flat_map(|n| [n.to_string(), format!("copies/{n}")])
        .collect();
    assert_eq!(listed, expected);

    // "." and ".." segments would be resolved away in a URL: refused, nothing else touched.
    for name in ["dots/../escape", "./here", "dir/."] {
        let err = c
            .put_object(container, name, Bytes::from_static(b"x"))
            .await
            .expect_err(name);
        assert!(matches!(err, SwiftError::Config(_)), "{name}: {err:?}");
    }
    for name in ["escape", "dots/escape", "here", "dir"] {
        assert!(
            c.head_object(container, name)
                .await
                .expect("HEAD")
                .is_none(),
            "{name}"
        );
    }

    for name in AWKWARD_NAMES {
        c.delete_object(container, name)
            .await
            .unwrap_or_else(|e| panic!("DELETE {name}: {e}"));
        assert!(
            c.head_object(container, name)
                .await
                .expect("HEAD")
                .is_none(),
            "{name}"
        );
    }
}

/// A server announcing a body of a terabyte and sending five bytes: the client reserves no
/// terabyte (that would abort the process) and reports the cut body as an error.
#[tokio::test]
async fn an_announced_length_is_not_trusted_for_memory() {
    let addr = serve(|_request| async {
        Response {
            status: 200,
            headers: vec![("content-length".into(), (1u64 << 40).to_string())],
            body: Bytes::from_static(b"short"),
        }
    })
    .await;
    let client = client_with(
        Credentials::Token {
            storage_url: format!("http://{addr}/v1/AUTH_test"),
            token: "token".into(),
        },
        quick_retries(1),
    );
    let result = client.get_object("c", "o", None).await;
    assert!(
        matches!(result, Err(SwiftError::Transport { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn create_only_puts() {
    let s = Scratch::new("if-absent").await;
    let (c, container) = (&s.client, s.name.as_str());
    let first = Bytes::from_static(b"first version");
    let put = |data: &Bytes| c.put_object_if_absent(container, "lease", data.clone());
    assert!(put(&first).await.expect("create"), "absent: written");
    assert!(
        !put(&Bytes::from_static(b"other bytes"))
            .await
            .expect("conflict"),
        "present with other bytes: refused"
    );
    assert_eq!(s.get("lease").await, first, "the first version stays");
    assert!(
        put(&first).await.expect("same bytes"),
        "present with the same bytes: counts as written (a retry finding its own write)"
    );
}

// ---- Keystone v3 ----------------------------------------------------------------------------

/// A Keystone v3 double: `POST /v3/auth/tokens` that checks the request the way Keystone does
/// (password with user domain and project scope, or application credential), records it, and
/// issues a token valid at the real Swift (a tempauth token) with a catalog pointing there.
async fn keystone_double(
    storage_url: String,
    token: String,
    seen: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) -> String {
    let addr = serve(move |request: Request| {
        let (storage_url, token, seen) = (storage_url.clone(), token.clone(), seen.clone());
        async move {
            if request.method != "POST" || request.target != "/v3/auth/tokens" {
                return Response::status(404);
            }
            let Ok(body) = serde_json::from_slice::<serde_json::Value>(&request.body) else {
                return Response::status(400);
            };
            let identity = &body["auth"]["identity"];
            let accepted = match identity["methods"][0].as_str() {
                Some("password") => {
                    let user = &identity["password"]["user"];
                    user["name"] == "demo"
                        && user["password"] == "demo-password"
                        && user["domain"]["name"] == "Default"
                        && body["auth"]["scope"]["project"]["name"] == "demo-project"
                }
                Some("application_credential") => {
                    let credential = &identity["application_credential"];
                    credential["id"] == "app-id" && credential["secret"] == "app-secret"
                }
                _ => false,
            };
            seen.lock().expect("recorded requests").push(body);
            if !accepted {
                return Response::status(401);
            }
            let reply = serde_json::json!({"token": {
                "expires_at": "2099-01-01T00:00:00.000000Z",
                "catalog": [
                    {"type": "identity", "endpoints": [
                        {"interface": "public", "region_id": "RegionOne", "url": "http://id.invalid"}]},
                    {"type": "object-store", "endpoints": [
                        {"interface": "internal", "region_id": "RegionOne", "url": "http://internal.invalid"},
                        {"interface": "public", "region_id": "RegionOne", "url": storage_url}]}
                ]
            }});
            Response {
                status: 201,
                headers: vec![
                    ("X-Subject-Token".into(), token),
                    ("Content-Type".into(), "application/json".into()),
                ],
                body: Bytes::from(reply.to_string()),
            }
        }
    })
    .await;
    format!("http://{addr}/v3")
}

#[tokio::test]
async fn keystone_v3_password_and_application_credentials() {
    let (storage_url, token) = v1_login(&env("ST_AUTH"), &user()).await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let auth_url = keystone_double(storage_url, token, seen.clone()).await;
    let keys = |pairs: &[(&str, &str)]| {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Credentials::from_keys(|k| map.get(k).cloned()).expect("Keystone credentials")
    };
    let password = keys(&[
        ("OS_AUTH_URL", &auth_url),
        ("OS_USERNAME", "demo"),
        ("OS_PASSWORD", "demo-password"),
        ("OS_PROJECT_NAME", "demo-project"),
        ("OS_USER_DOMAIN_NAME", "Default"),
        ("OS_PROJECT_DOMAIN_NAME", "Default"),
    ]);
    let application = keys(&[
        ("OS_AUTH_URL", &auth_url),
        ("OS_APPLICATION_CREDENTIAL_ID", "app-id"),
        ("OS_APPLICATION_CREDENTIAL_SECRET", "app-secret"),
    ]);
    for credentials in [password, application] {
        let client = client_for(credentials);
        let container = unique("keystone");
        client
            .create_container(&container)
            .await
            .expect("a request with a Keystone token");
        client.delete_container(&container).await.expect("cleanup");
    }
    assert_eq!(
        seen.lock().expect("recorded").len(),
        2,
        "one token request per client"
    );

    let wrong = keys(&[
        ("OS_AUTH_URL", &auth_url),
        ("OS_USERNAME", "demo"),
        ("OS_PASSWORD", "wrong"),
        ("OS_PROJECT_NAME", "demo-project"),
    ]);
    let err = client_for(wrong)
        .head_container("anything")
        .await
        .expect_err("a wrong password");
    assert!(matches!(err, SwiftError::Unauthorized(_)), "{err:?}");
}

// ---- static large objects -------------------------------------------------------------------

#[tokio::test]
async fn static_large_objects_with_data_segments_and_ranges() {
    let s = Scratch::new("slo").await;
    let (c, container) = (&s.client, s.name.as_str());
    let (a, b) = (random_bytes(1 << 20), random_bytes(3000));
    s.put("seg/a", a.clone()).await;
    s.put("seg/b", b.clone()).await;
    let segment = |object: &str, size: usize, range| SloSegment::Object {
        container: container.to_owned(),
        object: object.to_owned(),
        size: size as u64,
        range,
    };
    let segments = [
        SloSegment::Data(Bytes::from_static(b"HEADER")),
        segment("seg/a", a.len(), None),
        segment("seg/b", b.len(), Some(100..1100)),
        SloSegment::Data(Bytes::from(vec![0u8; 512])),
    ];
    c.put_slo_manifest(container, "joined", &segments)
        .await
        .expect("manifest");
    let mut expected = b"HEADER".to_vec();
    expected.extend_from_slice(&a);
    expected.extend_from_slice(&b[100..1100]);
    expected.extend_from_slice(&[0u8; 512]);
    assert_eq!(
        s.get("joined").await,
        expected,
        "GET returns the segments in order"
    );
    let (start, end) = (3, 6 + a.len() + 10);
    let ranged = c
        .get_object(container, "joined", Some(start as u64..end as u64))
        .await
        .expect("ranged GET across segments");
    assert_eq!(&ranged[..], &expected[start..end]);
    let manifest = c
        .get_slo_manifest(container, "joined")
        .await
        .expect("manifest listing");
    assert_eq!(manifest.as_array().map(Vec::len), Some(4));

    c.delete_object(container, "joined")
        .await
        .expect("delete the manifest");
    assert_eq!(s.get("seg/a").await, a, "segments outlive their manifest");
    let missing = [segment("seg/none", 1, None)];
    assert!(
        c.put_slo_manifest(container, "broken", &missing)
            .await
            .is_err(),
        "a manifest naming a missing segment is refused"
    );
}

// ---- containers -----------------------------------------------------------------------------

#[tokio::test]
async fn containers_and_listings() {
    let s = Scratch::new("listing").await;
    let (c, container) = (&s.client, s.name.as_str());
    c.create_container(container)
        .await
        .expect("creating twice is fine");
    let objects = [
        ("a/1", "one"),
        ("a/2", "two!"),
        ("b/1", "three"),
        ("top", "four!!"),
    ];
    for (name, data) in objects {
        s.put(name, data).await;
    }
    let info = c
        .head_container(container)
        .await
        .expect("HEAD")
        .expect("an existing container");
    assert_eq!(info.object_count, 4);
    assert_eq!(info.bytes_used, 18);
    assert!(
        c.head_container(&unique("missing"))
            .await
            .expect("HEAD")
            .is_none(),
        "a missing container"
    );

    let list = |prefix: &'static str, marker: Option<&'static str>, limit, delimiter| async move {
        c.list_objects(container, prefix, marker, limit, delimiter)
            .await
            .expect("list")
    };
    let rows = list("", None, 100, None).await;
    assert_eq!(rows.len(), 4);
    for (row, (name, data)) in rows.iter().zip(objects) {
        let ListEntry::Object {
            name: listed,
            bytes,
            hash,
            last_modified,
        } = row
        else {
            panic!("{row:?} is not an object");
        };
        assert_eq!((listed.as_str(), *bytes), (name, data.len() as u64));
        assert_eq!(*hash, md5_hex(data.as_bytes()));
        assert!(!last_modified.is_empty());
    }
    let names = |rows: Vec<ListEntry>| rows.into_iter().map(entry_name).collect::<Vec<_>>();
    assert_eq!(names(list("a/", None, 100, None).await), ["a/1", "a/2"]);
    assert_eq!(
        names(list("", Some("a/2"), 100, None).await),
        ["b/1", "top"]
    );
    assert_eq!(names(list("", None, 2, None).await), ["a/1", "a/2"]);
    assert_eq!(
        list("", None, 100, Some('/')).await,
        [
            ListEntry::Subdir {
                subdir: "a/".into()
            },
            ListEntry::Subdir {
                subdir: "b/".into()
            },
            rows[3].clone(),
        ]
    );
    assert_eq!(
        names(list("a/", None, 100, Some('/')).await),
        ["a/1", "a/2"]
    );
    assert!(list("zzz", None, 100, None).await.is_empty());

    let err = c.delete_container(container).await.expect_err("not empty");
    assert!(
        matches!(err, SwiftError::Http { status: 409, .. }),
        "{err:?}"
    );

    // A bulk delete Swift refuses as a whole (a name longer than it accepts) is an error, not
    // an empty report.
    let err = c
        .bulk_delete(container, &["x".repeat(3000)])
        .await
        .expect_err("an invalid bulk delete");
    assert!(
        matches!(err, SwiftError::Http { status: 400, .. }),
        "{err:?}"
    );
}

/// More objects than one listing page can hold (Swift's maximum is 10,000).
const MANY: usize = 10_050;

#[tokio::test]
async fn bulk_delete_after_paging_through_10050_objects() {
    let s = Scratch::new("many").await;
    let (c, container) = (&s.client, s.name.as_str());
    let names: Vec<String> = (0..MANY).map(|i| format!("many/{i:05}")).collect();
    let started = Instant::now();
    let mut puts = futures::stream::iter(&names)
        .map(|name| c.put_object(container, name, Bytes::from(name.clone())))
        .buffer_unordered(32);
    while let Some(result) = puts.next().await {
        result.expect("PUT of a small object");
    }
    eprintln!("{MANY} PUTs in {:?}", started.elapsed());

    let started = Instant::now();
    let pages = list_pages(c, container, 1000).await.expect("paged listing");
    eprintln!("{} listing pages in {:?}", pages.len(), started.elapsed());
    assert_eq!(pages.len(), MANY.div_ceil(1000));
    assert!(pages[..pages.len() - 1].iter().all(|p| p.len() == 1000));
    assert_eq!(pages.concat(), names, "every name once, in order");
    let info = c
        .head_container(container)
        .await
        .expect("HEAD")
        .expect("container");
    assert_eq!(info.object_count, MANY as u64);

    let started = Instant::now();
    let mut doomed = names.clone();
    doomed.extend(["many/missing-1".to_owned(), "never-was".to_owned()]);
    let report = c
        .bulk_delete(container, &doomed)
        .await
        .expect("bulk delete");
    eprintln!("bulk delete in {:?}: {report:?}", started.elapsed());
    assert_eq!(report.deleted, MANY as u64);
    assert_eq!(report.not_found, 2);
    assert!(report.errors.is_empty());
    assert!(
        list_pages(c, container, 1000)
            .await
            .expect("list")
            .is_empty()
    );
    let info = c
        .head_container(container)
        .await
        .expect("HEAD")
        .expect("container");
    assert_eq!(info.object_count, 0);
}

// ---- cluster features -----------------------------------------------------------------------

#[tokio::test]
async fn info_lists_the_middleware() {
    let info = client_for(credentials()).info().await.expect("GET /info");
    for feature in ["slo", "tempurl", "bulk_delete"] {
        assert!(info.get(feature).is_some(), "/info lacks {feature}: {info}");
    }
    let digests = &info["tempurl"]["allowed_digests"];
    assert!(
        digests
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d == "sha256")),
        "tempurl digests: {digests}"
    );
}

#[tokio::test]
async fn temp_urls_grant_one_method_without_a_token() {
    let s = Scratch::new("tempurl").await;
    let (c, container) = (&s.client, s.name.as_str());
    let key = format!("cloudfs-test-key-{:016x}", rand::random::<u64>());
    c.set_temp_url_key(&key)
        .await
        .expect("set the account's Temp-URL-Key");
    let data = random_bytes(4096);
    s.put("shared.bin", data.clone()).await;

    let storage_url = c.storage_url().await.expect("storage URL");
    let account_path = Url::parse(&storage_url)
        .expect("storage URL")
        .path()
        .to_owned();
    let expires = u64::try_from(unix_now()).expect("after 1970") + 300;
    let signed = |method: &str, object: &str, expires: u64| {
        let path = format!("{account_path}/{container}/{object}");
        let query = sign_temp_url(
            key.as_bytes(),
            method,
            &path,
            expires,
            TempUrlDigest::Sha256,
        );
        format!("{}{path}?{query}", origin(&storage_url))
    };
    let http = reqwest::Client::new();
    let status_of = |request: reqwest::RequestBuilder| async move {
        let resp = request.send().await.expect("a TempURL request");
        (resp.status(), resp.bytes().await.expect("a body"))
    };

    let (status, body) = status_of(http.get(signed("GET", "shared.bin", expires))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, data);

    let uploaded = random_bytes(1234);
    let put_url = signed("PUT", "uploaded.bin", expires);
    let (status, _) = status_of(http.put(&put_url).body(uploaded.clone())).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(s.get("uploaded.bin").await, uploaded);

    let good = signed("GET", "shared.bin", expires);
    let sig_end = good.find("&temp_url_expires").expect("a signature");
    let flipped = if good.as_bytes()[sig_end - 1] == b'0' {
        "1"
    } else {
        "0"
    };
    let forged = format!("{}{flipped}{}", &good[..sig_end - 1], &good[sig_end..]);
    for (what, url) in [
        ("a wrong signature", forged),
        ("a URL signed for PUT", put_url),
        ("an expired URL", signed("GET", "shared.bin", expires - 600)),
        (
            "another object",
            signed("GET", "uploaded.bin", expires).replace("uploaded", "shared"),
        ),
    ] {
        let (status, _) = status_of(http.get(url)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
    }

    c.set_temp_url_key("").await.expect("remove the key");
    // The proxy caches account metadata (the key with it); a request of a concurrent test
    // can refill that cache with the old key just before the change lands, for at most the
    // cache's lifetime, so the removal is checked until then.
    let deadline = Instant::now() + Duration::from_secs(70);
    loop {
        let (status, _) = status_of(http.get(&good)).await;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "with the key removed the URL still answers {status}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn a_temp_url_key_alone_reads_and_writes_objects() {
    let s = Scratch::new("tempurl-mode").await;
    let (c, container) = (&s.client, s.name.as_str());
    let key = format!("cloudfs-container-key-{:016x}", rand::random::<u64>());
    c.set_container_temp_url_key(container, &key)
        .await
        .expect("set the container's Temp-URL-Key");
    let data = random_bytes(10_000);
    s.put("dir/shared.bin", data.clone()).await;
    let storage_url = c.storage_url().await.expect("storage URL");
    let signed = client_for(Credentials::TempUrl {
        storage_url: storage_url.clone(),
        key: key.clone(),
    });

    let got = signed
        .get_object(container, "dir/shared.bin", None)
        .await
        .expect("signed GET");
    assert_eq!(got, data);
    let part = signed
        .get_object(container, "dir/shared.bin", Some(100..200))
        .await
        .expect("signed ranged GET");
    assert_eq!(part, data[100..200]);
    let info = signed
        .head_object(container, "dir/shared.bin")
        .await
        .expect("signed HEAD")
        .expect("the object exists");
    assert_eq!(info.size, data.len() as u64);
    assert!(
        signed
            .head_object(container, "missing")
            .await
            .expect("signed HEAD of a missing object")
            .is_none()
    );
    assert!(matches!(
        signed.get_object(container, "missing", None).await,
        Err(SwiftError::NotFound(_))
    ));

    let uploaded = Bytes::from(random_bytes(777));
    signed
        .put_object(container, "up.bin", uploaded.clone())
        .await
        .expect("signed PUT");
    assert_eq!(s.get("up.bin").await, uploaded);
    assert!(
        !signed
            .put_object_if_absent(container, "up.bin", Bytes::from_static(b"other"))
            .await
            .expect("signed create-only PUT of an existing object")
    );
    signed
        .delete_object(container, "up.bin")
        .await
        .expect("signed DELETE");
    assert!(
        c.head_object(container, "up.bin")
            .await
            .expect("HEAD")
            .is_none()
    );

    match signed.list_objects(container, "", None, 10, None).await {
        Err(SwiftError::Unauthorized(message)) => {
            assert!(message.contains("TempURL"), "{message}")
        }
        other => panic!("a listing with a TempURL key: {other:?}"),
    }
    let forged = client_for(Credentials::TempUrl {
        storage_url,
        key: format!("{key}-wrong"),
    });
    assert!(matches!(
        forged.get_object(container, "dir/shared.bin", None).await,
        Err(SwiftError::Unauthorized(_))
    ));
}

// ---- retries --------------------------------------------------------------------------------

#[tokio::test]
async fn retries_while_the_proxy_is_unreachable() {
    let s = Scratch::new("unreachable").await;
    s.put("object", "still here").await;
    let auth_url = env("ST_AUTH");
    let proxy = socket_addr(&auth_url);
    let down_for = Duration::from_millis(500);

    // A pre-authenticated client whose storage URL goes through a port that refuses
    // connections at first.
    let (storage_url, token) = v1_login(&auth_url, &user()).await;
    let late = late_forwarder(proxy, down_for);
    let path = Url::parse(&storage_url)
        .expect("storage URL")
        .path()
        .to_owned();
    let client = client_for(Credentials::Token {
        storage_url: format!("http://{late}{path}"),
        token,
    });
    let started = Instant::now();
    let data = client
        .get_object(&s.name, "object", None)
        .await
        .expect("GET after retries");
    assert_eq!(data, "still here");
    assert!(
        started.elapsed() >= down_for,
        "answered while the port was closed?"
    );

    // v1 credentials: the authentication request is retried the same way.
    let late = late_forwarder(proxy, down_for);
    let client = client_for(v1(&format!("http://{late}/auth/v1.0"), &user()));
    let data = client
        .get_object(&s.name, "object", None)
        .await
        .expect("GET after retries");
    assert_eq!(data, "still here");
}

#[tokio::test]
async fn retries_503_and_honours_retry_after() {
    let s = Scratch::new("unavailable").await;
    s.put("object", "eventually").await;
    let (storage_url, token) = v1_login(&env("ST_AUTH"), &user()).await;
    let path = Url::parse(&storage_url)
        .expect("storage URL")
        .path()
        .to_owned();
    let through = |front: &Front, retry| {
        client_with(
            Credentials::Token {
                storage_url: format!("{}{path}", front.base),
                token: token.clone(),
            },
            retry,
        )
    };

    let front = Front::start(
        &storage_url,
        Script {
            fail_first: 2,
            fail_status: 503,
            retry_after: Some(1),
            ..Script::default()
        },
    )
    .await;
    let started = Instant::now();
    let data = through(&front, RetryPolicy::default())
        .get_object(&s.name, "object", None)
        .await
        .expect("GET after two 503s");
    let waited = started.elapsed();
    assert_eq!(data, "eventually");
    assert_eq!(front.requests(), 3);
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(5)).contains(&waited),
        "two Retry-After: 1 should take about 2 s, took {waited:?}"
    );

    // Failures that do not stop: the client gives up after its attempts.
    for status in [503, 429] {
        let front = Front::start(
            &storage_url,
            Script {
                fail_first: usize::MAX,
                fail_status: status,
                ..Script::default()
            },
        )
        .await;
        let err = through(&front, quick_retries(3))
            .get_object(&s.name, "object", None)
            .await
            .expect_err("a server that never recovers");
        match (status, &err) {
            (503, SwiftError::Http { status: 503, .. }) | (429, SwiftError::Throttled { .. }) => {}
            _ => panic!("{status} forever gave {err:?}"),
        }
        assert_eq!(front.requests(), 3, "attempts against {status}");
    }
}
