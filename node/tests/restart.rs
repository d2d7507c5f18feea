//! Plays kubelet against the real `cloudfs-node` binary over its socket: a volume published
//! at two target paths (one read-only), written through one and read through the other; the
//! plugin is killed with SIGKILL and started again while I/O on the mounts goes on; the new
//! plugin unpublishes both; SIGTERM stops it cleanly. Needs root (FUSE, bind mounts).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudfs_csi::mounts;
use cloudfs_csi::proto::identity_client::IdentityClient;
use cloudfs_csi::proto::node_client::NodeClient;
use cloudfs_csi::proto::{NodeGetInfoRequest, ProbeRequest};
use cloudfs_csi::server;
use support::{Cleanup, publish, unpublish};
use tonic::transport::Channel;

#[path = "../../csi/tests/support/mod.rs"]
mod support;

const NODE: &str = env!("CARGO_BIN_EXE_cloudfs-node");

/// The `cloudfs` binary, built beside `cloudfs-node`.
fn cloudfs() -> PathBuf {
    support::cloudfs_binary(Path::new(NODE))
}

fn metrics_socket(dir: &Path) -> PathBuf {
    dir.join("node-metrics.sock")
}

/// What the plugin's `/metrics` says now.
async fn node_metrics(dir: &Path) -> String {
    cloudfs_metrics::scrape(&metrics_socket(dir), Duration::from_secs(10))
        .await
        .expect("the node plugin's metrics")
}

/// The value of the first series of metric `name` whose labels include all of `labels`.
fn value(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// A running `cloudfs-node`, killed when dropped.
struct Plugin(Child);

impl Plugin {
    fn start(dir: &Path) -> Plugin {
        let child = Command::new(NODE)
            .arg("--endpoint")
            .arg(format!("unix://{}", dir.join("csi.sock").display()))
            .args(["--node-id", "node-1"])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--cloudfs")
            .arg(cloudfs())
            .arg("--metrics-addr")
            .arg(format!("unix:{}", metrics_socket(dir).display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("start cloudfs-node");
        Plugin(child)
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling the child this value owns.
        unsafe { libc::kill(self.0.id() as i32, signal) };
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the plugin does not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Dials the plugin once it is up and ready.
async fn ready_channel(dir: &Path) -> Channel {
    let start = Instant::now();
    loop {
        if let Ok(channel) = server::connect(&dir.join("csi.sock")).await {
            let probe = IdentityClient::new(channel.clone())
                .probe(ProbeRequest {})
                .await;
            if probe.is_ok_and(|r| r.into_inner().ready == Some(true)) {
                return channel;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the plugin never got ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_keep_serving_across_a_plugin_restart_and_the_new_plugin_unpublishes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let volume_id = support::formatted_volume(&cloudfs(), dir.path());

    let mut plugin = Plugin::start(dir.path());
    let channel = ready_channel(dir.path()).await;
    let mut node = NodeClient::new(channel);
    let info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo")
        .into_inner();
    assert_eq!(info.node_id, "node-1");
    let (a, b) = (dir.path().join("pods/a/vol"), dir.path().join("pods/b/vol"));
    node.node_publish_volume(publish(&volume_id, &a, false))
        .await
        .expect("publish a");
    node.node_publish_volume(publish(&volume_id, &b, true))
        .await
        .expect("publish b");
    std::fs::write(a.join("one"), b"written through a").expect("write");
    assert_eq!(
        std::fs::read(b.join("one")).expect("read"),
        b"written through a"
    );

    // The plugin's metrics: its calls, and the mount process's file-system work.
    let metrics = node_metrics(dir.path()).await;
    let publishes = r#"method="NodePublishVolume""#;
    assert_eq!(
        value(
            &metrics,
            "cloudfs_csi_requests_total",
            &[publishes, r#"code="Ok""#]
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        value(&metrics, "cloudfs_node_mount_processes", &[]),
        Some(1.0)
    );
    let written = |metrics: &str| {
        value(
            metrics,
            "cloudfs_fs_written_bytes_total",
            &[r#"volume="vol""#],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(written(&metrics), 17.0, "{metrics}");

    // The plugin dies; the pods' mounts do not.
    plugin.signal(libc::SIGKILL);
    plugin.wait();
    std::fs::write(a.join("two"), b"while the plugin is down").expect("write");
    assert_eq!(
        std::fs::read(b.join("two")).expect("read"),
        b"while the plugin is down"
    );

    // A new plugin takes over, shows the mount's metrics again and unpublishes what the
    // old one published.
    let mut plugin = Plugin::start(dir.path());
    let mut node = NodeClient::new(ready_channel(dir.path()).await);
    let metrics = node_metrics(dir.path()).await;
    assert_eq!(written(&metrics), 17.0 + 24.0, "{metrics}");
    assert_eq!(
        value(&metrics, "cloudfs_csi_requests_total", &[publishes]),
        None
    );
    node.node_unpublish_volume(unpublish(&volume_id, &a))
        .await
        .expect("unpublish a");
    assert_eq!(
        std::fs::read(b.join("one")).expect("b still serves"),
        b"written through a"
    );
    node.node_unpublish_volume(unpublish(&volume_id, &b))
        .await
        .expect("unpublish b");
    assert!(!a.exists() && !b.exists(), "target paths removed");
    let table = mounts::mount_table().expect("mountinfo");
    assert!(
        !table.iter().any(|m| m.mount_point.starts_with(dir.path())),
        "no mount left: {table:?}"
    );

    // SIGTERM: a clean stop that removes the socket.
    plugin.signal(libc::SIGTERM);
    assert!(plugin.wait().success());
    assert!(!dir.path().join("csi.sock").exists());
}
