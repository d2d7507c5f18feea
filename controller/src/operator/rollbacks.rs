//! CloudfsRollback: rolls the PVC's volume back to a CloudfsSnapshot once (through its mount
//! when it is mounted, on whichever node; in the store otherwise). The state it replaces is
//! pinned under a name derived from the resource, so a restarted operator sees that the
//! rollback happened and does not do it twice.

use std::sync::Arc;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::Context;
use super::error::OperatorError;
use super::resolve::{claimed_volume, credentials};
use super::snapshots::parse_snapshot_id;
use super::status::{announce, condition, failed_condition, give_up_or_retry, now, patch_status};
use crate::backend::Pool;
use crate::crd::{CloudfsRollback, CloudfsRollbackStatus, CloudfsSnapshot};
use cloudfs::mailbox;
use cloudfs::snapshot;
use cloudfs::volume::VolumeError;

const SUCCEEDED: &str = "Succeeded";
const FAILED: &str = "Failed";

/// The snapshot a resource's rollback pins the replaced state under.
fn previous_state_name(object: &CloudfsRollback) -> Result<String, OperatorError> {
    let uid = object
        .uid()
        .ok_or_else(|| OperatorError::Invalid("the resource has no uid yet".into()))?;
    Ok(format!("pre-rollback-k8s-{uid}"))
}

pub async fn reconcile(
    object: Arc<CloudfsRollback>,
    ctx: Arc<Context>,
) -> Result<Action, OperatorError> {
    let namespace = object
        .namespace()
        .ok_or_else(|| OperatorError::Invalid("a CloudfsRollback is namespaced".into()))?;
    let api: Api<CloudfsRollback> = Api::namespaced(ctx.client.clone(), &namespace);
    let previous = object.status.clone().unwrap_or_default();
    if matches!(previous.phase.as_deref(), Some(SUCCEEDED | FAILED)) {
        return Ok(Action::await_change()); // runs once
    }
    let generation = object.meta().generation;
    let started = CloudfsRollbackStatus {
        phase: Some("Running".into()),
        start_time: previous.start_time.clone().or_else(|| Some(now())),
        observed_generation: generation,
        ..previous.clone()
    };
    patch_status(&api, &object, &started).await?;
    match roll_back(&object, &namespace, &ctx).await {
        Ok(previous_state) => {
            let status = CloudfsRollbackStatus {
                phase: Some(SUCCEEDED.into()),
                completion_time: Some(now()),
                previous_state_snapshot: Some(previous_state.clone()),
                conditions: condition(
                    &started.conditions,
                    "Complete",
                    true,
                    "RolledBack",
                    format!(
                        "rolled back to {}; the replaced state is snapshot {previous_state}",
                        object.spec.snapshot_name
                    ),
                    generation,
                ),
                ..started
            };
            patch_status(&api, &object, &status).await?;
            announce(
                &ctx.recorder,
                object.as_ref(),
                false,
                "RolledBack",
                "Rollback",
                format!(
                    "PVC {} rolled back to CloudfsSnapshot {}",
                    object.spec.pvc_name, object.spec.snapshot_name
                ),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(e) => {
            let permanent = e.is_permanent();
            let status = CloudfsRollbackStatus {
                phase: Some(if permanent { FAILED } else { "Pending" }.into()),
                completion_time: permanent.then(now),
                conditions: failed_condition(&started.conditions, "Complete", &e, generation),
                ..started
            };
            patch_status(&api, &object, &status).await?;
            give_up_or_retry(&ctx.recorder, object.as_ref(), "Rollback", e).await
        }
    }
}

/// Does the rollback (or finds it done); returns the snapshot holding the replaced state.
async fn roll_back(
    object: &CloudfsRollback,
    namespace: &str,
    ctx: &Context,
) -> Result<String, OperatorError> {
    let snapshots: Api<CloudfsSnapshot> = Api::namespaced(ctx.client.clone(), namespace);
    let target = snapshots
        .get_opt(&object.spec.snapshot_name)
        .await?
        .ok_or_else(|| {
            OperatorError::Waiting(format!(
                "CloudfsSnapshot {} does not exist (yet)",
                object.spec.snapshot_name
            ))
        })?;
    if target.spec.pvc_name != object.spec.pvc_name {
        return Err(OperatorError::Invalid(format!(
            "CloudfsSnapshot {} is of PVC {}, not {}",
            object.spec.snapshot_name, target.spec.pvc_name, object.spec.pvc_name
        )));
    }
    let (snapshot_name, snapshot_volume) = target
        .status
        .as_ref()
        .filter(|s| s.ready_to_use)
        .and_then(|s| s.snapshot_id.as_deref())
        .and_then(parse_snapshot_id)
        .ok_or_else(|| {
            OperatorError::Waiting(format!(
                "CloudfsSnapshot {} is not ready yet",
                object.spec.snapshot_name
            ))
        })?;
    let claimed = claimed_volume(&ctx.client, namespace, &object.spec.pvc_name).await?;
    if claimed.id != snapshot_volume {
        return Err(OperatorError::Invalid(format!(
            "PVC {} is volume {} now, but the snapshot is of volume {snapshot_volume}",
            object.spec.pvc_name, claimed.id
        )));
    }
    let keys = credentials(&ctx.client, claimed.secret.as_ref()).await?;
    let pool = Pool::open(&claimed.id.pool, &keys)?;
    let previous_state = previous_state_name(object)?;
    let volume = &claimed.id.volume;
    match snapshot::show(pool.store.as_ref(), volume, &previous_state).await {
        Ok(_) => return Ok(previous_state), // done before a restart
        Err(VolumeError::SnapshotNotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    mailbox::rollback(
        pool.store.as_ref(),
        &pool.blocks,
        volume,
        &snapshot_name,
        Some(&previous_state),
        pool.scratch.path(),
        ctx.config.rollback_timeout,
    )
    .await?;
    Ok(previous_state)
}
