//! The [`VolumeBackend`] that carries out the CSI Controller service on the engine (format,
//! clone, quota, snapshots, delete), pool by pool.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cloudfs::cas::{BlockCache, BlockStore, CasError};
use cloudfs::control::ControlError;
use cloudfs::fs::FsError;
use cloudfs::mailbox;
use cloudfs::meta::MetaError;
use cloudfs::snapshot::{self, SnapshotInfo};
use cloudfs::store::{ObjectStore, StoreError, StoreUrl};
use cloudfs::volume::{self, VolumeError};
use cloudfs_csi::controller::{BackendError, Origin, Secrets, SnapshotRecord, VolumeBackend};
use cloudfs_csi::volume_id::VolumeId;
use cloudfs_swift::SwiftError;

/// How long a call waits for a volume's mount (on some node) to take a snapshot.
const MOUNT_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long Probe waits for the default pool. The store client retries an unreachable
/// Swift for a minute or more (to ride out a proxy restart), longer than a prober waits for
/// an answer; past this the plugin is simply not ready.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Block size of the volumes the controller formats.
const BLOCK_SIZE: u64 = 8 << 20;

/// The engine behind the Controller service.
#[derive(Debug, Clone)]
pub struct EngineBackend {
    /// The pools `ListVolumes` shows; the first is where volumes go unless a StorageClass
    /// parameter `pool` says otherwise.
    pools: Vec<String>,
}

/// How an engine error becomes a [`BackendError`]: the constructor of the gRPC code its
/// cause calls for. A store error wrapped in a volume, block or file-system error maps like
/// the store error itself (a refused key stays `Unauthenticated` however deep it arrives);
/// every match names each variant, so a new engine error must be given its code here.
type Code = fn(String) -> BackendError;

fn backend_error(e: VolumeError) -> BackendError {
    volume_code(&e)(e.to_string())
}

fn control_error(e: ControlError) -> BackendError {
    control_code(&e)(e.to_string())
}

fn store_error(e: StoreError) -> BackendError {
    store_code(&e)(e.to_string())
}

fn volume_code(e: &VolumeError) -> Code {
    match e {
        VolumeError::NotFound(_) | VolumeError::SnapshotNotFound { .. } => BackendError::NotFound,
        VolumeError::InvalidName(_) | VolumeError::InvalidBlockSize(_) => {
            BackendError::InvalidArgument
        }
        VolumeError::Exists(_) | VolumeError::SnapshotExists { .. } => BackendError::AlreadyExists,
        // Another writer holds the volume, or took it over: retrying as is cannot help
        // until that writer lets go.
        VolumeError::LeaseHeld { .. } | VolumeError::LeaseLost { .. } => {
            BackendError::FailedPrecondition
        }
        // Formatted by a newer cloudfs: usable once this one is upgraded.
        VolumeError::TooNew { .. } => BackendError::FailedPrecondition,
        VolumeError::Corrupt { .. } | VolumeError::Io(_) => BackendError::Internal,
        VolumeError::Store(e) => store_code(e),
        VolumeError::Blocks(e) => cas_code(e),
        VolumeError::Meta(e) => meta_code(e),
    }
}

fn cas_code(e: &CasError) -> Code {
    match e {
        CasError::Store(e) => store_code(e),
        // The store may answer in time later.
        CasError::TimedOut { .. } => BackendError::Unavailable,
        CasError::Corrupt { .. } | CasError::Cache(_) => BackendError::Internal,
    }
}

fn meta_code(e: &MetaError) -> Code {
    match e {
        MetaError::Sqlite(_) | MetaError::Corrupt(_) => BackendError::Internal,
        MetaError::TooNew { .. } => BackendError::FailedPrecondition,
    }
}

fn fs_code(e: &FsError) -> Code {
    match e {
        FsError::Meta(e) => meta_code(e),
        FsError::Blocks(e) => cas_code(e),
        FsError::Replication(e) => volume_code(e),
        FsError::NotFound => BackendError::NotFound,
        FsError::Exists => BackendError::AlreadyExists,
        FsError::ReadOnly | FsError::NoSpace => BackendError::FailedPrecondition,
        FsError::NotDir
        | FsError::IsDir
        | FsError::NotEmpty
        | FsError::Invalid(_)
        | FsError::NameTooLong
        | FsError::NotPermitted
        | FsError::NoAttribute
        | FsError::Range
        | FsError::TooBig
        | FsError::BadHandle
        | FsError::FileTooLarge
        | FsError::Staging(_) => BackendError::Internal,
    }
}

