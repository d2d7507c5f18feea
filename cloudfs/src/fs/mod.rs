//! POSIX file-system operations over the inode table and the block store, independent of FUSE.
//!
//! This module owns the namespace (lookup, create, link, unlink, rename, directories, xattrs,
//! attributes); `data` owns file contents (write-back staging, reads, flush, truncate). Every
//! operation is a method on [`Fs`] taking inode numbers, so the FUSE adapter stays thin and the
//! tests can drive the whole engine without a kernel.

mod data;
mod error;
mod staging;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use rusqlite::Connection;
use tokio::runtime::Handle;

use crate::cas::BlockStore;
use crate::meta::{self, DirEntry, Inode, MetaStore, ROOT_INO};

pub use data::{FileState, Written};
pub use error::{FsError, FsResult};

/// Longest name a directory entry may have (as Linux file systems do).
pub const NAME_MAX: usize = 255;
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 64 * 1024;
/// How often an attribute read is tried while flushes keep committing under it (the last
/// try is used as it is).
const OVERLAY_READS: usize = 8;

/// Makes the volume's metadata durable in the object store (implemented by the volume layer).
pub trait MetadataSync: Send + Sync {
    fn sync(&self) -> FsResult<()>;
    /// Called once at a clean unmount, after the last `sync`.
    fn release(&self) -> FsResult<()>;
}

/// Who is asking: the owner of anything created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// Tunables of a mounted file system.
#[derive(Debug, Clone)]
pub struct FsConfig {
    pub block_size: u64,
    pub read_only: bool,
    /// Dirty bytes staged locally before writers start uploading.
    pub dirty_budget: u64,
    /// Memory for staged blocks, a whole block per staged block (more wait in staging
    /// files). Blocks still being uploaded after their file moved on may take up to the
    /// upload slots' worth of blocks beyond it.
    pub memory_staging: u64,
    /// Most blocks read ahead of a sequential reader.
    pub max_readahead_blocks: u64,
}

/// A time to set with `setattr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(i64),
}

/// The attributes `setattr` changes; `None` leaves one alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// How `rename` treats an existing destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    Replace,
    NoReplace,
    Exchange,
}

/// `setxattr`'s create/replace flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrMode {
    Any,
    Create,
    Replace,
}

/// One `readdir` result: the entry and the offset that resumes after it.
#[derive(Debug, Clone)]
pub struct Listing {
    pub offset: u64,
    pub name: Vec<u8>,
    pub inode: Inode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub blocks_free: u64,
    pub files: u64,
    pub files_free: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// The inode table a mount serves. A read-only mount swaps in newer generations as the
/// writer publishes them; every operation works on the table current when it started.
#[derive(Debug)]
struct MetaHandle(std::sync::RwLock<Arc<MetaStore>>);

impl MetaHandle {
    fn current(&self) -> Arc<MetaStore> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn read<T, E: From<meta::MetaError>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        self.current().read(f)
    }

    fn writes(&self) -> u64 {
        self.current().writes()
    }

    fn write<T, E: From<meta::MetaError>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        self.current().write(f)
    }

    fn replace(&self, meta: Arc<MetaStore>) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = meta;
    }
}

/// The file system of one mounted volume.
pub struct Fs {
    meta: MetaHandle,
    blocks: Arc<BlockStore>,
    rt: Handle,
    config: FsConfig,
    staging: staging::StagingPool,
    files: Mutex<HashMap<u64, Arc<FileState>>>,
    handles: Mutex<HashMap<u64, Arc<data::OpenHandle>>>,
    next_handle: AtomicU64,
    prefetch_slots: Arc<tokio::sync::Semaphore>,
    upload_slots: Arc<tokio::sync::Semaphore>,
    next_version: AtomicU64,
    sync: Option<Arc<dyn MetadataSync>>,
    /// Whether any directory may be sealed (spares the ancestry check while none is).
    seals: std::sync::atomic::AtomicBool,
    /// Whether any file may carry capabilities (spares a write the lookup while none does).
    any_file_capabilities: std::sync::atomic::AtomicBool,
    /// Shared by every kernel request that changes the volume; [`Fs::freeze`] takes it
    /// exclusively.
    changes: std::sync::RwLock<()>,
    /// The most bytes the files may hold; `NO_QUOTA` for none.
    quota: AtomicU64,
    /// Run whenever the inode table is replaced; see [`Fs::on_switch`].
    switch_hook: OnceLock<SwitchHook>,
    /// Whether a rollback saves the names of the state it replaces; see
    /// [`Fs::save_replaced_names`].
    save_replaced_names: std::sync::atomic::AtomicBool,
}

