//! What the CSI tests share (included by `csi/tests` and `node/tests`): a pool with a
//! formatted volume, kubelet's publish and unpublish requests, and a guard that unmounts
//! whatever a failing test left behind.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use cloudfs_csi::mounts;
use cloudfs_csi::node::NodeService;
use cloudfs_csi::process_mounter::ProcessMounter;
use cloudfs_csi::proto::volume_capability::access_mode::Mode;
use cloudfs_csi::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use cloudfs_csi::proto::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability};

/// The `cloudfs` binary in the target directory holding `beside`.
pub fn cloudfs_binary(beside: &Path) -> PathBuf {
    let bin = beside.with_file_name("cloudfs");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p cloudfs`",
        bin.display()
    );
    bin
}

/// Formats volume `vol` in a local pool under `dir`; returns its CSI volume id.
pub fn formatted_volume(cloudfs: &Path, dir: &Path) -> String {
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).expect("mkdir");
    let pool_url = format!("file://{}", pool.display());
    let formatted = Command::new(cloudfs)
        .args(["format", &pool_url, "vol"])
        .output()
        .expect("cloudfs format");
    assert!(formatted.status.success(), "{formatted:?}");
    format!("vol@{pool_url}")
}

pub fn capability(mode: Mode) -> Option<VolumeCapability> {
    Some(VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode.into() }),
    })
}

pub fn publish(volume_id: &str, target: &Path, readonly: bool) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: target.display().to_string(),
        volume_capability: capability(Mode::SingleNodeMultiWriter),
        readonly,
        ..NodePublishVolumeRequest::default()
    }
}

pub fn unpublish(volume_id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: target.display().to_string(),
    }
}

pub fn is_mounted(path: &Path) -> bool {
    let table = mounts::mount_table().expect("mountinfo");
    mounts::mount_at(&table, path).is_some()
}

/// Unmounts whatever is still mounted under its directory when dropped.
pub struct Cleanup(pub PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for entry in mounts::mount_table().unwrap_or_default().iter().rev() {
            if entry.mount_point.starts_with(&self.0) {
                let _ = mounts::unmount(&entry.mount_point);
            }
        }
    }
}

/// The size `df` shows for the file system at `path`, in bytes (0 when `stat -f` fails).
pub fn df_size(path: &Path) -> i64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%b %S"])
        .arg(path)
        .output()
        .expect("stat -f");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut fields = text
        .split_whitespace()
        .map(|f| f.parse::<i64>().unwrap_or(0));
    fields.next().unwrap_or(0) * fields.next().unwrap_or(0)
}

/// The node plugin of node `node-1`, starting `cloudfs` mount processes, with its state and
/// run directories under `dir`.
pub fn process_node(cloudfs: PathBuf, dir: &Path) -> NodeService<ProcessMounter> {
    NodeService::new(
        "node-1".into(),
        dir.join("state"),
        ProcessMounter::new(cloudfs, dir.join("run")),
    )
}
