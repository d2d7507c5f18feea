//! The CSI Controller service: volumes and snapshots as the external provisioner and
//! snapshotter ask for them, over a [`VolumeBackend`] (the engine, in `cloudfs-controller`).
//!
//! Ids carry their pool, because later calls carry nothing else: a volume is
//! `<volume>@<pool URL>` ([`VolumeId`]), a snapshot `<snapshot>@<volume id>`. Capacity is the
//! volume's quota. Every call validates its request first, and a second call on a volume
//! (or snapshot) while one is in flight is refused with `Aborted`.

use std::collections::HashMap;

use tonic::{Request, Response, Status};

use crate::mount_options::MountOptions;
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::{self, rpc};
use crate::proto::volume_content_source::{self, SnapshotSource, VolumeSource};
use crate::proto::{
    ControllerExpandVolumeRequest, ControllerExpandVolumeResponse,
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse,
    ControllerServiceCapability, CreateSnapshotRequest, CreateSnapshotResponse,
    CreateVolumeRequest, CreateVolumeResponse, DeleteSnapshotRequest, DeleteSnapshotResponse,
    DeleteVolumeRequest, DeleteVolumeResponse, GetSnapshotRequest, GetSnapshotResponse,
    ListSnapshotsRequest, ListSnapshotsResponse, ListVolumesRequest, ListVolumesResponse, Snapshot,
    ValidateVolumeCapabilitiesRequest, ValidateVolumeCapabilitiesResponse, Volume,
    VolumeCapability, VolumeContentSource, list_snapshots_response, list_volumes_response,
    validate_volume_capabilities_response,
};
use crate::request::{self, InFlight, required};
use crate::volume_id::VolumeId;

/// CSI secrets: the keys of the `cloudfs` credentials file. Never logged.
pub type Secrets = HashMap<String, String>;

/// Errors of a backend, each mapped to the gRPC code the spec names.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<BackendError> for Status {
    fn from(e: BackendError) -> Status {
        match e {
            BackendError::NotFound(m) => Status::not_found(m),
            BackendError::AlreadyExists(m) => Status::already_exists(m),
            BackendError::InvalidArgument(m) => Status::invalid_argument(m),
            BackendError::Unauthenticated(m) => Status::unauthenticated(m),
            BackendError::FailedPrecondition(m) => Status::failed_precondition(m),
            BackendError::Unavailable(m) => Status::unavailable(m),
            BackendError::Internal(m) => Status::internal(m),
        }
    }
}

/// A snapshot as the backend reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub name: String,
    pub volume: VolumeId,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// Logical bytes of the files it holds.
    pub size_bytes: u64,
}

/// What a new volume starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Empty,
    Snapshot { volume: VolumeId, name: String },
    Volume(VolumeId),
}

/// The pools behind the Controller service.
#[tonic::async_trait]
pub trait VolumeBackend: Send + Sync + 'static {
    /// The pool a volume created with these StorageClass parameters goes to.
    fn pool_for(&self, parameters: &HashMap<String, String>) -> Result<String, BackendError>;
    /// The pools `ListVolumes` and an unfiltered `ListSnapshots` look in.
    fn listed_pools(&self) -> Vec<String>;
    /// The quota of volume `id`, `None` when it does not exist (`Some(None)`: no quota).
    async fn volume_quota(
        &self,
        id: &VolumeId,
        secrets: &Secrets,
    ) -> Result<Option<Option<u64>>, BackendError>;
    /// Creates volume `id` from `origin` with `quota`.
    async fn create_volume(
        &self,
        id: &VolumeId,
        quota: Option<u64>,
        origin: &Origin,
        secrets: &Secrets,
    ) -> Result<(), BackendError>;
    /// Deletes volume `id`; a missing one is not an error.
    async fn delete_volume(&self, id: &VolumeId, secrets: &Secrets) -> Result<(), BackendError>;
    async fn set_quota(
        &self,
        id: &VolumeId,
        quota: Option<u64>,
        secrets: &Secrets,
    ) -> Result<(), BackendError>;
    /// The volumes of `pool` with their quotas.
    async fn list_volumes(&self, pool: &str) -> Result<Vec<(VolumeId, Option<u64>)>, BackendError>;
    /// Pins volume `volume` as snapshot `name`, or finds that snapshot if it exists.
    async fn create_snapshot(
        &self,
        volume: &VolumeId,
        name: &str,
        secrets: &Secrets,
    ) -> Result<SnapshotRecord, BackendError>;
    /// Deletes a snapshot; a missing one is not an error.
    async fn delete_snapshot(
        &self,
        volume: &VolumeId,
        name: &str,
        secrets: &Secrets,
    ) -> Result<(), BackendError>;
    /// The snapshots of `volume` (none when the volume does not exist).
    async fn list_snapshots(
        &self,
        volume: &VolumeId,
        secrets: &Secrets,
    ) -> Result<Vec<SnapshotRecord>, BackendError>;
}

