//! Shared harness of the engine tests: a volume on the in-memory store, driven through `Fs`
//! without a kernel.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use cloudfs::cas::{BlockCache, BlockStore};
use cloudfs::fs::{Caller, Fs};
use cloudfs::mount::{EngineConfig, open_fs};
use cloudfs::store::{MemStore, ObjectStore};
use cloudfs::volume;

pub const ROOT: u64 = 1;
/// Short, so that crash tests can take a dead mount's volume over quickly.
pub const TEST_LEASE_TTL: Duration = Duration::from_secs(1);
pub const ME: Caller = Caller { uid: 0, gid: 0 };

pub struct TestFs {
    pub fs: Arc<Fs>,
    pub store: Arc<MemStore>,
    pub block_size: u64,
    pub rt: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn engine(dir: &std::path::Path, name: &str, store_timeout: Duration) -> EngineConfig {
    EngineConfig {
        cache_dir: dir.join(name),
        cache_size: 64 << 20,
        store_timeout,
        read_only: false,
        lease_ttl: TEST_LEASE_TTL,
        snapshot: None,
    }
}

impl TestFs {
    /// A freshly formatted volume `vol` with the given block size.
    pub fn new(block_size: u64) -> TestFs {
        TestFs::with_timeout(block_size, Duration::from_secs(30))
    }

    pub fn with_timeout(block_size: u64, store_timeout: Duration) -> TestFs {
        let rt = runtime();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(MemStore::new());
        let dyn_store: Arc<dyn ObjectStore> = store.clone();
        let scratch = BlockStore::new(
            dyn_store.clone(),
            BlockCache::open(&dir.path().join("format-cache"), 1 << 20).expect("cache"),
            store_timeout,
        );
        rt.block_on(volume::format(
            &dyn_store, &scratch, "vol", block_size, 0, 0,
        ))
        .expect("format");
        let fs = open_fs(
            dyn_store,
            "vol",
            &engine(dir.path(), "cache0", store_timeout),
            rt.handle(),
        )
        .expect("open");
        TestFs {
            fs,
            store,
            block_size,
            rt,
            dir,
        }
    }

    /// Flushes everything, then opens the volume again from the store alone (fresh cache),
    /// as another machine would.
    pub fn remount(&mut self) {
        self.fs.shutdown().expect("shutdown");
        self.open_again();
    }

    /// Opens the volume again from what the store holds now, as after a crash: the old
    /// mount's lease is left to expire first.
    pub fn remount_without_sync(&mut self) {
        std::thread::sleep(TEST_LEASE_TTL + Duration::from_millis(100));
        self.open_again();
    }

    /// `remount`, reporting a failed shutdown instead of panicking (the volume stays mounted
    /// then).
    pub fn try_remount(&mut self) -> cloudfs::fs::FsResult<()> {
        self.fs.shutdown()?;
        self.open_again();
        Ok(())
    }

    pub fn open_again(&mut self) {
        let n = std::fs::read_dir(self.dir.path()).expect("dir").count();
        let dyn_store: Arc<dyn ObjectStore> = self.store.clone();
        self.fs = open_fs(
            dyn_store,
            "vol",
            &engine(
                self.dir.path(),
                &format!("cache{n}"),
                Duration::from_secs(30),
            ),
            self.rt.handle(),
        )
        .expect("reopen");
    }

    pub fn create(&self, parent: u64, name: &str) -> u64 {
        let (inode, fh) = self
            .fs
            .create(ME, parent, name.as_bytes(), 0o644, 0o022, libc::O_RDWR)
            .expect("create");
        self.fs.release(inode.ino, fh).expect("release");
        inode.ino
    }

    pub fn write_file(&self, parent: u64, name: &str, data: &[u8]) -> u64 {
        let (inode, fh) = self
            .fs
            .create(ME, parent, name.as_bytes(), 0o644, 0o022, libc::O_RDWR)
            .expect("create");
        self.fs.write(inode.ino, fh, 0, data).expect("write");
        self.fs.release(inode.ino, fh).expect("release");
        inode.ino
    }

    pub fn write_at(&self, ino: u64, offset: u64, data: &[u8]) {
        let fh = self.fs.open(ino, libc::O_RDWR).expect("open");
        self.fs.write(ino, fh, offset, data).expect("write");
        self.fs.release(ino, fh).expect("release");
    }

    pub fn read_all(&self, ino: u64) -> Vec<u8> {
        let size = self.fs.getattr(ino).expect("getattr").size;
        let fh = self.fs.open(ino, libc::O_RDONLY).expect("open");
        let mut out = Vec::new();
        while (out.len() as u64) < size {
            let chunk = self
                .fs
                .read(ino, fh, out.len() as u64, 1 << 20)
                .expect("read");
            assert!(!chunk.is_empty(), "short read at {}", out.len());
            out.extend_from_slice(&chunk);
        }
        self.fs.release(ino, fh).expect("release");
        out
    }

    pub fn names(&self, dir: u64) -> Vec<String> {
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let batch = self.fs.readdir(dir, offset, 100).expect("readdir");
            let Some(last) = batch.last() else { break };
            offset = last.offset;
            names.extend(
                batch
                    .iter()
                    .map(|e| String::from_utf8_lossy(&e.name).into_owned())
                    .filter(|n| n != "." && n != ".."),
            );
        }
        names.sort();
        names
    }
}

/// Deterministic pseudo-random bytes: `len` of them, varied by `seed`. Unlike a short
/// repeating pattern, the blocks of a file made of them differ from each other.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ seed)
        .collect()
}

impl TestFs {
    /// Every entry of `dir` but `.` and `..`, in listing order, with the attributes `readdir`
    /// reports for it.
    pub fn entries(&self, dir: u64) -> Vec<(String, cloudfs::meta::Inode)> {
        let mut entries = Vec::new();
        let mut offset = 0;
        loop {
            let batch = self.fs.readdir(dir, offset, 100).expect("readdir");
            let Some(last) = batch.last() else { break };
            offset = last.offset;
            entries.extend(
                batch
                    .into_iter()
                    .filter(|e| e.name != b"." && e.name != b"..")
                    .map(|e| (String::from_utf8_lossy(&e.name).into_owned(), e.inode)),
            );
        }
        entries
    }

    /// Reads a file to its end through a fresh handle, returning errors instead of panicking
    /// (the handle is released either way, which flushes the file).
    pub fn try_read_all(&self, ino: u64) -> cloudfs::fs::FsResult<Vec<u8>> {
        let fh = self.fs.open(ino, libc::O_RDONLY)?;
        let read = self.read_handle(ino, fh);
        let released = self.fs.release(ino, fh);
        released.and(read)
    }

    /// Reads a file from its start to its end through the open handle `fh`.
    pub fn read_handle(&self, ino: u64, fh: u64) -> cloudfs::fs::FsResult<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let chunk = self.fs.read(ino, fh, out.len() as u64, 1 << 20)?;
            if chunk.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
        }
    }
}
