//! CloudfsGarbageCollection: runs `cloudfs gc` on a pool as a Kubernetes Job, on a cron
//! schedule or whenever `runNow` changes. The Job keeps its outcome in the pool
//! (`--report-as <job>`), where the operator reads it, so the result reaches the status even
//! when nobody can read the Job's pod; the last `historyLimit` runs are kept, older Jobs and
//! outcomes removed.

use std::sync::Arc;
use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvFromSource, PodSpec, PodTemplateSpec, Secret,
    SecretEnvSource, Volume, VolumeMount,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::api::{Api, DeleteParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};

use super::Context;
use super::error::OperatorError;
use super::resolve::{class_secret, credentials};
use super::status::{announce, condition, failed_condition, give_up_or_retry, now, patch_status};
use crate::backend::Pool;
use crate::crd::{
    CloudfsGarbageCollection, CloudfsGarbageCollectionStatus, CollectionRun, FINALIZER,
    PoolReference, SecretReference,
};
use cloudfs::gc;

const RUNNING: &str = "Running";
/// Where a collection Job keeps its resumable state (lost with the pod: a new run starts over).
const STATE_DIR: &str = "/var/cache/cloudfs-gc";
/// How often a running collection is looked at.
const RUNNING_POLL: Duration = Duration::from_secs(10);
/// The longest the operator sleeps before looking at a schedule again.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Labels of everything made for a collection.
pub const COLLECTION_LABEL: &str = "cloudfs.io/collection";

/// The pool a collection cleans: its URL and the Secret with its credentials.
async fn resolve_pool(
    ctx: &Context,
    reference: &PoolReference,
) -> Result<(String, Option<SecretReference>), OperatorError> {
    if let Some(class_name) = &reference.storage_class_name {
        let classes: Api<StorageClass> = Api::all(ctx.client.clone());
        let class = classes.get_opt(class_name).await?.ok_or_else(|| {
            OperatorError::Waiting(format!("StorageClass {class_name} does not exist"))
        })?;
        let url = class
            .parameters
            .as_ref()
            .and_then(|p| p.get(cloudfs_csi::mount_options::POOL_PARAMETER))
            .cloned()
            .ok_or_else(|| {
                OperatorError::Invalid(format!("StorageClass {class_name} has no `pool` parameter"))
            })?;
        let secret = reference
            .secret_ref
            .clone()
            .or_else(|| class_secret(&class, None));
        return Ok((url, secret));
    }
    let url = reference
        .url
        .clone()
        .ok_or_else(|| OperatorError::Invalid("spec.pool needs storageClassName or url".into()))?;
    Ok((url, reference.secret_ref.clone()))
}

fn schedule(spec: Option<&str>) -> Result<Option<Cron>, OperatorError> {
    let Some(pattern) = spec else {
        return Ok(None);
    };
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .build()
        .parse(pattern)
        .map(Some)
        .map_err(|e| OperatorError::Invalid(format!("schedule {pattern:?}: {e}")))
}

/// The first time `cron` fires after `after`.
fn next_after(cron: &Cron, after: &Time) -> Result<Time, OperatorError> {
    let zoned = after.0.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC);
    cron.find_next_occurrence(&zoned, false)
        .map(|next| Time(next.timestamp()))
        .map_err(|e| OperatorError::Invalid(format!("schedule: {e}")))
}

pub async fn reconcile(
    object: Arc<CloudfsGarbageCollection>,
    ctx: Arc<Context>,
) -> Result<Action, OperatorError> {
    let api: Api<CloudfsGarbageCollection> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, object, |event| async {
        match event {
            Finalizer::Apply(object) => apply(&api, &object, &ctx).await,
            Finalizer::Cleanup(object) => cleanup(&object, &ctx).await,
        }
    })
    .await
    .map_err(OperatorError::from)
}

/// Removes the outcomes the collection's runs left in the pool (its Jobs are its dependents).
async fn cleanup(
    object: &CloudfsGarbageCollection,
    ctx: &Context,
) -> Result<Action, OperatorError> {
    let status = object.status.clone().unwrap_or_default();
    let runs: Vec<&CollectionRun> = status.last_run.iter().chain(&status.history).collect();
    if runs.is_empty() {
        return Ok(Action::await_change());
    }
    let (url, secret) = resolve_pool(ctx, &object.spec.pool).await?;
    let keys = credentials(&ctx.client, secret.as_ref()).await?;
    let pool = Pool::open(&url, &keys)?;
    for run in runs {
        gc::delete_outcome(pool.store.as_ref(), &run.job_name)
            .await
            .map_err(|e| OperatorError::Waiting(format!("removing an outcome: {e}")))?;
    }
    Ok(Action::await_change())
}

