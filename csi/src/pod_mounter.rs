//! A [`Mounter`] that serves each volume from a mount pod of its own on this node, so that
//! upgrading or restarting the node plugin's pod never ends the mounts applications use.
//!
//! The pod runs `cloudfs mount --foreground` privileged, with `/dev/fuse` and the node's state
//! directory (a hostPath mounted at the same path, with bidirectional propagation): the FUSE
//! mount it makes there is seen by the node plugin, which binds it into pods as with a mount
//! process. Credentials travel in a Secret the pod owns; the pod is owned by the Node, so it
//! goes with the node. A restarted plugin finds the mounts again in the kernel's mount table.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, HostPathVolumeSource, Node, Pod, PodSpec, ResourceRequirements, Secret,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, Resource};

use crate::metrics::MOUNT_METRICS_SOCKET;
use crate::mounts;
use crate::node::{MountFailure, MountRequest, Mounter};
use crate::process_mounter::{classify, credentials_file};

/// Where a mount pod finds its credentials file.
const CREDENTIALS_DIR: &str = "/etc/cloudfs";
/// Label every mount pod carries, with its node's name.
pub const NODE_LABEL: &str = "cloudfs.io/mount-node";

/// How mount pods are made.
#[derive(Debug, Clone)]
pub struct PodSettings {
    /// The namespace of mount pods (the node plugin's own).
    pub namespace: String,
    /// This node's name (mount pods are bound to it).
    pub node_name: String,
    /// The image with the `cloudfs` binary (the node plugin's own).
    pub image: String,
    /// The node plugin's state directory, on the host and in every mount pod.
    pub state_dir: PathBuf,
    pub resources: Option<ResourceRequirements>,
    pub priority_class_name: Option<String>,
    /// How long a mount pod may take to serve its mount, pulling its image included.
    pub start_timeout: Duration,
    /// How long a mount pod has to flush to the store when it is deleted.
    pub stop_timeout: Duration,
}

/// Starts and stops mount pods through the Kubernetes API.
#[derive(Clone)]
pub struct PodMounter {
    client: Client,
    settings: PodSettings,
}

fn failed(what: &str, error: impl std::fmt::Display) -> MountFailure {
    MountFailure::Failed(format!("{what}: {error}"))
}

