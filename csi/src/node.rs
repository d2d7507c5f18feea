//! The CSI Node service: publishes volumes at the target paths kubelet gives.
//!
//! Each volume a node uses is served by one mount process, started by a [`Mounter`], at
//! `<state dir>/volumes/<digest of the volume id>/mnt`; every target path is a bind mount of
//! it (read-only where asked), so all pods of a node share one mount of a volume. The mount
//! processes are not children of this service: they keep serving when it is restarted, and
//! because it reads the kernel's mount table rather than remembering what it published, a
//! restarted service unpublishes what an earlier one published.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::mount_options::{MountOptions, bind_flags};
use crate::mounts::{self, MountEntry};
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::{self, rpc};
use crate::proto::volume_capability::AccessType;
use crate::proto::volume_capability::access_mode::Mode;
use crate::proto::volume_usage::Unit;
use crate::proto::{
    NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse,
    NodePublishVolumeRequest, NodePublishVolumeResponse, NodeServiceCapability,
    NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse, VolumeCapability, VolumeCondition,
    VolumeUsage,
};
use crate::request::{self, InFlight, required};
use crate::volume_id::VolumeId;

/// What a mount of a volume needs. Its `Debug` names the secrets' keys, never their values.
pub struct MountRequest<'a> {
    pub id: &'a VolumeId,
    pub mountpoint: &'a Path,
    pub read_only: bool,
    /// Swift credentials: the keys of the `cloudfs` credentials file. Never logged.
    pub secrets: &'a HashMap<String, String>,
    /// How the mount process runs (from the volume context).
    pub options: &'a MountOptions,
}

impl std::fmt::Debug for MountRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<&str> = self.secrets.keys().map(String::as_str).collect();
        keys.sort_unstable();
        f.debug_struct("MountRequest")
            .field("id", self.id)
            .field("mountpoint", &self.mountpoint)
            .field("read_only", &self.read_only)
            .field("secrets", &format_args!("{keys:?} (values redacted)"))
            .field("options", self.options)
            .finish()
    }
}

/// Why a mount could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum MountFailure {
    #[error("the store refused the credentials: {0}")]
    Unauthenticated(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Failed(String),
}

impl From<MountFailure> for Status {
    fn from(failure: MountFailure) -> Status {
        match failure {
            MountFailure::Unauthenticated(m) => Status::unauthenticated(m),
            MountFailure::NotFound(m) => Status::not_found(m),
            MountFailure::InvalidArgument(m) => Status::invalid_argument(m),
            MountFailure::Failed(m) => Status::internal(m),
        }
    }
}

/// Starts and stops the mount processes that serve volumes. A local one runs `cloudfs mount`
/// as a detached process; a cluster one may run mounts in pods of their own.
#[tonic::async_trait]
pub trait Mounter: Send + Sync + 'static {
    /// Serves the volume at `request.mountpoint`; returns once the mount is usable.
    async fn mount(&self, request: MountRequest<'_>) -> Result<(), MountFailure>;
    /// Flushes the mount at `mountpoint` to the store and stops it.
    async fn unmount(&self, mountpoint: &Path) -> Result<(), MountFailure>;
}

/// How long a mount may take to answer `statfs` before it counts as not answering. FUSE
/// makes the caller wait for the mount process, which may hang (stopped, deadlocked, stuck
/// on the store); kubelet's calls must not hang with it.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How a mount answered `statfs`.
enum Answer {
    Stats(libc::statvfs),
    /// Its FUSE server is gone ("transport endpoint is not connected"): the mount is dead
    /// and only detaching it helps.
    Gone(std::io::Error),
    /// Another error: the mount process is there but failing (e.g. its store is down).
    Failed(std::io::Error),
    /// No answer within [`ANSWER_TIMEOUT`].
    Silent,
}

/// The Node service of one node.
pub struct NodeService<M> {
    node_id: String,
    state_dir: PathBuf,
    mounter: M,
    /// Volumes with a call in flight: a second call on one of them is refused (`Aborted`).
    in_flight: InFlight,
    /// Paths whose `statfs` has not returned yet: asking again would only tie up another
    /// thread behind the same hung mount.
    unanswered: Arc<Mutex<HashSet<PathBuf>>>,
}

