//! The operator: reconciles the cloudfs custom resources against the engine's library
//! functions. CloudfsSnapshot takes and deletes engine snapshots, CloudfsRollback rolls a
//! volume back once (both reach a mounted volume through its mount, on whichever node it
//! runs), CloudfsGarbageCollection runs `cloudfs gc` Jobs on a schedule or on demand, and
//! each PersistentVolume of the cloudfs driver gets a CloudfsVolume view, refreshed
//! periodically. Only the replica holding the leader Lease acts. Every reconcile is counted
//! and timed, errors by reason, and failures are retried with a per-resource exponential
//! backoff.

mod collections;
mod error;
mod leader;
mod resolve;
mod rollbacks;
mod snapshots;
mod status;
mod volumes;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudfs_metrics::prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use futures::StreamExt;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource};

use crate::crd::{CloudfsGarbageCollection, CloudfsRollback, CloudfsSnapshot};
pub use error::OperatorError;
use k8s_openapi::api::core::v1::{PersistentVolume, ResourceRequirements};
pub use leader::Leadership;

/// The name of the leader Lease and of the events' reporting controller.
pub const OPERATOR_NAME: &str = "cloudfs-operator";
/// Longest wait before a failed reconcile is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Who this replica is (its pod name), for the Lease and events.
    pub identity: String,
    /// The namespace of the leader Lease (the operator's own).
    pub namespace: String,
    /// How long the leader Lease lasts unrenewed.
    pub lease_duration: Duration,
    /// How long a snapshot waits for a mounted volume's mount to answer.
    pub mount_answer_timeout: Duration,
    /// How long a rollback waits for a mounted volume's mount (it rebuilds metadata first).
    pub rollback_timeout: Duration,
    /// The image of garbage-collection Jobs (it has the `cloudfs` binary).
    pub gc_image: String,
    /// The resources of garbage-collection Jobs' containers.
    pub gc_resources: ResourceRequirements,
    /// How often each CloudfsVolume view is read afresh from its pool.
    pub volume_refresh: Duration,
}

/// Reconcile counts, latencies and errors, by resource kind.
#[derive(Debug, Clone)]
pub struct ReconcileMetrics {
    reconciles: IntCounterVec,
    seconds: HistogramVec,
    errors: IntCounterVec,
    collections: IntCounterVec,
    reclaimed: IntCounterVec,
}

