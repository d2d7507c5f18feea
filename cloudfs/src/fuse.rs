//! The thin `fuser` adapter: decodes kernel requests, calls [`Fs`], encodes replies. Errors
//! become errnos here, and failures (as opposed to refusals) are logged here, once.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::closer::Closer;
use crate::fs::{
    Caller, Fs, FsError, RenameMode, SNAPSHOT_TREE_XATTR, SetAttr, SetTime, Switch, Written,
    XattrMode, snapshot_target,
};
use crate::meta::{Inode, ReplacedNames};
use crate::metrics::EngineMetrics;

/// How long the kernel may trust the names and attributes it is told where changes may not
/// pass through it: on a read-only mount, which follows a writer elsewhere, and on a kernel
/// that cannot be told to look a name up again without dropping it (see [`TRUSTED_TTL`]).
const SHORT_TTL: Duration = Duration::from_secs(1);
/// How long the kernel may trust them on a writable mount. The mount is the volume's only
/// writer, so every change but two reaches it as the kernel's own request, which updates or
/// drops what it cached. The two are told to it: after a rollback, every name of the replaced
/// state is to be looked up again ([`EXPIRE_ABI`]) and every inode's attributes refetched; after
/// a subtree copy, the attributes of the copy's parent. Bounded all the same, so that a change
/// missed by mistake could not stay unseen for long.
const TRUSTED_TTL: Duration = Duration::from_secs(3600);
/// The kernel version that can be told to look a name up again before its next use without
/// dropping it, which would detach what is mounted on it (`FUSE_EXPIRE_ONLY`, ABI 7.38,
/// Linux 6.2).
const EXPIRE_ABI: fuser::Version = fuser::Version(7, 38);
const MAX_WRITE: u32 = 1 << 20;
const READDIR_BATCH: usize = 256;

/// Serves an [`Fs`] to the kernel, measuring every operation.
#[derive(Debug)]
pub struct FuseFs {
    fs: Arc<Fs>,
    metrics: EngineMetrics,
    /// Whether handles that write a file from scratch bypass the page cache (see
    /// [`FuseFs::decide_direct_io`]): only on kernels that keep shared mappings of such files
    /// coherent with their direct writes (`FUSE_DIRECT_IO_ALLOW_MMAP`, fixed in Linux 6.9).
    direct_writes: bool,
    /// The handles opened with `FOPEN_DIRECT_IO`: only their writes can leave other handles'
    /// pages stale.
    direct_handles: Mutex<HashSet<u64>>,
    /// Set once the session is up; see [`FuseFs::drop_stale_pages`].
    notifier: Arc<OnceLock<Notifier>>,
    /// The files an open may keep the cached pages of; shared with the switch hook.
    kept_caches: Arc<KeptCaches>,
    /// How long the kernel may trust names and attributes: [`TRUSTED_TTL`] or [`SHORT_TTL`],
    /// settled at `init`.
    ttl: Duration,
    /// FUSE threads waiting for the kernel to drop pages, and how many may: all but one, which
    /// stays free to serve the reads whose page locks the kernel waits for.
    dropping_pages: AtomicUsize,
    max_dropping_pages: usize,
    /// Records what released handles wrote (the kernel skips the flush of `close`).
    closer: Closer,
    rt: tokio::runtime::Handle,
}

/// The kernel version whose FUSE maps direct-I/O files coherently (ABI 7.40, Linux 6.9).
const COHERENT_DIRECT_IO_MMAP: fuser::Version = fuser::Version(7, 40);

