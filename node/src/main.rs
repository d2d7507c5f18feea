//! `cloudfs-node`: the CSI node plugin. Serves the Identity and Node services on a Unix
//! socket for kubelet; each published volume is served by a `cloudfs mount` process of its
//! own, which keeps serving when this process is restarted (a restarted plugin finds the
//! mounts in the kernel's mount table).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use cloudfs_csi::identity::{IdentityService, Readiness};
use cloudfs_csi::metrics::{NodeExposition, RpcMetrics};
use cloudfs_csi::node::{Mounter, NodeService};
use cloudfs_csi::pod_mounter::{PodMounter, PodSettings, resource_quantity};
use cloudfs_csi::process_mounter::ProcessMounter;
use cloudfs_csi::proto::identity_server::IdentityServer;
use cloudfs_csi::proto::node_server::NodeServer;
use cloudfs_csi::server;
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
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
    /// How each volume's mount runs: `process` (a `cloudfs mount` process beside this
    /// plugin, which outlives this process but not its container) or `pod` (a mount pod of
    /// its own on this node, which outlives this plugin's pod: upgrades keep mounts serving).
    #[arg(
        long,
        env = "CLOUDFS_MOUNT_MODE",
        value_enum,
        default_value = "process"
    )]
    mount_mode: MountMode,
    /// Mount pods: their image, which has the `cloudfs` binary (this plugin's own image).
    #[arg(long, env = "CLOUDFS_MOUNT_IMAGE", required_if_eq("mount_mode", "pod"))]
    mount_image: Option<String>,
    /// Mount pods: their namespace (this plugin's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "cloudfs-system")]
    namespace: String,
    /// Mount pods: their priority class.
    #[arg(long, env = "CLOUDFS_MOUNT_PRIORITY_CLASS")]
    mount_priority_class: Option<String>,
    /// Mount pods: resource requests, as NAME=QUANTITY pairs.
    #[arg(long, env = "CLOUDFS_MOUNT_REQUESTS", value_delimiter = ',', value_parser = resource_quantity)]
    mount_requests: Vec<(String, Quantity)>,
    /// Mount pods: resource limits, as NAME=QUANTITY pairs.
    #[arg(long, env = "CLOUDFS_MOUNT_LIMITS", value_delimiter = ',', value_parser = resource_quantity)]
    mount_limits: Vec<(String, Quantity)>,
}

/// Where volume mounts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MountMode {
    Process,
    Pod,
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
    let readiness = BinaryReadiness(cloudfs.clone());
    match args.mount_mode {
        MountMode::Process => {
            let mounter = ProcessMounter::new(cloudfs, args.state_dir.join("run"));
            let node = NodeService::new(node_id, args.state_dir, mounter);
            serve(&args.endpoint, readiness, node, rpc_metrics).await
        }
        MountMode::Pod => {
            let resources = |pairs: Vec<(String, Quantity)>| {
                (!pairs.is_empty()).then(|| pairs.into_iter().collect())
            };
            let settings = PodSettings {
                namespace: args.namespace,
                node_name: node_id.clone(),
                image: args
                    .mount_image
                    .context("--mount-image is needed with --mount-mode pod")?,
                state_dir: args.state_dir.clone(),
                resources: Some(ResourceRequirements {
                    requests: resources(args.mount_requests),
                    limits: resources(args.mount_limits),
                    ..ResourceRequirements::default()
                }),
                priority_class_name: args.mount_priority_class,
                start_timeout: Duration::from_secs(300),
                stop_timeout: Duration::from_secs(120),
            };
            let client = kube::Client::try_default()
                .await
                .context("a Kubernetes client for mount pods")?;
            let node = NodeService::new(node_id, args.state_dir, PodMounter::new(client, settings));
            serve(&args.endpoint, readiness, node, rpc_metrics).await
        }
    }
}

async fn serve<M: Mounter>(
    endpoint: &str,
    readiness: BinaryReadiness,
    node: NodeService<M>,
    rpc_metrics: RpcMetrics,
) -> Result<()> {
    let routes = Routes::new(IdentityServer::new(IdentityService::new(readiness)))
        .add_service(NodeServer::new(node));
    server::serve(endpoint, routes, rpc_metrics, server::stop_signal()).await?;
    Ok(())
}