type SwitchHook = Box<dyn Fn(Switch) + Send + Sync>;

/// How the inode table of a mounted file system was replaced (see [`Fs::on_switch`]).
#[derive(Debug)]
pub enum Switch {
    /// By a rollback ([`Fs::restore`]), with the names of the state it replaced when asked
    /// for ([`Fs::save_replaced_names`]).
    Rollback(Option<meta::ReplacedNames>),
    /// By a newer generation a read-only mount follows ([`Fs::replace_meta`]).
    NewerGeneration,
}

const NO_QUOTA: u64 = u64::MAX;

/// Holds a frozen file system: no change is in flight or can start until it drops.
pub type Frozen<'a> = std::sync::RwLockWriteGuard<'a, ()>;

/// The extended attribute that seals a directory: set it (any value) to seal, remove it to
/// unseal. In the `trusted` namespace, so only root (CAP_SYS_ADMIN) can change it.
pub const SEAL_XATTR: &[u8] = b"trusted.cloudfs.sealed";

/// Where file capabilities live; a write takes them away (see [`Fs::drop_capabilities`]).
const CAPABILITY_XATTR: &[u8] = b"security.capability";

/// The extended attribute that copies a directory tree: setting it on a directory to
/// `<parent inode>:<name>` runs [`Fs::snapshot_tree`] into that parent under that name.
pub const SNAPSHOT_TREE_XATTR: &[u8] = b"trusted.cloudfs.snapshot-to";

/// The parent inode and name a [`SNAPSHOT_TREE_XATTR`] value names.
pub fn snapshot_target(value: &[u8]) -> FsResult<(u64, &[u8])> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.split_once(':'))
        .and_then(|(parent, name)| Some((parent.parse::<u64>().ok()?, name.as_bytes())))
        .ok_or(FsError::Invalid(
            "snapshot target must be <parent inode>:<name>",
        ))
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("meta", &self.meta.current().path())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(FsError::Invalid("bad file name"));
    }
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

fn get(conn: &Connection, ino: u64) -> FsResult<Inode> {
    meta::get_inode(conn, ino)?.ok_or(FsError::NotFound)
}

fn get_dir(conn: &Connection, ino: u64) -> FsResult<Inode> {
    let inode = get(conn, ino)?;
    if !inode.is_dir() {
        return Err(FsError::NotDir);
    }
    Ok(inode)
}

fn touch_dir(conn: &Connection, dir: &mut Inode, nlink_delta: i32, now: i64) -> FsResult<()> {
    dir.nlink = dir.nlink.saturating_add_signed(nlink_delta);
    dir.mtime_ns = now;
    dir.ctime_ns = now;
    meta::update_inode(conn, dir)?;
    Ok(())
}

fn without_setid(mode: u32) -> u32 {
    let mode = mode & !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        mode & !libc::S_ISGID
    } else {
        mode // the FUSE rule: without group execute it makes no program set-group-ID
    }
}

