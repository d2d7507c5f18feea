//! Serving CSI services on the Unix socket kubelet and the sidecars dial, and dialing one.

use std::future::Future;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;

use crate::metrics::{RpcMetrics, RpcMetricsLayer};

/// Errors of serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid endpoint {0:?}: expected unix:///path/to/socket")]
    BadEndpoint(String),
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The socket path of a `unix:///path` (or `unix:/path`) endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .filter(|path| path.starts_with('/') && path.len() > 1)
        .ok_or_else(|| ServeError::BadEndpoint(endpoint.to_owned()))?;
    Ok(PathBuf::from(path))
}

/// Binds `path`, replacing a socket left by an earlier process (never any other file).
fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::FileTypeExt;
    let socket_error = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(socket_error)?;
        }
        Ok(_) => {
            return Err(ServeError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(socket_error)?;
    }
    UnixListener::bind(path).map_err(socket_error)
}

/// Serves `routes` on the socket of `endpoint` until `shutdown` completes, then lets the
/// calls in flight finish and removes the socket. Every call is counted in `metrics`.
pub async fn serve(
    endpoint: &str,
    routes: Routes,
    metrics: RpcMetrics,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let path = socket_path(endpoint)?;
    let listener = bind(&path)?;
    tracing::info!(socket = %path.display(), "serving CSI");
    let served = tonic::transport::Server::builder()
        .layer(RpcMetricsLayer(metrics))
        .add_routes(routes)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&path);
    Ok(served?)
}

/// Completes on SIGTERM (how Kubernetes stops a pod) or Ctrl-C.
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!(error = %e, "no SIGTERM handler; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping: finishing the calls in flight");
}

/// Logs to stderr at the level `RUST_LOG` says (`info` by default).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// A gRPC channel to the CSI socket at `path`.
pub async fn connect(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://csi.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").ok(),
            Some(PathBuf::from("/csi/csi.sock"))
        );
        assert_eq!(
            socket_path("unix:/csi/csi.sock").ok(),
            Some(PathBuf::from("/csi/csi.sock"))
        );
        for bad in ["/csi/csi.sock", "tcp://x:1", "unix://", "unix://relative"] {
            assert!(socket_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_socket_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep").expect("write");
        assert!(matches!(bind(&file), Err(ServeError::NotASocket { .. })));
        assert_eq!(std::fs::read(&file).ok(), Some(b"keep".to_vec()));
    }
}
