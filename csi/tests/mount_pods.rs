//! Mount pods on a real API server (`tests/k8s/e2e.sh` runs this with KUBECONFIG set, after
//! applying the chart). There is no kubelet there, so no pod ever runs: the test proves that the
//! launcher, with the chart's node ServiceAccount, makes a pod that passes the API server's
//! validation and carries the right node, owner, image, privileges, volumes and command, that
//! its credentials travel in a Secret the pod owns, and that a mount no pod serves in time fails
//! with a clear error and asks its pod to stop.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use cloudfs_csi::mount_options::MountOptions;
use cloudfs_csi::node::{MountRequest, Mounter};
use cloudfs_csi::pod_mounter::{NODE_LABEL, PodMounter, PodSettings};
use cloudfs_csi::volume_id::VolumeId;
use k8s_openapi::api::core::v1::{Node, Pod, ResourceRequirements, Secret};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};

/// The chart's namespace, where its Role lets the node plugin make mount pods.
const MOUNT_NAMESPACE: &str = "cloudfs-system";

fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a Kubernetes object")
}

#[tokio::test]
async fn mount_pod_e2e_pods_pass_validation_and_carry_the_mount() {
    std::env::var("KUBECONFIG").expect("KUBECONFIG: run this with tests/k8s/e2e.sh");
    let client = Client::try_default().await.expect("a client");
    let run = format!(
        "{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    );
    let namespace = MOUNT_NAMESPACE;
    let node_name = format!("node-{run}");
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &object(serde_json::json!({ "metadata": { "name": node_name } })),
        )
        .await
        .expect("node");

    // The launcher runs with the chart's node ServiceAccount, in the chart's namespace.
    let node_kubeconfig = std::env::var("CLOUDFS_NODE_KUBECONFIG")
        .expect("CLOUDFS_NODE_KUBECONFIG: run this with tests/k8s/e2e.sh");
    let node_client = Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(node_kubeconfig).expect("a kubeconfig"),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("a client configuration"),
    )
    .expect("a client");
    let state = tempfile::tempdir().expect("state dir");
    let mounter = PodMounter::new(
        node_client,
        PodSettings {
            namespace: MOUNT_NAMESPACE.into(),
            node_name: node_name.clone(),
            image: "cloudfs-node:test".into(),
            state_dir: state.path().to_path_buf(),
            resources: Some(ResourceRequirements {
                limits: Some(BTreeMap::from([(
                    "memory".to_owned(),
                    Quantity("1Gi".into()),
                )])),
                ..ResourceRequirements::default()
            }),
            priority_class_name: None,
            start_timeout: Duration::from_secs(2),
            stop_timeout: Duration::from_secs(1),
        },
    );
    let id = VolumeId::parse("data@swift://pool").expect("a volume id");
    let mountpoint = state.path().join("volumes/0123abcd/mnt");
    let secrets = HashMap::from([
        (
            "ST_AUTH".to_owned(),
            "http://swift.example/auth/v1.0".to_owned(),
        ),
        ("ST_KEY".to_owned(), "secret".to_owned()),
    ]);
    let options = MountOptions::from_parameters(&HashMap::from([(
        "cacheSize".to_owned(),
        "1GiB".to_owned(),
    )]))
    .expect("mount options");
    let failure = mounter
        .mount(MountRequest {
            id: &id,
            mountpoint: &mountpoint,
            read_only: false,
            secrets: &secrets,
            options: &options,
        })
        .await
        .expect_err("no kubelet runs the pod here");
    assert!(failure.to_string().contains("did not serve"), "{failure}");

    // The pod the API server accepted, asked to stop since it did not serve.
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let name = mounter.pod_name(&mountpoint);
    let pod = pods.get(&name).await.expect("the mount pod");
    assert!(pod.metadata.deletion_timestamp.is_some(), "asked to stop");
    let labels = pod.metadata.labels.clone().expect("labels");
    assert_eq!(labels[NODE_LABEL], node_name);
    let owner = &pod.metadata.owner_references.clone().expect("an owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Node", node_name.as_str())
    );
    let spec = pod.spec.clone().expect("a spec");
    assert_eq!(spec.node_name.as_deref(), Some(node_name.as_str()));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let container = &spec.containers[0];
    assert_eq!(container.image.as_deref(), Some("cloudfs-node:test"));
    let privileged = container
        .security_context
        .as_ref()
        .and_then(|c| c.privileged);
    assert_eq!(privileged, Some(true));
    let command = container.command.clone().expect("a command").join(" ");
    for part in [
        "cloudfs --credentials /etc/cloudfs/credentials mount swift://pool data",
        &mountpoint.display().to_string(),
        "--foreground",
        "--cache-size 1073741824",
    ] {
        assert!(command.contains(part), "{part:?} in {command:?}");
    }
    let volumes = spec.volumes.clone().expect("volumes");
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.clone())
            .map(|h| h.path)
    };
    assert_eq!(host_path("state"), Some(state.path().display().to_string()));
    assert_eq!(host_path("fuse").as_deref(), Some("/dev/fuse"));
    let state_mount = container
        .volume_mounts
        .as_ref()
        .and_then(|mounts| mounts.iter().find(|m| m.name == "state"))
        .expect("the state dir mounted");
    assert_eq!(
        state_mount.mount_propagation.as_deref(),
        Some("Bidirectional")
    );
    let limits = container
        .resources
        .clone()
        .and_then(|r| r.limits)
        .expect("limits");
    assert_eq!(limits["memory"], Quantity("1Gi".into()));

    // The credentials, in a Secret the pod owns.
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(&name)
        .await
        .expect("the credentials Secret");
    let owner = &secret.metadata.owner_references.clone().expect("an owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Pod", name.as_str())
    );
    let file = secret
        .data
        .and_then(|data| data.get("credentials").cloned())
        .expect("a credentials file");
    assert_eq!(
        String::from_utf8_lossy(&file.0),
        "ST_AUTH=http://swift.example/auth/v1.0\nST_KEY=secret\n"
    );

    let _ = pods
        .delete(
            &name,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        )
        .await;
    let _ = nodes.delete(&node_name, &DeleteParams::default()).await;
}