impl PodMounter {
    pub fn new(client: Client, settings: PodSettings) -> PodMounter {
        PodMounter { client, settings }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    /// The name of the pod serving `mountpoint` on this node: a volume may be mounted on
    /// several nodes, and its mountpoint names it on each.
    pub fn pod_name(&self, mountpoint: &Path) -> String {
        let key = format!("{}\n{}", self.settings.node_name, mountpoint.display());
        let digest = blake3::hash(key.as_bytes()).to_hex();
        format!("cloudfs-mount-{}", &digest[..20])
    }

    /// The mount pod serving `request` (not created yet), owned by `node`.
    pub fn pod_for(&self, request: &MountRequest<'_>, node: Option<&Node>) -> Pod {
        let settings = &self.settings;
        let name = self.pod_name(request.mountpoint);
        let dir = request.mountpoint.parent().unwrap_or(request.mountpoint);
        let mut command: Vec<String> = vec!["cloudfs".into()];
        if !request.secrets.is_empty() {
            command.extend([
                "--credentials".into(),
                format!("{CREDENTIALS_DIR}/credentials"),
            ]);
        }
        command.extend([
            "mount".into(),
            request.id.pool.clone(),
            request.id.volume.clone(),
            request.mountpoint.display().to_string(),
            "--foreground".into(),
            "--cache-dir".into(),
            dir.join("cache").display().to_string(),
            "--metrics".into(),
            format!("unix:{}", dir.join(MOUNT_METRICS_SOCKET).display()),
        ]);
        if request.read_only {
            command.push("--read-only".into());
        }
        command.extend(request.options.mount_args());
        let state_dir = settings.state_dir.display().to_string();
        let mut volumes = vec![
            host_path_volume("state", &state_dir, "Directory"),
            host_path_volume("fuse", "/dev/fuse", "CharDevice"),
        ];
        let mut mounts = vec![
            VolumeMount {
                name: "state".into(),
                mount_path: state_dir.clone(),
                mount_propagation: Some("Bidirectional".into()),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "fuse".into(),
                mount_path: "/dev/fuse".into(),
                ..VolumeMount::default()
            },
        ];
        if !request.secrets.is_empty() {
            volumes.push(Volume {
                name: "credentials".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(name.clone()),
                    default_mode: Some(0o400),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
            mounts.push(VolumeMount {
                name: "credentials".into(),
                mount_path: CREDENTIALS_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
        let labels = BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "cloudfs".to_owned()),
            ("app.kubernetes.io/component".to_owned(), "mount".to_owned()),
            (NODE_LABEL.to_owned(), settings.node_name.clone()),
        ]);
        Pod {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(settings.namespace.clone()),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(
                    "cloudfs.io/volume".to_owned(),
                    request.id.to_string(),
                )])),
                owner_references: node.and_then(|node| node.controller_owner_ref(&())).map(
                    |mut owner| {
                        // The node owns the pod without blocking its deletion.
                        owner.controller = Some(false);
                        owner.block_owner_deletion = None;
                        vec![owner]
                    },
                ),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(settings.node_name.clone()),
                // A dead FUSE mount needs the plugin to clear it first: no blind restarts.
                restart_policy: Some("Never".into()),
                priority_class_name: settings.priority_class_name.clone(),
                termination_grace_period_seconds: Some(
                    i64::try_from(settings.stop_timeout.as_secs()).unwrap_or(i64::MAX),
                ),
                tolerations: Some(vec![k8s_openapi::api::core::v1::Toleration {
                    operator: Some("Exists".into()),
                    ..Default::default()
                }]),
                automount_service_account_token: Some(false),
                enable_service_links: Some(false),
                containers: vec![Container {
                    name: "mount".into(),
                    image: Some(settings.image.clone()),
                    command: Some(command),
                    resources: settings.resources.clone(),
                    security_context: Some(SecurityContext {
                        privileged: Some(true),
                        ..SecurityContext::default()
                    }),
                    termination_message_policy: Some("FallbackToLogsOnError".into()),
                    volume_mounts: Some(mounts),
                    ..Container::default()
                }],
                volumes: Some(volumes),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    /// The credentials Secret of mount pod `pod`, owned by it.
    fn secret_for(&self, pod: &Pod, secrets: &HashMap<String, String>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: pod.metadata.name.clone(),
                namespace: Some(self.settings.namespace.clone()),
                owner_references: pod.controller_owner_ref(&()).map(|owner| {
                    vec![OwnerReference {
                        // Blocking the pod's deletion would need rights on pods/finalizers.
                        block_owner_deletion: None,
                        ..owner
                    }]
                }),
                ..ObjectMeta::default()
            },
            string_data: Some(BTreeMap::from([(
                "credentials".to_owned(),
                credentials_file(secrets),
            )])),
            ..Secret::default()
        }
    }