fn control_code(e: &ControlError) -> Code {
    match e {
        ControlError::Volume(e) => volume_code(e),
        ControlError::Fs(e) => fs_code(e),
        ControlError::Meta(e) => meta_code(e),
        ControlError::NoAnswer { .. } => BackendError::Unavailable,
        ControlError::Refused(_) | ControlError::Socket { .. } | ControlError::BadReply(_) => {
            BackendError::Internal
        }
    }
}

fn store_code(e: &StoreError) -> Code {
    match e {
        StoreError::Unauthorized(_) => BackendError::Unauthenticated,
        StoreError::InvalidUrl { .. } | StoreError::InvalidKey(_) | StoreError::Config(_) => {
            BackendError::InvalidArgument
        }
        StoreError::NotFound(_) => BackendError::NotFound,
        StoreError::Io { .. } | StoreError::Unavailable(_) => BackendError::Unavailable,
        // The pool's store cannot do what was asked (e.g. sign URLs).
        StoreError::Unsupported(_) => BackendError::FailedPrecondition,
        StoreError::Swift(e) => swift_code(e),
    }
}

fn swift_code(e: &SwiftError) -> Code {
    match e {
        SwiftError::NotFound(_) => BackendError::NotFound,
        SwiftError::Unauthorized(_) => BackendError::Unauthenticated,
        // The credentials name an endpoint that does not hand out tokens (a wrong auth URL
        // or region).
        SwiftError::Auth(_) | SwiftError::Config(_) => BackendError::InvalidArgument,
        // A conditional write lost a race: another call changed the object first.
        SwiftError::PreconditionFailed(_) => BackendError::FailedPrecondition,
        SwiftError::Throttled { .. }
        | SwiftError::Transport { .. }
        | SwiftError::TimedOut { .. }
        | SwiftError::BadResponse { .. } => BackendError::Unavailable,
        SwiftError::Http { status, .. } => match status {
            401 | 403 => BackendError::Unauthenticated,
            404 => BackendError::NotFound,
            408 | 429 | 498 | 500..=599 => BackendError::Unavailable,
            _ => BackendError::Internal,
        },
    }
}

fn record(info: SnapshotInfo, volume: &VolumeId) -> SnapshotRecord {
    SnapshotRecord {
        name: info.name,
        volume: volume.clone(),
        created_at: info.created_at,
        size_bytes: info.logical_bytes,
    }
}

/// A pool opened for one call: the store, a block store with a scratch cache, and the
/// scratch directory.
pub struct Pool {
    pub store: Arc<dyn ObjectStore>,
    pub blocks: BlockStore,
    pub scratch: tempfile::TempDir,
}

impl Pool {
    /// Opens `pool` (a store URL) with the credentials in `secrets`, or (none given) those
    /// of this process's environment.
    pub fn open(pool: &str, secrets: &Secrets) -> Result<Pool, BackendError> {
        let url = StoreUrl::parse(pool).map_err(store_error)?;
        let store = if secrets.is_empty() {
            url.open(|key| std::env::var(key).ok())
        } else {
            url.open(|key| secrets.get(key).cloned())
        }
        .map_err(store_error)?;
        let scratch = tempfile::tempdir().map_err(|e| BackendError::Internal(e.to_string()))?;
        let cache = BlockCache::open(&scratch.path().join("blocks"), 64 << 20)
            .map_err(|e| BackendError::Internal(e.to_string()))?;
        let blocks = BlockStore::new(store.clone(), cache, Duration::from_secs(120));
        Ok(Pool {
            store,
            blocks,
            scratch,
        })
    }
}

impl EngineBackend {
    /// `pools`: the store URLs of the pools to serve, the default first.
    pub fn new(pools: Vec<String>) -> EngineBackend {
        EngineBackend { pools }
    }

    fn open(&self, pool: &str, secrets: &Secrets) -> Result<Pool, BackendError> {
        Pool::open(pool, secrets)
    }

    /// Whether the default pool can be listed now (for Probe), within [`PROBE_TIMEOUT`].
    pub async fn check(&self) -> Result<(), String> {
        let pool = self.pools.first().ok_or("no pool configured")?;
        let opened = self
            .open(pool, &HashMap::new())
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(PROBE_TIMEOUT, volume::list_volumes(opened.store.as_ref())).await
        {
            Ok(listed) => listed.map(|_| ()).map_err(|e| e.to_string()),
            Err(_elapsed) => Err(format!(
                "pool {pool} did not answer within {}s",
                PROBE_TIMEOUT.as_secs()
            )),
        }
    }
}

