//! The cloudfs custom resources (`cloudfs.io/v1alpha1`): what a user asks for in `spec`, and
//! what the operator reports in `status`. `crdgen` prints their CustomResourceDefinitions.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every cloudfs resource.
pub const GROUP: &str = "cloudfs.io";
/// Finalizer that keeps a resource until the engine state it owns is cleaned up.
pub const FINALIZER: &str = "cloudfs.io/cleanup";

/// A DNS-1123 label (the names of PVCs and of cloudfs resources).
const NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A Go-style duration: `30s`, `15m`, `24h`, `1h30m`.
const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h|d))+$";
/// Five cron fields (minute hour day-of-month month day-of-week), or an `@` shorthand.
const CRON_PATTERN: &str = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|([0-9*/,\-]+|[A-Za-z]{3})( +([0-9*/,\-?]+|[A-Za-z]{3}(-[A-Za-z]{3})?)){4})$";

/// What happens to the engine snapshot when its CloudfsSnapshot is deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// The snapshot is deleted with the resource.
    #[default]
    Delete,
    /// The snapshot stays in the pool (delete it with `cloudfs snapshot delete`).
    Retain,
}

/// A snapshot of the cloudfs volume behind a PersistentVolumeClaim: instant, metadata only.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cloudfs.io",
    version = "v1alpha1",
    kind = "CloudfsSnapshot",
    namespaced,
    status = "CloudfsSnapshotStatus",
    shortname = "cfsnap",
    category = "cloudfs",
    printcolumn = r#"{"name":"PVC","type":"string","jsonPath":".spec.pvcName"}"#,
    printcolumn = r#"{"name":"Ready","type":"boolean","jsonPath":".status.readyToUse"}"#,
    printcolumn = r#"{"name":"Files","type":"integer","jsonPath":".status.files"}"#,
    printcolumn = r#"{"name":"Logical","type":"integer","jsonPath":".status.logicalBytes"}"#,
    printcolumn = r#"{"name":"Unique","type":"integer","jsonPath":".status.uniqueBytes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CloudfsSnapshotSpec {
    /// The PersistentVolumeClaim (in this namespace) whose volume is snapshotted.
    #[schemars(regex(pattern = NAME_PATTERN), length(max = 253))]
    pub pvc_name: String,
    /// `Delete` (default) removes the snapshot from the pool with this resource; `Retain`
    /// keeps it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Where a CloudfsSnapshot stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudfsSnapshotStatus {
    /// `Pending`, `Ready` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default)]
    pub ready_to_use: bool,
    /// The engine snapshot: `<snapshot>@<volume>@<pool>` (the CSI snapshot id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// The Secret whose credentials reach the pool (kept to delete the snapshot even after
    /// the PVC is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_bytes: Option<u64>,
    /// Bytes only this snapshot references (what deleting it would free).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Rolls the volume behind a PersistentVolumeClaim back to a CloudfsSnapshot, once. A mounted
/// volume switches in place, through its mount.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cloudfs.io",
    version = "v1alpha1",
    kind = "CloudfsRollback",
    namespaced,
    status = "CloudfsRollbackStatus",
    shortname = "cfrb",
    category = "cloudfs",
    printcolumn = r#"{"name":"PVC","type":"string","jsonPath":".spec.pvcName"}"#,
    printcolumn = r#"{"name":"Snapshot","type":"string","jsonPath":".spec.snapshotName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CloudfsRollbackSpec {
    /// The PersistentVolumeClaim (in this namespace) whose volume is rolled back.
    #[schemars(regex(pattern = NAME_PATTERN), length(max = 253))]
    pub pvc_name: String,
    /// The CloudfsSnapshot (in this namespace, of the same PVC) to roll back to.
    #[schemars(regex(pattern = NAME_PATTERN), length(max = 253))]
    pub snapshot_name: String,
}

/// Where a CloudfsRollback stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudfsRollbackStatus {
    /// `Pending`, `Running`, `Succeeded` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The automatic snapshot holding the state rolled back from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_state_snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A reference to a Secret holding Swift credentials (the keys of the `cloudfs` credentials
/// file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    #[schemars(regex(pattern = NAME_PATTERN), length(max = 253))]
    pub name: String,
    #[schemars(regex(pattern = NAME_PATTERN), length(max = 63))]
    pub namespace: String,
}

/// The pool a garbage collection cleans: a StorageClass of cloudfs, or a store URL and the
/// Secret with its credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolReference {
    /// A StorageClass provisioned by cloudfs: its `pool` parameter and provisioner secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// A store URL (`swift://<container>`), when no StorageClass is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Credentials for `url` (or instead of the StorageClass's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,
}

