//! The `/metrics` endpoint (and `/healthz`) every cloudfs process serves (Prometheus text format), over TCP or
//! over a Unix socket; reading such a socket; and merging the expositions of several
//! processes into one, which is how the node plugin shows the metrics of the mount processes
//! it started. Registries belong to the callers: nothing here is global.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
pub use prometheus;
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::task::JoinHandle;

/// Errors of serving and reading metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("invalid metrics address {0:?}: expected HOST:PORT, :PORT or unix:/path")]
    BadEndpoint(String),
    #[error("serving metrics on {endpoint}: {source}")]
    Bind {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading metrics from {path}: {reason}")]
    Scrape { path: PathBuf, reason: String },
}

/// Where `/metrics` is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = MetricsError;

    fn from_str(s: &str) -> Result<Endpoint, MetricsError> {
        let bad = || MetricsError::BadEndpoint(s.to_owned());
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            return if path.starts_with('/') && path.len() > 1 {
                Ok(Endpoint::Unix(PathBuf::from(path)))
            } else {
                Err(bad())
            };
        }
        let with_host = if s.starts_with(':') {
            format!("0.0.0.0{s}")
        } else {
            s.to_owned()
        };
        with_host.parse().map(Endpoint::Tcp).map_err(|_| bad())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "{addr}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// What `/metrics` answers with.
#[async_trait::async_trait]
pub trait Exposition: Send + Sync + 'static {
    async fn render(&self) -> String;
}

#[async_trait::async_trait]
impl Exposition for Registry {
    async fn render(&self) -> String {
        encode(&self.gather())
    }
}

/// `families` in the Prometheus text format.
pub fn encode(families: &[MetricFamily]) -> String {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(families, &mut out) {
        tracing::warn!(error = %e, "could not encode some metrics");
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A running `/metrics` server. Dropping it stops the server and removes its socket.
#[derive(Debug)]
pub struct MetricsServer {
    endpoint: Endpoint,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Where it serves (with the port the system chose for port 0).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
        if let Endpoint::Unix(path) = &self.endpoint {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds `endpoint` and serves `GET /metrics` from `source`, and `GET /healthz`, on the
/// current Tokio runtime.
pub async fn start(
    endpoint: &Endpoint,
    source: Arc<dyn Exposition>,
) -> Result<MetricsServer, MetricsError> {
    let bind_error = |source| MetricsError::Bind {
        endpoint: endpoint.to_string(),
        source,
    };
    let router = Router::new()
        .route(
            "/metrics",
            get(move || {
                let source = source.clone();
                async move {
                    let text = source.render().await;
                    ([(CONTENT_TYPE, prometheus::TEXT_FORMAT)], text)
                }
            }),
        )
        // Liveness: the process serves requests.
        .route("/healthz", get(|| async { "ok" }));
    let (endpoint, task) = match endpoint {
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(bind_error)?;
            let local = listener.local_addr().map_err(bind_error)?;
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!(error = %e, "the metrics server stopped");
                }
            });
            (Endpoint::Tcp(local), task)
        }
        Endpoint::Unix(path) => {
            // The socket is private to its process: one left by a dead process is replaced.
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path).map_err(bind_error)?;
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!(error = %e, "the metrics server stopped");
                }
            });
            (Endpoint::Unix(path.clone()), task)
        }
    };
    tracing::info!(endpoint = %endpoint, "serving metrics at /metrics");
    Ok(MetricsServer { endpoint, task })
}

/// `GET /metrics` over `stream`.
async fn get_metrics<S>(stream: S) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = hyper::Request::get("/metrics")
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("answered {}", response.status()));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| "the answer is not UTF-8".to_owned())
}

/// The exposition served on the Unix socket at `path`, waiting at most `timeout`.
pub async fn scrape(path: &Path, timeout: Duration) -> Result<String, MetricsError> {
    let fetch = async {
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| e.to_string())?;
        get_metrics(stream).await
    };
    let fail = |reason| MetricsError::Scrape {
        path: path.to_owned(),
        reason,
    };
    match tokio::time::timeout(timeout, fetch).await {
        Ok(result) => result.map_err(fail),
        Err(_) => Err(fail(format!("no answer within {timeout:?}"))),
    }
}

/// The metric family a sample line belongs to when no `# TYPE` line announced one.
fn sample_name(line: &str) -> &str {
    line.split(['{', ' ']).next().unwrap_or(line)
}