impl FuseFs {
    /// Serves `fs` with `fuse_threads` threads; `rt` runs what must not hold one up.
    pub fn new(
        fs: Arc<Fs>,
        metrics: EngineMetrics,
        fuse_threads: usize,
        rt: tokio::runtime::Handle,
    ) -> Result<FuseFs, FsError> {
        let notifier: Arc<OnceLock<Notifier>> = Arc::new(OnceLock::new());
        let kept_caches = Arc::new(KeptCaches::default());
        let (weak_fs, switch_notifier, switch_kept, background) = (
            Arc::downgrade(&fs),
            notifier.clone(),
            kept_caches.clone(),
            rt.clone(),
        );
        fs.on_switch(move |how| {
            // Later opens drop what the kernel kept.
            switch_kept.forget_all();
            if let Switch::Rollback(replaced) = how {
                // The kernel is told which names to look up again (where it keeps them for
                // long: see `init`), and drops the pages and attributes of the inodes of the
                // restored state (for handles open across the rollback). Not here: the file
                // system is frozen, and either may wait for a request in flight (a lock on a
                // directory, a read holding a page).
                let (weak_fs, notifier) = (weak_fs.clone(), switch_notifier.clone());
                background.spawn_blocking(move || {
                    if let Some(replaced) = replaced {
                        expire_replaced_names(&replaced, &notifier);
                    }
                    drop_cached_inodes(&weak_fs, &notifier);
                });
            }
        })?;
        Ok(FuseFs {
            closer: Closer::start(&fs, &rt),
            fs,
            metrics,
            direct_writes: false,
            direct_handles: Mutex::new(HashSet::new()),
            notifier,
            kept_caches,
            ttl: SHORT_TTL,
            dropping_pages: AtomicUsize::new(0),
            max_dropping_pages: fuse_threads.saturating_sub(1),
            rt,
        })
    }

    /// Where the session's notifier goes once the session is up (the session owns the
    /// `FuseFs` by then).
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    /// Runs operation `op`, counting and timing it, and logging it if it failed (as
    /// opposed to being refused).
    fn measured<T>(
        &self,
        op: &str,
        run: impl FnOnce() -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        let started = Instant::now();
        let result = run();
        if let Err(e) = &result
            && e.is_failure()
        {
            tracing::error!(op, error = %e, "file-system operation failed");
        }
        let error = result.as_ref().err().map(FsError::errno_name);
        self.metrics.fs_operation(op, started.elapsed(), error);
        result
    }
}

fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn attr(inode: &Inode, block_size: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(inode.ino),
        size: inode.size,
        blocks: inode.size.div_ceil(512),
        atime: system_time(inode.atime_ns),
        mtime: system_time(inode.mtime_ns),
        ctime: system_time(inode.ctime_ns),
        crtime: system_time(inode.ctime_ns),
        kind: kind(inode.mode),
        perm: (inode.mode & 0o7777) as u16,
        nlink: inode.nlink,
        uid: inode.uid,
        gid: inode.gid,
        rdev: inode.rdev,
        blksize: block_size.min(u64::from(MAX_WRITE)) as u32,
        flags: 0,
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(nanos(t)),
    }
}