#[tonic::async_trait]
impl VolumeBackend for EngineBackend {
    fn pool_for(&self, parameters: &HashMap<String, String>) -> Result<String, BackendError> {
        match parameters.get(cloudfs_csi::mount_options::POOL_PARAMETER) {
            Some(pool) => {
                StoreUrl::parse(pool).map_err(store_error)?;
                Ok(pool.clone())
            }
            None => self.pools.first().cloned().ok_or_else(|| {
                BackendError::InvalidArgument(
                    "no pool: set the StorageClass parameter `pool` or start the controller \
                     with --pool"
                        .into(),
                )
            }),
        }
    }

    fn listed_pools(&self) -> Vec<String> {
        self.pools.clone()
    }

    async fn volume_quota(
        &self,
        id: &VolumeId,
        secrets: &Secrets,
    ) -> Result<Option<Option<u64>>, BackendError> {
        let pool = self.open(&id.pool, secrets)?;
        match volume::read_config(pool.store.as_ref(), &id.volume).await {
            Ok(config) => Ok(Some(config.quota_bytes)),
            Err(VolumeError::NotFound(_)) => Ok(None),
            Err(e) => Err(backend_error(e)),
        }
    }

    async fn create_volume(
        &self,
        id: &VolumeId,
        quota: Option<u64>,
        origin: &Origin,
        secrets: &Secrets,
    ) -> Result<(), BackendError> {
        let pool = self.open(&id.pool, secrets)?;
        let store = pool.store.as_ref();
        let same_pool = |source: &VolumeId| {
            if source.pool == id.pool {
                Ok(())
            } else {
                Err(BackendError::InvalidArgument(format!(
                    "{source} is in another pool than {id}: clones share blocks, so they \
                     stay in their pool"
                )))
            }
        };
        match origin {
            Origin::Empty => {
                volume::format(&pool.store, &pool.blocks, &id.volume, BLOCK_SIZE, 0, 0)
                    .await
                    .map_err(backend_error)?;
            }
            Origin::Snapshot { volume, name } => {
                same_pool(volume)?;
                snapshot::clone_volume(store, &volume.volume, Some(name), &id.volume)
                    .await
                    .map_err(backend_error)?;
            }
            Origin::Volume(source) => {
                same_pool(source)?;
                snapshot::clone_volume(store, &source.volume, None, &id.volume)
                    .await
                    .map_err(backend_error)?;
            }
        }
        volume::set_quota(store, &id.volume, quota)
            .await
            .map_err(backend_error)?;
        Ok(())
    }

    async fn delete_volume(&self, id: &VolumeId, secrets: &Secrets) -> Result<(), BackendError> {
        let pool = self.open(&id.pool, secrets)?;
        match volume::delete_volume(pool.store.as_ref(), &id.volume).await {
            Ok(_) | Err(VolumeError::NotFound(_)) => Ok(()),
            Err(e) => Err(backend_error(e)),
        }
    }

    async fn set_quota(
        &self,
        id: &VolumeId,
        quota: Option<u64>,
        secrets: &Secrets,
    ) -> Result<(), BackendError> {
        let pool = self.open(&id.pool, secrets)?;
        volume::set_quota(pool.store.as_ref(), &id.volume, quota)
            .await
            .map(|_| ())
            .map_err(backend_error)
    }

    async fn list_volumes(&self, pool: &str) -> Result<Vec<(VolumeId, Option<u64>)>, BackendError> {
        let opened = self.open(pool, &HashMap::new())?;
        let store = opened.store.as_ref();
        let mut volumes = Vec::new();
        for name in volume::list_volumes(store).await.map_err(backend_error)? {
            match volume::read_config(store, &name).await {
                Ok(config) => volumes.push((
                    VolumeId {
                        volume: name,
                        pool: pool.to_owned(),
                    },
                    config.quota_bytes,
                )),
                Err(VolumeError::NotFound(_)) => {} // deleted meanwhile
                Err(e) => return Err(backend_error(e)),
            }
        }
        Ok(volumes)
    }

