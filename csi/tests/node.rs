//! The Node service as kubelet drives it, with real `cloudfs mount` processes on a local
//! pool: one volume published at two target paths (one read-only) shares one mount; the
//! service is replaced by a fresh one (a plugin restart) while the mounts keep serving, and
//! the new one unpublishes both; a mount whose process died is reported abnormal and still
//! unpublished, and the next publish replaces it with a fresh one; a hung (stopped) mount is
//! reported abnormal within a bound and not bound into another pod; mount flags and the volume
//! context shape the mounts; a second call on a volume while one is in flight is `Aborted`;
//! bad requests get the right codes. Needs root and the `cloudfs` binary
//! (`cargo build -p cloudfs`, which `cargo test --workspace` does).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cloudfs_csi::node::{MountFailure, MountRequest, Mounter, NodeService};
use cloudfs_csi::process_mounter::ProcessMounter;
use cloudfs_csi::proto::node_server::Node;
use cloudfs_csi::proto::volume_capability::access_mode::Mode;
use cloudfs_csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use cloudfs_csi::proto::volume_usage::Unit;
use cloudfs_csi::proto::{NodeGetVolumeStatsRequest, VolumeCapability};
use support::{Cleanup, capability, is_mounted, publish, unpublish};
use tokio::sync::Notify;
use tonic::{Code, Request};

mod support;

/// The `cloudfs` binary of this test's target directory.
fn cloudfs_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    support::cloudfs_binary(exe.parent().expect("target/<profile>/deps"))
}

fn stats_of(volume_id: &str, path: &Path) -> Request<NodeGetVolumeStatsRequest> {
    Request::new(NodeGetVolumeStatsRequest {
        volume_id: volume_id.to_owned(),
        volume_path: path.display().to_string(),
        ..NodeGetVolumeStatsRequest::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_published_twice_shares_one_mount_that_outlives_the_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let volume_id = support::formatted_volume(&cloudfs_binary(), dir.path());
    let pool_url = volume_id.trim_start_matches("vol@").to_owned();
    let state = dir.path().join("state");
    let service = || {
        NodeService::new(
            "node-1".into(),
            state.clone(),
            ProcessMounter::new(cloudfs_binary(), dir.path().join("run")),
        )
    };
    let node = service();
    let (writer, reader) = (dir.path().join("pod-a/vol"), dir.path().join("pod-b/vol"));
    node.node_publish_volume(Request::new(publish(&volume_id, &writer, false)))
        .await
        .expect("publish read-write");
    node.node_publish_volume(Request::new(publish(&volume_id, &reader, true)))
        .await
        .expect("publish read-only");
    // Publishing again is a no-op.
    node.node_publish_volume(Request::new(publish(&volume_id, &reader, true)))
        .await
        .expect("publish again");
    std::fs::write(writer.join("hello"), b"from pod a").expect("write through one");
    assert_eq!(
        std::fs::read(reader.join("hello")).expect("read through the other"),
        b"from pod a"
    );
    let refused = std::fs::write(reader.join("nope"), b"x").expect_err("read-only");
    assert_eq!(refused.raw_os_error(), Some(libc::EROFS));
    let stats = node
        .node_get_volume_stats(stats_of(&volume_id, &writer))
        .await
        .expect("stats")
        .into_inner();
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit == Unit::Bytes as i32)
        .expect("bytes");
    assert!(bytes.used >= 10 && bytes.total > bytes.used, "{bytes:?}");
    assert_eq!(stats.volume_condition.map(|c| c.abnormal), Some(false));

    // A restarted plugin: a fresh service, nothing remembered. The mounts kept serving.
    drop(node);
    let node = service();
    std::fs::write(writer.join("after"), b"still here").expect("write after the restart");
    assert_eq!(
        std::fs::read(reader.join("after")).expect("read"),
        b"still here"
    );
    let shared =
        node.shared_mountpoint(&cloudfs_csi::volume_id::VolumeId::parse(&volume_id).expect("id"));
    node.node_unpublish_volume(Request::new(unpublish(&volume_id, &writer)))
        .await
        .expect("unpublish one");
    assert!(!writer.exists(), "the target path is removed");
    assert!(is_mounted(&shared), "the other pod still uses the mount");
    node.node_unpublish_volume(Request::new(unpublish(&volume_id, &reader)))
        .await
        .expect("unpublish the other");
    assert!(
        !is_mounted(&shared),
        "the last user gone, the mount stopped"
    );
    node.node_unpublish_volume(Request::new(unpublish(&volume_id, &reader)))
        .await
        .expect("unpublishing again is a no-op");

    // A mount whose process died: reported abnormal, and still unpublished.
    node.node_publish_volume(Request::new(publish(&volume_id, &writer, false)))
        .await
        .expect("publish");
    let killed = Command::new("pkill")
        .args(["-9", "-f", &format!("mount {pool_url} vol")])
        .status()
        .expect("pkill");
    assert!(killed.success(), "the mount process was found");
    let stats = node
        .node_get_volume_stats(stats_of(&volume_id, &writer))
        .await
        .expect("stats of a broken mount")
        .into_inner();
    assert_eq!(stats.volume_condition.map(|c| c.abnormal), Some(true));
    node.node_unpublish_volume(Request::new(unpublish(&volume_id, &writer)))
        .await
        .expect("unpublish a broken mount");
    assert!(!writer.exists(), "the broken target is removed");
    assert!(!is_mounted(&shared), "the dead mount is detached");
}

/// The pid and command line of the process serving the mount at `mountpoint`.
fn mount_process(mountpoint: &Path) -> (i32, Vec<String>) {
    let wanted = mountpoint.display().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args = cmdline
                .split(|b| *b == 0)
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect::<Vec<_>>();
            Some((pid, args))
        })
        .find(|(_, args)| args.iter().any(|a| a == "mount") && args.contains(&wanted))
        .expect("the mount process")
}