/// A path in the set of unanswered ones while its `statfs` call runs; it leaves the set when
/// the call ends, however it ends.
struct Answering {
    set: Arc<Mutex<HashSet<PathBuf>>>,
    path: PathBuf,
}

impl Drop for Answering {
    fn drop(&mut self) {
        lock(&self.set).remove(&self.path);
    }
}

/// A panic elsewhere cannot leave the set of unanswered paths inconsistent: it is only
/// inserted into and removed from.
fn lock(set: &Mutex<HashSet<PathBuf>>) -> std::sync::MutexGuard<'_, HashSet<PathBuf>> {
    set.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn internal(what: &str, error: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {error}"))
}

/// Detaches the bind mount at `target` of a mount whose process died.
fn detach_dead(target: &Path) -> Result<(), Status> {
    mounts::unmount(target).map_err(|e| {
        internal(
            &format!("detaching the dead mount at {}", target.display()),
            e,
        )
    })
}

/// Checks a capability this node can publish; returns whether it allows no writer at all.
fn reader_only(capability: Option<&VolumeCapability>) -> Result<bool, Status> {
    let capability =
        capability.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    request::reader_only(capability).map_err(Status::invalid_argument)
}

/// The flags of a pod's bind mount, from a mount capability's `mount_flags`.
fn mount_flags(capability: Option<&VolumeCapability>) -> Result<libc::c_ulong, Status> {
    let flags = match capability.and_then(|c| c.access_type.as_ref()) {
        Some(AccessType::Mount(mount)) => mount.mount_flags.as_slice(),
        _ => &[],
    };
    bind_flags(flags).map_err(Status::invalid_argument)
}

/// Whether the capability allows the volume at one target path only.
fn single_writer(capability: Option<&VolumeCapability>) -> bool {
    capability
        .and_then(|c| c.access_mode.as_ref())
        .is_some_and(|m| m.mode == Mode::SingleNodeSingleWriter as i32)
}

impl<M: Mounter> NodeService<M> {
    pub fn new(node_id: String, state_dir: PathBuf, mounter: M) -> NodeService<M> {
        NodeService {
            node_id,
            state_dir,
            mounter,
            in_flight: InFlight::default(),
            unanswered: Arc::default(),
        }
    }

    /// `statfs` of the mount at `path`, bounded by [`ANSWER_TIMEOUT`]. It runs on a thread
    /// of its own; a call that times out keeps its thread until the mount answers or dies,
    /// and until then the path counts as silent without a new call.
    async fn ask_statfs(&self, path: &Path) -> Answer {
        if !lock(&self.unanswered).insert(path.to_owned()) {
            return Answer::Silent;
        }
        let answering = Answering {
            set: self.unanswered.clone(),
            path: path.to_owned(),
        };
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
        // A thread of its own, not the runtime's blocking pool: the runtime waits for its
        // blocking threads when it shuts down, and one stuck on a hung mount would keep the
        // plugin from exiting on SIGTERM.
        let spawned = std::thread::Builder::new()
            .name("statfs".into())
            .spawn(move || {
                let result = statvfs(&answering.path);
                drop(answering);
                let _ = answer_tx.send(result);
            });
        if let Err(e) = spawned {
            return Answer::Failed(e); // the closure, and with it `answering`, is dropped
        }
        match tokio::time::timeout(ANSWER_TIMEOUT, answer_rx).await {
            Err(_elapsed) => Answer::Silent,
            Ok(Err(_ended)) => Answer::Failed(std::io::Error::other(
                "the statfs thread ended without an answer",
            )),
            Ok(Ok(Ok(st))) => Answer::Stats(st),
            Ok(Ok(Err(e)))
                if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) =>
            {
                Answer::Gone(e)
            }
            Ok(Ok(Err(e))) => Answer::Failed(e),
        }
    }

    /// Makes sure the volume's shared mount, if there is one, can be bound into a pod: a
    /// dead one (its mount process crashed) is detached, with `target` if this publish had
    /// bound it there, so that the caller starts a fresh one; a silent one is an error.
    async fn drop_dead_shared_mount(
        &self,
        volume_id: &str,
        shared: &Path,
        target: &Path,
    ) -> Result<(), Status> {
        let table = Self::table()?;
        let Some(mount) = mounts::mount_at(&table, shared) else {
            return Ok(());
        };
        match self.ask_statfs(shared).await {
            Answer::Stats(_) | Answer::Failed(_) => Ok(()),
            Answer::Silent => Err(Status::unavailable(format!(
                "the mount of volume {volume_id} on this node is not answering within {}s",
                ANSWER_TIMEOUT.as_secs()
            ))),
            Answer::Gone(e) => {
                tracing::warn!(
                    volume = volume_id,
                    error = %e,
                    "the volume's mount process is gone; starting a fresh one"
                );
                // Other pods' bind mounts of the dead mount stay dead until they are
                // published again; this one is replaced now.
                if mounts::mount_at(&table, target).is_some_and(|t| t.device == mount.device) {
                    detach_dead(target)?;
                }
                self.mounter.unmount(shared).await?;
                Ok(())
            }
        }
    }

    /// Where this node's one mount of volume `id` lives.
    pub fn shared_mountpoint(&self, id: &VolumeId) -> PathBuf {
        let digest = blake3::hash(id.to_string().as_bytes()).to_hex();
        self.state_dir
            .join("volumes")
            .join(&digest[..24])
            .join("mnt")
    }

    fn table() -> Result<Vec<MountEntry>, Status> {
        mounts::mount_table().map_err(|e| internal("reading the mount table", e))
    }
}

