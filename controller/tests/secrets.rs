//! Swift credentials arrive as CSI secrets: wrong ones are `Unauthenticated`, incomplete ones
//! `InvalidArgument`, never a panic; the right ones work. Against the real local Swift that
//! `tests/swift/swift.sh` runs (its ST_* variables in the environment; the test fails,
//! loudly, when they are missing).

use std::collections::HashMap;

use cloudfs_controller::EngineBackend;
use cloudfs_csi::controller::ControllerService;
use cloudfs_csi::proto::controller_server::Controller;
use cloudfs_csi::proto::volume_capability::access_mode::Mode;
use cloudfs_csi::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use cloudfs_csi::proto::{
    CreateVolumeRequest, DeleteVolumeRequest, ListVolumesRequest, VolumeCapability,
};
use tonic::{Code, Request};

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

#[tokio::test]
async fn secrets_are_checked_by_the_store_and_refusals_have_their_codes() {
    let credentials = |key: &str| -> HashMap<String, String> {
        HashMap::from([
            ("ST_AUTH".into(), env("ST_AUTH")),
            ("ST_USER".into(), env("ST_USER")),
            ("ST_KEY".into(), key.to_owned()),
        ])
    };
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