impl Fs {
    /// Builds the file system over an open volume. A writable one first drops the inodes of
    /// files that were unlinked while open when the previous mount ended.
    pub fn new(
        meta: Arc<MetaStore>,
        blocks: Arc<BlockStore>,
        rt: Handle,
        staging_dir: PathBuf,
        config: FsConfig,
        sync: Option<Arc<dyn MetadataSync>>,
    ) -> FsResult<Fs> {
        std::fs::create_dir_all(&staging_dir)?;
        if !config.read_only {
            meta.write(|tx| -> FsResult<()> {
                for ino in meta::unlinked_inodes(tx)? {
                    meta::delete_inode(tx, ino)?;
                }
                Ok(())
            })?;
        }
        let seals = meta.read(meta::has_seals)?;
        let any_file_capabilities = meta.read(|c| meta::has_xattr_anywhere(c, CAPABILITY_XATTR))?;
        let staging =
            staging::StagingPool::new(staging_dir, config.block_size, config.memory_staging);
        Ok(Fs {
            meta: MetaHandle(std::sync::RwLock::new(meta)),
            blocks,
            rt,
            config,
            staging,
            files: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            prefetch_slots: Arc::new(tokio::sync::Semaphore::new(8)),
            upload_slots: Arc::new(tokio::sync::Semaphore::new(4)),
            next_version: AtomicU64::new(1),
            sync,
            seals: std::sync::atomic::AtomicBool::new(seals),
            any_file_capabilities: std::sync::atomic::AtomicBool::new(any_file_capabilities),
            changes: std::sync::RwLock::new(()),
            quota: AtomicU64::new(NO_QUOTA),
            switch_hook: OnceLock::new(),
            save_replaced_names: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Has `hook` run each time the inode table is replaced, as soon as the new one is served
    /// (a rollback's file system is still frozen then): the FUSE adapter drops there what the
    /// kernel may keep of the replaced state. One hook per file system; a second is refused.
    pub fn on_switch(&self, hook: impl Fn(Switch) + Send + Sync + 'static) -> FsResult<()> {
        self.switch_hook
            .set(Box::new(hook))
            .map_err(|_| FsError::Invalid("a switch hook is already set"))
    }

    /// Has each later rollback save the names of the state it replaces, for the switch hook
    /// (the FUSE adapter, where the kernel keeps names for long and must be told which to look
    /// up again). Not by default: it is work done while the file system is frozen.
    pub fn save_replaced_names(&self) {
        self.save_replaced_names
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn switched(&self, how: Switch) {
        if let Some(hook) = self.switch_hook.get() {
            hook(how);
        }
    }

    /// Inodes numbered above `after`, in order, at most `limit` of them.
    pub fn inodes_after(&self, after: u64, limit: usize) -> FsResult<Vec<u64>> {
        Ok(self.meta.read(|c| meta::inodes_after(c, after, limit))?)
    }

    /// Sets (or with `None` lifts) the most bytes the volume's files may hold. Writes that
    /// would grow them past it fail with `ENOSPC`; `statfs` reports it as the size.
    pub fn set_quota(&self, quota_bytes: Option<u64>) {
        self.quota.store(
            quota_bytes.unwrap_or(NO_QUOTA),
            std::sync::atomic::Ordering::Release,
        );
    }

    pub fn quota(&self) -> Option<u64> {
        Some(self.quota.load(std::sync::atomic::Ordering::Acquire)).filter(|q| *q != NO_QUOTA)
    }

    /// Taken around every change from outside (never nested): by the kernel adapter around
    /// each request that changes the volume, by the workers around [`Fs::flush_released`], so
    /// that [`Fs::freeze`] can wait for the ones in flight and hold off new ones.
    pub fn change(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.changes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stops changes and flushes every file's staged writes into the inode table: while the
    /// guard lives, the table alone is the whole volume at one instant.
    pub fn freeze(&self) -> FsResult<Frozen<'_>> {
        let frozen = self
            .changes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.flush_all()?;
        Ok(frozen)
    }

    /// Replaces the whole inode table with the database at `source` (a rollback), on a frozen
    /// file system. Inode numbers used before are never handed out again, so a file handle
    /// still open on a file the restored state lacks fails instead of reaching a newer file.
    pub fn restore(&self, _frozen: &Frozen<'_>, source: &Path) -> FsResult<()> {
        self.writable()?;
        let meta = self.meta.current();
        // Until the restored table says otherwise, any file may have them again.
        self.any_file_capabilities
            .store(true, std::sync::atomic::Ordering::Release);
        for state in lock(&self.files).values() {
            state.may_have_capabilities();
        }
        let replaced = if self
            .save_replaced_names
            .load(std::sync::atomic::Ordering::Acquire)
        {
            Some(meta.save_names(&source.with_extension("replaced-names"))?)
        } else {
            None
        };
        meta.restore_from(source)?;
        self.switched(Switch::Rollback(replaced));
        let seals = meta.read(meta::has_seals)?;
        self.seals
            .store(seals, std::sync::atomic::Ordering::Release);
        let any_file_capabilities = meta.read(|c| meta::has_xattr_anywhere(c, CAPABILITY_XATTR))?;
        self.any_file_capabilities
            .store(any_file_capabilities, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// The inode table currently served.
    pub fn meta(&self) -> Arc<MetaStore> {
        self.meta.current()
    }

    /// Serves a newer generation of the volume (read-only mounts follow the writer so).
    pub fn replace_meta(&self, meta: Arc<MetaStore>) -> FsResult<()> {
        if !self.config.read_only {
            return Err(FsError::Invalid(
                "only a read-only mount follows newer generations",
            ));
        }
        self.meta.replace(meta);
        self.switched(Switch::NewerGeneration);
        Ok(())
    }

    fn writable(&self) -> FsResult<()> {
        if self.config.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Fails with `NotPermitted` when one of `inos` is a sealed directory or lies under one.
    fn check_unsealed(&self, conn: &Connection, inos: &[u64]) -> FsResult<()> {
        if !self.seals.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        for &ino in inos {
            if meta::is_sealed(conn, ino)? {
                return Err(FsError::NotPermitted);
            }
        }
        Ok(())
    }

    /// `writable`, and none of `inos` sealed (no query at all while nothing is sealed: this
    /// runs on every write).
    pub(crate) fn changeable(&self, inos: &[u64]) -> FsResult<()> {
        self.writable()?;
        if !self.seals.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        self.meta.read(|c| self.check_unsealed(c, inos))
    }

    /// The inode as the caller sees it: stored attributes with unflushed size/mtime on top.
    fn overlay(&self, mut inode: Inode) -> Inode {
        if let Some(state) = lock(&self.files).get(&inode.ino) {
            state.overlay(&mut inode);
        }
        inode
    }

    /// Reads inode rows with `read` and lays unflushed sizes and times over them. A flush that
    /// completes between the two would leave neither its new row nor its overlay (the old size
    /// would come back), so a write meanwhile means reading again.
    fn read_overlaid<T>(
        &self,
        read: impl Fn() -> FsResult<T>,
        overlay: impl Fn(&Self, T) -> T,
    ) -> FsResult<T> {
        for _ in 1..OVERLAY_READS {
            let before = self.meta.writes();
            let value = overlay(self, read()?);
            if self.meta.writes() == before {
                return Ok(value);
            }
        }
        Ok(overlay(self, read()?))
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let read = || {
            self.meta.read(|c| -> FsResult<Inode> {
                get_dir(c, parent)?;
                let ino = match name {
                    b"." => parent,
                    b".." => meta::parent_of(c, parent)?.unwrap_or(ROOT_INO),
                    _ => meta::lookup(c, parent, name)?.ok_or(FsError::NotFound)?,
                };
                get(c, ino)
            })
        };
        self.read_overlaid(read, Self::overlay)
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Inode> {
        self.read_overlaid(|| self.meta.read(|c| get(c, ino)), Self::overlay)
    }

    pub fn setattr(&self, ino: u64, attr: SetAttr) -> FsResult<Inode> {
        self.changeable(&[ino])?;
        // Pending writes land first so that an explicit mtime or size is the last word.
        self.flush_file(ino)?;
        if let Some(size) = attr.size {
            self.truncate(ino, size)?;
        }
        let now = now_ns();
        self.meta.write(|tx| -> FsResult<Inode> {
            let mut inode = get(tx, ino)?;
            if let Some(mode) = attr.mode {
                inode.mode = inode.file_type() | (mode & 0o7777);
            }
            if let Some(uid) = attr.uid {
                inode.uid = uid;
            }
            if let Some(gid) = attr.gid {
                inode.gid = gid;
            }
            let resolve = |t: SetTime| match t {
                SetTime::Now => now,
                SetTime::At(ns) => ns,
            };
            if let Some(t) = attr.atime {
                inode.atime_ns = resolve(t);
            }
            if let Some(t) = attr.mtime {
                inode.mtime_ns = resolve(t);
            }
            inode.ctime_ns = now;
            meta::update_inode(tx, &inode)?;
            Ok(inode)
        })
    }

    /// Clears a non-directory's set-user-ID bit, and its set-group-ID bit when it is
    /// group-executable. A kernel that leaves this to the file system (for the sake of writes
    /// that need not ask for `security.capability` first) asks for it on a chown, and on a
    /// write, truncate or `O_TRUNC` open by a caller without `CAP_FSETID`. The FUSE adapter
    /// learns of the last two only as "not uid 0": a root caller without `CAP_FSETID` keeps
    /// the bits on a truncate.
    pub fn drop_setid_bits(&self, ino: u64) -> FsResult<()> {
        let mode = self.meta.read(|c| get(c, ino))?.mode;
        if mode & libc::S_IFMT == libc::S_IFDIR || without_setid(mode) == mode {
            return Ok(());
        }
        self.changeable(&[ino])?;
        self.meta.write(|tx| -> FsResult<()> {
            let mut inode = get(tx, ino)?;
            inode.mode = without_setid(inode.mode);
            inode.ctime_ns = now_ns();
            meta::update_inode(tx, &inode)?;
            Ok(())
        })
    }

    /// Creates an inode named `name` in `parent`; `mode` carries the file type.
    fn make_node(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        symlink_target: Option<&[u8]>,
    ) -> FsResult<Inode> {
        self.writable()?;
        check_name(name)?;
        let now = now_ns();
        self.meta.write(|tx| -> FsResult<Inode> {
            let mut dir = get_dir(tx, parent)?;
            self.check_unsealed(tx, &[parent])?;
            if meta::lookup(tx, parent, name)?.is_some() {
                return Err(FsError::Exists);
            }
            let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
            let setgid_dir = dir.mode & libc::S_ISGID != 0;
            let mut mode = mode;
            if setgid_dir && is_dir {
                mode |= libc::S_ISGID;
            }
            let mut inode = Inode {
                ino: 0,
                mode,
                uid: caller.uid,
                gid: if setgid_dir { dir.gid } else { caller.gid },
                size: symlink_target.map_or(0, |t| t.len() as u64),
                nlink: if is_dir { 2 } else { 1 },
                rdev,
                atime_ns: now,
                mtime_ns: now,
                ctime_ns: now,
                generation: 0,
            };
            inode.ino = meta::insert_inode(tx, &inode)?;
            meta::insert_dentry(tx, parent, name, inode.ino)?;
            if let Some(target) = symlink_target {
                meta::set_symlink(tx, inode.ino, target)?;
            }
            touch_dir(tx, &mut dir, if is_dir { 1 } else { 0 }, now)?;
            Ok(inode)
        })
    }

    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<Inode> {
        let kind = match mode & libc::S_IFMT {
            0 => libc::S_IFREG,
            k
            @ (libc::S_IFREG | libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK | libc::S_IFSOCK) => k,
            _ => return Err(FsError::Invalid("mknod of an unsupported file type")),
        };
        self.make_node(
            caller,
            parent,
            name,
            kind | (mode & !umask & 0o7777),
            rdev,
            None,
        )
    }

    pub fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> FsResult<Inode> {
        self.make_node(
            caller,
            parent,
            name,
            libc::S_IFDIR | (mode & !umask & 0o7777),
            0,
            None,
        )
    }

    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> FsResult<Inode> {
        if target.is_empty() || target.len() > libc::PATH_MAX as usize {
            return Err(FsError::Invalid("bad symlink target"));
        }
        self.make_node(caller, parent, name, libc::S_IFLNK | 0o777, 0, Some(target))
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.meta.read(|c| -> FsResult<Vec<u8>> {
            let inode = get(c, ino)?;
            if inode.file_type() != libc::S_IFLNK {
                return Err(FsError::Invalid("not a symlink"));
            }
            meta::symlink_target(c, ino)?.ok_or(FsError::NotFound)
        })
    }

    pub fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> FsResult<Inode> {
        self.changeable(&[ino, new_parent])?;
        check_name(new_name)?;
        let now = now_ns();
        let inode = self.meta.write(|tx| -> FsResult<Inode> {
            let mut inode = get(tx, ino)?;
            if inode.is_dir() {
                return Err(FsError::NotPermitted);
            }
            let mut dir = get_dir(tx, new_parent)?;
            if meta::lookup(tx, new_parent, new_name)?.is_some() {
                return Err(FsError::Exists);
            }
            meta::insert_dentry(tx, new_parent, new_name, ino)?;
            inode.nlink += 1;
            inode.ctime_ns = now;
            meta::update_inode(tx, &inode)?;
            touch_dir(tx, &mut dir, 0, now)?;
            Ok(inode)
        })?;
        Ok(self.overlay(inode))
    }

    /// Drops one link of `inode` (already unnamed); frees it when none remain and no handle
    /// has it open. Returns the inode number to forget locally, if it was freed.
    fn drop_link(&self, tx: &Connection, mut inode: Inode, now: i64) -> FsResult<Option<u64>> {
        inode.nlink = if inode.is_dir() {
            0
        } else {
            inode.nlink.saturating_sub(1)
        };
        inode.ctime_ns = now;
        if inode.nlink == 0 && !self.is_open(inode.ino) {
            meta::delete_inode(tx, inode.ino)?;
            return Ok(Some(inode.ino));
        }
        meta::update_inode(tx, &inode)?;
        Ok(None)
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &[u8], want_dir: bool) -> FsResult<()> {
        self.writable()?;
        if want_dir && name == b"." {
            return Err(FsError::Invalid("cannot remove ."));
        }
        if want_dir && name == b".." {
            return Err(FsError::NotEmpty);
        }
        check_name(name)?;
        let now = now_ns();
        let freed = self.meta.write(|tx| -> FsResult<Option<u64>> {
            let mut dir = get_dir(tx, parent)?;
            let ino = meta::lookup(tx, parent, name)?.ok_or(FsError::NotFound)?;
            self.check_unsealed(tx, &[parent, ino])?;
            let inode = get(tx, ino)?;
            match (want_dir, inode.is_dir()) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if !meta::dir_is_empty(tx, ino)? => return Err(FsError::NotEmpty),
                _ => {}
            }
            meta::delete_dentry(tx, parent, name)?;
            touch_dir(tx, &mut dir, if want_dir { -1 } else { 0 }, now)?;
            self.drop_link(tx, inode, now)
        })?;
        if let Some(ino) = freed {
            self.forget_file(ino);
        }
        Ok(())
    }

    /// Whether `ancestor` is `dir` or one of the directories above it.
    fn is_ancestor(conn: &Connection, ancestor: u64, mut dir: u64) -> FsResult<bool> {
        loop {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            dir = meta::parent_of(conn, dir)?.unwrap_or(ROOT_INO);
        }
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        mode: RenameMode,
    ) -> FsResult<()> {
        self.writable()?;
        check_name(name)?;
        check_name(new_name)?;
        // A file's writes are recorded before a new name for it is: "write a temporary file,
        // close it, rename it over the old one" must never leave, in a generation a crash
        // falls back to, the new name on a file whose data was not recorded yet, while the
        // old file is gone (its writes are recorded in the background after the close).
        // An exchange moves the other file as well. With no file state at all nothing is
        // unrecorded, and the lookups are skipped (renames of closed, flushed files).
        if !lock(&self.files).is_empty() {
            let (src, dst) = self.meta.read(|c| -> FsResult<_> {
                Ok((
                    meta::lookup(c, parent, name)?,
                    meta::lookup(c, new_parent, new_name)?,
                ))
            })?;
            let exchanged = dst.filter(|_| matches!(mode, RenameMode::Exchange));
            for moved in src.into_iter().chain(exchanged) {
                self.flush_file(moved)?;
            }
        }
        let now = now_ns();
        let freed = self.meta.write(|tx| -> FsResult<Option<u64>> {
            let mut src_dir = get_dir(tx, parent)?;
            let mut dst_dir = get_dir(tx, new_parent)?;
            let src_ino = meta::lookup(tx, parent, name)?.ok_or(FsError::NotFound)?;
            self.check_unsealed(tx, &[parent, new_parent, src_ino])?;
            let mut src = get(tx, src_ino)?;
            let dst_ino = meta::lookup(tx, new_parent, new_name)?;
            if src.is_dir() && Self::is_ancestor(tx, src_ino, new_parent)? {
                return Err(FsError::Invalid("cannot move a directory into itself"));
            }
            let same_dir = parent == new_parent;
            let mut freed = None;
            match (mode, dst_ino) {
                (RenameMode::Exchange, None) => return Err(FsError::NotFound),
                (RenameMode::Exchange, Some(dst_ino)) => {
                    let mut dst = get(tx, dst_ino)?;
                    if dst.is_dir() && Self::is_ancestor(tx, dst_ino, parent)? {
                        return Err(FsError::Invalid("cannot move a directory into itself"));
                    }
                    meta::retarget_dentry(tx, parent, name, dst_ino)?;
                    meta::retarget_dentry(tx, new_parent, new_name, src_ino)?;
                    if !same_dir {
                        let shift = i32::from(src.is_dir()) - i32::from(dst.is_dir());
                        touch_dir(tx, &mut src_dir, -shift, now)?;
                        touch_dir(tx, &mut dst_dir, shift, now)?;
                    }
                    dst.ctime_ns = now;
                    meta::update_inode(tx, &dst)?;
                }
                (RenameMode::NoReplace, Some(_)) => return Err(FsError::Exists),
                (_, Some(dst_ino)) if dst_ino == src_ino => return Ok(None),
                (_, dst_ino) => {
                    if let Some(dst_ino) = dst_ino {
                        let dst = get(tx, dst_ino)?;
                        match (src.is_dir(), dst.is_dir()) {
                            (true, false) => return Err(FsError::NotDir),
                            (false, true) => return Err(FsError::IsDir),
                            (true, true) if !meta::dir_is_empty(tx, dst_ino)? => {
                                return Err(FsError::NotEmpty);
                            }
                            _ => {}
                        }
                        meta::delete_dentry(tx, new_parent, new_name)?;
                        if dst.is_dir() {
                            dst_dir.nlink -= 1;
                        }
                        freed = self.drop_link(tx, dst, now)?;
                    }
                    meta::move_dentry(tx, parent, name, new_parent, new_name)?;
                    let moved_dir = i32::from(src.is_dir() && !same_dir);
                    if same_dir {
                        src_dir.nlink = dst_dir.nlink;
                        touch_dir(tx, &mut src_dir, 0, now)?;
                    } else {
                        touch_dir(tx, &mut src_dir, -moved_dir, now)?;
                        touch_dir(tx, &mut dst_dir, moved_dir, now)?;
                    }
                }
            }
            src.ctime_ns = now;
            meta::update_inode(tx, &src)?;
            Ok(freed)
        })?;
        if let Some(ino) = freed {
            self.forget_file(ino);
        }
        Ok(())
    }

    /// Entries of `dir` after `offset` (0 starts; `.` and `..` come first), at most `limit`.
    pub fn readdir(&self, dir: u64, offset: u64, limit: usize) -> FsResult<Vec<Listing>> {
        self.read_overlaid(
            || self.read_dir_page(dir, offset, limit),
            |fs, mut out| {
                for listing in &mut out {
                    listing.inode = fs.overlay(listing.inode.clone());
                }
                out
            },
        )
    }

    fn read_dir_page(&self, dir: u64, offset: u64, limit: usize) -> FsResult<Vec<Listing>> {
        let mut out = Vec::new();
        self.meta.read(|c| -> FsResult<()> {
            let this = get_dir(c, dir)?;
            if offset < 1 {
                out.push(Listing {
                    offset: 1,
                    name: b".".to_vec(),
                    inode: this.clone(),
                });
            }
            if offset < 2 {
                let parent = meta::parent_of(c, dir)?.unwrap_or(ROOT_INO);
                out.push(Listing {
                    offset: 2,
                    name: b"..".to_vec(),
                    inode: get(c, parent)?,
                });
            }
            let after = offset.saturating_sub(2) as i64;
            let rest = limit.saturating_sub(out.len());
            for DirEntry { id, name, inode } in meta::read_dir(c, dir, after, rest)? {
                out.push(Listing {
                    offset: id as u64 + 2,
                    name,
                    inode,
                });
            }
            Ok(())
        })?;
        Ok(out)
    }

    pub fn statfs(&self) -> FsResult<StatFs> {
        // Without a quota, an "unlimited drive": a petabyte, less what is used.
        const FRAGMENT: u64 = 4096;
        const UNLIMITED: u64 = 1 << 50;
        const TOTAL_FILES: u64 = 1 << 40;
        // Taken before the table is read: a file whose writes are recorded meanwhile then
        // counts once, from the table.
        let unrecorded = self.unrecorded_sizes();
        let (file_bytes, inodes) = self.meta.read(|c| -> FsResult<(u64, u64)> {
            let mut bytes = meta::file_bytes(c)?;
            for (ino, size) in &unrecorded {
                if let Some(inode) = meta::get_inode(c, *ino)? {
                    bytes += size.saturating_sub(inode.size);
                }
            }
            Ok((bytes, meta::inode_count(c)?))
        })?;
        let total_blocks = self.quota().unwrap_or(UNLIMITED) / FRAGMENT;
        Ok(StatFs {
            blocks: total_blocks,
            blocks_free: total_blocks.saturating_sub(file_bytes.div_ceil(FRAGMENT)),
            files: TOTAL_FILES,
            files_free: TOTAL_FILES.saturating_sub(inodes),
            block_size: FRAGMENT as u32,
            name_max: NAME_MAX as u32,
        })
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        self.meta.read(|c| -> FsResult<Vec<u8>> {
            get(c, ino)?;
            if name == SEAL_XATTR {
                return match meta::is_sealed_dir(c, ino)? {
                    true => Ok(b"1".to_vec()),
                    false => Err(FsError::NoAttribute),
                };
            }
            meta::get_xattr(c, ino, name)?.ok_or(FsError::NoAttribute)
        })
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], mode: XattrMode) -> FsResult<()> {
        if name == SEAL_XATTR {
            return self.seal(ino);
        }
        if name == SNAPSHOT_TREE_XATTR {
            let (parent, name) = snapshot_target(value)?;
            return self.snapshot_tree(ino, parent, name).map(|_| ());
        }
        self.changeable(&[ino])?;
        if name.is_empty() || name.len() > XATTR_NAME_MAX {
            return Err(FsError::Range);
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::TooBig);
        }
        let now = now_ns();
        self.meta.write(|tx| -> FsResult<()> {
            let mut inode = get(tx, ino)?;
            let exists = meta::get_xattr(tx, ino, name)?.is_some();
            match (mode, exists) {
                (XattrMode::Create, true) => return Err(FsError::Exists),
                (XattrMode::Replace, false) => return Err(FsError::NoAttribute),
                _ => {}
            }
            meta::set_xattr(tx, ino, name, value)?;
            inode.ctime_ns = now;
            meta::update_inode(tx, &inode)?;
            Ok(())
        })?;
        if name == CAPABILITY_XATTR {
            self.any_file_capabilities
                .store(true, std::sync::atomic::Ordering::Release);
            if let Some(state) = lock(&self.files).get(&ino) {
                state.may_have_capabilities();
            }
        }
        Ok(())
    }

    /// Takes file `ino`'s capabilities away, as a write does on a local file system (the
    /// kernel does it itself before a write through the page cache, not before a direct
    /// one). Looks them up once per open file, not once per write, while no one sets them.
    pub fn drop_capabilities(&self, ino: u64) -> FsResult<()> {
        if !self
            .any_file_capabilities
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Ok(());
        }
        let state = lock(&self.files).get(&ino).cloned();
        // Cleared before the lookup: a `setxattr` after it sets it again.
        if state.as_ref().is_some_and(|s| !s.take_capabilities_check()) {
            return Ok(());
        }
        let has_them = self.meta.read(|c| -> FsResult<bool> {
            Ok(meta::get_xattr(c, ino, CAPABILITY_XATTR)?.is_some())
        });
        let dropped = match has_them {
            Ok(false) => Ok(()),
            Ok(true) => match self.removexattr(ino, CAPABILITY_XATTR) {
                Err(FsError::NoAttribute) => Ok(()), // a concurrent write took them
                other => other,
            },
            Err(e) => Err(e),
        };
        if dropped.is_err()
            && let Some(state) = state
        {
            state.may_have_capabilities();
        }
        dropped
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<Vec<u8>>> {
        self.meta.read(|c| -> FsResult<Vec<Vec<u8>>> {
            get(c, ino)?;
            Ok(meta::list_xattrs(c, ino)?)
        })
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        if name == SEAL_XATTR {
            return self.unseal(ino);
        }
        self.changeable(&[ino])?;
        let now = now_ns();
        self.meta.write(|tx| -> FsResult<()> {
            let mut inode = get(tx, ino)?;
            if !meta::remove_xattr(tx, ino, name)? {
                return Err(FsError::NoAttribute);
            }
            inode.ctime_ns = now;
            meta::update_inode(tx, &inode)?;
            Ok(())
        })
    }

    /// Seals directory `ino`: every change in or under it fails with `EPERM` until unsealed.
    pub fn seal(&self, ino: u64) -> FsResult<()> {
        self.writable()?;
        self.meta.write(|tx| -> FsResult<()> {
            if !get(tx, ino)?.is_dir() {
                return Err(FsError::NotDir);
            }
            meta::seal(tx, ino)?;
            Ok(())
        })?;
        self.seals.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    pub fn unseal(&self, ino: u64) -> FsResult<()> {
        self.writable()?;
        self.meta.write(|tx| -> FsResult<()> {
            get(tx, ino)?;
            if meta::unseal(tx, ino)? {
                Ok(())
            } else {
                Err(FsError::NoAttribute)
            }
        })
    }

    /// Makes everything written so far durable in the object store.
    pub fn sync_all(&self) -> FsResult<()> {
        self.flush_all()?;
        self.sync_metadata()
    }

    /// Flushes every file's staged writes into the inode table.
    fn flush_all(&self) -> FsResult<()> {
        let dirty: Vec<u64> = lock(&self.files).keys().copied().collect();
        for ino in dirty {
            self.flush_file(ino)?;
        }
        Ok(())
    }

    /// Copies directory `src` as `name` in `dst_parent`: metadata only, whatever its size;
    /// the copy's files share their blocks with the originals and diverge copy-on-write.
    pub fn snapshot_tree(&self, src: u64, dst_parent: u64, name: &[u8]) -> FsResult<Inode> {
        self.writable()?;
        check_name(name)?;
        self.flush_all()?;
        let now = now_ns();
        self.meta.write(|tx| -> FsResult<Inode> {
            get_dir(tx, src)?;
            let mut dst = get_dir(tx, dst_parent)?;
            self.check_unsealed(tx, &[dst_parent])?;
            if meta::lookup(tx, dst_parent, name)?.is_some() {
                return Err(FsError::Exists);
            }
            if Self::is_ancestor(tx, src, dst_parent)? {
                return Err(FsError::Invalid("cannot copy a directory into itself"));
            }
            let (root, copied) = meta::copy_tree(tx, src, dst_parent, name, now)?;
            touch_dir(tx, &mut dst, 1, now)?;
            tracing::info!(src, root, copied, "copied a directory tree");
            get(tx, root)
        })
    }

    /// The end of a mount: everything flushed and replicated, the write lease given up.
    pub fn shutdown(&self) -> FsResult<()> {
        self.sync_all()?;
        match &self.sync {
            Some(sync) if !self.config.read_only => sync.release(),
            _ => Ok(()),
        }
    }

    /// Replicates the metadata committed so far into the store.
    pub fn sync_metadata(&self) -> FsResult<()> {
        match &self.sync {
            Some(sync) if !self.config.read_only => sync.sync(),
            _ => Ok(()),
        }
    }
}
