//! The operator end to end on a real kube-apiserver and the real local Swift (both started by
//! `tests/k8s/e2e.sh`, which runs these tests): a PVC bound to a cloudfs volume, published
//! through the Node service as kubelet would; a CloudfsSnapshot becomes ready; more is
//! written; a CloudfsRollback switches the mounted volume back; deleting the snapshot
//! resource deletes the engine snapshot; a snapshot of a PVC that does not exist reports why; a
//! garbage collection run on demand reclaims a stray block through its Job; of two replicas
//! one leads, and the other takes over when the leader stops renewing its Lease.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use cloudfs_controller::crd::{
    CloudfsGarbageCollection, CloudfsGarbageCollectionSpec, CloudfsRollback, CloudfsRollbackSpec,
    CloudfsSnapshot, CloudfsSnapshotSpec, DeletionPolicy, PoolReference, definitions,
};
use cloudfs_controller::operator::{self, Leadership, OperatorConfig};
use cloudfs_csi::DRIVER_NAME;
use cloudfs_csi::node::NodeService;
use cloudfs_csi::process_mounter::ProcessMounter;
use cloudfs_csi::proto::node_server::Node;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, Event, Namespace, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeSpec, Secret, VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use support::{Cleanup, publish, unpublish};
use tonic::Request;

#[path = "../../csi/tests/support/mod.rs"]
mod support;

const BIN_DIR: &str = env!("CARGO_BIN_EXE_cloudfs-controller");

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| {
        panic!("{key} is not set: run these tests with tests/k8s/e2e.sh (Swift and kube-apiserver)")
    })
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        ..ObjectMeta::default()
    }
}

/// Polls `probe` until it gives a value, for at most `secs` seconds.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    mut probe: impl FnMut() -> F,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            started.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Installs the CRDs (as `crdgen` writes them) and waits until the API serves them.
async fn install_definitions(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, definition) in definitions() {
        let name = definition.metadata.name.clone().expect("a name");
        match api.get_opt(&name).await.expect("get CRD") {
            Some(existing) => {
                let mut updated = definition.clone();
                updated.metadata.resource_version = existing.metadata.resource_version;
                api.replace(&name, &PostParams::default(), &updated)
                    .await
                    .expect("replace CRD");
            }
            None => {
                api.create(&PostParams::default(), &definition)
                    .await
                    .expect("create CRD");
            }
        }
        eventually(&format!("CRD {name} established"), 30, || {
            let api = api.clone();
            let name = name.clone();
            async move {
                let crd = api.get(&name).await.ok()?;
                crd.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            }
        })
        .await;
    }
}

