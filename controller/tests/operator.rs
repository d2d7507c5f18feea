//! The operator and the CSI driver end to end on a real kube-apiserver, controller manager
//! and the real local Swift, with cloudfs-controller, csi-provisioner, snapshot-controller and
//! csi-snapshotter running beside them (all started by `tests/k8s/e2e.sh`, which runs these
//! tests). The tests play kubelet through the node plugin's library:
//! - a PVC of a cloudfs StorageClass is provisioned in Swift and published; a CloudfsSnapshot
//!   becomes ready; more is written; a CloudfsRollback switches the mounted volume back;
//!   deleting the snapshot resource deletes the engine snapshot; a snapshot of a PVC that does
//!   not exist reports why; credentials Swift refuses are a condition until the Secret is
//!   rotated; a garbage collection run on demand reclaims a stray block through its Job;
//!   deleting the PVC deletes the volume;
//! - a VolumeSnapshot of a mounted PVC is an engine snapshot, a PVC restored from it holds the
//!   data as it was, and deleting it deletes the engine snapshot;
//! - a claim that asks for more is expanded by csi-resizer: the volume's quota, the claim, its
//!   PV and the mounted volume's `df` all show the new size;
//! - of two replicas one leads, and the other takes over when the leader stops renewing.
//!
//! The operator runs with the token of the chart's controller ServiceAccount, which
//! `tests/k8s/e2e.sh` makes after applying the chart: a permission the chart's RBAC lacks fails
//! these tests.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloudfs_controller::crd::{
    CloudfsGarbageCollection, CloudfsGarbageCollectionSpec, CloudfsRollback, CloudfsRollbackSpec,
    CloudfsSnapshot, CloudfsSnapshotSpec, CloudfsVolume, DeletionPolicy, PoolReference,
    definitions,
};
use cloudfs_controller::operator::{self, Leadership, OperatorConfig};
use cloudfs_csi::DRIVER_NAME;
use cloudfs_csi::node::NodeService;
use cloudfs_csi::process_mounter::ProcessMounter;
use cloudfs_csi::proto::NodePublishVolumeResponse;
use cloudfs_csi::proto::node_server::Node;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    Event, Namespace, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    ResourceRequirements, Secret, TypedLocalObjectReference, VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use support::{Cleanup, df_size, publish, unpublish};
use tonic::Request;

#[path = "../../csi/tests/support/mod.rs"]
mod support;

const BIN_DIR: &str = env!("CARGO_BIN_EXE_cloudfs-controller");
const GIB: i64 = 1 << 30;

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| {
        panic!("{key} is not set: run these tests with tests/k8s/e2e.sh (Swift and kube-apiserver)")
    })
}

/// The namespace the chart installs into, where its Roles grant the operator Leases, Jobs and
/// their Secrets.
const OPERATOR_NAMESPACE: &str = "cloudfs-system";