#[tonic::async_trait]
impl<M: Mounter> Node for NodeService<M> {
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = required(&r.volume_id, "volume_id")?;
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let reader_only = reader_only(r.volume_capability.as_ref())?;
        let mut flags = mount_flags(r.volume_capability.as_ref())?;
        let options =
            MountOptions::from_parameters(&r.volume_context).map_err(Status::invalid_argument)?;
        let id = VolumeId::parse(volume_id)
            .ok_or_else(|| Status::not_found(format!("no volume {volume_id}")))?;
        let _claim = self.in_flight.claim(volume_id)?;
        let shared = self.shared_mountpoint(&id);
        if r.readonly || reader_only {
            flags |= libc::MS_RDONLY;
        }
        let read_only = flags & libc::MS_RDONLY != 0;

        self.drop_dead_shared_mount(volume_id, &shared, &target)
            .await?;
        let mut table = Self::table()?;
        let shared_mount = mounts::mount_at(&table, &shared).cloned();
        if let Some(existing) = mounts::mount_at(&table, &target) {
            let same_mount = shared_mount
                .as_ref()
                .is_some_and(|mount| mount.device == existing.device);
            if same_mount && existing.read_only == read_only {
                return Ok(Response::new(NodePublishVolumeResponse {}));
            }
            if same_mount || !matches!(self.ask_statfs(&target).await, Answer::Gone(_)) {
                return Err(Status::already_exists(format!(
                    "{} is already published, differently",
                    target.display()
                )));
            }
            // A bind mount of a mount that died since: replaced like a missing one.
            detach_dead(&target)?;
            table = Self::table()?;
        }
        if let Some(mount) = &shared_mount
            && single_writer(r.volume_capability.as_ref())
            && table
                .iter()
                .any(|e| e.device == mount.device && e.mount_point != shared)
        {
            return Err(Status::failed_precondition(format!(
                "volume {volume_id} has the single-writer access mode and is published \
                 elsewhere on this node already"
            )));
        }
        match &shared_mount {
            Some(mount) if mount.read_only && !read_only => {
                return Err(Status::failed_precondition(format!(
                    "volume {volume_id} is mounted read-only on this node; unpublish its \
                     read-only users before publishing it read-write"
                )));
            }
            Some(_) => {}
            None => {
                std::fs::create_dir_all(&shared)
                    .map_err(|e| internal("creating the volume's mount directory", e))?;
                self.mounter
                    .mount(MountRequest {
                        id: &id,
                        mountpoint: &shared,
                        read_only: reader_only,
                        secrets: &r.secrets,
                        options: &options,
                    })
                    .await?;
            }
        }
        std::fs::create_dir_all(&target).map_err(|e| internal("creating the target path", e))?;
        mounts::bind(&shared, &target, flags)
            .map_err(|e| internal(&format!("bind-mounting {}", target.display()), e))?;
        tracing::info!(volume = volume_id, target = %target.display(), flags, "published");
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = required(&r.volume_id, "volume_id")?;
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let _claim = self.in_flight.claim(volume_id)?;
        let table = Self::table()?;
        if mounts::mount_at(&table, &target).is_some() {
            mounts::unmount(&target)
                .map_err(|e| internal(&format!("unmounting {}", target.display()), e))?;
        }
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal("removing the target path", e)),
        }
        // The last user gone, the volume's mount stops too.
        if let Some(id) = VolumeId::parse(volume_id) {
            let shared = self.shared_mountpoint(&id);
            let table = Self::table()?;
            if let Some(mount) = mounts::mount_at(&table, &shared) {
                let users = table
                    .iter()
                    .filter(|e| e.device == mount.device && e.mount_point != shared)
                    .count();
                if users == 0 {
                    self.mounter.unmount(&shared).await?;
                }
            }
        }
        tracing::info!(volume = volume_id, target = %target.display(), "unpublished");
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        let volume_id = required(&r.volume_id, "volume_id")?;
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        if VolumeId::parse(volume_id).is_none() {
            return Err(Status::not_found(format!("no volume {volume_id}")));
        }
        let table = Self::table()?;
        if mounts::mount_at(&table, &path).is_none() {
            return Err(Status::not_found(format!(
                "volume {volume_id} is not published at {}",
                path.display()
            )));
        }
        let broken = |message: String| NodeGetVolumeStatsResponse {
            usage: Vec::new(),
            volume_condition: Some(VolumeCondition {
                abnormal: true,
                message,
            }),
        };
        let response = match self.ask_statfs(&path).await {
            Answer::Stats(st) => NodeGetVolumeStatsResponse {
                usage: usage(&st),
                volume_condition: Some(VolumeCondition {
                    abnormal: false,
                    message: "mounted and answering".into(),
                }),
            },
            Answer::Gone(e) => broken(format!("the mount's process is gone: {e}")),
            Answer::Failed(e) => broken(format!("the mount fails statfs: {e}")),
            Answer::Silent => broken(format!(
                "the mount is not answering within {}s",
                ANSWER_TIMEOUT.as_secs()
            )),
        };
        Ok(Response::new(response))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::GetVolumeStats,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(
                node_service_capability::Rpc { r#type: t.into() },
            )),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

