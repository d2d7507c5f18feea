//! The Controller service on the engine, against a local pool: volumes created idempotently
//! with their capacity as quota, capabilities validated, listings paged, snapshots taken
//! and listed, a volume created from a snapshot and published through the Node service
//! holding exactly the snapshot's files, expansion (also of a mounted volume, whose `df`
//! grows), deletes, and the codes of bad requests.
//! Needs root and the `cloudfs` binary (built by `cargo test --workspace`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cloudfs_controller::EngineBackend;
use cloudfs_csi::controller::ControllerService;
use cloudfs_csi::proto::controller_server::Controller;
use cloudfs_csi::proto::node_server::Node;
use cloudfs_csi::proto::volume_capability::access_mode::Mode;
use cloudfs_csi::proto::volume_capability::{AccessType, BlockVolume};
use cloudfs_csi::proto::volume_content_source::{SnapshotSource, Type as Source};
use cloudfs_csi::proto::{
    CapacityRange, ControllerExpandVolumeRequest, CreateSnapshotRequest, CreateVolumeRequest,
    DeleteSnapshotRequest, DeleteVolumeRequest, GetSnapshotRequest, ListSnapshotsRequest,
    ListVolumesRequest, ValidateVolumeCapabilitiesRequest, VolumeContentSource,
};
use support::{Cleanup, capability, df_size, publish, unpublish};
use tonic::{Code, Request};

#[path = "../../csi/tests/support/mod.rs"]
mod support;

const GIB: i64 = 1 << 30;

fn cloudfs_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    support::cloudfs_binary(exe.parent().expect("target/<profile>/deps"))
}

fn create(name: &str, bytes: i64, source: Option<Source>) -> Request<CreateVolumeRequest> {
    Request::new(CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: capability(Mode::SingleNodeWriter).into_iter().collect(),
        volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
        ..CreateVolumeRequest::default()
    })
}