/// A client with the credentials of the kubeconfig `var` names (a ServiceAccount's token).
async fn client_from(var: &str) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(env(var)).expect("a kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("a client configuration");
    Client::try_from(config).expect("a client")
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

/// Waits until object `name` of `api` no longer exists.
async fn deleted<K>(api: &Api<K>, name: &str, secs: u64)
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(&format!("{name} to be deleted"), secs, || async {
        api.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

/// Creates CloudfsSnapshot `name` of PVC `pvc` (deleted with its engine snapshot).
async fn create_snapshot(snapshots: &Api<CloudfsSnapshot>, name: &str, pvc: &str) {
    snapshots
        .create(
            &PostParams::default(),
            &CloudfsSnapshot::new(
                name,
                CloudfsSnapshotSpec {
                    pvc_name: pvc.into(),
                    deletion_policy: DeletionPolicy::Delete,
                },
            ),
        )
        .await
        .expect("create CloudfsSnapshot");
}

/// The `Ready` condition of CloudfsSnapshot `name`, once the operator has set one.
async fn ready_condition(snapshots: &Api<CloudfsSnapshot>, name: &str) -> Condition {
    eventually(&format!("{name} to have a Ready condition"), 60, || async {
        let status = snapshots.get(name).await.ok()?.status?;
        status.conditions.into_iter().find(|c| c.type_ == "Ready")
    })
    .await
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
    let credentials = swift_credentials();
    env("KUBECONFIG");
    let client = Client::try_default()
        .await
        .expect("a client from KUBECONFIG");
    install_definitions(&client).await;

    // A namespace with a Secret and a StorageClass; a claim that csi-provisioner has cloudfs
    // provision in the real Swift.
    let run = format!("{}-{}", std::process::id(), rand_suffix());
    let scene = Scene::create(&client, &run, credentials.clone()).await;
    let Scene { ns, pool, .. } = scene.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let cloudfs = support::cloudfs_binary(Path::new(BIN_DIR));
    let claim = scene.provisioned_claim("data", None).await;
    let volume_id = claim.volume_id.clone();
    let volume_name = claim.volume_name().to_owned();

    // Kubelet's part: publish the volume on this node and write to it.
    let node = support::process_node(cloudfs.clone(), dir.path());
    let target = dir.path().join("pod/data");
    let mut request = publish(&volume_id, &target, false);
    request.secrets = credentials.clone();
    request.volume_context = claim.context.clone();
    node.node_publish_volume(Request::new(request))
        .await
        .expect("publish");
    std::fs::write(target.join("a"), b"before").expect("write");

    // The operator, in the chart's namespace with the chart's ServiceAccount (so with exactly
    // the permissions its RBAC grants).
    let registry = cloudfs_metrics::prometheus::Registry::new();
    let config = OperatorConfig {
        identity: "e2e".into(),
        namespace: OPERATOR_NAMESPACE.into(),
        lease_duration: Duration::from_secs(15),
        mount_answer_timeout: Duration::from_secs(60),
        rollback_timeout: Duration::from_secs(120),
        gc_image: "cloudfs:e2e".into(),
        gc_resources: ResourceRequirements {
            limits: Some([("memory".to_owned(), Quantity("1Gi".into()))].into()),
            ..ResourceRequirements::default()
        },
        volume_refresh: Duration::from_secs(3),
    };
    let operator = tokio::spawn({
        let client = client_from("CLOUDFS_OPERATOR_KUBECONFIG").await;
        let registry = registry.clone();
        async move { operator::run(client, config, &registry).await }
    });

    // A snapshot of the mounted volume, taken by its mount.
    let snapshots: Api<CloudfsSnapshot> = Api::namespaced(client.clone(), &ns);
    create_snapshot(&snapshots, "snap-1", "data").await;
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

    // The volume's view: its claim, usage from the replicated metadata, its writer (the
    // mount), owned by the PV.
    let views: Api<CloudfsVolume> = Api::all(client.clone());
    let view = eventually(
        "the CloudfsVolume to count the file and see the mount",
        60,
        || {
            let views = views.clone();
            let pv_name = claim.pv_name.clone();
            async move {
                let view = views.get(&pv_name).await.ok()?;
                let status = view.status.as_ref()?;
                (status.files == Some(1) && status.writer.is_some()).then_some(view)
            }
        },
    )
    .await;
    assert_eq!(view.spec.volume_handle, volume_id);
    let owner = &view.metadata.owner_references.clone().expect("an owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("PersistentVolume", claim.pv_name.as_str())
    );
    let status = view.status.expect("a status");
    assert_eq!(status.claim, Some(format!("{ns}/data")));
    assert_eq!(status.capacity_bytes, Some(1 << 30));
    assert!(status.last_replication_time.is_some(), "{status:?}");

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
    deleted(&snapshots, "snap-1", 60).await;
    let names = snapshot_names(&cloudfs, &pool, &volume_name);
    assert!(!names.contains(&engine_name), "{names:?}");
    assert!(names.contains(&previous), "{names:?}");

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
    create_snapshot(&snapshots, "orphan", "missing").await;
    let waiting = ready_condition(&snapshots, "orphan").await;
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

    // Credentials Swift refuses are a condition, retried with backoff; the rotated Secret is
    // picked up by the next attempt, with no restart.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let with_key = |key: &str| serde_json::json!({ "stringData": { "ST_KEY": key } });
    secrets
        .patch(
            "swift",
            &PatchParams::default(),
            &Patch::Merge(with_key("not-the-key")),
        )
        .await
        .expect("break the Secret");
    create_snapshot(&snapshots, "snap-2", "data").await;
    let refused = ready_condition(&snapshots, "snap-2").await;
    assert_eq!(refused.status, "False");
    assert_eq!(refused.reason, "CredentialsRefused", "{refused:?}");
    secrets
        .patch(
            "swift",
            &PatchParams::default(),
            &Patch::Merge(with_key(&credentials["ST_KEY"])),
        )
        .await
        .expect("rotate the Secret");
    eventually("snap-2 ready with the rotated Secret", 90, || {
        let snapshots = snapshots.clone();
        async move {
            let status = snapshots.get("snap-2").await.ok()?.status?;
            status.ready_to_use.then_some(())
        }
    })
    .await;
    snapshots
        .delete("snap-2", &DeleteParams::default())
        .await
        .expect("delete snap-2");

    collect_on_demand(&scene, &credentials, &cloudfs, dir.path()).await;

    assert!(!operator.is_finished(), "the operator keeps leading");
    operator.abort();
    node.node_unpublish_volume(Request::new(unpublish(&volume_id, &target)))
        .await
        .expect("unpublish");
    // Deleting the claim has csi-provisioner delete the volume and its PV, and the garbage
    // collector the PV's view.
    scene.delete_claim(&claim).await;
    deleted(&views, &claim.pv_name, 60).await;
    assert!(
        !volume_names(&cloudfs, &pool).contains(&volume_name),
        "{volume_name} is deleted from the pool"
    );
    scene.delete().await;
}

/// The other door to the same engine snapshots: a CSI VolumeSnapshot, through snapshot-controller
/// and csi-snapshotter, of a mounted claim; a claim restored from it (an instant clone) holds
/// the data as it was; deleting the VolumeSnapshot deletes the engine snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_e2e_volume_snapshots_through_the_csi_sidecars() {
    let stage = NodeStage::new().await;
    let NodeStage {
        client,
        run,
        scene,
        node,
        cloudfs,
        dir,
        ..
    } = &stage;

    let source = scene.provisioned_claim("source", None).await;
    let source_target = dir.path().join("pod/source");
    stage
        .publish(&source, &source_target)
        .await
        .expect("publish the source");
    std::fs::write(source_target.join("x"), b"as it was").expect("write");

    let snapshot_api = |kind: &str, plural: &str| {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", kind),
            plural,
        )
    };
    let class_name = format!("cloudfs-{run}");
    let classes: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &snapshot_api("VolumeSnapshotClass", "volumesnapshotclasses"),
    );
    let class: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotClass",
        "metadata": { "name": class_name },
        "driver": DRIVER_NAME,
        "deletionPolicy": "Delete",
        "parameters": {
            "csi.storage.k8s.io/snapshotter-secret-name": "swift",
            "csi.storage.k8s.io/snapshotter-secret-namespace": scene.ns,
        },
    }))
    .expect("a VolumeSnapshotClass");
    classes
        .create(&PostParams::default(), &class)
        .await
        .expect("create the VolumeSnapshotClass");
    let snapshots: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &scene.ns,
        &snapshot_api("VolumeSnapshot", "volumesnapshots"),
    );
    let snapshot: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": { "name": "snap", "namespace": scene.ns },
        "spec": {
            "volumeSnapshotClassName": class_name,
            "source": { "persistentVolumeClaimName": "source" },
        },
    }))
    .expect("a VolumeSnapshot");
    snapshots
        .create(&PostParams::default(), &snapshot)
        .await
        .expect("create the VolumeSnapshot");
    let content_name = eventually("the VolumeSnapshot to be ready", 120, || {
        let snapshots = snapshots.clone();
        async move {
            let status = snapshots.get("snap").await.ok()?.data["status"].clone();
            (status["readyToUse"] == true)
                .then(|| {
                    status["boundVolumeSnapshotContentName"]
                        .as_str()
                        .map(str::to_owned)
                })
                .flatten()
        }
    })
    .await;
    let contents: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &snapshot_api("VolumeSnapshotContent", "volumesnapshotcontents"),
    );
    let handle = contents
        .get(&content_name)
        .await
        .expect("the VolumeSnapshotContent")
        .data["status"]["snapshotHandle"]
        .as_str()
        .expect("a snapshot handle")
        .to_owned();
    assert!(
        handle.ends_with(&format!("@{}", source.volume_id)),
        "{handle} is a snapshot of {}",
        source.volume_id
    );
    let engine_name = handle.split('@').next().expect("a name").to_owned();
    assert!(
        snapshot_names(cloudfs, &scene.pool, source.volume_name()).contains(&engine_name),
        "{engine_name} is an engine snapshot"
    );

    // The source moves on; a claim restored from the snapshot has the data as it was.
    std::fs::write(source_target.join("x"), b"changed since").expect("rewrite");
    let restored = scene
        .provisioned_claim(
            "restored",
            Some(TypedLocalObjectReference {
                api_group: Some("snapshot.storage.k8s.io".into()),
                kind: "VolumeSnapshot".into(),
                name: "snap".into(),
            }),
        )
        .await;
    let restored_target = dir.path().join("pod/restored");
    stage
        .publish(&restored, &restored_target)
        .await
        .expect("publish the restored claim");
    assert_eq!(
        std::fs::read(restored_target.join("x")).expect("read"),
        b"as it was"
    );
    settled_content(&source_target.join("x"), b"changed since").await;
    for (claim, target) in [(&source, &source_target), (&restored, &restored_target)] {
        node.node_unpublish_volume(Request::new(unpublish(&claim.volume_id, target)))
            .await
            .expect("unpublish");
    }

    // Deleting the VolumeSnapshot deletes the engine snapshot (deletionPolicy: Delete).
    snapshots
        .delete("snap", &DeleteParams::default())
        .await
        .expect("delete the VolumeSnapshot");
    deleted(&contents, &content_name, 120).await;
    assert!(
        !snapshot_names(cloudfs, &scene.pool, source.volume_name()).contains(&engine_name),
        "{engine_name} is deleted"
    );
    for claim in [&restored, &source] {
        scene.delete_claim(claim).await;
    }
    let _ = classes.delete(&class_name, &DeleteParams::default()).await;
    scene.delete().await;
}

