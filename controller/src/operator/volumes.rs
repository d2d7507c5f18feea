//! CloudfsVolume: a read-only view of each PersistentVolume of the cloudfs driver. The view has
//! the PV's name and is owned by it (so it goes with the PV); every refresh reads the volume's
//! usage from its newest replicated metadata, its writer from its lease and the time its
//! metadata last reached the pool.

use std::sync::Arc;

use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::error::OperatorError;
use super::resolve::{claimed_volume, credentials, volume_of, volume_secret};
use super::status::{condition, failed_condition, now, patch_status};
use super::{Context, OPERATOR_NAME};
use crate::backend::Pool;
use crate::crd::{CloudfsVolume, CloudfsVolumeSpec, CloudfsVolumeStatus};
use cloudfs::{inspect, lease, volume};
use cloudfs_csi::volume_id::VolumeId;

pub async fn reconcile(
    pv: Arc<PersistentVolume>,
    ctx: Arc<Context>,
) -> Result<Action, OperatorError> {
    let Some(id) = volume_of(&pv) else {
        return Ok(Action::await_change());
    };
    if pv.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let api: Api<CloudfsVolume> = Api::all(ctx.client.clone());
    let name = pv.name_any();
    let view = CloudfsVolume {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            owner_references: pv.controller_owner_ref(&()).map(|owner| {
                vec![OwnerReference {
                    // Blocking the PV's deletion would need rights on its finalizers.
                    block_owner_deletion: None,
                    ..owner
                }]
            }),
            ..ObjectMeta::default()
        },
        spec: CloudfsVolumeSpec {
            persistent_volume_name: name.clone(),
            volume_handle: id.to_string(),
        },
        status: None,
    };
    let view = api
        .patch(
            &name,
            &PatchParams::apply(OPERATOR_NAME).force(),
            &Patch::Apply(&view),
        )
        .await?;
    let previous = view.status.clone().unwrap_or_default();
    let claim = pv
        .spec
        .as_ref()
        .and_then(|spec| spec.claim_ref.as_ref())
        .and_then(|claim| Some((claim.namespace.clone()?, claim.name.clone()?)));
    match observe(&pv, &id, claim.as_ref(), &ctx).await {
        Ok(observed) => {
            let status = CloudfsVolumeStatus {
                conditions: condition(
                    &previous.conditions,
                    "Observed",
                    true,
                    "Observed",
                    "read from the pool",
                    view.meta().generation,
                ),
                ..observed
            };
            patch_status(&api, &view, &status).await?;
            Ok(Action::requeue(ctx.config.volume_refresh))
        }
        Err(e) => {
            let status = CloudfsVolumeStatus {
                observed_time: Some(now()),
                conditions: failed_condition(
                    &previous.conditions,
                    "Observed",
                    &e,
                    view.meta().generation,
                ),
                ..previous
            };
            patch_status(&api, &view, &status).await?;
            Err(e)
        }
    }
}

/// What the pool says of volume `id` now.
async fn observe(
    pv: &PersistentVolume,
    id: &VolumeId,
    claim: Option<&(String, String)>,
    ctx: &Context,
) -> Result<CloudfsVolumeStatus, OperatorError> {
    let secret = match (volume_secret(pv), claim) {
        (Some(secret), _) => Some(secret),
        (None, Some((namespace, name))) => {
            claimed_volume(&ctx.client, namespace, name).await?.secret
        }
        (None, None) => None,
    };
    let keys = credentials(&ctx.client, secret.as_ref()).await?;
    let pool = Pool::open(&id.pool, &keys)?;
    let store = pool.store.as_ref();
    let stats = inspect::stats(store, &pool.blocks, &id.volume, pool.scratch.path()).await?;
    let writer = lease::live_holder(store, &id.volume).await?;
    let replicated = volume::last_replicated(store, &id.volume).await?;
    Ok(CloudfsVolumeStatus {
        claim: claim.map(|(namespace, name)| format!("{namespace}/{name}")),
        capacity_bytes: stats.quota_bytes,
        files: Some(stats.files),
        directories: Some(stats.directories),
        logical_bytes: Some(stats.logical_bytes),
        stored_bytes: Some(stats.stored_bytes),
        dedup_ratio: Some((stats.dedup_ratio * 100.0).round() / 100.0),
        last_replication_time: replicated.and_then(|secs| {
            k8s_openapi::jiff::Timestamp::from_second(secs)
                .ok()
                .map(Time)
        }),
        writer: writer.map(|holder| holder.holder),
        observed_time: Some(now()),
        conditions: Vec::new(),
    })
}