/// The size `df` shows for the file system at `path`.
fn code<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    result.expect_err("refused").code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_and_snapshots_through_the_controller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let pool = dir.path().join("pool");
    std::fs::create_dir(&pool).expect("mkdir");
    let pool_url = format!("file://{}", pool.display());
    let controller = ControllerService::new(EngineBackend::new(vec![pool_url.clone()]));
    let node = support::process_node(cloudfs_binary(), dir.path());

    // Create, idempotently; the capacity is the quota.
    let volume = controller
        .create_volume(create("pvc-1", GIB, None))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("a volume");
    assert_eq!(volume.volume_id, format!("pvc-1@{pool_url}"));
    assert_eq!(volume.capacity_bytes, GIB);
    let again = controller
        .create_volume(create("pvc-1", GIB, None))
        .await
        .expect("create again")
        .into_inner();
    assert_eq!(
        again.volume.map(|v| v.volume_id),
        Some(volume.volume_id.clone())
    );
    assert_eq!(
        code(
            controller
                .create_volume(create("pvc-1", 2 * GIB, None))
                .await
        ),
        Code::AlreadyExists
    );

    // Write a file, snapshot, change it, and restore the snapshot as a new volume.
    let target = dir.path().join("pods/a/vol");
    node.node_publish_volume(Request::new(publish(&volume.volume_id, &target, false)))
        .await
        .expect("publish");
    std::fs::write(target.join("file"), b"before the snapshot").expect("write");
    assert_eq!(df_size(&target), GIB, "df shows the capacity");
    node.node_unpublish_volume(Request::new(unpublish(&volume.volume_id, &target)))
        .await
        .expect("unpublish");
    let snapshot = controller
        .create_snapshot(Request::new(CreateSnapshotRequest {
            source_volume_id: volume.volume_id.clone(),
            name: "snap-1".into(),
            ..CreateSnapshotRequest::default()
        }))
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("a snapshot");
    assert!(snapshot.ready_to_use);
    assert_eq!(snapshot.source_volume_id, volume.volume_id);
    node.node_publish_volume(Request::new(publish(&volume.volume_id, &target, false)))
        .await
        .expect("publish");
    std::fs::write(target.join("file"), b"after the snapshot").expect("write");
    node.node_unpublish_volume(Request::new(unpublish(&volume.volume_id, &target)))
        .await
        .expect("unpublish");

    let restored = controller
        .create_volume(create(
            "pvc-restored",
            GIB,
            Some(Source::Snapshot(SnapshotSource {
                snapshot_id: snapshot.snapshot_id.clone(),
            })),
        ))
        .await
        .expect("create from the snapshot")
        .into_inner()
        .volume
        .expect("a volume");
    let restored_target = dir.path().join("pods/b/vol");
    node.node_publish_volume(Request::new(publish(
        &restored.volume_id,
        &restored_target,
        false,
    )))
    .await
    .expect("publish the restored volume");
    assert_eq!(
        std::fs::read(restored_target.join("file")).expect("read"),
        b"before the snapshot"
    );
    node.node_unpublish_volume(Request::new(unpublish(
        &restored.volume_id,
        &restored_target,
    )))
    .await
    .expect("unpublish");

    // Listings, paged.
    let page = controller
        .list_volumes(Request::new(ListVolumesRequest {
            max_entries: 1,
            starting_token: String::new(),
        }))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page.entries.len(), 1);
    let rest = controller
        .list_volumes(Request::new(ListVolumesRequest {
            max_entries: 0,
            starting_token: page.next_token.clone(),
        }))
        .await
        .expect("list the rest")
        .into_inner();
    assert_eq!(rest.entries.len(), 1);
    assert!(rest.next_token.is_empty());
    assert_eq!(
        code(
            controller
                .list_volumes(Request::new(ListVolumesRequest {
                    max_entries: 0,
                    starting_token: "bogus".into(),
                }))
                .await
        ),
        Code::Aborted
    );
    let listed = controller
        .list_snapshots(Request::new(ListSnapshotsRequest {
            source_volume_id: volume.volume_id.clone(),
            ..ListSnapshotsRequest::default()
        }))
        .await
        .expect("list snapshots")
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    let got = controller
        .get_snapshot(Request::new(GetSnapshotRequest {
            snapshot_id: snapshot.snapshot_id.clone(),
            secrets: HashMap::new(),
        }))
        .await
        .expect("get snapshot")
        .into_inner();
    assert_eq!(
        got.snapshot.map(|s| s.snapshot_id),
        Some(snapshot.snapshot_id.clone())
    );

    // Capabilities: one writer node, file systems only.
    let validate = |mode: Mode, block: bool| {
        let mut caps = capability(mode).expect("a capability");
        if block {
            caps.access_type = Some(AccessType::Block(BlockVolume {}));
        }
        Request::new(ValidateVolumeCapabilitiesRequest {
            volume_id: volume.volume_id.clone(),
            volume_capabilities: vec![caps],
            ..ValidateVolumeCapabilitiesRequest::default()
        })
    };
    let confirmed =
        |r: cloudfs_csi::proto::ValidateVolumeCapabilitiesResponse| r.confirmed.is_some();
    for (mode, block, expected) in [
        (Mode::SingleNodeWriter, false, true),
        (Mode::MultiNodeReaderOnly, false, true),
        (Mode::MultiNodeMultiWriter, false, false),
        (Mode::SingleNodeWriter, true, false),
    ] {
        let answer = controller
            .validate_volume_capabilities(validate(mode, block))
            .await
            .expect("validate")
            .into_inner();
        assert_eq!(confirmed(answer), expected, "{mode:?} block={block}");
    }
    let mut many_writers = create("pvc-x", GIB, None).into_inner();
    many_writers.volume_capabilities = capability(Mode::MultiNodeMultiWriter).into_iter().collect();
    let status = controller
        .create_volume(Request::new(many_writers))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("one writer"), "{status:?}");

    // StorageClass parameters: mount options travel to the nodes in the volume context;
    // an unknown or bad one is refused.
    let mut tuned = create("pvc-tuned", GIB, None).into_inner();
    tuned.parameters = [
        ("cacheSize", "256MiB"),
        ("syncInterval", "10s"),
        ("csi.storage.k8s.io/pvc/name", "data"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let context = controller
        .create_volume(Request::new(tuned))
        .await
        .expect("create with parameters")
        .into_inner()
        .volume
        .expect("a volume")
        .volume_context;
    assert_eq!(
        context,
        [
            ("cacheSize".to_owned(), (256u64 << 20).to_string()),
            ("syncInterval".to_owned(), "10s".to_owned()),
        ]
        .into()
    );
    for (key, value) in [("cachesize", "1GiB"), ("syncInterval", "never")] {
        let mut bad = create("pvc-bad", GIB, None).into_inner();
        bad.parameters = [(key.to_owned(), value.to_owned())].into();
        let status = controller
            .create_volume(Request::new(bad))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(key), "{status:?}");
    }

    // Expansion raises the quota, with no node step.
    let expanded = controller
        .controller_expand_volume(Request::new(ControllerExpandVolumeRequest {
            volume_id: volume.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 3 * GIB,
                limit_bytes: 0,
            }),
            ..ControllerExpandVolumeRequest::default()
        }))
        .await
        .expect("expand")
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 3 * GIB);
    assert!(!expanded.node_expansion_required);
    let stat = std::process::Command::new(cloudfs_binary())
        .args(["stat", &pool_url, "pvc-1", "--json"])
        .output()
        .expect("cloudfs stat");
    let stat: serde_json::Value = serde_json::from_slice(&stat.stdout).expect("JSON");
    assert_eq!(stat["quota_bytes"], 3 * GIB);

    // Bad requests.
    assert_eq!(
        code(controller.create_volume(create("", GIB, None)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            controller
                .create_snapshot(Request::new(CreateSnapshotRequest {
                    source_volume_id: format!("nope@{pool_url}"),
                    name: "s".into(),
                    ..CreateSnapshotRequest::default()
                }))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            controller
                .get_snapshot(Request::new(GetSnapshotRequest {
                    snapshot_id: format!("nope@pvc-1@{pool_url}"),
                    secrets: HashMap::new(),
                }))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            controller
                .create_volume(create(
                    "pvc-y",
                    GIB,
                    Some(Source::Snapshot(SnapshotSource {
                        snapshot_id: "missing".into(),
                    })),
                ))
                .await
        ),
        Code::NotFound
    );

    // Deletes are idempotent.
    for _ in 0..2 {
        controller
            .delete_snapshot(Request::new(DeleteSnapshotRequest {
                snapshot_id: snapshot.snapshot_id.clone(),
                secrets: HashMap::new(),
            }))
            .await
            .expect("delete snapshot");
        let tuned_id = format!("pvc-tuned@{pool_url}");
        for id in [&volume.volume_id, &restored.volume_id, &tuned_id] {
            controller
                .delete_volume(Request::new(DeleteVolumeRequest {
                    volume_id: id.clone(),
                    secrets: HashMap::new(),
                }))
                .await
                .expect("delete volume");
        }
    }
    let left = controller
        .list_volumes(Request::new(ListVolumesRequest::default()))
        .await
        .expect("list")
        .into_inner();
    assert!(left.entries.is_empty(), "{:?}", left.entries);
}