/// A CloudfsGarbageCollection run on demand: the operator starts a Job; with no kubelet here,
/// the test runs the Job's command itself with the Job's credentials, as its pod would, and
/// the outcome the run keeps in the pool reaches the status.
async fn collect_on_demand(
    scene: &Scene,
    credentials: &HashMap<String, String>,
    cloudfs: &Path,
    scratch: &Path,
) {
    let Scene {
        client,
        ns,
        class,
        pool,
    } = scene;
    let operator_ns = OPERATOR_NAMESPACE;
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
    let job = Api::<Job>::namespaced(client.clone(), operator_ns)
        .get(&job_name)
        .await
        .expect("the Job");
    let container = job
        .spec
        .and_then(|spec| spec.template.spec)
        .map(|pod| pod.containers[0].clone())
        .expect("a container");
    let limits = container.resources.and_then(|r| r.limits).expect("limits");
    assert_eq!(
        limits["memory"],
        Quantity("1Gi".into()),
        "the operator's resources"
    );
    let mut command = container.command.expect("a command");
    assert_eq!(command[..3], ["cloudfs", "gc", pool], "{command:?}");
    let secret_name = container.env_from.expect("credentials")[0]
        .secret_ref
        .clone()
        .expect("a Secret")
        .name;
    let keys = Api::<Secret>::namespaced(client.clone(), operator_ns)
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
    deleted(&collections, &name, 30).await;
}

