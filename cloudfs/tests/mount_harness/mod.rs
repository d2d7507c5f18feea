//! The harness of the real-mount tests: runs the `cloudfs` binary on a volume of its own (a
//! temp dir, or a container of its own in the test Swift), and cleans every mount and process
//! up even when a test panics.
#![allow(dead_code)]

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

pub const CLOUDFS: &str = env!("CARGO_BIN_EXE_cloudfs");
pub const VOLUME: &str = "vol";
/// The longest any single wait of these tests may take.
pub const WAIT: Duration = Duration::from_secs(60);
pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Runs a command to completion and collects its output; kills it if it outlives two `WAIT`s.
/// Never panics, so `Drop` can use it.
pub fn run(command: &mut Command) -> io::Result<Output> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id() as i32;
    let (done, output) = std::sync::mpsc::channel();
    // A thread drains the pipes, so a chatty child cannot block on a full one.
    std::thread::spawn(move || done.send(child.wait_with_output()));
    output.recv_timeout(2 * WAIT).unwrap_or_else(|_| {
        sigkill(pid);
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{command:?} did not finish"),
        ))
    })
}

/// Polls `probe` until it yields a value; panics after `WAIT`.
pub fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn utf8(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// Whether anything is mounted at `path` (from `/proc/self/mountinfo`).
pub fn is_mountpoint(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let wanted = path.to_string_lossy();
    info.lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted.as_ref()))
}

/// Whether process `pid` is still running (a zombie counts as dead).
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit(')').next().unwrap_or_default().trim_start();
        !state.starts_with('Z')
    })
}

pub fn sigkill(pid: i32) {
    send_signal(pid, libc::SIGKILL);
}

pub fn send_signal(pid: i32, signal: libc::c_int) {
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) };
}

/// One formatted volume in a private temp dir (`store/`, `mnt/`, `cache/`, `run/`) and at
/// most one mount of it. Dropping it unmounts and kills whatever is left, even mid-panic.
pub struct Harness {
    dir: tempfile::TempDir,
    /// `file://<dir>/store`, or a container of its own in the test Swift when the environment
    /// says `CLOUDFS_TEST_STORE=swift` (credentials from `ST_AUTH`/`ST_USER`/`ST_KEY`).
    store_url: String,
    /// Mounts so far; each gets a fresh cache directory `cache/<n>`.
    mounts: usize,
    /// The process serving the current mount.
    pid: Option<i32>,
}

impl Harness {
    /// A volume with 64 KiB blocks, so that small files already span several blocks.
    pub fn new() -> Harness {
        Harness::with_block_size("64KiB")
    }

    pub fn with_block_size(block_size: &str) -> Harness {
        let dir = tempfile::tempdir().expect("creating the test's temp dir");
        for sub in ["store", "mnt", "cache", "run"] {
            fs::create_dir(dir.path().join(sub)).expect("creating a harness directory");
        }
        let store_url = match std::env::var("CLOUDFS_TEST_STORE").as_deref() {
            Ok("swift") => {
                let leaf = dir
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
                let unique: String = leaf
                    .unwrap_or_default()
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .collect();
                format!("swift://cloudfs-test-{unique}")
            }
            _ => format!("file://{}", utf8(&dir.path().join("store"))),
        };
        let harness = Harness {
            dir,
            store_url,
            mounts: 0,
            pid: None,
        };
        let store = harness.store_url();
        harness.cloudfs_ok(&["format", &store, VOLUME, "--block-size", block_size]);
        harness
    }

    /// Runs `f` on the test's store, opened behind cloudfs's back.
    fn with_store<T>(&self, f: impl AsyncFnOnce(&dyn cloudfs::store::ObjectStore) -> T) -> T {
        let store = cloudfs::store::StoreUrl::parse(&self.store_url)
            .and_then(|url| url.open(|k| std::env::var(k).ok()))
            .expect("opening the test's store");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(f(store.as_ref()))
    }

    /// Replaces an object of the test's store behind cloudfs's back (to damage it).
    pub fn overwrite_object(&self, key: &str, data: &[u8]) {
        self.with_store(async |store| store.put(key, data.to_vec().into()).await)
            .expect("overwriting the object");
    }

    /// Writes `data` under every key of `keys` behind cloudfs's back, many at once.
    pub fn put_objects(&self, keys: &[String], data: &'static [u8]) {
        use futures::StreamExt;
        self.with_store(async |store| {
            futures::stream::iter(keys)
                .map(|key| store.put(key, bytes::Bytes::from_static(data)))
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<Vec<()>, _>>()
        })
        .expect("writing objects");
    }

