//! What the CSI plugins measure: every RPC by method and gRPC code with its latency (a tower
//! layer around the gRPC server), and for the node plugin, the metrics of the mount
//! processes it started, collected from their sockets into its own `/metrics`.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use cloudfs_metrics::prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use cloudfs_metrics::{Exposition, encode, merge, scrape};
use tonic::Code;
use tonic::codegen::http;

/// Latency buckets of RPCs: from a capability query to publishing a large volume.
const RPC_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0,
];
/// The longest a node plugin waits for one mount process's metrics.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// The socket a mount process serves its metrics on, in its volume's directory.
pub const MOUNT_METRICS_SOCKET: &str = "metrics.sock";

/// RPC counts and latencies, registered in a registry of the caller's.
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    requests: IntCounterVec,
    seconds: HistogramVec,
}

impl RpcMetrics {
    pub fn register(registry: &Registry) -> cloudfs_metrics::prometheus::Result<RpcMetrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                "cloudfs_csi_requests_total",
                "CSI calls answered, by method and gRPC code (OK or the error's code).",
            ),
            &["method", "code"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "cloudfs_csi_request_duration_seconds",
                "Time to answer a CSI call, by method.",
            )
            .buckets(RPC_BUCKETS.to_vec()),
            &["method"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(RpcMetrics { requests, seconds })
    }

    fn record(&self, method: &str, code: Code, elapsed: Duration) {
        let code = format!("{code:?}");
        self.requests.with_label_values(&[method, &code]).inc();
        self.seconds
            .with_label_values(&[method])
            .observe(elapsed.as_secs_f64());
    }
}

/// The CSI method of a request path (`/csi.v1.Node/NodePublishVolume`); anything else is
/// `unknown`, so a caller cannot grow the label set.
fn method(path: &str) -> &str {
    path.strip_prefix("/csi.v1.")
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, method)| method)
        .filter(|m| !m.is_empty() && m.len() <= 64 && m.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or("unknown")
}

/// The gRPC code of a response: in its headers when the call failed before a body (how
/// every error of a unary call travels), else OK.
fn code<B>(response: &http::Response<B>) -> Code {
    response
        .headers()
        .get("grpc-status")
        .map_or(Code::Ok, |status| Code::from_bytes(status.as_bytes()))
}

/// Wraps the gRPC server's services in [`Metered`].
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer(pub RpcMetrics);

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Metered<S> {
        Metered {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// A service whose calls are counted and timed.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: RpcMetrics,
}

impl<S, B, R> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method(request.uri().path()).to_owned();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                Ok(response) => code(response),
                Err(_) => Code::Internal,
            };
            metrics.record(&method, code, started.elapsed());
            result
        })
    }
}

/// The node plugin's `/metrics`: its own registry, then the metrics of every mount process
/// serving a volume under `volumes_dir` (each labelled with its volume and pool).
#[derive(Debug)]
pub struct NodeExposition {
    registry: Registry,
    volumes_dir: PathBuf,
    mounts: IntGauge,
    scrape_errors: IntCounter,
}

impl NodeExposition {
    pub fn new(
        registry: Registry,
        volumes_dir: PathBuf,
    ) -> cloudfs_metrics::prometheus::Result<NodeExposition> {
        let mounts = IntGauge::new(
            "cloudfs_node_mount_processes",
            "Mount processes of this node whose metrics were collected.",
        )?;
        let scrape_errors = IntCounter::new(
            "cloudfs_node_mount_scrape_errors_total",
            "Times a mount process's metrics could not be collected.",
        )?;
        registry.register(Box::new(mounts.clone()))?;
        registry.register(Box::new(scrape_errors.clone()))?;
        Ok(NodeExposition {
            registry,
            volumes_dir,
            mounts,
            scrape_errors,
        })
    }

    /// The sockets of the mount processes (a volume's directory holds one while mounted).
    fn sockets(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.volumes_dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|entry| entry.path().join(MOUNT_METRICS_SOCKET))
            .filter(|socket| socket.exists())
            .collect()
    }
}

#[tonic::async_trait]
impl Exposition for NodeExposition {
    async fn render(&self) -> String {
        let mut scrapes = tokio::task::JoinSet::new();
        for socket in self.sockets() {
            scrapes.spawn(async move { scrape(&socket, SCRAPE_TIMEOUT).await });
        }
        let mut mounts = Vec::new();
        while let Some(joined) = scrapes.join_next().await {
            match joined {
                Ok(Ok(text)) => mounts.push(text),
                Ok(Err(e)) => {
                    self.scrape_errors.inc();
                    tracing::debug!(error = %e, "a mount's metrics could not be collected");
                }
                Err(e) => {
                    self.scrape_errors.inc();
                    tracing::warn!(error = %e, "collecting a mount's metrics failed");
                }
            }
        }
        self.mounts.set(mounts.len() as i64);
        let mut all = vec![encode(&self.registry.gather())];
        all.extend(mounts);
        merge(&all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_come_from_csi_paths_only() {
        assert_eq!(
            method("/csi.v1.Node/NodePublishVolume"),
            "NodePublishVolume"
        );
        assert_eq!(method("/csi.v1.Identity/Probe"), "Probe");
        for other in [
            "/",
            "/x.Y/Z",
            "/csi.v1.Node/",
            "/csi.v1.Node/a-b",
            "garbage",
        ] {
            assert_eq!(method(other), "unknown", "{other}");
        }
    }

    #[test]
    fn codes_come_from_the_grpc_status_header() {
        let ok = http::Response::new(());
        assert_eq!(code(&ok), Code::Ok);
        let mut failed = http::Response::new(());
        failed
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(code(&failed), Code::NotFound);
    }
}