/// The Swift credentials of the local test Swift, as a Secret holds them.
fn swift_credentials() -> HashMap<String, String> {
    ["ST_AUTH", "ST_USER", "ST_KEY"]
        .into_iter()
        .map(|key| (key.to_owned(), env(key)))
        .collect()
}

/// A test's own corner of the cluster: a namespace with the Swift Secret, and a StorageClass
/// of the cloudfs driver putting volumes in a pool (container) of the test's own.
#[derive(Clone)]
struct Scene {
    client: Client,
    ns: String,
    class: String,
    pool: String,
}

/// A claim csi-provisioner has bound to a volume cloudfs provisioned.
struct ProvisionedClaim {
    name: String,
    pv_name: String,
    volume_id: String,
    /// The PV's volume attributes, which kubelet hands to NodePublishVolume.
    context: HashMap<String, String>,
}

impl ProvisionedClaim {
    /// The volume's name in its pool.
    fn volume_name(&self) -> &str {
        self.volume_id.split('@').next().unwrap_or_default()
    }
}

impl Scene {
    async fn create(client: &Client, run: &str, credentials: HashMap<String, String>) -> Self {
        let scene = Scene {
            client: client.clone(),
            ns: format!("cloudfs-e2e-{run}"),
            class: format!("cloudfs-{run}"),
            pool: format!("swift://operator-e2e-{run}"),
        };
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: meta(&scene.ns, None),
                    ..Namespace::default()
                },
            )
            .await
            .expect("namespace");
        Api::<Secret>::namespaced(client.clone(), &scene.ns)
            .create(
                &PostParams::default(),
                &Secret {
                    metadata: meta("swift", Some(&scene.ns)),
                    string_data: Some(credentials.into_iter().collect()),
                    ..Secret::default()
                },
            )
            .await
            .expect("secret");
        let parameters: BTreeMap<String, String> = [
            ("pool", scene.pool.as_str()),
            ("csi.storage.k8s.io/provisioner-secret-name", "swift"),
            (
                "csi.storage.k8s.io/provisioner-secret-namespace",
                scene.ns.as_str(),
            ),
            ("csi.storage.k8s.io/controller-expand-secret-name", "swift"),
            (
                "csi.storage.k8s.io/controller-expand-secret-namespace",
                scene.ns.as_str(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        Api::<StorageClass>::all(client.clone())
            .create(
                &PostParams::default(),
                &StorageClass {
                    metadata: meta(&scene.class, None),
                    provisioner: DRIVER_NAME.into(),
                    parameters: Some(parameters),
                    allow_volume_expansion: Some(true),
                    ..StorageClass::default()
                },
            )
            .await
            .expect("storage class");
        scene
    }

    /// Creates claim `name` of the scene's class (from `source` if given) and waits until the
    /// controller manager has bound it to the PV csi-provisioner made for it.
    async fn provisioned_claim(
        &self,
        name: &str,
        source: Option<TypedLocalObjectReference>,
    ) -> ProvisionedClaim {
        let claims = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &self.ns);
        let capacity: BTreeMap<String, Quantity> =
            [("storage".to_owned(), Quantity("1Gi".into()))].into();
        claims
            .create(
                &PostParams::default(),
                &PersistentVolumeClaim {
                    metadata: meta(name, Some(&self.ns)),
                    spec: Some(PersistentVolumeClaimSpec {
                        access_modes: Some(vec!["ReadWriteOnce".into()]),
                        storage_class_name: Some(self.class.clone()),
                        data_source: source,
                        resources: Some(VolumeResourceRequirements {
                            requests: Some(capacity),
                            ..VolumeResourceRequirements::default()
                        }),
                        ..PersistentVolumeClaimSpec::default()
                    }),
                    ..PersistentVolumeClaim::default()
                },
            )
            .await
            .expect("claim");
        let pv_name = eventually(&format!("claim {name} to be bound"), 120, || {
            let claims = claims.clone();
            async move {
                let claim = claims.get(name).await.ok()?;
                let bound = claim.status?.phase.as_deref() == Some("Bound");
                bound.then_some(claim.spec?.volume_name?)
            }
        })
        .await;
        let csi = Api::<PersistentVolume>::all(self.client.clone())
            .get(&pv_name)
            .await
            .expect("the claim's PV")
            .spec
            .and_then(|spec| spec.csi)
            .expect("a CSI volume");
        assert_eq!(csi.driver, DRIVER_NAME);
        assert!(
            csi.volume_handle.ends_with(&format!("@{}", self.pool)),
            "{} is in the class's pool",
            csi.volume_handle
        );
        ProvisionedClaim {
            name: name.to_owned(),
            pv_name,
            volume_id: csi.volume_handle,
            context: csi
                .volume_attributes
                .unwrap_or_default()
                .into_iter()
                .collect(),
        }
    }

    /// Deletes a claim and waits until csi-provisioner has deleted its volume and PV.
    async fn delete_claim(&self, claim: &ProvisionedClaim) {
        Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &self.ns)
            .delete(&claim.name, &DeleteParams::default())
            .await
            .expect("delete the claim");
        let volumes = Api::<PersistentVolume>::all(self.client.clone());
        deleted(&volumes, &claim.pv_name, 120).await;
    }

    async fn delete(&self) {
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.ns, &DeleteParams::default())
            .await;
        let _ = Api::<StorageClass>::all(self.client.clone())
            .delete(&self.class, &DeleteParams::default())
            .await;
    }
}

