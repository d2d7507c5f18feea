//! The Identity service over a real Unix socket, as kubelet and the sidecars reach it: a
//! stale socket is replaced, the calls answer and are counted, Probe follows readiness, and
//! shutdown removes the socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cloudfs_csi::identity::{IdentityService, Readiness};
use cloudfs_csi::metrics::RpcMetrics;
use cloudfs_csi::proto::identity_client::IdentityClient;
use cloudfs_csi::proto::identity_server::IdentityServer;
use cloudfs_csi::proto::plugin_capability::{self, service, volume_expansion};
use cloudfs_csi::proto::{GetPluginCapabilitiesRequest, GetPluginInfoRequest, ProbeRequest};
use cloudfs_csi::{DRIVER_NAME, server};
use cloudfs_metrics::{encode, prometheus::Registry};
use tonic::service::Routes;
use tonic::transport::Channel;

/// Readiness a test switches.
#[derive(Clone, Default)]
struct Switch(Arc<AtomicBool>);

#[tonic::async_trait]
impl Readiness for Switch {
    async fn check(&self) -> Result<(), String> {
        if self.0.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("the store is unreachable".into())
        }
    }
}

/// Dials the server, waiting for it to listen.
async fn connect(path: &Path) -> Channel {
    for _ in 0..200 {
        if let Ok(channel) = server::connect(path).await {
            return channel;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the server never listened on {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_answers_on_the_socket_and_probe_follows_readiness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket: PathBuf = dir.path().join("csi/csi.sock");
    // A socket left by an earlier process is replaced.
    std::fs::create_dir_all(socket.parent().expect("parent")).expect("mkdir");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));

    let ready = Switch::default();
    let routes = Routes::new(IdentityServer::new(IdentityService::new(ready.clone())));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let endpoint = format!("unix://{}", socket.display());
    let registry = Registry::new();
    let rpc_metrics = RpcMetrics::register(&registry).expect("metrics");
    let server = tokio::spawn(async move {
        server::serve(&endpoint, routes, rpc_metrics, async {
            let _ = stopped.await;
        })
        .await
    });

    let mut client = IdentityClient::new(connect(&socket).await);
    let info = client
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("GetPluginInfo")
        .into_inner();
    assert_eq!(info.name, DRIVER_NAME);
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let capabilities = client
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .expect("GetPluginCapabilities")
        .into_inner()
        .capabilities;
    assert_eq!(capabilities.len(), 2, "{capabilities:?}");
    assert!(capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(plugin_capability::Type::Service(s)) if s.r#type == service::Type::ControllerService as i32
    )));
    assert!(capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(plugin_capability::Type::VolumeExpansion(e))
            if e.r#type == volume_expansion::Type::Online as i32
    )));
    let probe = |client: &mut IdentityClient<Channel>| {
        let mut client = client.clone();
        async move {
            client
                .probe(ProbeRequest {})
                .await
                .expect("Probe")
                .into_inner()
                .ready
        }
    };
    assert_eq!(probe(&mut client).await, Some(false), "not ready yet");
    ready.0.store(true, Ordering::SeqCst);
    assert_eq!(probe(&mut client).await, Some(true));

    let metrics = encode(&registry.gather());
    for counted in [
        r#"cloudfs_csi_requests_total{code="Ok",method="GetPluginInfo"} 1"#,
        r#"cloudfs_csi_requests_total{code="Ok",method="Probe"} 2"#,
        r#"cloudfs_csi_request_duration_seconds_count{method="Probe"} 2"#,
    ] {
        assert!(metrics.contains(counted), "{counted} in\n{metrics}");
    }

    stop.send(()).expect("stop");
    server
        .await
        .expect("server task")
        .expect("a clean shutdown");
    assert!(!socket.exists(), "the socket is removed at shutdown");
}