/// The command line of the process serving the mount at `mountpoint`.
fn mount_process_args(mountpoint: &Path) -> Vec<String> {
    mount_process(mountpoint).1
}

/// Kills the process serving the mount at `mountpoint`, as a crash would, and waits (a
/// bounded while) for its mount to be dead.
fn crash_mount_process(mountpoint: &Path) {
    let (pid, _) = mount_process(mountpoint);
    // SAFETY: a pid just read from /proc, of a process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill {pid}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::metadata(mountpoint) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return,
            _ if std::time::Instant::now() > deadline => {
                panic!("the mount at {} did not die", mountpoint.display())
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_replaces_a_shared_mount_whose_process_died() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let volume_id = support::formatted_volume(&cloudfs_binary(), dir.path());
    let node = support::process_node(cloudfs_binary(), dir.path());
    // A short lease, so the crashed writer's lease is soon over (kubelet would retry the
    // publish until then).
    let lease_ttl = Duration::from_secs(2);
    let request_for = |target: &Path| {
        let mut request = publish(&volume_id, target, false);
        request.volume_context = [("leaseTTL".to_owned(), lease_ttl.as_secs().to_string())].into();
        Request::new(request)
    };
    let (first, second) = (dir.path().join("pod-a/vol"), dir.path().join("pod-b/vol"));
    node.node_publish_volume(request_for(&first))
        .await
        .expect("publish");
    std::fs::write(first.join("before"), b"x").expect("the first mount works");
    let shared =
        node.shared_mountpoint(&cloudfs_csi::volume_id::VolumeId::parse(&volume_id).expect("id"));
    crash_mount_process(&shared);
    tokio::time::sleep(lease_ttl + Duration::from_secs(1)).await;

    // A new pod: it gets a fresh mount, not the dead one.
    node.node_publish_volume(request_for(&second))
        .await
        .expect("publish after the crash");
    std::fs::write(second.join("after"), b"fresh mount").expect("write through the new pod");
    assert_eq!(
        std::fs::read(second.join("after")).expect("read it back"),
        b"fresh mount"
    );
    std::fs::metadata(&shared).expect("the shared mount answers");
    // Publishing the old pod again replaces its bind mount of the dead mount.
    node.node_publish_volume(request_for(&first))
        .await
        .expect("publish the old pod again");
    assert_eq!(
        std::fs::read(first.join("after")).expect("read through the old pod"),
        b"fresh mount"
    );

    for target in [&first, &second] {
        node.node_unpublish_volume(Request::new(unpublish(&volume_id, target)))
            .await
            .expect("unpublish");
    }
    assert!(
        !is_mounted(&shared),
        "the last user gone, the mount stopped"
    );
}

/// A process stopped with SIGSTOP, resumed when dropped (so a failing test leaves no frozen
/// mount) or at the latest after `limit`, by a thread of its own: a call that blocks the
/// async runtime's threads (as a statfs on them would) also stalls the runtime's timers.
struct Frozen {
    done: Option<std::sync::mpsc::Sender<()>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

impl Frozen {
    fn stop(pid: i32, limit: Duration) -> Frozen {
        // SAFETY: a pid just read from /proc, of a process this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "stop {pid}");
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let _ = wait.recv_timeout(limit);
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        });
        Frozen {
            done: Some(done),
            watchdog: Some(watchdog),
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(watchdog) = self.watchdog.take() {
            let _ = watchdog.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_mount_is_reported_abnormal_without_hanging_the_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let volume_id = support::formatted_volume(&cloudfs_binary(), dir.path());
    let node = Arc::new(support::process_node(cloudfs_binary(), dir.path()));
    let target = dir.path().join("pod-a/vol");
    // The calls run as tasks of their own, not on the test's thread, so that one blocking
    // its worker thread leaves the test to fail.
    let stats_task = |node: &Arc<NodeService<ProcessMounter>>| {
        let (node, request) = (node.clone(), stats_of(&volume_id, &target));
        tokio::spawn(async move { node.node_get_volume_stats(request).await })
    };
    node.node_publish_volume(Request::new(publish(&volume_id, &target, false)))
        .await
        .expect("publish");
    let shared =
        node.shared_mountpoint(&cloudfs_csi::volume_id::VolumeId::parse(&volume_id).expect("id"));
    let (pid, _) = mount_process(&shared);

    // Freeze the mount process: FUSE calls on its mount wait for it.
    let frozen = Frozen::stop(pid, Duration::from_secs(40));
    let bound = cloudfs_csi::node::ANSWER_TIMEOUT + Duration::from_secs(10);
    let stats = tokio::time::timeout(
        bound,
        node.node_get_volume_stats(stats_of(&volume_id, &target)),
    )
    .await
    .expect("NodeGetVolumeStats answers although the mount hangs")
    .expect("stats")
    .into_inner();
    let condition = stats.volume_condition.expect("a condition");
    assert!(condition.abnormal, "{condition:?}");
    assert!(
        condition.message.contains("not answering within"),
        "{condition:?}"
    );
    // Asked again while the first statfs still waits: answered at once.
    let again = tokio::time::timeout(Duration::from_secs(1), stats_task(&node))
        .await
        .expect("answered without waiting again")
        .expect("task")
        .expect("stats")
        .into_inner();
    assert_eq!(again.volume_condition.map(|c| c.abnormal), Some(true));
    // Nor is the hung mount bound into another pod.
    let other = dir.path().join("pod-b/vol");
    let publish_task = {
        let (node, request) = (node.clone(), publish(&volume_id, &other, false));
        tokio::spawn(async move { node.node_publish_volume(Request::new(request)).await })
    };
    let status = tokio::time::timeout(bound, publish_task)
        .await
        .expect("NodePublishVolume answers although the mount hangs")
        .expect("task")
        .expect_err("a hung mount is not published");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // Resumed, the mount is healthy again.
    drop(frozen);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stats = node
            .node_get_volume_stats(stats_of(&volume_id, &target))
            .await
            .expect("stats")
            .into_inner();
        if stats.volume_condition.as_ref().map(|c| c.abnormal) == Some(false) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still abnormal after the mount resumed: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.node_unpublish_volume(Request::new(unpublish(&volume_id, &target)))
        .await
        .expect("unpublish");
    assert!(!is_mounted(&shared), "the mount stopped");
}

/// A mounter whose mounts wait for the test's go-ahead, then mount a tmpfs: a slow mount
/// the test controls.
struct GatedMounter {
    entered: Arc<Notify>,
    go: Arc<Notify>,
}

#[tonic::async_trait]
impl Mounter for GatedMounter {
    async fn mount(&self, request: MountRequest<'_>) -> Result<(), MountFailure> {
        self.entered.notify_one();
        self.go.notified().await;
        let fail = |e: std::io::Error| MountFailure::Failed(e.to_string());
        let target = std::ffi::CString::new(request.mountpoint.as_os_str().as_encoded_bytes())
            .map_err(|e| fail(std::io::Error::other(e)))?;
        // SAFETY: valid NUL-terminated strings; tmpfs takes no data.
        let mounted = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if mounted != 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    async fn unmount(&self, mountpoint: &Path) -> Result<(), MountFailure> {
        cloudfs_csi::mounts::unmount(mountpoint).map_err(|e| MountFailure::Failed(e.to_string()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_call_on_a_volume_in_flight_is_aborted_and_succeeds_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let (entered, go) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let node = Arc::new(NodeService::new(
        "node-1".into(),
        dir.path().join("state"),
        GatedMounter {
            entered: entered.clone(),
            go: go.clone(),
        },
    ));
    let volume_id = format!("vol@file://{}", dir.path().join("pool").display());
    let (first, second) = (dir.path().join("pod-a/vol"), dir.path().join("pod-b/vol"));
    let slow = {
        let (node, request) = (node.clone(), publish(&volume_id, &first, false));
        tokio::spawn(async move { node.node_publish_volume(Request::new(request)).await })
    };
    tokio::time::timeout(Duration::from_secs(10), entered.notified())
        .await
        .expect("the first publish reaches its mount");

    // While it mounts, other calls on the volume are refused, not queued.
    let at_once = Duration::from_secs(5);
    let status = tokio::time::timeout(
        at_once,
        node.node_publish_volume(Request::new(publish(&volume_id, &second, false))),
    )
    .await
    .expect("answered at once")
    .expect_err("a publish while one is in flight");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let status = tokio::time::timeout(
        at_once,
        node.node_unpublish_volume(Request::new(unpublish(&volume_id, &first))),
    )
    .await
    .expect("answered at once")
    .expect_err("an unpublish while a publish is in flight");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(!second.exists(), "the refused publish made nothing");

    go.notify_one();
    tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the first publish finishes")
        .expect("task")
        .expect("the first publish succeeds");
    // The volume free again, the same call succeeds (and shares the mount).
    node.node_publish_volume(Request::new(publish(&volume_id, &second, false)))
        .await
        .expect("the retried publish");
    std::fs::write(first.join("file"), b"shared").expect("write through one pod");
    assert_eq!(
        std::fs::read(second.join("file")).expect("read through the other"),
        b"shared"
    );
    for target in [&first, &second] {
        node.node_unpublish_volume(Request::new(unpublish(&volume_id, target)))
            .await
            .expect("unpublish");
    }
    let shared =
        node.shared_mountpoint(&cloudfs_csi::volume_id::VolumeId::parse(&volume_id).expect("id"));
    assert!(
        !is_mounted(&shared),
        "the last user gone, the mount stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_flags_and_the_volume_context_shape_the_mounts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let volume_id = support::formatted_volume(&cloudfs_binary(), dir.path());
    let node = support::process_node(cloudfs_binary(), dir.path());
    let target = dir.path().join("pod/vol");
    let mut request = publish(&volume_id, &target, false);
    request.volume_capability = Some(VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            mount_flags: vec!["noexec,nosuid".into(), "nodev".into()],
            ..MountVolume::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
    });
    request.volume_context = [
        ("cacheSize", "64MiB"),
        ("fuseThreads", "4"),
        ("syncInterval", "2s"),
        ("csi.storage.k8s.io/pod.name", "app-0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    node.node_publish_volume(Request::new(request.clone()))
        .await
        .expect("publish");

    let table = cloudfs_csi::mounts::mount_table().expect("mountinfo");
    let bound = cloudfs_csi::mounts::mount_at(&table, &target).expect("the pod's mount");
    for flag in ["noexec", "nosuid", "nodev", "rw"] {
        assert!(bound.options.iter().any(|o| o == flag), "{flag}: {bound:?}");
    }
    let shared =
        node.shared_mountpoint(&cloudfs_csi::volume_id::VolumeId::parse(&volume_id).expect("id"));
    let args = mount_process_args(&shared).join(" ");
    for option in ["--cache-size 67108864", "--threads 4", "--sync-interval 2"] {
        assert!(args.contains(option), "{option} in {args}");
    }
    std::fs::write(target.join("file"), b"data").expect("the mount works");

    // Bad flags and options are refused before anything is mounted.
    let other = dir.path().join("pod-2/vol");
    let mut bad_flag = publish(&volume_id, &other, false);
    if let Some(AccessType::Mount(mount)) = bad_flag
        .volume_capability
        .as_mut()
        .and_then(|c| c.access_type.as_mut())
    {
        mount.mount_flags = vec!["sync".into()];
    }
    let status = node
        .node_publish_volume(Request::new(bad_flag))
        .await
        .expect_err("an unsupported flag");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("sync"), "{status:?}");
    let mut bad_context = publish(&volume_id, &other, false);
    bad_context.volume_context = [("cacheSize".to_owned(), "lots".to_owned())].into();
    let status = node
        .node_publish_volume(Request::new(bad_context))
        .await
        .expect_err("a bad cache size");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        !other.exists(),
        "nothing was made for the refused publishes"
    );

    node.node_unpublish_volume(Request::new(unpublish(&volume_id, &target)))
        .await
        .expect("unpublish");
    assert!(!is_mounted(&shared), "the mount stopped");
}

#[tokio::test]
async fn bad_requests_get_the_codes_the_spec_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeService::new(
        "node-1".into(),
        dir.path().join("state"),
        ProcessMounter::new(
            PathBuf::from("/nonexistent/cloudfs"),
            dir.path().join("run"),
        ),
    );
    let target = dir.path().join("target");
    fn code<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
        result.expect_err("refused").code()
    }
    let mut missing_id = publish("", &target, false);
    assert_eq!(
        code(
            node.node_publish_volume(Request::new(missing_id.clone()))
                .await
        ),
        Code::InvalidArgument
    );
    missing_id.volume_id = "vol@file:///x".into();
    missing_id.target_path.clear();
    assert_eq!(
        code(node.node_publish_volume(Request::new(missing_id)).await),
        Code::InvalidArgument
    );
    let mut no_capability = publish("vol@file:///x", &target, false);
    no_capability.volume_capability = None;
    assert_eq!(
        code(node.node_publish_volume(Request::new(no_capability)).await),
        Code::InvalidArgument
    );
    let mut block = publish("vol@file:///x", &target, false);
    block.volume_capability = Some(VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
    });
    assert_eq!(
        code(node.node_publish_volume(Request::new(block)).await),
        Code::InvalidArgument
    );
    let mut many_writers = publish("vol@file:///x", &target, false);
    many_writers.volume_capability = capability(Mode::MultiNodeMultiWriter);
    let status = node
        .node_publish_volume(Request::new(many_writers))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("one writer"), "{status:?}");
    assert_eq!(
        code(
            node.node_publish_volume(Request::new(publish("not-an-id", &target, false)))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            node.node_unpublish_volume(Request::new(unpublish("", &target)))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_get_volume_stats(stats_of("vol@file:///x", &target))
                .await
        ),
        Code::NotFound
    );
}