    /// The keys of the test's store under `prefix`.
    pub fn object_keys(&self, prefix: &str) -> Vec<String> {
        self.with_store(async |store| cloudfs::store::list_all(store, prefix).await)
            .expect("listing the store")
            .into_iter()
            .map(|object| object.key)
            .collect()
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn store_url(&self) -> String {
        self.store_url.clone()
    }

    /// The directory of the test's store, when it is a local one.
    pub fn local_store_dir(&self) -> Option<PathBuf> {
        self.store_url.strip_prefix("file://").map(PathBuf::from)
    }

    pub fn mnt(&self) -> PathBuf {
        self.root().join("mnt")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.root().join("run")
    }

    /// A path inside the mount.
    pub fn at(&self, rel: &str) -> PathBuf {
        self.mnt().join(rel)
    }

    pub fn try_cloudfs(&self, args: &[&str]) -> io::Result<Output> {
        run(Command::new(CLOUDFS)
            .args(args)
            .env("CLOUDFS_RUN_DIR", self.run_dir())
            .env("RUST_BACKTRACE", "1"))
    }

    pub fn cloudfs(&self, args: &[&str]) -> Output {
        self.try_cloudfs(args).expect("running the cloudfs binary")
    }

    /// Runs `cloudfs args`, which must succeed; returns its stdout.
    pub fn cloudfs_ok(&self, args: &[&str]) -> String {
        let out = self.cloudfs(args);
        assert!(
            out.status.success(),
            "cloudfs {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Mounts the volume with a fresh, empty cache directory (so everything comes from the
    /// store) and `extra` flags.
    pub fn mount(&mut self, extra: &[&str]) {
        assert!(self.pid.is_none(), "already mounted");
        self.mounts += 1;
        let out = self.mount_at(&self.mnt(), &self.mounts.to_string(), extra);
        assert!(
            out.status.success(),
            "cloudfs mount {extra:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = self.mnt();
        assert!(
            is_mountpoint(&mnt),
            "cloudfs mount returned but nothing is mounted"
        );
        // The mount is visible a moment before its process writes the pid file.
        self.pid = Some(wait_for("the mount's pid file", || self.pid_from_file()));
    }

    pub fn pid_files(&self) -> Vec<PathBuf> {
        fs::read_dir(self.run_dir())
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|ext| ext == "pid"))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn pid_from_file(&self) -> Option<i32> {
        self.pid_files()
            .iter()
            .find_map(|p| fs::read_to_string(p).ok()?.trim().parse().ok())
    }

    /// Runs `cloudfs mount` of the volume at `mnt` with the fresh cache dir `cache/<cache>`.
    pub fn mount_at(&self, mnt: &Path, cache: &str, extra: &[&str]) -> Output {
        self.mount_volume_at(VOLUME, mnt, cache, extra)
    }

    /// `cloudfs mount` of `volume` of the harness's store at `mnt`, with cache `cache/<cache>`.
    fn mount_volume_at(&self, volume: &str, mnt: &Path, cache: &str, extra: &[&str]) -> Output {
        let cache = self.root().join("cache").join(cache);
        let store = self.store_url();
        let mut args = vec![
            "mount",
            &store,
            volume,
            utf8(mnt),
            "--cache-dir",
            utf8(&cache),
        ];
        args.extend_from_slice(extra);
        self.cloudfs(&args)
    }

    /// `cloudfs umount`: flushes everything to the store and waits for the process to exit.
    pub fn umount(&mut self) {
        let mnt = self.mnt();
        self.cloudfs_ok(&["umount", "--timeout", "60", utf8(&mnt)]);
        self.pid = None;
        assert!(!is_mountpoint(&mnt), "still mounted after cloudfs umount");
    }

    /// `kill -9` of the mount process, then detaches the dead mount.
    pub fn kill_mount(&mut self) {
        let pid = self.pid.take().expect("a running mount to kill");
        sigkill(pid);
        wait_for("the killed mount process to exit", || {
            (!alive(pid)).then_some(())
        });
        let out = run(Command::new("umount").arg("-l").arg(self.mnt())).expect("running umount");
        assert!(out.status.success(), "umount -l failed: {out:?}");
        // The stale pid file would otherwise be mistaken for the next mount's.
        for stale in self.pid_files() {
            fs::remove_file(stale).expect("removing a stale pid file");
        }
    }

    pub fn fsck_is_clean(&self) {
        let stdout = self.cloudfs_ok(&["fsck", &self.store_url(), VOLUME]);
        assert!(stdout.contains("clean"), "fsck output: {stdout}");
    }

    pub fn stat(&self) -> serde_json::Value {
        let stdout = self.cloudfs_ok(&["stat", &self.store_url(), VOLUME, "--json"]);
        serde_json::from_str(&stdout).expect("cloudfs stat --json prints one JSON object")
    }
}

impl Harness {
    /// The last lines of every mount log, to explain a failed test.
    fn print_mount_logs(&self) {
        let Ok(caches) = fs::read_dir(self.root().join("cache")) else {
            return;
        };
        for cache in caches.filter_map(Result::ok) {
            let log = fs::read_to_string(cache.path().join("mount.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- {}/mount.log (last 40 lines)", cache.path().display());
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// A further mount (a mountpoint `mnt-<name>` and cache of its own) of a volume of the
/// harness's store, unmounted on drop.
pub struct ExtraMount<'a> {
    harness: &'a Harness,
    pub mnt: PathBuf,
}

impl Harness {
    /// Mounts `volume` as [`ExtraMount`] `name` with `extra` flags; the failed command's
    /// output when it does not mount.
    pub fn try_mount_extra(
        &self,
        volume: &str,
        name: &str,
        extra: &[&str],
    ) -> Result<ExtraMount<'_>, Output> {
        let mnt = self.root().join(format!("mnt-{name}"));
        fs::create_dir_all(&mnt).expect("creating an extra mountpoint");
        let out = self.mount_volume_at(volume, &mnt, name, extra);
        if out.status.success() {
            Ok(ExtraMount { harness: self, mnt })
        } else {
            Err(out)
        }
    }

    /// [`Harness::try_mount_extra`], which must succeed.
    pub fn mount_extra(&self, volume: &str, name: &str, extra: &[&str]) -> ExtraMount<'_> {
        self.try_mount_extra(volume, name, extra)
            .unwrap_or_else(|out| panic!("mount {volume} as {name} {extra:?}: {out:?}"))
    }
}

impl Drop for ExtraMount<'_> {
    fn drop(&mut self) {
        let unmounted = self
            .harness
            .try_cloudfs(&["umount", "--timeout", "60", utf8(&self.mnt)])
            .is_ok_and(|out| out.status.success());
        if !unmounted || is_mountpoint(&self.mnt) {
            let _ = run(Command::new("umount").arg("-l").arg(&self.mnt));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_mount_logs();
        }
        self.unmount_all();
        if let Some(container) = self.store_url.strip_prefix("swift://") {
            delete_swift_container(container);
        }
    }
}

impl Harness {
    fn unmount_all(&mut self) {
        let mnt = self.mnt();
        if self.pid.is_none() && !is_mountpoint(&mnt) {
            return;
        }
        let unmounted = self
            .try_cloudfs(&["umount", "--timeout", "60", utf8(&mnt)])
            .is_ok_and(|out| out.status.success());
        if !unmounted || is_mountpoint(&mnt) {
            let _ = run(Command::new("umount").arg("-l").arg(&mnt));
        }
        if let Some(pid) = self.pid.take().filter(|pid| alive(*pid)) {
            sigkill(pid);
        }
    }
}

/// The test Swift's account (credentials from `ST_AUTH`/`ST_USER`/`ST_KEY`), for what a test
/// does or checks behind cloudfs's back.
pub struct SwiftAccount {
    pub client: cloudfs_swift::SwiftClient,
    runtime: tokio::runtime::Runtime,
}

impl SwiftAccount {
    pub fn open() -> Result<SwiftAccount, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let credentials = cloudfs_swift::Credentials::from_keys(|k| std::env::var(k).ok())
            .map_err(|e| e.to_string())?;
        let client = cloudfs_swift::SwiftClient::new(
            credentials,
            cloudfs_swift::RetryPolicy {
                attempts: 3,
                ..cloudfs_swift::RetryPolicy::default()
            },
        )
        .map_err(|e| e.to_string())?;
        Ok(SwiftAccount { client, runtime })
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}

impl Harness {
    /// The container of the test's pool when it lives in Swift.
    pub fn swift_container(&self) -> Option<&str> {
        self.store_url.strip_prefix("swift://")
    }
}

/// Empties and deletes a test container of the test Swift (best effort: a failure is
/// printed, never a panic in `Drop`).
fn delete_swift_container(container: &str) {
    let cleanup = || -> Result<(), String> {
        let swift = SwiftAccount::open()?;
        let client = &swift.client;
        swift.block_on(async {
            loop {
                let names: Vec<String> = client
                    .list_objects(container, "", None, 10_000, None)
                    .await
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .filter_map(|row| match row {
                        cloudfs_swift::ListEntry::Object { name, .. } => Some(name),
                        cloudfs_swift::ListEntry::Subdir { .. } => None,
                    })
                    .collect();
                if names.is_empty() {
                    return client
                        .delete_container(container)
                        .await
                        .map_err(|e| e.to_string());
                }
                client
                    .bulk_delete(container, &names)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        })
    };
    if let Err(e) = cleanup() {
        eprintln!("could not delete test container {container}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers: data, assertions, libc wrappers
// ---------------------------------------------------------------------------------------------

/// `len` pseudo-random bytes, the same for the same seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first wrong byte at offset {at}");
    }
}

pub fn assert_content(path: &Path, want: &[u8]) {
    let got = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert_same(&got, want, &path.display().to_string());
}
