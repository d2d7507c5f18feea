//! `cloudfs-controller`: the CSI controller plugin. Serves the Identity and Controller
//! services on a Unix socket for the external provisioner and snapshotter.

use anyhow::Result;
use clap::Parser;
use cloudfs_controller::EngineBackend;
use cloudfs_csi::controller::ControllerService;
use cloudfs_csi::identity::{IdentityService, Readiness};
use cloudfs_csi::proto::controller_server::ControllerServer;
use cloudfs_csi::proto::identity_server::IdentityServer;
use cloudfs_csi::server;
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
    let backend = EngineBackend::new(args.pools);
    let routes = Routes::new(IdentityServer::new(IdentityService::new(PoolReadiness(
        backend.clone(),
    ))))
    .add_service(ControllerServer::new(ControllerService::new(backend)));
    server::serve(&args.endpoint, routes, server::stop_signal()).await?;
    Ok(())
}