fn statvfs(path: &Path) -> std::io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain old data, fully written on success.
    let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a writable statvfs.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut out) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(out)
}

fn usage(st: &libc::statvfs) -> Vec<VolumeUsage> {
    let fragment = st.f_frsize;
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    vec![
        VolumeUsage {
            total: clamp(st.f_blocks.saturating_mul(fragment)),
            available: clamp(st.f_bavail.saturating_mul(fragment)),
            used: clamp(
                st.f_blocks
                    .saturating_sub(st.f_bfree)
                    .saturating_mul(fragment),
            ),
            unit: Unit::Bytes.into(),
        },
        VolumeUsage {
            total: clamp(st.f_files),
            available: clamp(st.f_favail),
            used: clamp(st.f_files.saturating_sub(st.f_ffree)),
            unit: Unit::Inodes.into(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_request_never_shows_its_secrets() {
        let id = VolumeId::parse("vol@swift://pool").expect("id");
        let secrets = HashMap::from([
            ("ST_USER".to_owned(), "test:tester".to_owned()),
            ("ST_KEY".to_owned(), "s3cr3t-value".to_owned()),
        ]);
        let request = MountRequest {
            id: &id,
            mountpoint: Path::new("/var/lib/cloudfs/volumes/x/mnt"),
            read_only: false,
            secrets: &secrets,
            options: &MountOptions::default(),
        };
        let shown = format!("{request:?}");
        assert!(
            shown.contains("ST_KEY") && shown.contains("ST_USER"),
            "{shown}"
        );
        assert!(
            !shown.contains("s3cr3t-value") && !shown.contains("test:tester"),
            "{shown}"
        );
        assert!(shown.contains("/var/lib/cloudfs/volumes/x/mnt"), "{shown}");
    }
}