impl ReconcileMetrics {
    pub fn register(registry: &Registry) -> cloudfs_metrics::prometheus::Result<Self> {
        let reconciles = IntCounterVec::new(
            Opts::new(
                "cloudfs_operator_reconciles_total",
                "Reconciles of cloudfs resources, by kind and result (ok or error).",
            ),
            &["kind", "result"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "cloudfs_operator_reconcile_duration_seconds",
                "Time a reconcile took, by kind.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0]),
            &["kind"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "cloudfs_operator_errors_total",
                "Failed reconciles, by kind and reason (SecretUnavailable, ClaimNotReady, …).",
            ),
            &["kind", "reason"],
        )?;
        let collections = IntCounterVec::new(
            Opts::new(
                "cloudfs_operator_gc_runs_total",
                "Finished garbage collections, by CloudfsGarbageCollection and result.",
            ),
            &["collection", "result"],
        )?;
        let reclaimed = IntCounterVec::new(
            Opts::new(
                "cloudfs_operator_gc_reclaimed_bytes_total",
                "Bytes garbage collections reclaimed, by CloudfsGarbageCollection.",
            ),
            &["collection"],
        )?;
        for collector in [&reconciles, &errors, &collections, &reclaimed] {
            registry.register(Box::new(collector.clone()))?;
        }
        registry.register(Box::new(seconds.clone()))?;
        Ok(ReconcileMetrics {
            reconciles,
            seconds,
            errors,
            collections,
            reclaimed,
        })
    }

    fn collection_finished(&self, collection: &str, run: &crate::crd::CollectionRun) {
        self.collections
            .with_label_values(&[collection, &run.result])
            .inc();
        self.reclaimed
            .with_label_values(&[collection])
            .inc_by(run.bytes_reclaimed.unwrap_or_default());
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub config: OperatorConfig,
    metrics: ReconcileMetrics,
    /// Consecutive failures per resource (by uid), for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs one reconcile of `object`, measuring it and resetting its backoff on success.
    async fn measured<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        reconcile: impl Future<Output = Result<Action, OperatorError>>,
    ) -> Result<Action, OperatorError> {
        let kind = K::kind(&());
        let started = Instant::now();
        let result = reconcile.await;
        self.metrics
            .seconds
            .with_label_values(&[kind.as_ref()])
            .observe(started.elapsed().as_secs_f64());
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .reconciles
            .with_label_values(&[kind.as_ref(), outcome])
            .inc();
        if result.is_ok()
            && let Some(uid) = object.meta().uid.as_ref()
        {
            self.failures().remove(uid);
        }
        result
    }

    /// When to try `object` again after `error`: 5 s, doubling per consecutive failure, at
    /// most five minutes.
    fn backoff<K: Resource<DynamicType = ()>>(&self, object: &K, error: &OperatorError) -> Action {
        let kind = K::kind(&());
        self.metrics
            .errors
            .with_label_values(&[kind.as_ref(), error.reason()])
            .inc();
        tracing::warn!(%kind, name = %object.meta().name.clone().unwrap_or_default(), error = %error, "reconcile failed; will retry");
        let uid = object.meta().uid.clone().unwrap_or_default();
        let mut failures = self.failures();
        let count = failures.entry(uid).or_insert(0);
        *count = count.saturating_add(1);
        let delay = Duration::from_secs(5).saturating_mul(1 << (*count - 1).min(6));
        Action::requeue(delay.min(MAX_BACKOFF))
    }
}

/// A controller of resources of `api`, reconciled by `reconcile` (measured, with backoff).
fn reconciling<K, F>(
    api: Api<K>,
    ctx: &Arc<Context>,
    reconcile: fn(Arc<K>, Arc<Context>) -> F,
) -> impl Future<Output = ()>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    F: Future<Output = Result<Action, OperatorError>> + Send + 'static,
{
    Controller::new(api, watcher::Config::default())
        .run(
            move |object, ctx: Arc<Context>| async move {
                ctx.measured(object.as_ref(), reconcile(object.clone(), ctx.clone()))
                    .await
            },
            |object, error, ctx| ctx.backoff(object.as_ref(), error),
            ctx.clone(),
        )
        .for_each(|_| async {})
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] cloudfs_metrics::prometheus::Error),
    #[error("lost the leader lease {0}: another replica leads now")]
    LostLeadership(String),
}

/// Waits for the leader Lease, then reconciles until leadership is lost.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    registry: &Registry,
) -> Result<(), RunError> {
    let metrics = ReconcileMetrics::register(registry)?;
    let leadership = Leadership::new(
        client.clone(),
        &config.namespace,
        OPERATOR_NAME,
        &config.identity,
        config.lease_duration,
    );
    leadership.acquire().await?;
    tracing::info!(identity = %config.identity, "leading: reconciling cloudfs resources");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: OPERATOR_NAME.into(),
            instance: Some(config.identity.clone()),
        },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder,
        config,
        metrics,
        failures: Mutex::default(),
    });
    let snapshots = reconciling(
        Api::<CloudfsSnapshot>::all(client.clone()),
        &ctx,
        snapshots::reconcile,
    );
    let rollbacks = reconciling(
        Api::<CloudfsRollback>::all(client.clone()),
        &ctx,
        rollbacks::reconcile,
    );
    let collections = reconciling(
        Api::<CloudfsGarbageCollection>::all(client.clone()),
        &ctx,
        collections::reconcile,
    );
    let volumes = reconciling(
        Api::<PersistentVolume>::all(client.clone()),
        &ctx,
        volumes::reconcile,
    );
    tokio::select! {
        () = snapshots => Ok(()),
        () = rollbacks => Ok(()),
        () = collections => Ok(()),
        () = volumes => Ok(()),
        () = leadership.keep() => Err(RunError::LostLeadership(OPERATOR_NAME.into())),
    }
}