async fn apply(
    api: &Api<CloudfsGarbageCollection>,
    object: &CloudfsGarbageCollection,
    ctx: &Context,
) -> Result<Action, OperatorError> {
    let status = object.status.clone().unwrap_or_default();
    let generation = object.meta().generation;
    match step(object, &status, ctx).await {
        Ok((status, action)) => {
            patch_status(api, object, &status).await?;
            Ok(action)
        }
        Err(e) => {
            let failed = CloudfsGarbageCollectionStatus {
                conditions: failed_condition(&status.conditions, "Ready", &e, generation),
                observed_generation: generation,
                ..status
            };
            patch_status(api, object, &failed).await?;
            give_up_or_retry(&ctx.recorder, object, "Collect", e).await
        }
    }
}

/// One step: collect the outcome of the run in progress, or start a run that is due, or
/// wait for the next one.
async fn step(
    object: &CloudfsGarbageCollection,
    status: &CloudfsGarbageCollectionStatus,
    ctx: &Context,
) -> Result<(CloudfsGarbageCollectionStatus, Action), OperatorError> {
    let spec = &object.spec;
    humantime::parse_duration(&spec.grace_period)
        .map_err(|e| OperatorError::Invalid(format!("gracePeriod {:?}: {e}", spec.grace_period)))?;
    let cron = schedule(spec.schedule.as_deref())?;
    let (url, secret) = resolve_pool(ctx, &spec.pool).await?;
    let generation = object.meta().generation;
    let mut status = CloudfsGarbageCollectionStatus {
        observed_generation: generation,
        conditions: condition(
            &status.conditions,
            "Ready",
            true,
            "PoolResolved",
            format!("collecting pool {url}"),
            generation,
        ),
        ..status.clone()
    };
    if let Some(run) = status.last_run.clone().filter(|run| run.result == RUNNING) {
        let keys = credentials(&ctx.client, secret.as_ref()).await?;
        let pool = Pool::open(&url, &keys)?;
        let Some(finished) = finished_run(ctx, &pool, run).await? else {
            return Ok((status, Action::requeue(RUNNING_POLL)));
        };
        announce(
            &ctx.recorder,
            object,
            finished.result != "Succeeded",
            &format!("Collection{}", finished.result),
            "Collect",
            format!(
                "run {}: {}; {} bytes reclaimed",
                finished.job_name,
                finished.result,
                finished.bytes_reclaimed.unwrap_or_default()
            ),
        )
        .await;
        ctx.metrics
            .collection_finished(&object.name_any(), &finished);
        status.history.insert(0, finished.clone());
        status.last_run = Some(finished);
        let keep = spec.history_limit.max(1) as usize;
        for pruned in status.history.split_off(keep.min(status.history.len())) {
            prune(ctx, &pool, &pruned.job_name).await?;
        }
    }
    let run_now = spec.run_now.is_some() && spec.run_now != status.last_run_now;
    let since = status
        .last_run
        .as_ref()
        .and_then(|run| run.start_time.clone())
        .or_else(|| object.meta().creation_timestamp.clone())
        .unwrap_or_else(now);
    let next = cron.as_ref().map(|c| next_after(c, &since)).transpose()?;
    let due = next.as_ref().is_some_and(|next| next.0 <= now().0);
    status.next_run = next.clone();
    if !(run_now || due) {
        let wait = next.map_or(MAX_WAIT, |next| {
            let secs = next.0.as_second() - now().0.as_second();
            Duration::from_secs(secs.max(1) as u64).min(MAX_WAIT)
        });
        return Ok((status, Action::requeue(wait)));
    }
    let job_name = start_job(object, ctx, &url, secret.as_ref()).await?;
    announce(
        &ctx.recorder,
        object,
        false,
        "CollectionStarted",
        "Collect",
        format!("Job {job_name} collects pool {url}"),
    )
    .await;
    status.last_run_now = spec.run_now.clone();
    status.last_run = Some(CollectionRun {
        job_name,
        start_time: Some(now()),
        result: RUNNING.into(),
        ..CollectionRun::default()
    });
    if let Some(cron) = &cron {
        status.next_run = Some(next_after(cron, &now())?);
    }
    Ok((status, Action::requeue(RUNNING_POLL)))
}