impl FuseFs {
    fn entry(&self, reply: ReplyEntry, result: Result<Inode, FsError>) {
        match result {
            Ok(inode) => reply.entry(
                self.ttl(&inode),
                &self.attr(&inode),
                Generation(inode.generation),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Decides whether handle `fh`, opened with `flags`, bypasses the page cache
    /// (`FOPEN_DIRECT_IO`), and records it: one that writes a file from scratch, opened
    /// write-only or on an `empty` file. Its writes then skip the copy into page-cache pages
    /// (the kernel hands the writer's own pages over); reads through it, if any, come from
    /// the engine's block memory. A read-write handle on a file with contents, a database's
    /// say, keeps the page cache for its reads.
    fn decide_direct_io(&self, fh: u64, flags: i32, empty: impl FnOnce() -> bool) -> bool {
        let bypass = self.direct_writes
            && match flags & libc::O_ACCMODE {
                libc::O_WRONLY => true,
                libc::O_RDWR => empty(),
                _ => false,
            };
        if bypass {
            self.direct_handles().insert(fh);
        }
        bypass
    }

    fn direct_handles(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.direct_handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A handle that does not bypass the page cache keeps what the kernel cached of the file
    /// (`FOPEN_KEEP_CACHE`) when [`KeptCaches`] allows, so reading a file again, or in
    /// another process, costs no request. No `close` waits for a flush (`FOPEN_NOFLUSH`): the
    /// release of the handle, which the kernel sends without making anyone wait, hands the
    /// file to the [`Closer`] instead. That spares a round trip per `close` (a quarter of a
    /// file create's) and lets a writer of many small files go on while the last one is
    /// uploaded; the price is that a failed upload is reported by `fsync`, not by `close` (the
    /// writes stay staged, and readable, and are tried again). Shared mappings are written
    /// back by the kernel when unmapped, which needs no flush either.
    fn open_flags(&self, ino: u64, bypasses_page_cache: bool) -> FopenFlags {
        let cache = if bypasses_page_cache {
            FopenFlags::FOPEN_DIRECT_IO
        } else if self.kept_caches.keep(ino) {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        cache | FopenFlags::FOPEN_NOFLUSH
    }

    /// After a direct write to a file other handles have open: drops the kernel's pages of
    /// the range. The kernel drops them itself before it sends the write, but a reader may
    /// have cached the old bytes again while the write was on its way here. Done before the
    /// write is answered, so that every read that starts after it sees it, by a FUSE thread
    /// holding no engine lock: the page locks the kernel waits for are released when the
    /// reads holding them, served by other threads, end. With no thread to spare, it is done
    /// just after the answer instead. Writes of a mapping's pages (`FUSE_WRITE_CACHE`) come
    /// from the page cache itself, which may wait for their answer. A reader that cached the
    /// old bytes and closed its handle before this looks leaves them to the next open, which
    /// does not keep them (see [`KeptCaches`]): the caller forgot the file there first.
    fn drop_stale_pages(&self, ino: u64, written: Written, flags: WriteFlags) {
        if written.len == 0 // a length of 0 would mean the whole file
            || flags.contains(WriteFlags::FUSE_WRITE_CACHE)
            || !self.fs.open_elsewhere(ino)
        {
            return;
        }
        let Some(notifier) = self.notifier.get().cloned() else {
            return;
        };
        let range = (INodeNo(ino), written.offset as i64, i64::from(written.len));
        let drop_range = move || {
            if let Err(e) = notifier.inval_inode(range.0, range.1, range.2) {
                tracing::warn!(ino, error = %e, "could not drop pages a write made stale");
            }
        };
        if self.dropping_pages.fetch_add(1, Ordering::AcqRel) < self.max_dropping_pages {
            drop_range();
        } else {
            self.rt.spawn_blocking(drop_range);
        }
        self.dropping_pages.fetch_sub(1, Ordering::AcqRel);
    }

    fn attr(&self, inode: &Inode) -> FileAttr {
        attr(inode, self.fs.config().block_size)
    }

    /// How long the kernel may trust what it is told about `inode`: not at all while it has a
    /// set-ID bit, which cloudfs may drop without the kernel seeing the new mode (on a write
    /// or a chown: see `Fs::drop_setid_bits`). Rare files; the rest keep the mount's TTL.
    fn ttl(&self, inode: &Inode) -> &Duration {
        if inode.mode & (libc::S_ISUID | libc::S_ISGID) != 0 && !inode.is_dir() {
            &Duration::ZERO
        } else {
            &self.ttl
        }
    }

    /// Has the kernel drop the attributes it cached of `ino` (not its pages: that could wait
    /// for reads), after a change that did not pass through the kernel's requests for it.
    fn drop_cached_attributes(&self, ino: u64) {
        if let Some(notifier) = self.notifier.get()
            && let Err(e) = notifier.inval_inode(INodeNo(ino), -1, 0)
        {
            tracing::warn!(ino, error = %e, "could not drop attributes the kernel cached");
        }
    }
}

/// The files whose pages the kernel may keep when a handle opens them through the page cache
/// (`FOPEN_KEEP_CACHE`): those opened since the last event that could leave pages of theirs
/// stale — a direct write to them (a reader may have cached the old bytes while it was on
/// its way), a refused write, a rollback, a newer generation followed. An open of any other
/// file has the kernel drop its pages, and enters it. Every other change of a file's bytes
/// passes through the kernel's cache: writes through it update it, truncation cuts it.
/// Bounded: when full it starts over, which costs opens their kept pages once.
#[derive(Debug, Default)]
struct KeptCaches(Mutex<HashSet<u64>>);

const KEPT_CACHES_MAX: usize = 1 << 16;

impl KeptCaches {
    fn files(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether an open of `ino` may keep the file's cached pages; enters it either way.
    fn keep(&self, ino: u64) -> bool {
        let mut files = self.files();
        if files.contains(&ino) {
            return true;
        }
        if files.len() >= KEPT_CACHES_MAX {
            files.clear();
        }
        files.insert(ino);
        false
    }

    fn forget(&self, ino: u64) {
        self.files().remove(&ino);
    }

    fn forget_all(&self) {
        self.files().clear();
    }
}

/// Inodes dropped from the kernel's caches per query of the inode table.
const DROP_BATCH: usize = 4096;

/// After a rollback: has the kernel look up again, before its next use, every name of the
/// state the rollback replaced (one request each; the kernel answers at once for a name it
/// does not hold). A name it finds naming the same inode stays, with what is mounted on it.
fn expire_replaced_names(replaced: &ReplacedNames, notifier: &OnceLock<Notifier>) {
    let Some(notifier) = notifier.get() else {
        return; // no session: nothing cached
    };
    let started = Instant::now();
    let (mut after, mut names) = (0, 0);
    loop {
        let batch = match replaced.page(after, DROP_BATCH) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the names a rollback replaced");
                return;
            }
        };
        let Some(&(last, _, _)) = batch.last() else {
            break;
        };
        for (_, parent, name) in &batch {
            if let Err(e) = notifier.expire_entry(INodeNo(*parent), OsStr::from_bytes(name)) {
                tracing::warn!(parent, error = %e, "stopped expiring names a rollback replaced");
                return;
            }
        }
        names += batch.len();
        after = last;
    }
    tracing::info!(names, took = ?started.elapsed(), "had the kernel look up again the names a rollback replaced");
}

/// After a rollback: has the kernel drop the attributes, and the pages, it cached of every
/// inode of the restored state (one request each; the kernel answers at once for an inode it
/// does not hold), so that handles and mappings open across the rollback see the restored
/// state.
fn drop_cached_inodes(fs: &Weak<Fs>, notifier: &OnceLock<Notifier>) {
    let Some(notifier) = notifier.get() else {
        return; // no session: nothing cached
    };
    let started = Instant::now();
    let (mut after, mut inodes) = (0, 0);
    loop {
        // Taken batch by batch: an unmount does not wait for the whole pass.
        let Some(fs) = fs.upgrade() else {
            return;
        };
        let batch = match fs.inodes_after(after, DROP_BATCH) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "could not list the inodes whose cached state a rollback made stale");
                return;
            }
        };
        drop(fs);
        let Some(&last) = batch.last() else {
            break;
        };
        for &ino in &batch {
            if let Err(e) = notifier.inval_inode(INodeNo(ino), 0, 0) {
                // The session is gone (an inode the kernel does not hold is no error).
                tracing::warn!(ino, error = %e, "stopped dropping cached state a rollback made stale");
                return;
            }
        }
        inodes += batch.len();
        after = last;
    }
    tracing::info!(inodes, took = ?started.elapsed(), "dropped what the kernel cached of the rolled-back inodes");
}

fn empty(reply: ReplyEmpty, result: Result<(), FsError>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, data: Result<Vec<u8>, FsError>) {
    match data {
        Ok(data) if size == 0 => reply.size(data.len() as u32),
        Ok(data) if data.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(errno(&e)),
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let wanted = InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            // The kernel then asks for `security.capability` once per attribute refresh
            // instead of before every write (a round trip each), and leaves the set-ID bits to
            // us: see `Fs::drop_setid_bits`. It still removes file capabilities itself, before
            // writes through the page cache (the engine does before direct ones).
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            // Lets handles that bypass the page cache be mapped too (a shared mapping's
            // pages are written back and dropped before each direct write).
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
        // A read-only mount may follow a writer elsewhere. After a newer generation, later
        // opens drop what the kernel kept (see `KeptCaches`); with this, the kernel also
        // checks, before it reads cached pages through a handle open across it, whether the
        // file's modification time or size changed. Not on a writable mount, where every
        // change passes through the kernel, and where it would drop the pages of a file after
        // each of its writes.
        let wanted = if self.fs.config().read_only {
            wanted | InitFlags::FUSE_AUTO_INVAL_DATA
        } else {
            wanted
        };
        let granted = wanted & config.capabilities();
        self.direct_writes = granted.contains(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            && config.kernel_abi() >= COHERENT_DIRECT_IO_MMAP;
        self.ttl = if config.kernel_abi() >= EXPIRE_ABI && !self.fs.config().read_only {
            // A rollback then tells the kernel which names to look up again.
            self.fs.save_replaced_names();
            TRUSTED_TTL
        } else {
            SHORT_TTL
        };
        tracing::debug!(ttl = ?self.ttl, "names and attributes the kernel may cache");
        let _ = config.add_capabilities(granted);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self.measured("lookup", || self.fs.lookup(parent.0, name.as_bytes()));
        self.entry(reply, result);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.measured("getattr", || self.fs.getattr(ino.0)) {
            Ok(inode) => reply.attr(self.ttl(&inode), &self.attr(&inode)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _change = self.fs.change();
        let change = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
        };
        // A chown, or a truncate by a caller without CAP_FSETID (uid 0 stands for it: fuser
        // does not pass on the kernel's FATTR_KILL_SUIDGID), drops the set-ID bits; an explicit
        // mode is the caller's word.
        let drops_setid = mode.is_none()
            && (uid.is_some() || gid.is_some() || (size.is_some() && req.uid() != 0));
        let result = self.measured("setattr", || {
            if drops_setid {
                self.fs.drop_setid_bits(ino.0)?;
            }
            self.fs.setattr(ino.0, change)
        });
        match result {
            Ok(inode) => reply.attr(self.ttl(&inode), &self.attr(&inode)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.measured("readlink", || self.fs.readlink(ino.0)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _change = self.fs.change();
        let result = self.measured("mknod", || {
            self.fs
                .mknod(caller(req), parent.0, name.as_bytes(), mode, umask, rdev)
        });
        self.entry(reply, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _change = self.fs.change();
        let result = self.measured("mkdir", || {
            self.fs
                .mkdir(caller(req), parent.0, name.as_bytes(), mode, umask)
        });
        self.entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _change = self.fs.change();
        let result = self.measured("unlink", || self.fs.unlink(parent.0, name.as_bytes()));
        empty(reply, result);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _change = self.fs.change();
        let result = self.measured("rmdir", || self.fs.rmdir(parent.0, name.as_bytes()));
        empty(reply, result);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _change = self.fs.change();
        let result = self.measured("symlink", || {
            self.fs.symlink(
                caller(req),
                parent.0,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
            )
        });
        self.entry(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _change = self.fs.change();
        let mode = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else {
            RenameMode::Replace
        };
        let result = self.measured("rename", || {
            self.fs.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                mode,
            )
        });
        empty(reply, result);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _change = self.fs.change();
        let result = self.measured("link", || {
            self.fs.link(ino.0, newparent.0, newname.as_bytes())
        });
        self.entry(reply, result);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            self.closer.wait_for_room();
        }
        let _change = self.fs.change();
        // As the engine truncates: only an open for writing (see `Fs::open`).
        let truncates = flags.0 & libc::O_TRUNC != 0
            && flags.0 & libc::O_ACCMODE != libc::O_RDONLY
            && req.uid() != 0;
        let result = self.measured("open", || {
            if truncates {
                self.fs.drop_setid_bits(ino.0)?;
            }
            self.fs.open(ino.0, flags.0)
        });
        match result {
            Ok(fh) => {
                let direct = self.decide_direct_io(fh, flags.0, || {
                    flags.0 & libc::O_TRUNC != 0
                        || self.fs.getattr(ino.0).is_ok_and(|inode| inode.size == 0)
                });
                reply.opened(FileHandle(fh), self.open_flags(ino.0, direct))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.measured("read", || self.fs.read(ino.0, fh.0, offset, size)) {
            Ok(data) => {
                self.metrics.bytes_read(data.len());
                reply.data(&data)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = {
            let _change = self.fs.change();
            self.measured("write", || {
                if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                    self.fs.drop_setid_bits(ino.0)?;
                }
                // A mapping's writeback keeps them, as on a local file system.
                if !write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) {
                    self.fs.drop_capabilities(ino.0)?;
                }
                self.fs.write(ino.0, fh.0, offset, data)
            })
        };
        let direct = self.direct_handles().contains(&fh.0);
        if direct || result.is_err() {
            // A reader may have cached the old bytes while a direct write was on its way (see
            // `drop_stale_pages`); a mapping may show a refused write's. Not kept past the
            // next open, from here on (before `open_elsewhere` is asked).
            self.kept_caches.forget(ino.0);
        }
        match result {
            Ok(written) => {
                self.metrics.bytes_written(written.len as usize);
                if direct {
                    self.drop_stale_pages(ino.0, written, write_flags);
                }
                reply.written(written.len)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _change = self.fs.change();
        empty(reply, self.measured("flush", || self.fs.flush(ino.0, fh.0)));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _change = self.fs.change();
        self.direct_handles().remove(&fh.0);
        let released = self.measured("release", || self.fs.release_handle(ino.0, fh.0));
        empty(
            reply,
            released.map(|unflushed| {
                if unflushed {
                    self.closer.flush_later(ino.0);
                }
            }),
        );
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _change = self.fs.change();
        empty(reply, self.measured("fsync", || self.fs.fsync(ino.0)));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.measured("opendir", || self.fs.getattr(ino.0)) {
            Ok(inode) if inode.is_dir() => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.measured("readdir", || self.fs.readdir(ino.0, offset, READDIR_BATCH)) {
            Ok(entries) => {
                for e in entries {
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(INodeNo(e.inode.ino), e.offset, kind(e.inode.mode), name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.measured("readdirplus", || {
            self.fs.readdir(ino.0, offset, READDIR_BATCH)
        }) {
            Ok(entries) => {
                for e in entries {
                    let name = OsStr::from_bytes(&e.name);
                    let attr = self.attr(&e.inode);
                    let generation = Generation(e.inode.generation);
                    if reply.add(
                        INodeNo(e.inode.ino),
                        e.offset,
                        name,
                        self.ttl(&e.inode),
                        &attr,
                        generation,
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _change = self.fs.change();
        empty(reply, self.measured("fsyncdir", || self.fs.fsyncdir()));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.measured("statfs", || self.fs.statfs()) {
            Ok(s) => reply.statfs(
                s.blocks,
                s.blocks_free,
                s.blocks_free,
                s.files,
                s.files_free,
                s.block_size,
                s.name_max,
                s.block_size,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _change = self.fs.change();
        let mode = if flags & libc::XATTR_CREATE != 0 {
            XattrMode::Create
        } else if flags & libc::XATTR_REPLACE != 0 {
            XattrMode::Replace
        } else {
            XattrMode::Any
        };
        let result = self.measured("setxattr", || {
            self.fs.setxattr(ino.0, name.as_bytes(), value, mode)
        });
        if result.is_ok()
            && name.as_bytes() == SNAPSHOT_TREE_XATTR
            && let Ok((parent, _)) = snapshot_target(value)
        {
            // The copy's parent gained an entry behind the kernel's back.
            self.drop_cached_attributes(parent);
        }
        empty(reply, result);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let value = self.measured("getxattr", || self.fs.getxattr(ino.0, name.as_bytes()));
        xattr_reply(reply, size, value);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names = self
            .measured("listxattr", || self.fs.listxattr(ino.0))
            .map(|names| {
                names
                    .into_iter()
                    .flat_map(|mut n| {
                        n.push(0);
                        n
                    })
                    .collect()
            });
        xattr_reply(reply, size, names);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _change = self.fs.change();
        let result = self.measured("removexattr", || {
            self.fs.removexattr(ino.0, name.as_bytes())
        });
        empty(reply, result);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission bits are checked by the kernel (`default_permissions`).
        let result = self.measured("access", || self.fs.getattr(ino.0));
        empty(reply, result.map(|_| ()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.closer.wait_for_room();
        let _change = self.fs.change();
        let result = self.measured("create", || {
            self.fs
                .create(caller(req), parent.0, name.as_bytes(), mode, umask, flags)
        });
        match result {
            Ok((inode, fh)) => {
                let direct = self.decide_direct_io(fh, flags, || inode.size == 0);
                reply.created(
                    self.ttl(&inode),
                    &self.attr(&inode),
                    Generation(inode.generation),
                    FileHandle(fh),
                    self.open_flags(inode.ino, direct),
                )
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}