/// A test's scene, and a node plugin playing kubelet's node for its claims. What it mounts
/// lies under a scratch directory, unmounted when the stage is dropped, even mid-panic.
struct NodeStage {
    client: Client,
    run: String,
    credentials: HashMap<String, String>,
    scene: Scene,
    node: NodeService<ProcessMounter>,
    cloudfs: PathBuf,
    // Unmounts before the directory goes (fields drop in this order).
    _cleanup: Cleanup,
    dir: tempfile::TempDir,
}

impl NodeStage {
    async fn new() -> NodeStage {
        let credentials = swift_credentials();
        env("KUBECONFIG");
        let client = Client::try_default()
            .await
            .expect("a client from KUBECONFIG");
        let run = format!("{}-{}", std::process::id(), rand_suffix());
        let scene = Scene::create(&client, &run, credentials.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let cloudfs = support::cloudfs_binary(Path::new(BIN_DIR));
        let node = support::process_node(cloudfs.clone(), dir.path());
        NodeStage {
            client,
            run,
            credentials,
            scene,
            node,
            cloudfs,
            _cleanup: Cleanup(dir.path().to_path_buf()),
            dir,
        }
    }

    /// Publishes `claim` at `target` as kubelet would: with the Secret's keys as the CSI
    /// secrets and the PV's volume attributes as the volume context.
    async fn publish(
        &self,
        claim: &ProvisionedClaim,
        target: &Path,
    ) -> Result<tonic::Response<NodePublishVolumeResponse>, tonic::Status> {
        let mut request = publish(&claim.volume_id, target, false);
        request.secrets = self.credentials.clone();
        request.volume_context = claim.context.clone();
        self.node.node_publish_volume(Request::new(request)).await
    }
}

/// The volumes of `pool`, as `cloudfs volume list` gives them.
fn volume_names(cloudfs: &Path, pool: &str) -> Vec<String> {
    let listed = std::process::Command::new(cloudfs)
        .args(["volume", "list", pool, "--json"])
        .output()
        .expect("cloudfs volume list");
    assert!(listed.status.success(), "{listed:?}");
    serde_json::from_slice(&listed.stdout).expect("a JSON array of names")
}

/// The engine snapshots of a volume, by name.
fn snapshot_names(cloudfs: &Path, pool: &str, volume: &str) -> Vec<String> {
    let listed = std::process::Command::new(cloudfs)
        .args(["snapshot", "list", pool, volume, "--json"])
        .output()
        .expect("cloudfs snapshot list");
    assert!(listed.status.success(), "{listed:?}");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    listed
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect()
}

/// A few random hex digits, so runs against one API server never collide.
fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{nanos:08x}")
}