/// The run, finished, if its outcome is in the pool or its Job failed.
async fn finished_run(
    ctx: &Context,
    pool: &Pool,
    run: CollectionRun,
) -> Result<Option<CollectionRun>, OperatorError> {
    let completed = |result: &str| CollectionRun {
        completion_time: Some(now()),
        duration_seconds: run
            .start_time
            .as_ref()
            .map(|start| (now().0.as_millisecond() - start.0.as_millisecond()) as f64 / 1000.0),
        result: result.to_owned(),
        ..run.clone()
    };
    if let Some(outcome) = gc::read_outcome(pool.store.as_ref(), &run.job_name)
        .await
        .map_err(|e| OperatorError::Waiting(format!("reading the run's outcome: {e}")))?
    {
        let mut finished = completed(if outcome.report.is_some() {
            "Succeeded"
        } else {
            "Failed"
        });
        if let Some(report) = &outcome.report {
            finished.scanned = Some(report.scanned);
            finished.deleted = Some(report.deleted);
            finished.bytes_reclaimed = Some(report.bytes_reclaimed);
            finished.duration_seconds = Some(report.seconds);
        }
        finished.message = outcome.error;
        return Ok(Some(finished));
    }
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let failed = jobs
        .get_opt(&run.job_name)
        .await?
        .and_then(|job| job.status)
        .and_then(|status| status.conditions)
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Failed" && c.status == "True")
        });
    Ok(failed.then(|| CollectionRun {
        message: Some("the Job failed before keeping an outcome".into()),
        ..completed("Failed")
    }))
}

/// Removes a run that fell out of the history: its Job (with its pod and credentials) and
/// its outcome.
async fn prune(ctx: &Context, pool: &Pool, job_name: &str) -> Result<(), OperatorError> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let background = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    match jobs.delete(job_name, &background).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    gc::delete_outcome(pool.store.as_ref(), job_name)
        .await
        .map_err(|e| OperatorError::Waiting(format!("removing an old outcome: {e}")))
}

/// Creates the Job of a new run, with a copy of the pool's credentials beside it (a Job can
/// only read Secrets of its own namespace); returns the Job's name.
async fn start_job(
    object: &CloudfsGarbageCollection,
    ctx: &Context,
    url: &str,
    secret: Option<&SecretReference>,
) -> Result<String, OperatorError> {
    let spec = &object.spec;
    let name = object.name_any();
    let prefix: String = name.chars().take(40).collect();
    let job_name = format!(
        "{}-gc-{}",
        prefix.trim_end_matches('-'),
        now().0.as_second()
    );
    let labels: std::collections::BTreeMap<String, String> = [
        ("app.kubernetes.io/managed-by", super::OPERATOR_NAME),
        (COLLECTION_LABEL, name.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let mut command = vec![
        "cloudfs".to_owned(),
        "gc".to_owned(),
        url.to_owned(),
        "--grace".to_owned(),
        spec.grace_period.clone(),
        "--state-dir".to_owned(),
        STATE_DIR.to_owned(),
        "--report-as".to_owned(),
        job_name.clone(),
        "--json".to_owned(),
    ];
    if spec.dry_run {
        command.push("--dry-run".into());
    }
    let credentials_name = format!("{job_name}-credentials");
    let keys = credentials(&ctx.client, secret).await?;
    let env_from = (!keys.is_empty()).then(|| {
        vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: credentials_name.clone(),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        }]
    });
    let job = Job {
        metadata: ObjectMeta {
            name: Some(job_name.clone()),
            namespace: Some(ctx.config.namespace.clone()),
            labels: Some(labels.clone()),
            // Deleting the collection deletes its Jobs.
            owner_references: object.controller_owner_ref(&()).map(|owner| vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(2),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    containers: vec![Container {
                        name: "gc".into(),
                        image: Some(ctx.config.gc_image.clone()),
                        command: Some(command),
                        env_from,
                        resources: Some(ctx.config.gc_resources.clone()),
                        volume_mounts: Some(vec![VolumeMount {
                            name: "state".into(),
                            mount_path: STATE_DIR.into(),
                            ..VolumeMount::default()
                        }]),
                        ..Container::default()
                    }],
                    volumes: Some(vec![Volume {
                        name: "state".into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    };
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let created = jobs.create(&PostParams::default(), &job).await?;
    if !keys.is_empty() {
        let owner = OwnerReference {
            api_version: "batch/v1".into(),
            kind: "Job".into(),
            name: job_name.clone(),
            uid: created.uid().unwrap_or_default(),
            ..OwnerReference::default()
        };
        let copy = Secret {
            metadata: ObjectMeta {
                name: Some(credentials_name),
                namespace: Some(ctx.config.namespace.clone()),
                labels: Some(labels),
                owner_references: Some(vec![owner]),
                ..ObjectMeta::default()
            },
            string_data: Some(keys.into_iter().collect()),
            ..Secret::default()
        };
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
        secrets.create(&PostParams::default(), &copy).await?;
    }
    Ok(job_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_fire_after_a_time() {
        let cron = schedule(Some("0 3 * * *"))
            .expect("valid")
            .expect("a schedule");
        let after = Time("2026-11-25T04:00:00Z".parse().expect("time"));
        let next = next_after(&cron, &after).expect("next");
        assert_eq!(next.0.to_string(), "2026-11-26T03:00:00Z");
        assert!(schedule(Some("every day")).is_err());
        assert!(schedule(None).expect("none").is_none());
    }
}