/// `<snapshot>@<volume id>`.
pub fn snapshot_id(record: &SnapshotRecord) -> String {
    format!("{}@{}", record.name, record.volume)
}

/// Splits a snapshot id; `None` when it is not one cloudfs hands out.
pub fn parse_snapshot_id(id: &str) -> Option<(String, VolumeId)> {
    let (name, volume) = id.split_once('@')?;
    let volume = VolumeId::parse(volume)?;
    cloudfs_name(name).then(|| (name.to_owned(), volume))
}

/// Whether `name` may name a cloudfs volume or snapshot.
fn cloudfs_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The cloudfs name for a CSI name: itself when it is one, else a digest of it (the same
/// name always maps to the same volume, which keeps creation idempotent).
pub fn name_for(csi_name: &str) -> String {
    if cloudfs_name(csi_name) {
        csi_name.to_owned()
    } else {
        format!("n-{}", &blake3::hash(csi_name.as_bytes()).to_hex()[..40])
    }
}

/// Checks requested capabilities; `Err` says what cloudfs cannot offer.
fn check_capabilities(capabilities: &[VolumeCapability]) -> Result<(), String> {
    if capabilities.is_empty() {
        return Err("volume_capabilities are required".into());
    }
    for capability in capabilities {
        request::reader_only(capability)?;
    }
    Ok(())
}

/// The quota a capacity range asks for: its requirement, else its limit (0: none).
fn quota_of(range: Option<&crate::proto::CapacityRange>) -> Result<Option<u64>, Status> {
    let Some(range) = range else {
        return Ok(None);
    };
    if range.required_bytes < 0 || range.limit_bytes < 0 {
        return Err(Status::invalid_argument("capacity cannot be negative"));
    }
    if range.limit_bytes > 0 && range.required_bytes > range.limit_bytes {
        return Err(Status::out_of_range("required_bytes exceeds limit_bytes"));
    }
    let bytes = if range.required_bytes > 0 {
        range.required_bytes
    } else {
        range.limit_bytes
    };
    Ok((bytes > 0).then_some(bytes as u64))
}

/// Pages of a listing: `starting_token` is the index of the first entry to return.
fn page<T>(entries: Vec<T>, max: i32, token: &str) -> Result<(Vec<T>, String), Status> {
    if max < 0 {
        return Err(Status::invalid_argument("max_entries cannot be negative"));
    }
    let start: usize = if token.is_empty() {
        0
    } else {
        token
            .parse()
            .ok()
            .filter(|start| *start <= entries.len())
            .ok_or_else(|| Status::aborted(format!("starting_token {token:?} is not valid")))?
    };
    let count = if max == 0 { usize::MAX } else { max as usize };
    let end = start.saturating_add(count).min(entries.len());
    let next = if end < entries.len() {
        end.to_string()
    } else {
        String::new()
    };
    Ok((
        entries.into_iter().skip(start).take(end - start).collect(),
        next,
    ))
}

fn volume_message(
    id: &VolumeId,
    quota: Option<u64>,
    source: Option<VolumeContentSource>,
    volume_context: HashMap<String, String>,
) -> Volume {
    Volume {
        capacity_bytes: quota.map_or(0, |q| i64::try_from(q).unwrap_or(i64::MAX)),
        volume_id: id.to_string(),
        volume_context,
        content_source: source,
        accessible_topology: Vec::new(),
    }
}

fn snapshot_message(record: &SnapshotRecord) -> Snapshot {
    Snapshot {
        size_bytes: i64::try_from(record.size_bytes).unwrap_or(i64::MAX),
        snapshot_id: snapshot_id(record),
        source_volume_id: record.volume.to_string(),
        creation_time: Some(prost_types::Timestamp {
            seconds: record.created_at,
            nanos: 0,
        }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

/// The Controller service.
pub struct ControllerService<B> {
    backend: B,
    in_flight: InFlight,
}

impl<B: VolumeBackend> ControllerService<B> {
    pub fn new(backend: B) -> ControllerService<B> {
        ControllerService {
            backend,
            in_flight: InFlight::default(),
        }
    }

    /// Where a CreateVolume's content comes from.
    async fn origin(
        &self,
        source: Option<&VolumeContentSource>,
        secrets: &Secrets,
    ) -> Result<Origin, Status> {
        match source.and_then(|s| s.r#type.as_ref()) {
            None => Ok(Origin::Empty),
            Some(volume_content_source::Type::Snapshot(SnapshotSource { snapshot_id })) => {
                let (name, volume) = parse_snapshot_id(snapshot_id)
                    .ok_or_else(|| Status::not_found(format!("no snapshot {snapshot_id}")))?;
                let exists = self
                    .backend
                    .list_snapshots(&volume, secrets)
                    .await?
                    .iter()
                    .any(|s| s.name == name);
                if !exists {
                    return Err(Status::not_found(format!("no snapshot {snapshot_id}")));
                }
                Ok(Origin::Snapshot { volume, name })
            }
            Some(volume_content_source::Type::Volume(VolumeSource { volume_id })) => {
                let volume = VolumeId::parse(volume_id)
                    .ok_or_else(|| Status::not_found(format!("no volume {volume_id}")))?;
                if self.backend.volume_quota(&volume, secrets).await?.is_none() {
                    return Err(Status::not_found(format!("no volume {volume_id}")));
                }
                Ok(Origin::Volume(volume))
            }
        }
    }
}

#[tonic::async_trait]
impl<B: VolumeBackend> Controller for ControllerService<B> {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = required(&r.name, "name")?;
        check_capabilities(&r.volume_capabilities).map_err(Status::invalid_argument)?;
        let quota = quota_of(r.capacity_range.as_ref())?;
        let options =
            MountOptions::from_parameters(&r.parameters).map_err(Status::invalid_argument)?;
        let pool = self.backend.pool_for(&r.parameters)?;
        let id = VolumeId {
            volume: name_for(name),
            pool,
        };
        let _claim = self.in_flight.claim(&id.to_string())?;
        let origin = self
            .origin(r.volume_content_source.as_ref(), &r.secrets)
            .await?;
        match self.backend.volume_quota(&id, &r.secrets).await? {
            Some(existing) if existing == quota => {}
            Some(_) => {
                return Err(Status::already_exists(format!(
                    "volume {name} exists with another capacity"
                )));
            }
            None => {
                self.backend
                    .create_volume(&id, quota, &origin, &r.secrets)
                    .await?;
                tracing::info!(volume = %id, ?quota, "created");
            }
        }
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume_message(
                &id,
                quota,
                r.volume_content_source,
                options.to_context(),
            )),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = required(&r.volume_id, "volume_id")?;
        // An id cloudfs never handed out names no volume: deleting it is done already.
        if let Some(id) = VolumeId::parse(volume_id) {
            let _claim = self.in_flight.claim(volume_id)?;
            self.backend.delete_volume(&id, &r.secrets).await?;
            tracing::info!(volume = volume_id, "deleted");
        }
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        let volume_id = required(&r.volume_id, "volume_id")?;
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities are required"));
        }
        let id = VolumeId::parse(volume_id)
            .ok_or_else(|| Status::not_found(format!("no volume {volume_id}")))?;
        if self.backend.volume_quota(&id, &r.secrets).await?.is_none() {
            return Err(Status::not_found(format!("no volume {volume_id}")));
        }
        let response = match check_capabilities(&r.volume_capabilities) {
            Ok(()) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: HashMap::new(),
                }),
                message: String::new(),
            },
            Err(why) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
        };
        Ok(Response::new(response))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let r = request.into_inner();
        let mut all = Vec::new();
        for pool in self.backend.listed_pools() {
            all.extend(self.backend.list_volumes(&pool).await?);
        }
        all.sort_by_key(|(id, _)| id.to_string());
        let (entries, next_token) = page(all, r.max_entries, &r.starting_token)?;
        Ok(Response::new(ListVolumesResponse {
            entries: entries
                .into_iter()
                .map(|(id, quota)| list_volumes_response::Entry {
                    volume: Some(volume_message(&id, quota, None, HashMap::new())),
                    status: None,
                })
                .collect(),
            next_token,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
            rpc::Type::GetSnapshot,
            rpc::Type::CloneVolume,
            rpc::Type::ExpandVolume,
            rpc::Type::ListVolumes,
            rpc::Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(
                controller_service_capability::Rpc { r#type: t.into() },
            )),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let source = required(&r.source_volume_id, "source_volume_id")?;
        let name = required(&r.name, "name")?;
        let volume = VolumeId::parse(source)
            .ok_or_else(|| Status::not_found(format!("no volume {source}")))?;
        let snapshot = name_for(name);
        let _claim = self.in_flight.claim(&format!("{snapshot}@{volume}"))?;
        // Snapshot names are unique across volumes (the external snapshotter relies on it).
        for pool in self.backend.listed_pools() {
            for (other, _) in self.backend.list_volumes(&pool).await? {
                if other != volume
                    && self
                        .backend
                        .list_snapshots(&other, &r.secrets)
                        .await?
                        .iter()
                        .any(|s| s.name == snapshot)
                {
                    return Err(Status::already_exists(format!(
                        "snapshot {name} exists for another volume"
                    )));
                }
            }
        }
        if self
            .backend
            .volume_quota(&volume, &r.secrets)
            .await?
            .is_none()
        {
            return Err(Status::not_found(format!("no volume {source}")));
        }
        let record = self
            .backend
            .create_snapshot(&volume, &snapshot, &r.secrets)
            .await?;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(snapshot_message(&record)),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let r = request.into_inner();
        let snapshot_id = required(&r.snapshot_id, "snapshot_id")?;
        if let Some((name, volume)) = parse_snapshot_id(snapshot_id) {
            let _claim = self.in_flight.claim(snapshot_id)?;
            self.backend
                .delete_snapshot(&volume, &name, &r.secrets)
                .await?;
        }
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        let mut all: Vec<SnapshotRecord> = Vec::new();
        if !r.snapshot_id.is_empty() {
            if let Some((name, volume)) = parse_snapshot_id(&r.snapshot_id) {
                all.extend(
                    self.backend
                        .list_snapshots(&volume, &r.secrets)
                        .await?
                        .into_iter()
                        .filter(|s| s.name == name),
                );
            }
        } else if !r.source_volume_id.is_empty() {
            if let Some(volume) = VolumeId::parse(&r.source_volume_id) {
                all.extend(self.backend.list_snapshots(&volume, &r.secrets).await?);
            }
        } else {
            for pool in self.backend.listed_pools() {
                for (volume, _) in self.backend.list_volumes(&pool).await? {
                    all.extend(self.backend.list_snapshots(&volume, &r.secrets).await?);
                }
            }
        }
        if !r.source_volume_id.is_empty() {
            all.retain(|s| s.volume.to_string() == r.source_volume_id);
        }
        all.sort_by_key(snapshot_id);
        let (entries, next_token) = page(all, r.max_entries, &r.starting_token)?;
        Ok(Response::new(ListSnapshotsResponse {
            entries: entries
                .iter()
                .map(|record| list_snapshots_response::Entry {
                    snapshot: Some(snapshot_message(record)),
                })
                .collect(),
            next_token,
        }))
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let r = request.into_inner();
        let snapshot_id = required(&r.snapshot_id, "snapshot_id")?;
        let missing = || Status::not_found(format!("no snapshot {snapshot_id}"));
        let (name, volume) = parse_snapshot_id(snapshot_id).ok_or_else(missing)?;
        let record = self
            .backend
            .list_snapshots(&volume, &r.secrets)
            .await?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(missing)?;
        Ok(Response::new(GetSnapshotResponse {
            snapshot: Some(snapshot_message(&record)),
        }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = required(&r.volume_id, "volume_id")?;
        let quota = quota_of(r.capacity_range.as_ref())?
            .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        let id = VolumeId::parse(volume_id)
            .ok_or_else(|| Status::not_found(format!("no volume {volume_id}")))?;
        let _claim = self.in_flight.claim(volume_id)?;
        let current = self
            .backend
            .volume_quota(&id, &r.secrets)
            .await?
            .ok_or_else(|| Status::not_found(format!("no volume {volume_id}")))?;
        // A quota only grows here (a volume without one has room for anything already), and
        // the answer is the capacity the volume has: a smaller request leaves it as it is.
        let capacity = match current {
            Some(current) if current < quota => {
                self.backend.set_quota(&id, Some(quota), &r.secrets).await?;
                tracing::info!(volume = volume_id, quota, "expanded");
                quota
            }
            Some(current) => {
                let limit = r
                    .capacity_range
                    .as_ref()
                    .map_or(0, |range| range.limit_bytes);
                if limit > 0 && current > limit as u64 {
                    return Err(Status::out_of_range(format!(
                        "volume {volume_id} has {current} bytes already, over limit_bytes {limit}"
                    )));
                }
                current
            }
            None => quota,
        };
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: i64::try_from(capacity).unwrap_or(i64::MAX),
            node_expansion_required: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_their_tokens() {
        let all: Vec<u32> = (0..5).collect();
        let (first, next) = page(all.clone(), 2, "").expect("page");
        assert_eq!((first, next.as_str()), (vec![0, 1], "2"));
        let (last, next) = page(all.clone(), 10, "4").expect("page");
        assert_eq!((last, next.as_str()), (vec![4], ""));
        assert_eq!(page(all.clone(), 0, "").expect("page").0.len(), 5);
        assert_eq!(
            page(all.clone(), 1, "nope")
                .map(|_| ())
                .expect_err("bad")
                .code(),
            tonic::Code::Aborted
        );
        assert_eq!(
            page(all, -1, "").map(|_| ()).expect_err("bad").code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn names_map_to_cloudfs_names_stably() {
        assert_eq!(name_for("pvc-123"), "pvc-123");
        let odd = name_for("sanity/with space");
        assert!(cloudfs_name(&odd) && odd == name_for("sanity/with space"));
        let id = "snap-1@vol@swift://pool";
        let (name, volume) = parse_snapshot_id(id).expect("parse");
        assert_eq!(
            snapshot_id(&SnapshotRecord {
                name,
                volume,
                created_at: 0,
                size_bytes: 0
            }),
            id
        );
        assert_eq!(parse_snapshot_id("snap-1"), None);
    }

    #[test]
    fn capacity_is_the_requirement_or_the_limit() {
        let range = |required_bytes, limit_bytes| crate::proto::CapacityRange {
            required_bytes,
            limit_bytes,
        };
        assert_eq!(quota_of(None).ok(), Some(None));
        assert_eq!(quota_of(Some(&range(10, 0))).ok(), Some(Some(10)));
        assert_eq!(quota_of(Some(&range(0, 20))).ok(), Some(Some(20)));
        assert_eq!(quota_of(Some(&range(10, 20))).ok(), Some(Some(10)));
        assert!(quota_of(Some(&range(30, 20))).is_err());
    }
}