/// Garbage collection of a pool, on a schedule or on demand, each run a Kubernetes Job
/// running `cloudfs gc`.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cloudfs.io",
    version = "v1alpha1",
    kind = "CloudfsGarbageCollection",
    status = "CloudfsGarbageCollectionStatus",
    shortname = "cfgc",
    category = "cloudfs",
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Last result","type":"string","jsonPath":".status.lastRun.result"}"#,
    printcolumn = r#"{"name":"Reclaimed","type":"integer","jsonPath":".status.lastRun.bytesReclaimed"}"#,
    printcolumn = r#"{"name":"Next run","type":"date","jsonPath":".status.nextRun"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CloudfsGarbageCollectionSpec {
    pub pool: PoolReference,
    /// When to collect, in cron syntax (`0 3 * * *`); none: only on `runNow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = CRON_PATTERN))]
    pub schedule: Option<String>,
    /// Blocks younger than this are never collected (they may belong to writes in flight).
    #[serde(default = "default_grace_period")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub grace_period: String,
    /// Report what would be deleted, delete nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Set to a new value (a timestamp, a counter) to run once now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_now: Option<String>,
    /// Finished runs (and their Jobs) to keep.
    #[serde(default = "default_history_limit")]
    #[schemars(range(min = 1, max = 100))]
    pub history_limit: u32,
}

fn default_grace_period() -> String {
    "24h".into()
}

fn default_history_limit() -> u32 {
    3
}

/// One collection run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CollectionRun {
    /// The Job that ran it.
    pub job_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// `Running`, `Succeeded` or `Failed`.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scanned: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_reclaimed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a CloudfsGarbageCollection stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudfsGarbageCollectionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<CollectionRun>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<Time>,
    /// The `runNow` value last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_now: Option<String>,
    /// Finished runs, newest first, at most `historyLimit`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<CollectionRun>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A read-only view of one provisioned cloudfs volume, which the operator keeps for each
/// PersistentVolume of the cloudfs driver (under the PV's name, owned by it) and refreshes
/// periodically: `kubectl get cloudfsvolumes` tells the state of the storage at a glance.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cloudfs.io",
    version = "v1alpha1",
    kind = "CloudfsVolume",
    status = "CloudfsVolumeStatus",
    shortname = "cfvol",
    category = "cloudfs",
    printcolumn = r#"{"name":"Claim","type":"string","jsonPath":".status.claim"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".status.capacityBytes"}"#,
    printcolumn = r#"{"name":"Files","type":"integer","jsonPath":".status.files"}"#,
    printcolumn = r#"{"name":"Logical","type":"integer","jsonPath":".status.logicalBytes"}"#,
    printcolumn = r#"{"name":"Dedup","type":"number","jsonPath":".status.dedupRatio"}"#,
    printcolumn = r#"{"name":"Writer","type":"string","jsonPath":".status.writer"}"#,
    printcolumn = r#"{"name":"Replicated","type":"date","jsonPath":".status.lastReplicationTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CloudfsVolumeSpec {
    /// The PersistentVolume this view follows (the view has its name).
    pub persistent_volume_name: String,
    /// The cloudfs volume: `<volume>@<pool>` (the CSI volume handle).
    pub volume_handle: String,
}

/// What the pool says of a volume, as of `observedTime`. Usage comes from the newest
/// metadata replicated to the pool, so it trails a busy mount by up to its sync interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudfsVolumeStatus {
    /// The bound claim, `<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// The quota (the claim's capacity); none: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directories: Option<u64>,
    /// Bytes the files hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_bytes: Option<u64>,
    /// Bytes of the distinct blocks the files use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
    /// Logical over stored bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_ratio: Option<f64>,
    /// When the volume's metadata last reached the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_replication_time: Option<Time>,
    /// Who holds the volume's writer lease (a read-write mount: `<host>:<pid>`); none: nobody.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    /// When the operator last looked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Every definition, with the file name `manifests/crds/` keeps it under.
pub fn definitions() -> Vec<(String, CustomResourceDefinition)> {
    [
        CloudfsSnapshot::crd(),
        CloudfsRollback::crd(),
        CloudfsGarbageCollection::crd(),
        CloudfsVolume::crd(),
    ]
    .into_iter()
    .map(|definition| (format!("{}.yaml", definition.spec.names.plural), definition))
    .collect()
}

/// A definition as the YAML file `crdgen` writes.
pub fn render(definition: &CustomResourceDefinition) -> Result<String, serde_norway::Error> {
    Ok(format!(
        "# Generated by crdgen from controller/src/crd.rs: do not edit.\n{}",
        serde_norway::to_string(definition)?
    ))
}
