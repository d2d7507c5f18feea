//! The life of a mount process: open the volume into the cache directory, serve it through
//! FUSE, replicate metadata on an interval, and on SIGTERM/SIGINT (or an external unmount)
//! flush everything into the store before exiting. Also `unmount`, which asks a mount process
//! to do exactly that and waits for it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, SessionACL};

use crate::cas::{BlockCache, BlockStore};
use crate::control::{self, LiveVolume};
use crate::fs::{Fs, FsConfig, FsError, MetadataSync};
use crate::fuse::FuseFs;
use crate::lease::{StoreLease, holder_id};
use crate::mailbox;
use crate::metrics::{EngineMetrics, MeteredStore};
use crate::store::{ObjectStore, StoreError, StoreUrl};
use crate::volume::{self, Replicator, VolumeError, VolumeSync};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mountpoint {0} does not exist or is not a directory")]
    NoMountpoint(PathBuf),
    #[error("{0} is already a mountpoint")]
    AlreadyMounted(PathBuf),
    #[error("{0} is not a cloudfs mount")]
    NotMounted(PathBuf),
    #[error("cache directory {0} is in use by another mount")]
    CacheInUse(PathBuf),
    #[error("mount process {pid} did not exit within {secs}s")]
    StuckUnmount { pid: i32, secs: u64 },
    #[error(
        "a read-write mount needs credentials that can list the pool (to take the volume's \
         lease); a TempURL key allows --read-only mounts only"
    )]
    ReadWriteNeedsListing,
    #[error("a snapshot is immutable: it can only be mounted --read-only")]
    SnapshotNeedsReadOnly,
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Metrics(#[from] cloudfs_metrics::MetricsError),
    #[error("setting up metrics: {0}")]
    MetricsRegistry(#[from] cloudfs_metrics::prometheus::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> MountError {
    let context = context.into();
    move |source| MountError::Io { context, source }
}

/// Most dirty bytes a mount keeps in memory (more wait in staging files): room for the
/// blocks of a sequential writer in flight to the store, small enough for a bounded RSS.
const MEMORY_STAGING_CAP: u64 = 64 << 20;

/// How long one FUSE request may keep the polling reader before another thread reads the
/// requests waiting meanwhile: far above the tens of microseconds of a metadata operation, so
/// that these stay on one thread. The reader sets a timer to this for every request; a timer
/// due before the kernel's next tick (4 ms at 250 Hz) would make it reprogram the clock
/// device twice per request, which on a VM costs as much as the wake polling saves (measured:
/// 500 µs gave back the whole gain).
const PROMOTE_AFTER: Duration = Duration::from_millis(5);

/// Everything a mount needs.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Where the volume lives (for messages; the store itself is passed to [`run`]).
    pub store: StoreUrl,
    pub volume: String,
    pub mountpoint: PathBuf,
    pub engine: EngineConfig,
    /// How often changed metadata is replicated when nobody calls `fsync`.
    pub sync_interval: Duration,
    pub fuse_threads: usize,
    /// How long the thread reading FUSE requests polls for the next one after an answer
    /// (`fuser::Polling::window`); zero for every thread sleeping on the device instead.
    pub poll_window: Duration,
    pub run_dir: PathBuf,
    /// Where to serve `/metrics`, if anywhere.
    pub metrics: Option<cloudfs_metrics::Endpoint>,
}

/// Where a mount process announces its pid, keyed by mountpoint.
pub fn pid_file(run_dir: &Path, mountpoint: &Path) -> PathBuf {
    let digest = blake3::hash(mountpoint.as_os_str().as_encoded_bytes());
    run_dir.join(format!("{}.pid", &digest.to_hex()[..16]))
}

/// The default directory for pid files.
pub fn default_run_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/cloudfs")
    } else if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(dir).join("cloudfs")
    } else {
        std::env::temp_dir().join(format!("cloudfs-{uid}"))
    }
}

fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What is mounted at a path: file-system type and source, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedFs {
    pub fs_type: String,
    pub source: String,
}

impl MountedFs {
    /// Whether this is a cloudfs FUSE mount (the subtype is only recorded when mounted
    /// through fusermount, so the source name decides).
    pub fn is_cloudfs(&self) -> bool {
        self.fs_type.starts_with("fuse") && self.source.starts_with("cloudfs:")
    }
}

/// The file system mounted at `path`, if `path` is a mountpoint.
pub fn mounted_at(path: &Path) -> Option<MountedFs> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = path.to_string_lossy();
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        if unescape_mountinfo(fields.get(4)?) != wanted {
            return None;
        }
        Some(MountedFs {
            fs_type: fields.get(sep + 1)?.to_string(),
            source: unescape_mountinfo(fields.get(sep + 2)?),
        })
    })
}

/// Holds an exclusive lock on the cache directory for the life of the mount.
fn lock_cache_dir(dir: &Path) -> Result<File, MountError> {
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(io_err("opening the cache lock"))?;
    // SAFETY: flock on a valid, owned descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(MountError::CacheInUse(dir.to_path_buf()));
    }
    Ok(file)
}

/// Where and how an engine keeps its local state.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub cache_dir: PathBuf,
    /// Disk budget of the cache directory (read cache plus write-back staging).
    pub cache_size: u64,
    pub store_timeout: Duration,
    pub read_only: bool,
    /// How long a read-write mount's lease outlives its last renewal.
    pub lease_ttl: Duration,
    /// Serve this named snapshot (read-only) instead of the volume's newest state.
    pub snapshot: Option<String>,
}

/// An opened volume: its file system and, for a read-only mount, what follows the writer.
#[derive(Debug)]
pub struct Engine {
    pub fs: Arc<Fs>,
    /// What the engine measures (not registered anywhere yet).
    pub metrics: EngineMetrics,
    follower: Option<Follower>,
    /// The replication of a read-write mount.
    volume_sync: Option<Arc<VolumeSync>>,
}

/// Keeps a read-only mount on the newest generation the writer has published.
#[derive(Debug)]
struct Follower {
    store: Arc<dyn ObjectStore>,
    blocks: Arc<BlockStore>,
    volume: String,
    db_dir: PathBuf,
    generation: std::sync::Mutex<String>,
    opened: std::sync::atomic::AtomicU64,
}