/// Whether a quantity the API server shows is `bytes` (csi-resizer writes "2Gi"; a client
/// may write the plain number).
fn is_bytes(quantity: Option<&Quantity>, bytes: i64) -> bool {
    quantity.is_some_and(|q| q.0 == format!("{}Gi", bytes / GIB) || q.0 == bytes.to_string())
}

/// A claim that asks for more: csi-resizer calls ControllerExpandVolume, which raises the
/// volume's quota; the claim and its PV show the new size, and the mounted volume's `df`
/// follows without an unpublish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_e2e_a_claim_grows_through_csi_resizer() {
    let stage = NodeStage::new().await;
    let NodeStage {
        client,
        scene,
        node,
        cloudfs,
        dir,
        ..
    } = &stage;
    let claim = scene.provisioned_claim("grows", None).await;
    let target = dir.path().join("pod/grows");
    stage.publish(&claim, &target).await.expect("publish");
    assert_eq!(df_size(&target), GIB);

    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &scene.ns);
    let more = serde_json::json!({"spec": {"resources": {"requests": {"storage": "2Gi"}}}});
    claims
        .patch(&claim.name, &PatchParams::default(), &Patch::Merge(&more))
        .await
        .expect("ask for 2Gi");
    let volumes = Api::<PersistentVolume>::all(client.clone());
    eventually("the claim and its PV to show 2Gi", 120, || {
        let (claims, volumes) = (claims.clone(), volumes.clone());
        let (name, pv_name) = (claim.name.clone(), claim.pv_name.clone());
        async move {
            let shown = claims.get(&name).await.ok()?.status?.capacity?;
            let pv = volumes.get(&pv_name).await.ok()?.spec?.capacity?;
            (is_bytes(shown.get("storage"), 2 * GIB) && is_bytes(pv.get("storage"), 2 * GIB))
                .then_some(())
        }
    })
    .await;
    let stat = std::process::Command::new(cloudfs)
        .args(["stat", &scene.pool, claim.volume_name(), "--json"])
        .output()
        .expect("cloudfs stat");
    assert!(stat.status.success(), "{stat:?}");
    let stat: serde_json::Value = serde_json::from_slice(&stat.stdout).expect("JSON");
    assert_eq!(stat["quota_bytes"], 2 * GIB, "{stat}");
    // A mount elsewhere than the controller picks the quota up from the pool within 30 s.
    eventually("the mounted volume's df to show 2 GiB", 60, || {
        let target = target.clone();
        async move { (df_size(&target) == 2 * GIB).then_some(()) }
    })
    .await;

    node.node_unpublish_volume(Request::new(unpublish(&claim.volume_id, &target)))
        .await
        .expect("unpublish");
    scene.delete_claim(&claim).await;
    scene.delete().await;
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