    async fn create_snapshot(
        &self,
        volume: &VolumeId,
        name: &str,
        secrets: &Secrets,
    ) -> Result<SnapshotRecord, BackendError> {
        let pool = self.open(&volume.pool, secrets)?;
        match snapshot::show(pool.store.as_ref(), &volume.volume, name).await {
            Ok(existing) => return Ok(record(existing, volume)),
            Err(VolumeError::SnapshotNotFound { .. }) => {}
            Err(e) => return Err(backend_error(e)),
        }
        // A mounted volume is snapshotted by its mount, on whichever node it runs.
        let info = mailbox::snapshot(
            pool.store.as_ref(),
            &pool.blocks,
            &volume.volume,
            name,
            pool.scratch.path(),
            MOUNT_ANSWER_TIMEOUT,
        )
        .await
        .map_err(control_error)?;
        Ok(record(info, volume))
    }

    async fn delete_snapshot(
        &self,
        volume: &VolumeId,
        name: &str,
        secrets: &Secrets,
    ) -> Result<(), BackendError> {
        let pool = self.open(&volume.pool, secrets)?;
        match snapshot::delete(pool.store.as_ref(), &volume.volume, name).await {
            Ok(()) | Err(VolumeError::SnapshotNotFound { .. } | VolumeError::NotFound(_)) => Ok(()),
            Err(e) => Err(backend_error(e)),
        }
    }

    async fn list_snapshots(
        &self,
        volume: &VolumeId,
        secrets: &Secrets,
    ) -> Result<Vec<SnapshotRecord>, BackendError> {
        let pool = self.open(&volume.pool, secrets)?;
        match snapshot::list(pool.store.as_ref(), &volume.volume).await {
            Ok(infos) => Ok(infos.into_iter().map(|i| record(i, volume)).collect()),
            Err(VolumeError::NotFound(_)) => Ok(Vec::new()),
            Err(e) => Err(backend_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::*;

    fn code(e: BackendError) -> Code {
        tonic::Status::from(e).code()
    }

    #[test]
    fn wrapped_engine_errors_map_by_their_cause() {
        let unauthorized = || StoreError::Unauthorized("401 on blocks/ab".into());
        for (error, expected) in [
            (VolumeError::Store(unauthorized()), Code::Unauthenticated),
            (
                VolumeError::Blocks(CasError::Store(unauthorized())),
                Code::Unauthenticated,
            ),
            (
                VolumeError::Blocks(CasError::TimedOut {
                    key: "blocks/ab".into(),
                    secs: 120,
                }),
                Code::Unavailable,
            ),
            (
                VolumeError::LeaseLost {
                    volume: "v".into(),
                    epoch: 3,
                },
                Code::FailedPrecondition,
            ),
            (
                VolumeError::Store(StoreError::Swift(SwiftError::Throttled {
                    what: "PUT".into(),
                })),
                Code::Unavailable,
            ),
            (
                VolumeError::Store(StoreError::Swift(SwiftError::Http {
                    status: 503,
                    what: "GET".into(),
                    body: String::new(),
                })),
                Code::Unavailable,
            ),
            (
                VolumeError::Store(StoreError::Swift(SwiftError::TimedOut {
                    what: "GET".into(),
                    limit: Duration::from_secs(120),
                })),
                Code::Unavailable,
            ),
            (
                VolumeError::Meta(MetaError::Corrupt("page 3".into())),
                Code::Internal,
            ),
            (VolumeError::NotFound("v".into()), Code::NotFound),
        ] {
            let message = error.to_string();
            let mapped = backend_error(error);
            assert_eq!(
                mapped.to_string(),
                message,
                "the message is the error's own"
            );
            assert_eq!(code(mapped), expected, "{message}");
        }
    }

    #[test]
    fn errors_of_a_mount_map_by_their_cause() {
        let unauthorized = || StoreError::Unauthorized("401".into());
        for (error, expected) in [
            (
                ControlError::Fs(FsError::Blocks(CasError::Store(unauthorized()))),
                Code::Unauthenticated,
            ),
            (
                ControlError::Fs(FsError::Replication(Box::new(VolumeError::Blocks(
                    CasError::TimedOut {
                        key: "k".into(),
                        secs: 1,
                    },
                )))),
                Code::Unavailable,
            ),
            (
                ControlError::Volume(VolumeError::SnapshotExists {
                    volume: "v".into(),
                    name: "s".into(),
                }),
                Code::AlreadyExists,
            ),
            (
                ControlError::NoAnswer {
                    volume: "v".into(),
                    secs: 60,
                },
                Code::Unavailable,
            ),
            (ControlError::Refused("busy".into()), Code::Internal),
        ] {
            let message = error.to_string();
            assert_eq!(code(control_error(error)), expected, "{message}");
        }
    }
}
