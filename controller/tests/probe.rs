//! `cloudfs-controller`'s Probe follows its default pool's store: with Swift unreachable (the
//! credentials point at a closed port) it answers not-ready, promptly; with a pool that
//! answers, ready. Runs the real binary, as the CSI sidecars reach it, on a Unix socket.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cloudfs_csi::proto::ProbeRequest;
use cloudfs_csi::proto::identity_client::IdentityClient;
use cloudfs_csi::server;
use tonic::transport::Channel;

/// A `cloudfs-controller` process, killed when dropped.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cloudfs-controller` serving `pool` on a socket in `dir`, with only `env` as its
/// environment (no credentials of this test's own leak in).
fn start(dir: &Path, pool: &str, env: &[(&str, String)]) -> Controller {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cloudfs-controller"));
    command
        .env_clear()
        .args(["--pool", pool])
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.join("csi.sock").display()))
        .arg("--metrics-addr")
        .arg(format!("unix:{}", dir.join("metrics.sock").display()));
    for (key, value) in env {
        command.env(key, value);
    }
    Controller(command.spawn().expect("start cloudfs-controller"))
}

/// Dials the controller's socket, waiting (bounded) for it to listen.
async fn connect(socket: &Path, controller: &mut Controller) -> IdentityClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(channel) = server::connect(socket).await {
            return IdentityClient::new(channel);
        }
        if let Ok(Some(status)) = controller.0.try_wait() {
            panic!("cloudfs-controller exited: {status}");
        }
        assert!(Instant::now() < deadline, "the controller never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Probe's answer, which must come within `bound`.
async fn probe(client: &mut IdentityClient<Channel>, bound: Duration) -> Option<bool> {
    tokio::time::timeout(bound, client.probe(ProbeRequest {}))
        .await
        .expect("Probe answers in time")
        .expect("Probe")
        .into_inner()
        .ready
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_is_not_ready_while_swift_is_unreachable() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let env = [
        ("ST_AUTH", format!("http://127.0.0.1:{closed}/auth/v1.0")),
        ("ST_USER", "test:tester".to_owned()),
        ("ST_KEY", "testing".to_owned()),
    ];
    let mut controller = start(dir.path(), "swift://probe-unreachable", &env);
    let mut client = connect(&dir.path().join("csi.sock"), &mut controller).await;
    assert_eq!(
        probe(&mut client, Duration::from_secs(20)).await,
        Some(false),
        "not ready while the store cannot be reached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_is_ready_when_the_pool_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = dir.path().join("pool");
    std::fs::create_dir(&pool).expect("mkdir");
    let mut controller = start(dir.path(), &format!("file://{}", pool.display()), &[]);
    let mut client = connect(&dir.path().join("csi.sock"), &mut controller).await;
    assert_eq!(
        probe(&mut client, Duration::from_secs(20)).await,
        Some(true)
    );
}
