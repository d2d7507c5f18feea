//! `cloudfs-node`: the CSI node plugin. Serves the Identity and Node services on a Unix
//! socket for kubelet; each published volume is served by a `cloudfs mount` process of its
//! own, which keeps serving when this process is restarted (a restarted plugin finds the
//! mounts in the kernel's mount table).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use cloudfs_csi::identity::{IdentityService, Readiness};
use cloudfs_csi::metrics::{NodeExposition, RpcMetrics};
use cloudfs_csi::node::NodeService;
use cloudfs_csi::process_mounter::ProcessMounter;
use cloudfs_csi::proto::identity_server::IdentityServer;
use cloudfs_csi::proto::node_server::NodeServer;
use cloudfs_csi::server;
use tonic::service::Routes;

/// cloudfs CSI node plugin: publishes cloudfs volumes at the target paths kubelet asks for.
#[derive(Debug, Parser)]
#[command(name = "cloudfs-node", version, max_term_width = 100)]
struct Args {
    /// The socket to serve CSI on.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's id, as the controller and kubelet know it [default: the host name].
    #[arg(long, env = "CLOUDFS_NODE_ID")]
    node_id: Option<String>,
    /// Where volumes are mounted before being bound into pods, with their caches.
    #[arg(long, env = "CLOUDFS_STATE_DIR", default_value = "/var/lib/cloudfs")]
    state_dir: PathBuf,
    /// The `cloudfs` binary that serves mounts [default: the one beside this binary, else
    /// `cloudfs` on the PATH].
    #[arg(long, env = "CLOUDFS_BIN")]
    cloudfs: Option<PathBuf>,
    /// Where to serve Prometheus metrics (this plugin's calls, and the metrics of every
    /// mount process it started): HOST:PORT, :PORT or unix:/path.
    #[arg(long, env = "CLOUDFS_METRICS_ADDR", default_value = ":9810")]
    metrics_addr: cloudfs_metrics::Endpoint,
}

/// Ready once the `cloudfs` binary that serves mounts is there to run.
struct BinaryReadiness(PathBuf);

#[tonic::async_trait]
impl Readiness for BinaryReadiness {
    async fn check(&self) -> Result<(), String> {
        let out = tokio::process::Command::new(&self.0)
            .arg("--version")
            .output()
            .await
            .map_err(|e| format!("{}: {e}", self.0.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{} --version failed", self.0.display()))
        }
    }
}

fn default_cloudfs() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("cloudfs")))
        .filter(|beside| beside.exists())
        .unwrap_or_else(|| PathBuf::from("cloudfs"))
}

#[tokio::main]
async fn main() -> Result<()> {
    server::init_logging();
    let args = Args::parse();
    let node_id = match args.node_id {
        Some(id) => id,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name (or pass --node-id)")?
            .trim()
            .to_owned(),
    };
    let registry = cloudfs_metrics::prometheus::Registry::new();
    let rpc_metrics = RpcMetrics::register(&registry)?;
    let exposition = NodeExposition::new(registry, args.state_dir.join("volumes"))?;
    let _metrics = cloudfs_metrics::start(&args.metrics_addr, Arc::new(exposition)).await?;
    let cloudfs = args.cloudfs.unwrap_or_else(default_cloudfs);
    let mounter = ProcessMounter::new(cloudfs.clone(), args.state_dir.join("run"));
    let routes = Routes::new(IdentityServer::new(IdentityService::new(BinaryReadiness(
        cloudfs,
    ))))
    .add_service(NodeServer::new(NodeService::new(
        node_id,
        args.state_dir,
        mounter,
    )));
    server::serve(&args.endpoint, routes, rpc_metrics, server::stop_signal()).await?;
    Ok(())
}
