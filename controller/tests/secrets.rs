//! Swift credentials arrive as CSI secrets, to the controller and to the node's publish:
//! wrong ones are `Unauthenticated`, incomplete ones `InvalidArgument`, never a panic, and the
//! key is never echoed; the right ones work. Against the real local Swift that
//! `tests/swift/swift.sh` runs (its ST_* variables in the environment; the tests fail,
//! loudly, when they are missing). The node test needs root and the `cloudfs` binary.

use std::collections::HashMap;
use std::path::PathBuf;

use cloudfs_controller::EngineBackend;
use cloudfs_csi::controller::ControllerService;
use cloudfs_csi::proto::controller_server::Controller;
use cloudfs_csi::proto::node_server::Node;
use cloudfs_csi::proto::volume_capability::access_mode::Mode;
use cloudfs_csi::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use cloudfs_csi::proto::{
    CreateVolumeRequest, DeleteVolumeRequest, ListVolumesRequest, VolumeCapability,
};
use support::{Cleanup, is_mounted, publish, unpublish};
use tonic::{Code, Request};

#[path = "../../csi/tests/support/mod.rs"]
mod support;

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| {
        panic!("{key} is not set: start the test Swift (tests/swift/swift.sh) and export its env")
    })
}

fn create(name: &str, secrets: HashMap<String, String>) -> Request<CreateVolumeRequest> {
    Request::new(CreateVolumeRequest {
        name: name.into(),
        volume_capabilities: vec![VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter.into(),
            }),
        }],
        secrets,
        ..CreateVolumeRequest::default()
    })
}

/// The test Swift's credentials, with `key` as the key.
fn credentials(key: &str) -> HashMap<String, String> {
    HashMap::from([
        ("ST_AUTH".into(), env("ST_AUTH")),
        ("ST_USER".into(), env("ST_USER")),
        ("ST_KEY".into(), key.to_owned()),
    ])
}

#[tokio::test]
async fn secrets_are_checked_by_the_store_and_refusals_have_their_codes() {
    let container = format!("csi-secrets-{}", std::process::id());
    let controller =
        ControllerService::new(EngineBackend::new(vec![format!("swift://{container}")]));

    // A pool whose container does not exist yet lists no volumes (rather than failing).
    let listed = controller
        .list_volumes(Request::new(ListVolumesRequest::default()))
        .await
        .expect("list an empty pool")
        .into_inner();
    assert!(listed.entries.is_empty(), "{:?}", listed.entries);

    let wrong = controller
        .create_volume(create("pvc-wrong", credentials("not-the-key")))
        .await
        .expect_err("wrong credentials");
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    assert!(
        !wrong.message().contains("not-the-key"),
        "secrets are never echoed"
    );

    let incomplete = HashMap::from([("ST_USER".to_owned(), env("ST_USER"))]);
    let refused = controller
        .create_volume(create("pvc-incomplete", incomplete))
        .await
        .expect_err("incomplete credentials");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    let good = credentials(&env("ST_KEY"));
    let volume = controller
        .create_volume(create("pvc-good", good.clone()))
        .await
        .expect("the right credentials")
        .into_inner()
        .volume
        .expect("a volume");
    controller
        .delete_volume(Request::new(DeleteVolumeRequest {
            volume_id: volume.volume_id,
            secrets: good,
        }))
        .await
        .expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publish_secrets_are_checked_by_the_store() {
    let exe = std::env::current_exe().expect("the test binary's path");
    let cloudfs: PathBuf = support::cloudfs_binary(exe.parent().expect("target/<profile>/deps"));
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let container = format!("csi-node-secrets-{}", std::process::id());
    let controller =
        ControllerService::new(EngineBackend::new(vec![format!("swift://{container}")]));
    let good = credentials(&env("ST_KEY"));
    let volume_id = controller
        .create_volume(create("pvc-node", good.clone()))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("a volume")
        .volume_id;
    let node = support::process_node(cloudfs, dir.path());
    let shared =
        node.shared_mountpoint(&cloudfs_csi::volume_id::VolumeId::parse(&volume_id).expect("id"));
    let target = dir.path().join("pod/vol");
    let with_secrets = |secrets: HashMap<String, String>| {
        let mut request = publish(&volume_id, &target, false);
        request.secrets = secrets;
        Request::new(request)
    };

    let wrong_key = "not-the-key-0451";
    let wrong = node
        .node_publish_volume(with_secrets(credentials(wrong_key)))
        .await
        .expect_err("wrong credentials");
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    assert!(
        !wrong.message().contains(wrong_key),
        "the key is never echoed: {wrong:?}"
    );
    let incomplete = HashMap::from([("ST_USER".to_owned(), env("ST_USER"))]);
    let refused = node
        .node_publish_volume(with_secrets(incomplete))
        .await
        .expect_err("incomplete credentials");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        !is_mounted(&shared) && !is_mounted(&target),
        "nothing is mounted for a refused publish"
    );

    node.node_publish_volume(with_secrets(good.clone()))
        .await
        .expect("the right credentials");
    std::fs::write(target.join("file"), b"on swift").expect("write");
    assert_eq!(
        std::fs::read(target.join("file")).expect("read"),
        b"on swift"
    );
    node.node_unpublish_volume(Request::new(unpublish(&volume_id, &target)))
        .await
        .expect("unpublish");
    assert!(!is_mounted(&shared), "the mount stopped");
    controller
        .delete_volume(Request::new(DeleteVolumeRequest {
            volume_id,
            secrets: good,
        }))
        .await
        .expect("delete");
}
