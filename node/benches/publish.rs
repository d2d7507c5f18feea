//! Benchmark (not a test): NodePublishVolume latency, from the call to a target path that
//! answers `stat`, for a fresh volume and for one of 100,000 files, on a local pool (or the
//! pool given as `CLOUDFS_BENCH_POOL`, e.g. `swift://bench` with the ST_* variables set).
//! Prints a table. Needs root. Run:
//! `cargo build --release -p cloudfs && cargo bench -p cloudfs-node --bench publish`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cloudfs_csi::node::NodeService;
use cloudfs_csi::process_mounter::ProcessMounter;
use cloudfs_csi::proto::node_server::Node;
use cloudfs_csi::proto::volume_capability::access_mode::Mode;
use cloudfs_csi::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use cloudfs_csi::proto::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability};
use tonic::Request;

fn cloudfs() -> PathBuf {
    let exe = std::env::current_exe().expect("the bench binary's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .join("cloudfs");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release -p cloudfs` first",
        bin.display()
    );
    bin
}

fn run(cloudfs: &Path, args: &[&str]) {
    let out = Command::new(cloudfs).args(args).output().expect("cloudfs");
    assert!(out.status.success(), "cloudfs {args:?}: {out:?}");
}

/// A volume of `files` files: 1,000 written, then copies of their directory.
fn make_volume(cloudfs: &Path, pool: &str, name: &str, files: usize, work: &Path) {
    run(cloudfs, &["format", pool, name]);
    if files == 0 {
        return;
    }
    let mnt = work.join(format!("fill-{name}"));
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let run_dir = work.join("fill-run");
    let run_dir = run_dir.to_string_lossy();
    let mnt_text = mnt.to_string_lossy();
    run(
        cloudfs,
        &["--run-dir", &run_dir, "mount", pool, name, &mnt_text],
    );
    let first = mnt.join("d000");
    std::fs::create_dir(&first).expect("mkdir");
    for i in 0..files.min(1000) {
        std::fs::write(first.join(format!("f{i:04}")), b"bench").expect("write");
    }
    for k in 1..files / 1000 {
        let copy = mnt.join(format!("d{k:03}"));
        run(
            cloudfs,
            &[
                "snapshot",
                "tree",
                &first.to_string_lossy(),
                &copy.to_string_lossy(),
            ],
        );
    }
    run(cloudfs, &["--run-dir", &run_dir, "umount", &mnt_text]);
}

fn publish(volume_id: &str, target: &Path) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: target.display().to_string(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter.into(),
            }),
        }),
        ..NodePublishVolumeRequest::default()
    }
}

#[tokio::main]
async fn main() {
    let work = tempfile::tempdir().expect("tempdir");
    let cloudfs = cloudfs();
    let pool = std::env::var("CLOUDFS_BENCH_POOL").unwrap_or_else(|_| {
        let dir = work.path().join("pool");
        std::fs::create_dir(&dir).expect("mkdir");
        format!("file://{}", dir.display())
    });
    let node = NodeService::new(
        "bench".into(),
        work.path().join("state"),
        ProcessMounter::new(cloudfs.clone(), work.path().join("run")),
    );
    println!("{:<32} {:>10} {:>12}", "volume", "files", "publish ms");
    for (name, files) in [("fresh", 0), ("files-100k", 100_000)] {
        make_volume(&cloudfs, &pool, name, files, work.path());
        let volume_id = format!("{name}@{pool}");
        let target = work.path().join("pods").join(name);
        let start = Instant::now();
        node.node_publish_volume(Request::new(publish(&volume_id, &target)))
            .await
            .expect("publish");
        std::fs::metadata(target.join(".")).expect("the target answers");
        let took = start.elapsed();
        println!(
            "{name:<32} {files:>10} {:>12.0}",
            took.as_secs_f64() * 1000.0
        );
        node.node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
            volume_id,
            target_path: target.display().to_string(),
        }))
        .await
        .expect("unpublish");
    }
}