/// One exposition holding every family of `expositions` once: the series of a family that
/// several processes export (told apart by their labels) are listed together under one
/// `# HELP` and `# TYPE`, as the text format requires.
pub fn merge(expositions: &[String]) -> String {
    struct Family<'a> {
        declared_by: usize,
        headers: Vec<&'a str>,
        samples: Vec<&'a str>,
    }
    let mut order: Vec<&str> = Vec::new();
    let mut families: std::collections::HashMap<&str, Family<'_>> = Default::default();
    for (index, text) in expositions.iter().enumerate() {
        let mut current: Option<&str> = None;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let header = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "));
            let name = match header {
                Some(rest) => rest.split(' ').next().unwrap_or(rest),
                None if line.starts_with('#') => continue,
                None => current.unwrap_or_else(|| sample_name(line)),
            };
            let family = families.entry(name).or_insert_with(|| {
                order.push(name);
                Family {
                    declared_by: index,
                    headers: Vec::new(),
                    samples: Vec::new(),
                }
            });
            match header {
                Some(_) => {
                    current = Some(name);
                    if family.declared_by == index {
                        family.headers.push(line);
                    }
                }
                None => family.samples.push(line),
            }
        }
    }
    let mut out = String::new();
    for name in order {
        if let Some(family) = families.get(name) {
            for line in family.headers.iter().chain(&family.samples) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{IntCounterVec, Opts};

    fn registry(volume: &str, count: u64) -> Registry {
        let labels = [("volume".to_owned(), volume.to_owned())].into();
        let registry = Registry::new_custom(None, Some(labels)).expect("registry");
        let ops = IntCounterVec::new(Opts::new("cloudfs_ops_total", "Operations."), &["op"])
            .expect("counter");
        registry.register(Box::new(ops.clone())).expect("register");
        ops.with_label_values(&["read"]).inc_by(count);
        registry
    }

    #[test]
    fn endpoints_parse() {
        let parse = |s: &str| s.parse::<Endpoint>().ok();
        assert_eq!(
            parse(":9810"),
            Some(Endpoint::Tcp("0.0.0.0:9810".parse().expect("addr")))
        );
        assert_eq!(
            parse("127.0.0.1:1"),
            Some(Endpoint::Tcp("127.0.0.1:1".parse().expect("addr")))
        );
        assert_eq!(parse("unix:/a/b"), Some(Endpoint::Unix("/a/b".into())));
        assert_eq!(parse("unix:///a/b"), Some(Endpoint::Unix("/a/b".into())));
        for bad in ["", "9810", "unix:", "unix:rel", "host:port", "http://x:1"] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn merging_declares_each_family_once_and_keeps_every_series() {
        let a = encode(&registry("a", 3).gather());
        let b = encode(&registry("b", 5).gather());
        let merged = merge(&[a, b]);
        assert_eq!(merged.matches("# TYPE cloudfs_ops_total").count(), 1);
        assert_eq!(merged.matches("# HELP cloudfs_ops_total").count(), 1);
        assert!(merged.contains(r#"cloudfs_ops_total{op="read",volume="a"} 3"#));
        assert!(merged.contains(r#"cloudfs_ops_total{op="read",volume="b"} 5"#));
        let type_at = merged.find("# TYPE").expect("type line");
        let sample_at = merged.find("cloudfs_ops_total{").expect("sample");
        assert!(type_at < sample_at, "{merged}");
    }

    #[tokio::test]
    async fn a_unix_socket_endpoint_serves_what_scrape_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("metrics.sock");
        let server = start(&Endpoint::Unix(path.clone()), Arc::new(registry("v", 7)))
            .await
            .expect("start");
        let text = scrape(&path, Duration::from_secs(5)).await.expect("scrape");
        assert!(text.contains(r#"cloudfs_ops_total{op="read",volume="v"} 7"#));
        drop(server);
        assert!(!path.exists(), "the socket is removed with the server");
        assert!(scrape(&path, Duration::from_secs(5)).await.is_err());
    }

    #[tokio::test]
    async fn a_tcp_endpoint_serves_the_text_format() {
        let server = start(
            &Endpoint::Tcp("127.0.0.1:0".parse().expect("addr")),
            Arc::new(registry("v", 1)),
        )
        .await
        .expect("start");
        let Endpoint::Tcp(addr) = server.endpoint().clone() else {
            panic!("a TCP endpoint")
        };
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let text = get_metrics(stream).await.expect("GET /metrics");
        assert!(text.contains("cloudfs_ops_total"));
    }
}