/// A file's content through the mount, once the kernel's cached attributes have expired.
async fn settled_content(path: &Path, want: &[u8]) {
    let what = format!(
        "{} to read {:?}",
        path.display(),
        String::from_utf8_lossy(want)
    );
    eventually(&what, 10, || async {
        (std::fs::read(path).ok()? == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_e2e_snapshot_rollback_and_cleanup_on_a_real_api_server() {
    let credentials: HashMap<String, String> = ["ST_AUTH", "ST_USER", "ST_KEY"]
        .into_iter()
        .map(|key| (key.to_owned(), env(key)))
        .collect();
    env("KUBECONFIG");
    let client = Client::try_default()
        .await
        .expect("a client from KUBECONFIG");
    install_definitions(&client).await;

    // A namespace, a Secret, a StorageClass, and a PVC bound to a PV of a cloudfs volume.
    let run = format!("{}-{}", std::process::id(), rand_suffix());
    let ns = format!("cloudfs-e2e-{run}");
    let container = format!("operator-e2e-{run}");
    let pool = format!("swift://{container}");
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let cloudfs = support::cloudfs_binary(Path::new(BIN_DIR));
    let formatted = std::process::Command::new(&cloudfs)
        .args(["format", &pool, "data-volume"])
        .output()
        .expect("cloudfs format");
    assert!(formatted.status.success(), "{formatted:?}");
    let volume_id = format!("data-volume@{pool}");

    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta(&ns, None),
                ..Namespace::default()
            },
        )
        .await
        .expect("namespace");
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &Secret {
                metadata: meta("swift", Some(&ns)),
                string_data: Some(credentials.clone().into_iter().collect()),
                ..Secret::default()
            },
        )
        .await
        .expect("secret");
    let class = format!("cloudfs-{run}");
    let parameters: BTreeMap<String, String> = [
        ("pool", pool.as_str()),
        ("csi.storage.k8s.io/provisioner-secret-name", "swift"),
        (
            "csi.storage.k8s.io/provisioner-secret-namespace",
            ns.as_str(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    Api::<StorageClass>::all(client.clone())
        .create(
            &PostParams::default(),
            &StorageClass {
                metadata: meta(&class, None),
                provisioner: DRIVER_NAME.into(),
                parameters: Some(parameters),
                ..StorageClass::default()
            },
        )
        .await
        .expect("storage class");
    let pv_name = format!("pv-{run}");
    let capacity: BTreeMap<String, Quantity> =
        [("storage".to_owned(), Quantity("1Gi".into()))].into();
    Api::<PersistentVolume>::all(client.clone())
        .create(
            &PostParams::default(),
            &PersistentVolume {
                metadata: meta(&pv_name, None),
                spec: Some(PersistentVolumeSpec {
                    capacity: Some(capacity.clone()),
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: Some(class.clone()),
                    csi: Some(CSIPersistentVolumeSource {
                        driver: DRIVER_NAME.into(),
                        volume_handle: volume_id.clone(),
                        ..CSIPersistentVolumeSource::default()
                    }),
                    ..PersistentVolumeSpec::default()
                }),
                ..PersistentVolume::default()
            },
        )
        .await
        .expect("persistent volume");
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &PersistentVolumeClaim {
                metadata: meta("data", Some(&ns)),
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: Some(class.clone()),
                    volume_name: Some(pv_name.clone()),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(capacity.clone()),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            },
        )
        .await
        .expect("claim");

    // Kubelet's part: publish the volume on this node and write to it.
    let node = NodeService::new(
        "node-1".into(),
        dir.path().join("state"),
        ProcessMounter::new(cloudfs.clone(), dir.path().join("run")),
    );
    let target = dir.path().join("pod/data");
    let mut request = publish(&volume_id, &target, false);
    request.secrets = credentials.clone();
    node.node_publish_volume(Request::new(request))
        .await
        .expect("publish");
    std::fs::write(target.join("a"), b"before").expect("write");

    // The operator, leading in this namespace.
    let registry = cloudfs_metrics::prometheus::Registry::new();
    let config = OperatorConfig {
        identity: "e2e".into(),
        namespace: ns.clone(),
        lease_duration: Duration::from_secs(15),
        mount_answer_timeout: Duration::from_secs(60),
        rollback_timeout: Duration::from_secs(120),
        gc_image: "cloudfs:e2e".into(),
    };
    let operator = tokio::spawn({
        let client = client.clone();
        let registry = registry.clone();
        async move { operator::run(client, config, &registry).await }
    });

    // A snapshot of the mounted volume, taken by its mount.
    let snapshots: Api<CloudfsSnapshot> = Api::namespaced(client.clone(), &ns);
    snapshots
        .create(
            &PostParams::default(),
            &CloudfsSnapshot::new(
                "snap-1",
                CloudfsSnapshotSpec {
                    pvc_name: "data".into(),
                    deletion_policy: DeletionPolicy::Delete,
                },
            ),
        )
        .await
        .expect("create CloudfsSnapshot");
    let status = eventually("snap-1 ready", 90, || {
        let snapshots = snapshots.clone();
        async move {
            let status = snapshots.get("snap-1").await.ok()?.status?;
            status.ready_to_use.then_some(status)
        }
    })
    .await;
    assert_eq!(status.phase.as_deref(), Some("Ready"));
    assert_eq!(status.files, Some(1), "{status:?}");
    let snapshot_id = status.snapshot_id.clone().expect("a snapshot id");
    assert!(
        snapshot_id.ends_with(&format!("@{volume_id}")),
        "{snapshot_id}"
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("a Ready condition");
    assert_eq!(ready.status, "True");
    let engine_name = snapshot_id.split('@').next().expect("name").to_owned();

    // More writes, then a rollback: the mounted volume switches back in place.
    std::fs::write(target.join("a"), b"after the snapshot").expect("rewrite");
    std::fs::write(target.join("b"), b"new").expect("write");
    let rollbacks: Api<CloudfsRollback> = Api::namespaced(client.clone(), &ns);
    rollbacks
        .create(
            &PostParams::default(),
            &CloudfsRollback::new(
                "rb-1",
                CloudfsRollbackSpec {
                    pvc_name: "data".into(),
                    snapshot_name: "snap-1".into(),
                },
            ),
        )
        .await
        .expect("create CloudfsRollback");
    let rolled = eventually("rb-1 to finish", 120, || {
        let rollbacks = rollbacks.clone();
        async move {
            let status = rollbacks.get("rb-1").await.ok()?.status?;
            matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")).then_some(status)
        }
    })
    .await;
    assert_eq!(rolled.phase.as_deref(), Some("Succeeded"), "{rolled:?}");
    assert!(rolled.start_time.is_some() && rolled.completion_time.is_some());
    let previous = rolled
        .previous_state_snapshot
        .clone()
        .expect("previous state");
    settled_content(&target.join("a"), b"before").await;
    eventually("b to disappear", 10, || async {
        (!target.join("b").exists()).then_some(())
    })
    .await;

    // Deleting the resource deletes the engine snapshot (the finalizer); the automatic
    // pre-rollback snapshot stays.
    snapshots
        .delete("snap-1", &DeleteParams::default())
        .await
        .expect("delete CloudfsSnapshot");
    eventually("snap-1 to be gone", 60, || {
        let snapshots = snapshots.clone();
        async move {
            snapshots
                .get_opt("snap-1")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    let listed = std::process::Command::new(&cloudfs)
        .args(["snapshot", "list", &pool, "data-volume", "--json"])
        .output()
        .expect("cloudfs snapshot list");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    let names: Vec<&str> = listed
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(!names.contains(&engine_name.as_str()), "{names:?}");
    assert!(names.contains(&previous.as_str()), "{names:?}");

    // Events announce each change of state.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for reason in ["SnapshotReady", "RolledBack", "SnapshotDeleted"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} in {reasons:?}"
        );
    }

    // A snapshot of a PVC that does not exist says why, and keeps trying.
    snapshots
        .create(
            &PostParams::default(),
            &CloudfsSnapshot::new(
                "orphan",
                CloudfsSnapshotSpec {
                    pvc_name: "missing".into(),
                    deletion_policy: DeletionPolicy::Delete,
                },
            ),
        )
        .await
        .expect("create CloudfsSnapshot");
    let waiting = eventually("orphan to report its claim", 30, || {
        let snapshots = snapshots.clone();
        async move {
            let status = snapshots.get("orphan").await.ok()?.status?;
            status.conditions.into_iter().find(|c| c.type_ == "Ready")
        }
    })
    .await;
    assert_eq!(waiting.status, "False");
    assert_eq!(waiting.reason, "ClaimNotReady", "{waiting:?}");
    let text = cloudfs_metrics::encode(&registry.gather());
    assert!(
        text.contains(
            r#"cloudfs_operator_errors_total{kind="CloudfsSnapshot",reason="ClaimNotReady"}"#
        ),
        "{text}"
    );
    snapshots
        .delete("orphan", &DeleteParams::default())
        .await
        .expect("delete orphan");

    collect_on_demand(
        &client,
        &ns,
        &class,
        &pool,
        &credentials,
        &cloudfs,
        dir.path(),
    )
    .await;

    assert!(!operator.is_finished(), "the operator keeps leading");
    operator.abort();
    node.node_unpublish_volume(Request::new(unpublish(&volume_id, &target)))
        .await
        .expect("unpublish");
    let deleted = std::process::Command::new(&cloudfs)
        .args(["volume", "delete", &pool, "data-volume"])
        .output()
        .expect("cloudfs volume delete");
    assert!(deleted.status.success(), "{deleted:?}");
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await;
    let _ = Api::<StorageClass>::all(client.clone())
        .delete(&class, &DeleteParams::default())
        .await;
    let _ = Api::<PersistentVolume>::all(client)
        .delete(&pv_name, &DeleteParams::default())
        .await;
}

/// A CloudfsGarbageCollection run on demand: the operator starts a Job; with no kubelet here,
/// the test runs the Job's command itself with the Job's credentials, as its pod would, and
/// the outcome the run keeps in the pool reaches the status.
async fn collect_on_demand(
    client: &Client,
    ns: &str,
    class: &str,
    pool: &str,
    credentials: &HashMap<String, String>,
    cloudfs: &Path,
    scratch: &Path,
) {
    // A block nothing references, for the collection to reclaim.
    let store = cloudfs::store::StoreUrl::parse(pool)
        .expect("pool URL")
        .open(|key| credentials.get(key).cloned())
        .expect("open the pool");
    let stray = vec![7u8; 100_000];
    let key = cloudfs::cas::block_key(&cloudfs::cas::hash_block(&stray));
    store.put(&key, stray.into()).await.expect("a stray block");
    // Object times have whole seconds: a block of the run's first second counts as recent.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let collections: Api<CloudfsGarbageCollection> = Api::all(client.clone());
    let name = format!("gc-{ns}");
    collections
        .create(
            &PostParams::default(),
            &CloudfsGarbageCollection::new(
                &name,
                CloudfsGarbageCollectionSpec {
                    pool: PoolReference {
                        storage_class_name: Some(class.to_owned()),
                        url: None,
                        secret_ref: None,
                    },
                    schedule: None,
                    grace_period: "0s".into(),
                    dry_run: false,
                    run_now: Some("1".into()),
                    history_limit: 3,
                },
            ),
        )
        .await
        .expect("create CloudfsGarbageCollection");
    let job_name = eventually("a collection Job", 60, || {
        let collections = collections.clone();
        let name = name.clone();
        async move {
            let run = collections.get(&name).await.ok()?.status?.last_run?;
            (run.result == "Running").then_some(run.job_name)
        }
    })
    .await;
    let job = Api::<Job>::namespaced(client.clone(), ns)
        .get(&job_name)
        .await
        .expect("the Job");
    let container = job
        .spec
        .and_then(|spec| spec.template.spec)
        .map(|pod| pod.containers[0].clone())
        .expect("a container");
    let mut command = container.command.expect("a command");
    assert_eq!(command[..3], ["cloudfs", "gc", pool], "{command:?}");
    let secret_name = container.env_from.expect("credentials")[0]
        .secret_ref
        .clone()
        .expect("a Secret")
        .name;
    let keys = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&secret_name)
        .await
        .expect("the Job's Secret")
        .data
        .expect("keys");
    // The pod's emptyDir, here a scratch directory.
    if let Some(at) = command.iter().position(|arg| arg == "--state-dir") {
        command[at + 1] = scratch.join("gc-state").display().to_string();
    }
    let ran = std::process::Command::new(cloudfs)
        .args(&command[1..])
        .env_remove("ST_AUTH")
        .env_remove("ST_USER")
        .env_remove("ST_KEY")
        .envs(
            keys.iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned())),
        )
        .output()
        .expect("run the Job's command");
    assert!(ran.status.success(), "{ran:?}");

    let run = eventually("the run's outcome in status", 60, || {
        let collections = collections.clone();
        let name = name.clone();
        async move {
            let run = collections.get(&name).await.ok()?.status?.last_run?;
            (run.result != "Running").then_some(run)
        }
    })
    .await;
    assert_eq!(run.result, "Succeeded", "{run:?}");
    assert!(run.bytes_reclaimed >= Some(100_000), "{run:?}");
    assert!(
        store.head(&key).await.expect("head").is_none(),
        "the stray block is gone"
    );
    let status = collections
        .get(&name)
        .await
        .expect("collection")
        .status
        .expect("status");
    assert_eq!(status.history.len(), 1);
    assert_eq!(status.last_run_now.as_deref(), Some("1"));
    collections
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete the collection");
    eventually("the collection to be gone", 30, || {
        let collections = collections.clone();
        let name = name.clone();
        async move {
            collections
                .get_opt(&name)
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
}

/// A few random hex digits, so runs against one API server never collide.
fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{nanos:08x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_e2e_one_replica_leads_at_a_time() {
    env("KUBECONFIG");
    let client = Client::try_default()
        .await
        .expect("a client from KUBECONFIG");
    let ns = format!("cloudfs-lease-{}-{}", std::process::id(), rand_suffix());
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta(&ns, None),
                ..Namespace::default()
            },
        )
        .await
        .expect("namespace");
    let replica = |identity: &str| {
        Leadership::new(
            client.clone(),
            &ns,
            "leader",
            identity,
            Duration::from_secs(3),
        )
    };
    let (a, b) = (replica("a"), replica("b"));
    a.acquire().await.expect("the first replica leads");
    let waiting = tokio::time::timeout(Duration::from_secs(2), b.acquire()).await;
    assert!(waiting.is_err(), "the second waits while the first renews");

    // The first stops renewing (it died): the second takes over once the lease expires, and
    // the first, were it to come back, finds it lost.
    let took_over = tokio::time::timeout(Duration::from_secs(20), b.acquire()).await;
    assert!(matches!(took_over, Ok(Ok(()))), "{took_over:?}");
    let lost = tokio::time::timeout(Duration::from_secs(10), a.keep()).await;
    assert!(lost.is_ok(), "the old leader learns it lost the lease");
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await;
}
