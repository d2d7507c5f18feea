//! `cloudfs-controller`: the CSI controller plugin (Identity and Controller services on a
//! Unix socket for the external provisioner and snapshotter) and, with `--operator`, the
//! operator reconciling the cloudfs custom resources.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use cloudfs_controller::EngineBackend;
use cloudfs_controller::operator::{self, OperatorConfig};
use cloudfs_csi::controller::ControllerService;
use cloudfs_csi::identity::{IdentityService, Readiness};
use cloudfs_csi::metrics::RpcMetrics;
use cloudfs_csi::pod_mounter::resource_quantity;
use cloudfs_csi::proto::controller_server::ControllerServer;
use cloudfs_csi::proto::identity_server::IdentityServer;
use cloudfs_csi::server;
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use tonic::service::Routes;

/// cloudfs CSI controller: creates, clones, expands, snapshots and deletes cloudfs volumes.
#[derive(Debug, Parser)]
#[command(name = "cloudfs-controller", version, max_term_width = 100)]
struct Args {
    /// The socket to serve CSI on.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// A pool (store URL: swift://<container> or file:///path) to serve; repeat for more.
    /// The first is where volumes go unless the StorageClass parameter `pool` names
    /// another; ListVolumes shows these. Credentials come from each call's CSI secrets, or
    /// else from this process's environment (ST_*/OS_* variables).
    #[arg(
        long = "pool",
        env = "CLOUDFS_POOLS",
        value_delimiter = ',',
        required = true
    )]
    pools: Vec<String>,
    /// Where to serve Prometheus metrics: HOST:PORT, :PORT or unix:/path.
    #[arg(long, env = "CLOUDFS_METRICS_ADDR", default_value = ":9811")]
    metrics_addr: cloudfs_metrics::Endpoint,
    /// Also run the operator, against the Kubernetes API of the cluster (in a pod) or of
    /// KUBECONFIG.
    #[arg(long, env = "CLOUDFS_OPERATOR")]
    operator: bool,
    /// The operator's namespace, where its leader Lease lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "cloudfs-system")]
    namespace: String,
    /// This replica's name, for the leader Lease and events [default: the host name].
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// The image garbage-collection Jobs run (it holds the `cloudfs` binary).
    #[arg(long, env = "CLOUDFS_GC_IMAGE", default_value = concat!("cloudfs:", env!("CARGO_PKG_VERSION")))]
    gc_image: String,
    /// Resource requests of garbage-collection Jobs, as NAME=QUANTITY pairs.
    #[arg(long, env = "CLOUDFS_GC_REQUESTS", value_delimiter = ',', default_value = "cpu=100m,memory=256Mi", value_parser = resource_quantity)]
    gc_requests: Vec<(String, Quantity)>,
    /// Resource limits of garbage-collection Jobs, as NAME=QUANTITY pairs (the mark phase
    /// holds every referenced block's hash in memory: about 100 bytes per block).
    #[arg(long, env = "CLOUDFS_GC_LIMITS", value_delimiter = ',', default_value = "memory=2Gi", value_parser = resource_quantity)]
    gc_limits: Vec<(String, Quantity)>,
    /// How often the operator reads each CloudfsVolume view afresh from its pool (it loads
    /// the volume's newest metadata to count files and bytes).
    #[arg(long, env = "CLOUDFS_VOLUME_REFRESH", default_value = "5m", value_parser = humantime::parse_duration)]
    volume_refresh: Duration,
}

/// Ready once the default pool answers.
struct PoolReadiness(EngineBackend);

#[tonic::async_trait]
impl Readiness for PoolReadiness {
    async fn check(&self) -> Result<(), String> {
        self.0.check().await
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    server::init_logging();
    let args = Args::parse();
    let registry = cloudfs_metrics::prometheus::Registry::new();
    let rpc_metrics = RpcMetrics::register(&registry)?;
    let _metrics = cloudfs_metrics::start(&args.metrics_addr, Arc::new(registry.clone())).await?;
    let backend = EngineBackend::new(args.pools);
    let routes = Routes::new(IdentityServer::new(IdentityService::new(PoolReadiness(
        backend.clone(),
    ))))
    .add_service(ControllerServer::new(ControllerService::new(backend)));
    let operator = async {
        if !args.operator {
            return std::future::pending().await;
        }
        let identity = match args.identity {
            Some(identity) => identity,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")?
                .trim()
                .to_owned(),
        };
        let config = OperatorConfig {
            identity,
            namespace: args.namespace,
            lease_duration: Duration::from_secs(15),
            mount_answer_timeout: Duration::from_secs(60),
            rollback_timeout: Duration::from_secs(600),
            gc_image: args.gc_image,
            gc_resources: ResourceRequirements {
                requests: Some(args.gc_requests.into_iter().collect()),
                limits: Some(args.gc_limits.into_iter().collect()),
                ..ResourceRequirements::default()
            },
            volume_refresh: args.volume_refresh,
        };
        let client = kube::Client::try_default().await?;
        anyhow::Ok(operator::run(client, config, &registry).await?)
    };
    tokio::select! {
        served = server::serve(&args.endpoint, routes, rpc_metrics, server::stop_signal()) => served?,
        ran = operator => ran?,
    }
    Ok(())
}
