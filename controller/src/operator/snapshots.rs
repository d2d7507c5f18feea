//! CloudfsSnapshot: takes an engine snapshot of the PVC's volume (through its mount when it is
//! mounted, on whichever node), reports it in status, and deletes it with the resource
//! (a finalizer) unless the resource says `Retain`.

use std::sync::Arc;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};

use super::Context;
use super::error::OperatorError;
use super::resolve::{claimed_volume, credentials};
use super::status::{announce, condition, failed_condition, give_up_or_retry, now, patch_status};
use crate::backend::Pool;
use crate::crd::{CloudfsSnapshot, CloudfsSnapshotStatus, DeletionPolicy, FINALIZER};
use cloudfs::mailbox;
use cloudfs::snapshot;
use cloudfs::volume::VolumeError;
use cloudfs_csi::volume_id::VolumeId;

/// The engine name of the snapshot a resource owns: stable across restarts, unique per
/// resource.
pub fn engine_name(object: &CloudfsSnapshot) -> Result<String, OperatorError> {
    let uid = object
        .uid()
        .ok_or_else(|| OperatorError::Invalid("the resource has no uid yet".into()))?;
    Ok(format!("k8s-{uid}"))
}

/// The engine snapshot and the volume of a CSI-style snapshot id `<snapshot>@<volume id>`.
pub fn parse_snapshot_id(id: &str) -> Option<(String, VolumeId)> {
    let (name, volume) = id.split_once('@')?;
    Some((name.to_owned(), VolumeId::parse(volume)?))
}

pub async fn reconcile(
    object: Arc<CloudfsSnapshot>,
    ctx: Arc<Context>,
) -> Result<Action, OperatorError> {
    let namespace = object
        .namespace()
        .ok_or_else(|| OperatorError::Invalid("a CloudfsSnapshot is namespaced".into()))?;
    let api: Api<CloudfsSnapshot> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, object, |event| async {
        match event {
            Finalizer::Apply(object) => apply(&api, &object, &ctx).await,
            Finalizer::Cleanup(object) => cleanup(&object, &ctx).await,
        }
    })
    .await
    .map_err(OperatorError::from)
}

async fn apply(
    api: &Api<CloudfsSnapshot>,
    object: &CloudfsSnapshot,
    ctx: &Context,
) -> Result<Action, OperatorError> {
    let previous = object.status.clone().unwrap_or_default();
    if previous.ready_to_use {
        return Ok(Action::await_change());
    }
    match take(object, ctx).await {
        Ok(status) => {
            patch_status(api, object, &status).await?;
            announce(
                &ctx.recorder,
                object,
                false,
                "SnapshotReady",
                "Snapshot",
                format!(
                    "snapshot {} of PVC {}: {} files, {} bytes",
                    status.snapshot_id.as_deref().unwrap_or_default(),
                    object.spec.pvc_name,
                    status.files.unwrap_or_default(),
                    status.logical_bytes.unwrap_or_default()
                ),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(e) => {
            let phase = if e.is_permanent() {
                "Failed"
            } else {
                "Pending"
            };
            let status = CloudfsSnapshotStatus {
                phase: Some(phase.into()),
                observed_generation: object.meta().generation,
                conditions: failed_condition(
                    &previous.conditions,
                    "Ready",
                    &e,
                    object.meta().generation,
                ),
                ..previous
            };
            patch_status(api, object, &status).await?;
            give_up_or_retry(&ctx.recorder, object, "Snapshot", e).await
        }
    }
}

/// Takes (or finds, after a restart) the engine snapshot; returns the status to report.
async fn take(
    object: &CloudfsSnapshot,
    ctx: &Context,
) -> Result<CloudfsSnapshotStatus, OperatorError> {
    let namespace = object.namespace().unwrap_or_default();
    let claimed = claimed_volume(&ctx.client, &namespace, &object.spec.pvc_name).await?;
    let keys = credentials(&ctx.client, claimed.secret.as_ref()).await?;
    let pool = Pool::open(&claimed.id.pool, &keys)?;
    let name = engine_name(object)?;
    let volume = &claimed.id.volume;
    let info = match snapshot::show(pool.store.as_ref(), volume, &name).await {
        Ok(existing) => existing,
        Err(VolumeError::SnapshotNotFound { .. }) => {
            mailbox::snapshot(
                pool.store.as_ref(),
                &pool.blocks,
                volume,
                &name,
                pool.scratch.path(),
                ctx.config.mount_answer_timeout,
            )
            .await?
        }
        Err(e) => return Err(e.into()),
    };
    let unique = snapshot::list_with_unique_bytes(
        pool.store.as_ref(),
        &pool.blocks,
        volume,
        pool.scratch.path(),
    )
    .await?
    .into_iter()
    .find(|s| s.name == name)
    .and_then(|s| s.unique_bytes);
    let previous = object.status.clone().unwrap_or_default();
    Ok(CloudfsSnapshotStatus {
        phase: Some("Ready".into()),
        ready_to_use: true,
        snapshot_id: Some(format!("{name}@{}", claimed.id)),
        secret_ref: claimed.secret,
        creation_time: Some(now()),
        files: Some(info.files),
        logical_bytes: Some(info.logical_bytes),
        unique_bytes: unique,
        observed_generation: object.meta().generation,
        conditions: condition(
            &previous.conditions,
            "Ready",
            true,
            "SnapshotTaken",
            format!("engine snapshot {name} of volume {}", claimed.id),
            object.meta().generation,
        ),
    })
}

/// Deletes the engine snapshot (unless retained) before the resource goes.
async fn cleanup(object: &CloudfsSnapshot, ctx: &Context) -> Result<Action, OperatorError> {
    let status = object.status.clone().unwrap_or_default();
    let Some((name, volume)) = status.snapshot_id.as_deref().and_then(parse_snapshot_id) else {
        return Ok(Action::await_change()); // nothing was taken
    };
    if object.spec.deletion_policy == DeletionPolicy::Retain {
        announce(
            &ctx.recorder,
            object,
            false,
            "SnapshotRetained",
            "Delete",
            format!("snapshot {name} of volume {volume} stays in the pool"),
        )
        .await;
        return Ok(Action::await_change());
    }
    let keys = credentials(&ctx.client, status.secret_ref.as_ref()).await?;
    let pool = Pool::open(&volume.pool, &keys)?;
    match snapshot::delete(pool.store.as_ref(), &volume.volume, &name).await {
        Ok(()) | Err(VolumeError::SnapshotNotFound { .. } | VolumeError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    announce(
        &ctx.recorder,
        object,
        false,
        "SnapshotDeleted",
        "Delete",
        format!("deleted snapshot {name} of volume {volume}"),
    )
    .await;
    Ok(Action::await_change())
}