    /// Waits until the pod's mount appears at `mountpoint`, or the pod ends.
    async fn served(&self, name: &str, mountpoint: &Path) -> Result<(), MountFailure> {
        let started = Instant::now();
        loop {
            let table = mounts::mount_table().map_err(|e| failed("reading the mount table", e))?;
            if mounts::mount_at(&table, mountpoint).is_some() {
                return Ok(());
            }
            let pod = self
                .pods()
                .get_opt(name)
                .await
                .map_err(|e| failed("reading the mount pod", e))?
                .ok_or_else(|| MountFailure::Failed(format!("mount pod {name} disappeared")))?;
            if let Some(message) = ended(&pod) {
                return Err(classify(&message));
            }
            if started.elapsed() > self.settings.start_timeout {
                return Err(MountFailure::Failed(format!(
                    "mount pod {name} did not serve {} within {:?}",
                    mountpoint.display(),
                    self.settings.start_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A `NAME=QUANTITY` pair of a container's resources (`cpu=100m`, `memory=1Gi`).
pub fn resource_quantity(pair: &str) -> Result<(String, Quantity), String> {
    match pair.split_once('=') {
        Some((name, quantity)) if !name.is_empty() && !quantity.is_empty() => {
            Ok((name.to_owned(), Quantity(quantity.to_owned())))
        }
        _ => Err(format!("{pair:?} is not NAME=QUANTITY (e.g. memory=1Gi)")),
    }
}

fn host_path_volume(name: &str, path: &str, type_: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(type_.into()),
        }),
        ..Volume::default()
    }
}

/// What a mount pod that has stopped said last (its termination message), if it stopped.
fn ended(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if !matches!(status.phase.as_deref(), Some("Failed" | "Succeeded")) {
        return None;
    }
    let terminated = status
        .container_statuses
        .as_ref()
        .and_then(|statuses| statuses.first())
        .and_then(|s| s.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    Some(
        terminated
            .and_then(|t| t.message.clone())
            .unwrap_or_else(|| "the mount pod stopped".into()),
    )
}

#[tonic::async_trait]
impl Mounter for PodMounter {
    async fn mount(&self, request: MountRequest<'_>) -> Result<(), MountFailure> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = nodes
            .get_opt(&self.settings.node_name)
            .await
            .map_err(|e| failed("reading this node", e))?;
        let pod = self.pod_for(&request, node.as_ref());
        let name = pod.metadata.name.clone().unwrap_or_default();
        // A pod of an earlier attempt that did not serve is replaced.
        if let Some(stale) = self
            .pods()
            .get_opt(&name)
            .await
            .map_err(|e| failed("reading the mount pod", e))?
        {
            tracing::info!(pod = %name, "replacing a mount pod that does not serve");
            self.remove(&name, &stale).await?;
        }
        let created = self
            .pods()
            .create(&PostParams::default(), &pod)
            .await
            .map_err(|e| failed("creating the mount pod", e))?;
        if !request.secrets.is_empty() {
            let secrets: Api<Secret> =
                Api::namespaced(self.client.clone(), &self.settings.namespace);
            secrets
                .create(
                    &PostParams::default(),
                    &self.secret_for(&created, request.secrets),
                )
                .await
                .map_err(|e| failed("creating the mount pod's credentials", e))?;
        }
        tracing::info!(pod = %name, volume = %request.id, "started a mount pod");
        if let Err(e) = self.served(&name, request.mountpoint).await {
            let _ = self.remove(&name, &created).await;
            return Err(e);
        }
        Ok(())
    }

    async fn unmount(&self, mountpoint: &Path) -> Result<(), MountFailure> {
        let name = self.pod_name(mountpoint);
        if let Some(pod) = self
            .pods()
            .get_opt(&name)
            .await
            .map_err(|e| failed("reading the mount pod", e))?
        {
            self.remove(&name, &pod).await?;
        }
        // Whatever the pod left (it was killed, or it never existed): detach it.
        let table = mounts::mount_table().map_err(|e| failed("reading the mount table", e))?;
        if mounts::mount_at(&table, mountpoint).is_some() {
            mounts::unmount(mountpoint)
                .map_err(|e| failed(&format!("detaching {}", mountpoint.display()), e))?;
        }
        Ok(())
    }
}

impl PodMounter {
    /// Deletes mount pod `name` (it flushes and unmounts on SIGTERM) and waits until it is
    /// gone, at most its grace period and a little more.
    async fn remove(&self, name: &str, pod: &Pod) -> Result<(), MountFailure> {
        let uid = pod.metadata.uid.clone();
        self.pods()
            .delete(name, &DeleteParams::default())
            .await
            .map_err(|e| failed("deleting the mount pod", e))?;
        let deadline = Instant::now() + self.settings.stop_timeout + Duration::from_secs(10);
        while Instant::now() < deadline {
            let current = self
                .pods()
                .get_opt(name)
                .await
                .map_err(|e| failed("reading the mount pod", e))?;
            if current.is_none_or(|p| p.metadata.uid != uid) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(MountFailure::Failed(format!(
            "mount pod {name} still exists after {:?}",
            self.settings.stop_timeout
        )))
    }
}