impl Engine {
    /// For a read-only mount: switches to a newer generation if the writer published one.
    /// Returns whether it did.
    pub fn refresh(&self, rt: &tokio::runtime::Handle) -> Result<bool, MountError> {
        let Some(follower) = &self.follower else {
            return Ok(false);
        };
        let latest = rt.block_on(volume::latest_generation_key(
            follower.store.as_ref(),
            &follower.volume,
        ))?;
        let current = crate::fs::lock(&follower.generation).clone();
        if latest.is_none_or(|key| key == current) {
            return Ok(false);
        }
        let n = follower.opened.fetch_add(1, Ordering::Relaxed) + 1;
        let path = follower.db_dir.join(format!("volume.{n}.db"));
        let opened = rt.block_on(volume::open(
            follower.store.as_ref(),
            &follower.blocks,
            &follower.volume,
            &path,
        ))?;
        self.fs.replace_meta(opened.meta)?;
        tracing::info!(generation = %opened.generation, "read-only mount now serves a newer generation");
        *crate::fs::lock(&follower.generation) = opened.generation;
        // Earlier copies are unlinked; operations still using one keep it open until done.
        let keep = format!("volume.{n}.db");
        for entry in fs::read_dir(&follower.db_dir).map_err(io_err("listing the metadata dir"))? {
            let entry = entry.map_err(io_err("listing the metadata dir"))?;
            if !entry.file_name().to_string_lossy().starts_with(&keep) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(true)
    }
}

/// Opens a volume of `store` as a file system: rebuilds the metadata working copy in the
/// cache directory and wires up the block cache, staging and (read-write) replication.
/// Must not be called from inside the `rt` runtime.
pub fn open_fs(
    store: Arc<dyn ObjectStore>,
    volume_name: &str,
    config: &EngineConfig,
    rt: &tokio::runtime::Handle,
) -> Result<Arc<Fs>, MountError> {
    Ok(open_engine(store, volume_name, config, rt)?.fs)
}

/// [`open_fs`], keeping what a read-only mount needs to follow the writer.
pub fn open_engine(
    store: Arc<dyn ObjectStore>,
    volume_name: &str,
    config: &EngineConfig,
    rt: &tokio::runtime::Handle,
) -> Result<Engine, MountError> {
    let metrics = EngineMetrics::new();
    let store = MeteredStore::wrap(store, metrics.clone());
    let cache = BlockCache::open(&config.cache_dir.join("blocks"), config.cache_size / 2)
        .map_err(io_err("opening the block cache"))?;
    let blocks = Arc::new(
        BlockStore::new(store.clone(), cache, config.store_timeout).with_metrics(metrics.clone()),
    );
    if config.snapshot.is_some() && !config.read_only {
        return Err(MountError::SnapshotNeedsReadOnly);
    }
    if !config.read_only && !store.can_list() {
        return Err(MountError::ReadWriteNeedsListing);
    }
    let lease = if config.read_only {
        None
    } else {
        Some(rt.block_on(volume::bounded(
            config.store_timeout,
            StoreLease::acquire(store.as_ref(), volume_name, &holder_id(), config.lease_ttl),
        ))?)
    };
    if lease.is_some() {
        rt.block_on(blocks.refresh_damaged());
    }
    let db_path = config.cache_dir.join("meta").join("volume.db");
    let opened = match &config.snapshot {
        Some(name) => rt.block_on(crate::snapshot::open(
            store.as_ref(),
            &blocks,
            volume_name,
            name,
            &db_path,
        ))?,
        None => rt.block_on(volume::open(store.as_ref(), &blocks, volume_name, &db_path))?,
    };
    let volume_sync: Option<Arc<VolumeSync>> = lease.map(|lease| {
        Arc::new(VolumeSync {
            replicator: Replicator::new(
                store.clone(),
                volume_name,
                lease.epoch(),
                0,
                opened.chunks.clone(),
            ),
            lease,
            store: store.clone(),
            meta: opened.meta.clone(),
            blocks: blocks.clone(),
            rt: rt.clone(),
            last_renewal: std::sync::Mutex::new(Instant::now()),
        })
    });
    let sync = volume_sync
        .clone()
        .map(|sync| sync as Arc<dyn MetadataSync>);
    let staging = config.cache_dir.join("staging");
    let _ = fs::remove_dir_all(&staging);
    let block_size = opened.config.block_size;
    let fs_config = FsConfig {
        block_size,
        read_only: config.read_only,
        dirty_budget: (config.cache_size / 4).max(2 * block_size),
        memory_staging: (config.cache_size / 32)
            .min(MEMORY_STAGING_CAP)
            .max(block_size),
        max_readahead_blocks: (config.cache_size / 4 / block_size).clamp(1, 8),
    };
    let follower = (config.read_only && config.snapshot.is_none()).then(|| Follower {
        store: store.clone(),
        blocks: blocks.clone(),
        volume: volume_name.to_owned(),
        db_dir: config.cache_dir.join("meta"),
        generation: std::sync::Mutex::new(opened.generation.clone()),
        opened: std::sync::atomic::AtomicU64::new(0),
    });
    let fs = Arc::new(Fs::new(
        opened.meta.clone(),
        blocks,
        rt.clone(),
        staging,
        fs_config,
        sync,
    )?);
    fs.set_quota(opened.config.quota_bytes);
    Ok(Engine {
        fs,
        metrics,
        follower,
        volume_sync,
    })
}

/// How often a read-write mount re-reads its volume's quota from the store.
const QUOTA_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Serves the engine's metrics at `endpoint`, every series labelled with the volume and
/// its pool.
fn serve_metrics(
    endpoint: &cloudfs_metrics::Endpoint,
    config: &MountConfig,
    metrics: &EngineMetrics,
    rt: &tokio::runtime::Handle,
) -> Result<cloudfs_metrics::MetricsServer, MountError> {
    let labels = [
        ("volume".to_owned(), config.volume.clone()),
        ("pool".to_owned(), config.store.to_string()),
    ];
    let registry = cloudfs_metrics::prometheus::Registry::new_custom(None, Some(labels.into()))?;
    metrics.register(&registry)?;
    Ok(rt.block_on(cloudfs_metrics::start(endpoint, Arc::new(registry)))?)
}

/// Mounts and serves until unmounted or signalled. `ready` runs once the mount is usable.
pub fn run(
    config: MountConfig,
    store: Arc<dyn ObjectStore>,
    ready: impl FnOnce(),
) -> Result<(), MountError> {
    let mountpoint =
        std::path::absolute(&config.mountpoint).map_err(io_err("resolving the mountpoint"))?;
    if !mountpoint.is_dir() {
        return Err(MountError::NoMountpoint(mountpoint));
    }
    if mounted_at(&mountpoint).is_some() {
        return Err(MountError::AlreadyMounted(mountpoint));
    }
    let _cache_lock = lock_cache_dir(&config.engine.cache_dir)?;
    limit_allocator_caching();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cloudfs-io")
        .enable_all()
        .build()
        .map_err(io_err("starting the I/O runtime"))?;
    let engine = open_engine(store, &config.volume, &config.engine, rt.handle())?;
    let fs = engine.fs.clone();
    let mut options = vec![
        MountOption::FSName(format!("cloudfs:{}", config.volume)),
        MountOption::Subtype("cloudfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if config.engine.read_only {
        options.push(MountOption::RO);
    }
    let mut fuse_config = Config::default();
    fuse_config.mount_options = options;
    // SAFETY: geteuid has no preconditions.
    fuse_config.acl = if unsafe { libc::geteuid() } == 0 {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fuse_config.n_threads = Some(config.fuse_threads.max(1));
    if !config.poll_window.is_zero() {
        fuse_config.polling = Some(fuser::Polling {
            window: config.poll_window,
            promote_after: PROMOTE_AFTER,
        });
    }
    let _metrics_server = match &config.metrics {
        Some(endpoint) => Some(serve_metrics(
            endpoint,
            &config,
            &engine.metrics,
            rt.handle(),
        )?),
        None => None,
    };
    let fuse_fs = FuseFs::new(
        fs.clone(),
        engine.metrics.clone(),
        config.fuse_threads.max(1),
        rt.handle().clone(),
    )?;
    let notifier = fuse_fs.notifier_slot();
    let session = fuser::Session::new(fuse_fs, &mountpoint, &fuse_config)
        .and_then(|session| {
            let _ = notifier.set(session.notifier());
            session.spawn()
        })
        .map_err(io_err(format!("mounting {}", mountpoint.display())))?;
    fs::create_dir_all(&config.run_dir).map_err(io_err("creating the run directory"))?;
    let live = engine.volume_sync.as_ref().map(|sync| {
        Arc::new(LiveVolume::new(
            fs.clone(),
            sync.clone(),
            config.volume.clone(),
            config.engine.cache_dir.join("meta"),
        ))
    });
    let _control = match &live {
        Some(live) => {
            let path = control::socket_path(&config.run_dir, &config.store, &config.volume);
            Some(control::serve(path, live.clone()).map_err(io_err("opening the control socket"))?)
        }
        None => None,
    };
    let pid_path = pid_file(&config.run_dir, &mountpoint);
    fs::write(&pid_path, std::process::id().to_string()).map_err(io_err("writing the pid file"))?;
    tracing::info!(
        store = %config.store,
        volume = %config.volume,
        mountpoint = %mountpoint.display(),
        "mounted"
    );
    ready();

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(io_err("installing signal handlers"))?;
    }
    let mut last_sync = Instant::now();
    let mut last_quota_check = Instant::now();
    let mut last_mailbox_check = Instant::now();
    while !stop.load(Ordering::Acquire) && !session.guard.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(live) = &live
            && last_mailbox_check.elapsed() >= mailbox::POLL_INTERVAL
        {
            // Snapshots and rollbacks asked for from other machines (the CSI controller,
            // the operator).
            if let Err(e) = mailbox::answer_pending(live) {
                tracing::warn!(error = %e, "could not answer requests left in the store; will retry");
            }
            last_mailbox_check = Instant::now();
        }
        if let Some(sync) = &engine.volume_sync
            && last_quota_check.elapsed() >= QUOTA_CHECK_INTERVAL
        {
            // A quota set where no control socket reaches (another machine) applies here.
            match rt.block_on(volume::read_config(sync.store.as_ref(), &config.volume)) {
                Ok(volume_config) => fs.set_quota(volume_config.quota_bytes),
                Err(e) => tracing::warn!(error = %e, "could not re-read the volume's quota"),
            }
            last_quota_check = Instant::now();
        }
        if last_sync.elapsed() >= config.sync_interval {
            if config.engine.read_only {
                if let Err(e) = engine.refresh(rt.handle()) {
                    tracing::warn!(error = %e, "could not follow a newer generation; will retry");
                }
            } else if let Err(e) = fs.sync_metadata() {
                tracing::error!(error = %e, "periodic metadata sync failed; will retry");
            }
            last_sync = Instant::now();
        }
    }
    tracing::info!("unmounting: flushing to the store");
    let flushed = fs.sync_all();
    if !session.guard.is_finished()
        && let Err(e) = session.umount_and_join()
    {
        tracing::warn!(error = %e, "unmount failed; detaching the mount");
        lazy_unmount(&mountpoint);
    }
    let _ = fs::remove_file(&pid_path);
    flushed?;
    fs.shutdown()?;
    tracing::info!("unmounted cleanly");
    Ok(())
}

/// Keeps freed block buffers from piling up in glibc's per-thread arenas: large buffers are
/// always mapped and unmapped, and a few arenas serve the many FUSE threads.
fn limit_allocator_caching() {
    // SAFETY: mallopt only tunes allocator parameters; called before the FUSE threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

fn lazy_unmount(mountpoint: &Path) {
    let Ok(path) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: a valid NUL-terminated path; MNT_DETACH needs no other argument.
    unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Asks the mount process serving `mountpoint` to flush and unmount, and waits until it has.
pub fn unmount(mountpoint: &Path, run_dir: &Path, timeout: Duration) -> Result<(), MountError> {
    let mountpoint = std::path::absolute(mountpoint).map_err(io_err("resolving the mountpoint"))?;
    let pid_path = pid_file(run_dir, &mountpoint);
    let pid = fs::read_to_string(&pid_path)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|pid| process_alive(*pid));
    if let Some(pid) = pid {
        // SAFETY: sending SIGTERM to a pid we read from our own pid file.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while process_alive(pid) {
            if start.elapsed() > timeout {
                return Err(MountError::StuckUnmount {
                    pid,
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // A mount process that was killed (even one still being reaped when asked) leaves its
    // mount behind, dead: detach it.
    if mounted_at(&mountpoint).is_some_and(|m| m.is_cloudfs()) {
        lazy_unmount(&mountpoint);
        let _ = fs::remove_file(&pid_path);
        return Ok(());
    }
    match pid {
        Some(_) => Ok(()),
        None => Err(MountError::NotMounted(mountpoint)),
    }
}
