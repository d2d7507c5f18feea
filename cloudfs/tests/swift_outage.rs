//! A Swift outage in the middle of large writes, on the real local Swift that
//! `tests/swift/swift.sh` runs (the test fails, loudly, when it is not running).
//!
//! What a user gets (documented in the README): while the proxy is stopped, store requests
//! wait (and are retried with backoff when they fail); if it comes back within
//! `--store-timeout` the write completes, otherwise `close`/`fsync` fail with `EIO` once that
//! time has passed. Either way the volume stays
//! consistent: a remount on a fresh cache sees every file that was fsynced, intact, and
//! `fsck` is clean.

mod mount_harness;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mount_harness::*;

fn swift_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/swift/swift.sh")
}

/// The pid of the running Swift proxy, from `swift.sh env`.
fn proxy_pid() -> i32 {
    let out = Command::new("bash")
        .arg(swift_script())
        .arg("env")
        .output()
        .expect("running swift.sh env");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("export SWIFT_PROXY_PID=")?
                .trim()
                .parse()
                .ok()
        })
        .expect("the Swift proxy is running (start it with tests/swift/swift.sh start)")
}

/// The proxy's processes: the parent and its workers.
fn proxy_processes() -> Vec<String> {
    let pid = proxy_pid();
    let workers = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .expect("running pgrep");
    let mut pids = vec![pid.to_string()];
    pids.extend(
        String::from_utf8_lossy(&workers.stdout)
            .split_whitespace()
            .map(str::to_owned),
    );
    pids
}

fn signal(pids: &[String], signal: &str) {
    let status = Command::new("kill")
        .arg(signal)
        .args(pids)
        .status()
        .expect("running kill");
    assert!(status.success(), "kill {signal} {pids:?}");
}

/// The proxy and its workers stopped (SIGSTOP) for a while: requests meet a proxy that
/// accepts connections but does not answer. They go on after `outage`, or when this is
/// dropped (also when the test fails), whichever comes first.
struct Outage {
    pids: Vec<String>,
    resumer: Option<std::thread::JoinHandle<()>>,
}

impl Outage {
    fn start(outage: Duration) -> Outage {
        let pids = proxy_processes();
        signal(&pids, "-STOP");
        let resumer = {
            let pids = pids.clone();
            std::thread::spawn(move || {
                std::thread::sleep(outage);
                signal(&pids, "-CONT");
            })
        };
        Outage {
            pids,
            resumer: Some(resumer),
        }
    }

    /// Waits until the proxy runs again.
    fn end(mut self) {
        if let Some(resumer) = self.resumer.take() {
            resumer.join().expect("resuming the proxy");
        }
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if self.resumer.is_some() {
            let _ = Command::new("kill").arg("-CONT").args(&self.pids).status();
        }
    }
}

/// Writes `len` bytes of pattern `seed` to `path` and fsyncs; returns the result of the fsync.
fn write_and_fsync(path: &Path, seed: u64, len: usize) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(&pattern(seed, len))?;
    file.sync_all()
}

#[test]
fn writes_survive_a_swift_proxy_outage() {
    assert!(
        std::env::var("ST_AUTH").is_ok(),
        "set ST_AUTH/ST_USER/ST_KEY: run `eval \"$(tests/swift/swift.sh env)\"` after starting it"
    );
    // SAFETY: the environment is set before any thread of this test starts.
    unsafe { std::env::set_var("CLOUDFS_TEST_STORE", "swift") };
    let mut h = Harness::with_block_size("1MiB");
    h.mount(&["--store-timeout", "60"]);
    write_and_fsync(&h.at("before"), 1, 3 << 20).expect("write before the outage");

    // A short outage in the middle of a 24 MiB write: the write completes when it is over.
    let writer = {
        let path = h.at("during");
        std::thread::spawn(move || write_and_fsync(&path, 2, 24 << 20))
    };
    std::thread::sleep(Duration::from_millis(300));
    let outage = Outage::start(Duration::from_secs(3));
    writer
        .join()
        .expect("writer thread")
        .expect("a write across a 3 s outage completes");
    outage.end();
    h.umount();

    // An outage longer than the store timeout: fsync fails with EIO, in bounded time.
    h.mount(&["--store-timeout", "4"]);
    let outage = Outage::start(Duration::from_secs(10));
    let started = Instant::now();
    let failed = write_and_fsync(&h.at("lost"), 3, 4 << 20);
    assert_eq!(failed.err().and_then(|e| e.raw_os_error()), Some(libc::EIO));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "EIO took {:?}",
        started.elapsed()
    );
    outage.end();
    h.umount();

    // A fresh cache sees everything that was fsynced, intact; the volume is consistent.
    h.mount(&[]);
    assert_content(&h.at("before"), &pattern(1, 3 << 20));
    assert_content(&h.at("during"), &pattern(2, 24 << 20));
    if let Ok(data) = fs::read(h.at("lost")) {
        // Written after all, by the flush at unmount: then it must be whole.
        assert_same(&data, &pattern(3, 4 << 20), "the file whose fsync failed");
    }
    h.umount();
    h.fsck_is_clean();
}