/// An expand request for `volume_id` to `bytes`.
fn expand(volume_id: &str, bytes: i64) -> Request<ControllerExpandVolumeRequest> {
    Request::new(ControllerExpandVolumeRequest {
        volume_id: volume_id.to_owned(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..ControllerExpandVolumeRequest::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansion_grows_a_mounted_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let pool = dir.path().join("pool");
    std::fs::create_dir(&pool).expect("mkdir");
    let controller = ControllerService::new(EngineBackend::new(vec![format!(
        "file://{}",
        pool.display()
    )]));
    let node = support::process_node(cloudfs_binary(), dir.path());
    let volume_id = controller
        .create_volume(create("pvc-grow", GIB, None))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("a volume")
        .volume_id;
    let target = dir.path().join("pods/a/vol");
    node.node_publish_volume(Request::new(publish(&volume_id, &target, false)))
        .await
        .expect("publish");
    assert_eq!(df_size(&target), GIB);

    let expanded = controller
        .controller_expand_volume(expand(&volume_id, 2 * GIB))
        .await
        .expect("expand")
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 2 * GIB);
    assert!(!expanded.node_expansion_required);
    // The controller runs elsewhere than the mount, as in a cluster: the mount finds the new
    // quota in the pool (it looks every 30 s).
    let deadline = Instant::now() + Duration::from_secs(45);
    while df_size(&target) != 2 * GIB {
        assert!(
            Instant::now() < deadline,
            "df still shows {} bytes",
            df_size(&target)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A smaller request leaves the capacity as it is, and says so.
    let unchanged = controller
        .controller_expand_volume(expand(&volume_id, GIB))
        .await
        .expect("expand to less")
        .into_inner();
    assert_eq!(unchanged.capacity_bytes, 2 * GIB);
    // One whose limit the volume is past already cannot be met.
    let mut capped = expand(&volume_id, GIB);
    if let Some(range) = capped.get_mut().capacity_range.as_mut() {
        range.limit_bytes = GIB;
    }
    assert_eq!(
        code(controller.controller_expand_volume(capped).await),
        Code::OutOfRange
    );

    node.node_unpublish_volume(Request::new(unpublish(&volume_id, &target)))
        .await
        .expect("unpublish");
    controller
        .delete_volume(Request::new(DeleteVolumeRequest {
            volume_id,
            secrets: HashMap::new(),
        }))
        .await
        .expect("delete");
}
