//! cloudfs's Container Storage Interface: the CSI v1 wire types and services (generated from
//! `proto/csi.proto`), the Identity, Controller and Node services, and serving them on a Unix
//! socket with their [`metrics`]. The Node service starts mounts through the
//! [`node::Mounter`] trait ([`process_mounter`] runs `cloudfs mount` processes,
//! [`pod_mounter`] runs them in mount pods of their own), so kubelet and the Kubernetes
//! sidecars drive cloudfs through exactly these types.

pub mod controller;
pub mod identity;
pub mod metrics;
pub mod mount_options;
pub mod mounts;
pub mod node;
pub mod pod_mounter;
pub mod process_mounter;
mod request;
pub mod server;
pub mod volume_id;

/// The CSI v1 messages and services, generated at build time.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

/// The name cloudfs registers under with kubelet and in `CSIDriver` objects.
pub const DRIVER_NAME: &str = "cloudfs.csi.k8s.io";
