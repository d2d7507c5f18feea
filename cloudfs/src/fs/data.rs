//! File contents: open handles, write-back staging of dirty blocks, reads with read-ahead,
//! flush (upload + one metadata transaction), truncate.
//!
//! A dirty block waits in a staging buffer (see `staging`) until the file is flushed: on
//! `flush`/`fsync`/`release`, when the staging budget fills, and before any attribute change.
//! Flushing hashes each dirty block, uploads the ones the pool lacks, and swaps the new block
//! list in with one SQLite transaction, so metadata never names a block that is not stored.
//! All-zero blocks become holes. A block a writer fills is uploaded at once in the background
//! and, once stored and still unchanged, recorded by the writer's next call when every staged
//! block before it is recorded too, which frees its buffer: a long sequential write streams
//! through a few buffers instead of staging it all, and the stored file only ever holds a
//! prefix of what the writer wrote (never a hole where a block is still on its way).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::task::JoinSet;

use super::staging::BlockBuffer;
use super::{Caller, Fs, FsError, FsResult, get, lock, now_ns};
use crate::cas::{CasError, REFRESH_AGE, hash_block};
use crate::meta::{self, BlockRef, Hash, Inode};

/// Size of a file's size field while it has no unflushed changes.
const CLEAN: u64 = u64::MAX;
/// Blocks one flush has on the wire at once (bounds its memory to this many blocks).
const UPLOAD_PARALLELISM: usize = 4;
/// Largest file: what fits in the kernel's `loff_t`.
const MAX_FILE_SIZE: u64 = i64::MAX as u64;

/// A block being rewritten: its bytes so far, and how far they reach.
#[derive(Debug)]
struct Staged {
    buffer: BlockBuffer,
    extent: u64,
    /// Changes with every write into the block (unique across the file system).
    version: u64,
}

/// A finished background upload of a filled block: `None` hash for a hole.
#[derive(Debug, Clone, Copy)]
struct Uploaded {
    idx: u64,
    version: u64,
    len: u64,
    hash: Option<Hash>,
    /// When the upload ended: past [`REFRESH_AGE`] the record is dropped and the flush
    /// uploads the block again.
    at: Instant,
}

/// Waits for one of a flush's uploads to end (`Ok` when none is left).
async fn next_upload(uploads: &mut JoinSet<Result<(), CasError>>) -> FsResult<()> {
    match uploads.join_next().await {
        Some(Ok(uploaded)) => Ok(uploaded?),
        Some(Err(e)) => Err(FsError::Staging(std::io::Error::other(format!(
            "block upload stopped: {e}"
        )))),
        None => Ok(()),
    }
}

/// Names `block` (hash and length; `None` for a hole) as block `idx` of file `ino`.
fn record_block(
    tx: &rusqlite::Connection,
    ino: u64,
    idx: u64,
    block: Option<(Hash, u64)>,
) -> meta::MetaResult<()> {
    match block {
        Some((hash, len)) => meta::put_block(tx, ino, &BlockRef { idx, hash, len }),
        None => meta::delete_block(tx, ino, idx),
    }
}

/// The content of a block: a hash, or `None` for an all-zero block (a hole).
fn content_hash(data: &[u8]) -> Option<Hash> {
    (!data.iter().all(|b| *b == 0)).then(|| hash_block(data))
}

/// Per-inode state while a file is open or has unflushed writes.
#[derive(Debug)]
pub struct FileState {
    opens: AtomicU32,
    /// The size callers see (`CLEAN` when the stored size is current).
    size: AtomicU64,
    mtime_ns: AtomicI64,
    staged: Mutex<BTreeMap<u64, Staged>>,
    /// Background uploads that ended, waiting for the holder of `staged` to record them.
    uploaded: Mutex<Vec<Uploaded>>,
    /// Whether the file may have capabilities a write must drop (see
    /// `Fs::drop_capabilities`): until a write looked and until they are set again.
    capabilities_unchecked: AtomicBool,
    /// Whether a flush of the file's writes failed since they were last recorded: the
    /// closer's retries flush it again (see [`Fs::failed_flushes`]).
    flush_failed: AtomicBool,
}

impl FileState {
    fn new() -> FileState {
        FileState {
            opens: AtomicU32::new(0),
            size: AtomicU64::new(CLEAN),
            mtime_ns: AtomicI64::new(0),
            staged: Mutex::new(BTreeMap::new()),
            uploaded: Mutex::new(Vec::new()),
            capabilities_unchecked: AtomicBool::new(true),
            flush_failed: AtomicBool::new(false),
        }
    }

    pub(super) fn may_have_capabilities(&self) {
        self.capabilities_unchecked.store(true, Ordering::Release);
    }

    /// Whether a write must look for capabilities; the next one need not, unless they are set
    /// again meanwhile.
    pub(super) fn take_capabilities_check(&self) -> bool {
        self.capabilities_unchecked.swap(false, Ordering::AcqRel)
    }

    pub(super) fn overlay(&self, inode: &mut Inode) {
        let size = self.size.load(Ordering::Acquire);
        if size != CLEAN {
            inode.size = size;
            inode.mtime_ns = self.mtime_ns.load(Ordering::Acquire);
            inode.ctime_ns = inode.mtime_ns;
        }
    }
}

/// Where a write's bytes landed (an appending handle writes at the end, wherever the caller
/// said).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub offset: u64,
    pub len: u32,
}

/// How far from where the previous read ended a read may start and still continue a
/// sequential stream: the kernel sends its read-ahead as several requests at once, and the
/// FUSE threads serve them in any order.
const SEQUENTIAL_SLACK: u64 = 4 << 20;

/// One `open` of a file: its flags and read-ahead state.
#[derive(Debug)]
pub(super) struct OpenHandle {
    ino: u64,
    append: bool,
    /// Where the last read ended.
    next_offset: AtomicU64,
    /// How many reads in a row started within [`SEQUENTIAL_SLACK`] of the one before.
    near_reads: AtomicU64,
    window: AtomicU64,
}

impl OpenHandle {
    fn new(ino: u64, append: bool) -> OpenHandle {
        OpenHandle {
            ino,
            append,
            next_offset: AtomicU64::new(0),
            near_reads: AtomicU64::new(0),
            window: AtomicU64::new(1),
        }
    }

    /// Notes a read of `offset..end`; whether it continues a sequential stream: it starts
    /// where the last one ended, or it is the second in a row to start close to that (one
    /// random read landing close by chance is not taken for a stream).
    fn continues_stream(&self, offset: u64, end: u64) -> bool {
        let previous_end = self.next_offset.swap(end, Ordering::AcqRel);
        if offset.abs_diff(previous_end) > SEQUENTIAL_SLACK {
            self.near_reads.store(0, Ordering::Release);
            return false;
        }
        let near_reads = self.near_reads.fetch_add(1, Ordering::AcqRel) + 1;
        offset == previous_end || near_reads >= 2
    }
}

/// The part of one block an I/O range covers.
struct Piece {
    idx: u64,
    start: u64,
    len: u64,
    /// Offset of this piece within the caller's buffer.
    at: usize,
}

fn pieces(offset: u64, len: u64, block_size: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let idx = pos / block_size;
        let start = pos % block_size;
        let len = (block_size - start).min(end - pos);
        let piece = Piece {
            idx,
            start,
            len,
            at: (pos - offset) as usize,
        };
        pos += len;
        Some(piece)
    })
}

/// File `ino`'s state in the map of `files`, added if missing.
fn state_of(files: &mut HashMap<u64, Arc<FileState>>, ino: u64) -> &Arc<FileState> {
    files
        .entry(ino)
        .or_insert_with(|| Arc::new(FileState::new()))
}

impl Fs {
    fn file_state(&self, ino: u64) -> Arc<FileState> {
        state_of(&mut lock(&self.files), ino).clone()
    }

    pub(super) fn is_open(&self, ino: u64) -> bool {
        lock(&self.files)
            .get(&ino)
            .is_some_and(|s| s.opens.load(Ordering::Acquire) > 0)
    }

    /// Whether another handle than the caller's has file `ino` open: the pages the kernel
    /// cached for it may hold what the caller just overwrote.
    pub fn open_elsewhere(&self, ino: u64) -> bool {
        lock(&self.files)
            .get(&ino)
            .is_some_and(|s| s.opens.load(Ordering::Acquire) > 1)
    }

    /// Forgets a deleted file's unflushed state.
    pub(super) fn forget_file(&self, ino: u64) {
        // Not holding the map's lock while waiting for the staged writes (a flush may be
        // uploading them).
        let state = lock(&self.files).remove(&ino);
        if let Some(state) = state {
            let mut staged = std::mem::take(&mut *lock(&state.staged));
            self.unstage_all(&mut staged);
        }
    }

    /// Drops staged blocks, giving their buffers back.
    fn unstage_all(&self, staged: &mut BTreeMap<u64, Staged>) {
        for (_, block) in std::mem::take(staged) {
            self.unstage(block);
        }
    }

    fn unstage(&self, block: Staged) {
        self.staging.discharge(block.extent);
        self.staging.recycle(block.buffer);
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<OpenHandle>> {
        lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    fn new_handle(&self, ino: u64, flags: i32) -> u64 {
        // Counted under the map's lock, which the last `release` holds to remove a state it
        // saw unopened: counted after it, the open would land on a state no longer mapped.
        state_of(&mut lock(&self.files), ino)
            .opens
            .fetch_add(1, Ordering::AcqRel);
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let handle = OpenHandle::new(ino, flags & libc::O_APPEND != 0);
        lock(&self.handles).insert(fh, Arc::new(handle));
        fh
    }

    /// Opens an existing file; `flags` are `open(2)`'s.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let inode = self.getattr(ino)?;
        if inode.is_dir() {
            return Err(FsError::IsDir);
        }
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if writes || flags & libc::O_TRUNC != 0 {
            self.changeable(&[ino])?;
        }
        if flags & libc::O_TRUNC != 0 && inode.is_file() && writes {
            self.flush_file(ino)?;
            self.truncate(ino, 0)?;
        }
        Ok(self.new_handle(ino, flags))
    }

    /// Creates and opens a regular file (`O_CREAT`; with `O_EXCL` an existing name fails).
    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> FsResult<(Inode, u64)> {
        let created = self.mknod(
            caller,
            parent,
            name,
            libc::S_IFREG | (mode & 0o7777),
            umask,
            0,
        );
        let inode = match created {
            Err(FsError::Exists) if flags & libc::O_EXCL == 0 => {
                let ino = self.lookup(parent, name)?.ino;
                let fh = self.open(ino, flags)?;
                return Ok((self.getattr(ino)?, fh));
            }
            other => other?,
        };
        let fh = self.new_handle(inode.ino, flags);
        Ok((inode, fh))
    }

    /// Up to `size` bytes at `offset`. A read inside one stored block is a slice of the block
    /// as fetched (no copy); others are assembled.
    pub fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let handle = self.handle(fh)?;
        if handle.ino != ino {
            return Err(FsError::BadHandle);
        }
        let state = lock(&self.files).get(&ino).cloned();
        // Holding the staging lock keeps a concurrent flush from swapping blocks mid-read.
        let staged = state.as_ref().map(|s| lock(&s.staged));
        let file_size = match state.as_ref().map(|s| s.size.load(Ordering::Acquire)) {
            Some(size) if size != CLEAN => size,
            _ => self.meta.read(|c| get(c, ino))?.size,
        };
        if offset >= file_size || size == 0 {
            return Ok(Bytes::new());
        }
        let end = file_size.min(offset + u64::from(size));
        let bs = self.config.block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let stored: HashMap<u64, BlockRef> = self
            .meta
            .read(|c| meta::blocks_in(c, ino, first, last))?
            .into_iter()
            .map(|b| (b.idx, b))
            .collect();
        let sequential = handle.continues_stream(offset, end);
        let is_staged = |idx: u64| staged.as_ref().is_some_and(|s| s.contains_key(&idx));
        let within_one_stored_block = stored
            .get(&first)
            .filter(|block| first == last && !is_staged(first) && end - first * bs <= block.len);
        let data = match within_one_stored_block {
            Some(block) => {
                self.read_stored(block, offset - first * bs, end - offset, sequential)?
            }
            None => {
                let mut buf = vec![0u8; (end - offset) as usize];
                for piece in pieces(offset, end - offset, bs) {
                    let out = &mut buf[piece.at..piece.at + piece.len as usize];
                    if let Some(block) = staged.as_ref().and_then(|s| s.get(&piece.idx)) {
                        let n = piece.len.min(block.extent.saturating_sub(piece.start)) as usize;
                        block.buffer.read_at(&mut out[..n], piece.start)?;
                        continue;
                    }
                    let Some(block) = stored.get(&piece.idx) else {
                        continue; // a hole reads as zeros
                    };
                    if piece.start >= block.len {
                        continue;
                    }
                    let n = piece.len.min(block.len - piece.start);
                    let data = self.read_stored(block, piece.start, n, sequential)?;
                    out[..data.len()].copy_from_slice(&data);
                }
                Bytes::from(buf)
            }
        };
        drop(staged);
        if sequential {
            self.read_ahead(&handle, last, file_size)?;
        } else {
            handle.window.store(1, Ordering::Release);
        }
        Ok(data)
    }

    /// `len` bytes at `start` of a stored block: the whole block is fetched (and cached) for a
    /// sequential reader or a large share of it, else only the bytes asked for.
    fn read_stored(
        &self,
        block: &BlockRef,
        start: u64,
        len: u64,
        sequential: bool,
    ) -> FsResult<Bytes> {
        let whole = sequential || len * 4 >= block.len;
        Ok(self
            .rt
            .block_on(self.blocks.read(&block.hash, block.len, start, len, whole))?)
    }

    /// Starts background downloads of the blocks after `last`, growing the window while the
    /// reader stays sequential.
    fn read_ahead(&self, handle: &OpenHandle, last: u64, file_size: u64) -> FsResult<()> {
        let bs = self.config.block_size;
        let window = handle.window.load(Ordering::Acquire);
        let max_window = self
            .config
            .max_readahead_blocks
            .min(self.blocks.read_ahead_limit(bs));
        handle
            .window
            .store((window * 2).min(max_window.max(1)), Ordering::Release);
        let last_block = file_size.saturating_sub(1) / bs;
        if last >= last_block || max_window == 0 {
            return Ok(());
        }
        let window = window.min(max_window);
        let upto = (last + window).min(last_block);
        let ahead = self
            .meta
            .read(|c| meta::blocks_in(c, handle.ino, last + 1, upto))?;
        for block in ahead {
            // Also not when being fetched: a second task would only wait for the first, and
            // hold a read-ahead slot that a block further on needs.
            if !self.blocks.needs_fetch(&block.hash) {
                continue;
            }
            let Ok(permit) = self.prefetch_slots.clone().try_acquire_owned() else {
                break;
            };
            let blocks = self.blocks.clone();
            self.rt.spawn(async move {
                if let Err(e) = blocks.fetch(&block.hash, block.len).await {
                    tracing::debug!(error = %e, "read-ahead failed");
                }
                drop(permit);
            });
        }
        Ok(())
    }

    pub fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> FsResult<Written> {
        self.changeable(&[ino])?;
        let handle = self.handle(fh)?;
        if handle.ino != ino {
            return Err(FsError::BadHandle);
        }
        let state = self.file_state(ino);
        let mut staged = lock(&state.staged);
        let size = match state.size.load(Ordering::Acquire) {
            CLEAN => self.meta.read(|c| get(c, ino))?.size,
            size => size,
        };
        if let Err(e) = self.record_uploaded(ino, &state, &mut staged, size) {
            // Only bookkeeping: the flush uploads (deduplicated) and records the blocks.
            tracing::warn!(ino, error = %e, "could not record blocks uploaded in the background");
        }
        let offset = if handle.append { size } else { offset };
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|end| *end <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooLarge)?;
        self.check_quota(ino, size, end)?;
        // Dirty from here on, so that whatever a failing write leaves staged is flushed.
        state.mtime_ns.store(now_ns(), Ordering::Release);
        state.size.store(size, Ordering::Release);
        for piece in pieces(offset, data.len() as u64, self.config.block_size) {
            let covers_from_start = piece.start == 0;
            let block = self.stage(
                ino,
                &mut staged,
                piece.idx,
                size,
                covers_from_start,
                piece.len,
            )?;
            let chunk = &data[piece.at..piece.at + piece.len as usize];
            block.buffer.write_at(chunk, piece.start)?;
            let new_extent = block.extent.max(piece.start + piece.len);
            self.staging.charge(new_extent - block.extent);
            block.extent = new_extent;
            block.version = self.next_version.fetch_add(1, Ordering::Relaxed);
            if piece.start + piece.len == self.config.block_size {
                self.upload_behind(&state, block, piece.idx)?;
            }
        }
        state.size.store(size.max(end), Ordering::Release);
        if self.staging.staged_bytes() > self.config.dirty_budget {
            self.flush_locked(ino, &state, &mut staged)?;
        }
        Ok(Written {
            offset,
            len: data.len() as u32,
        })
    }

    /// Starts uploading a block a writer just filled, so a sequential writer's blocks stream
    /// to the store while it writes the next ones. While every upload slot is busy the writer
    /// waits for one, so it runs at the store's pace instead of piling blocks up for the
    /// flush; the result is used only if the block has not changed since.
    fn upload_behind(&self, state: &Arc<FileState>, block: &mut Staged, idx: u64) -> FsResult<()> {
        let permit = match self.upload_slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => match self.rt.block_on(self.upload_slots.clone().acquire_owned()) {
                Ok(permit) => permit,
                Err(_) => return Ok(()), // closed: the flush uploads the block
            },
        };
        let data = block.buffer.snapshot(block.extent)?;
        let version = block.version;
        let (state, meta, blocks) = (state.clone(), self.meta.current(), self.blocks.clone());
        self.rt.spawn(async move {
            let len = data.len() as u64;
            let hashing = data.clone();
            let Ok(hash) = tokio::task::spawn_blocking(move || content_hash(&hashing)).await else {
                return;
            };
            if let Some(hash) = hash {
                let referenced = meta
                    .read(|c| meta::hash_referenced(c, &hash))
                    .unwrap_or(false);
                if let Err(e) = blocks.upload(hash, data, referenced).await {
                    tracing::debug!(error = %e, "write-behind upload failed; flush retries");
                    return;
                }
            }
            drop(permit);
            // Not `staged`: a flush holding it may be waiting for this very I/O thread.
            lock(&state.uploaded).push(Uploaded {
                idx,
                version,
                len,
                hash,
                at: Instant::now(),
            });
        });
        Ok(())
    }

    /// Records the blocks whose background upload ended while they stayed unchanged and
    /// before which no other block is staged, and frees their buffers. The stored size grows
    /// to cover them (a reader of the stored file, a snapshot, or the state after a crash sees
    /// a prefix of the writes, as on a local file system).
    fn record_uploaded(
        &self,
        ino: u64,
        state: &FileState,
        staged: &mut BTreeMap<u64, Staged>,
        size: u64,
    ) -> FsResult<()> {
        let finished = self.finished_uploads(state, staged, size);
        if finished.is_empty() {
            return Ok(());
        }
        let bs = self.config.block_size;
        let ready: HashSet<u64> = finished.iter().map(|u| u.idx).collect();
        let first_waiting = staged.keys().find(|idx| !ready.contains(idx));
        let (current, later): (Vec<Uploaded>, Vec<Uploaded>) = finished
            .into_iter()
            .partition(|u| first_waiting.is_none_or(|w| u.idx < *w));
        // Recorded once the blocks before them are.
        lock(&state.uploaded).extend(later);
        let Some(end) = current.iter().map(|u| (u.idx + 1) * bs).max() else {
            return Ok(());
        };
        let mtime = state.mtime_ns.load(Ordering::Acquire);
        self.meta.write(|tx| -> FsResult<()> {
            let Some(mut inode) = meta::get_inode(tx, ino)? else {
                return Ok(());
            };
            for block in &current {
                record_block(tx, ino, block.idx, block.hash.map(|h| (h, block.len)))?;
            }
            inode.size = inode.size.max(end);
            inode.mtime_ns = mtime.max(inode.mtime_ns);
            inode.ctime_ns = inode.mtime_ns;
            meta::update_inode(tx, &inode)?;
            Ok(())
        })?;
        for block in &current {
            if let Some(done) = staged.remove(&block.idx) {
                self.unstage(done);
            }
        }
        Ok(())
    }

    /// Takes the finished background uploads that still describe their staged block (same
    /// version, whole, inside the file, recent enough to trust).
    fn finished_uploads(
        &self,
        state: &FileState,
        staged: &BTreeMap<u64, Staged>,
        size: u64,
    ) -> Vec<Uploaded> {
        let bs = self.config.block_size;
        let mut finished = std::mem::take(&mut *lock(&state.uploaded));
        finished.retain(|u| {
            u.len == bs
                && (u.idx + 1) * bs <= size
                && u.at.elapsed() < REFRESH_AGE
                && staged
                    .get(&u.idx)
                    .is_some_and(|b| b.version == u.version && b.extent == u.len)
        });
        finished
    }

    /// The staging copy of block `idx`, created from the stored block unless the write that
    /// needs it replaces all of the stored bytes.
    fn stage<'a>(
        &self,
        ino: u64,
        staged: &'a mut BTreeMap<u64, Staged>,
        idx: u64,
        size: u64,
        write_from_start: bool,
        write_len: u64,
    ) -> FsResult<&'a mut Staged> {
        let slot = match staged.entry(idx) {
            Entry::Occupied(existing) => return Ok(existing.into_mut()),
            Entry::Vacant(slot) => slot,
        };
        {
            let mut buffer = self.staging.buffer()?;
            let mut extent = 0;
            let stored = self.meta.read(|c| meta::blocks_in(c, ino, idx, idx))?;
            if let Some(block) = stored.first() {
                let live = block
                    .len
                    .min(size.saturating_sub(idx * self.config.block_size));
                if !(write_from_start && write_len >= live) && live > 0 {
                    let data = self
                        .rt
                        .block_on(self.blocks.fetch(&block.hash, block.len))?;
                    buffer.write_at(&data[..live as usize], 0)?;
                    extent = live;
                    self.staging.charge(live);
                }
            }
            Ok(slot.insert(Staged {
                buffer,
                extent,
                version: self.next_version.fetch_add(1, Ordering::Relaxed),
            }))
        }
    }

    /// Uploads a file's dirty blocks and records them (and its size and mtime) in one
    /// transaction.
    pub fn flush_file(&self, ino: u64) -> FsResult<()> {
        let Some(state) = lock(&self.files).get(&ino).cloned() else {
            return Ok(());
        };
        let mut staged = lock(&state.staged);
        self.flush_locked(ino, &state, &mut staged)
    }

    /// Records the staged writes of file `ino`; a failure leaves them staged, and the file
    /// marked for the closer's retries (see [`Fs::failed_flushes`]).
    fn flush_locked(
        &self,
        ino: u64,
        state: &FileState,
        staged: &mut BTreeMap<u64, Staged>,
    ) -> FsResult<()> {
        let flushed = self.record_staged(ino, state, staged);
        state
            .flush_failed
            .store(flushed.is_err(), Ordering::Release);
        flushed
    }

    fn record_staged(
        &self,
        ino: u64,
        state: &FileState,
        staged: &mut BTreeMap<u64, Staged>,
    ) -> FsResult<()> {
        let size = state.size.load(Ordering::Acquire);
        if size == CLEAN {
            return Ok(());
        }
        // The flush records every block in one transaction: no prefix rule, and a block
        // uploaded in the background is neither hashed nor uploaded again.
        let uploaded: HashMap<u64, Uploaded> = self
            .finished_uploads(state, staged, size)
            .into_iter()
            .map(|u| (u.idx, u))
            .collect();
        let bs = self.config.block_size;
        let live_blocks = size.div_ceil(bs);
        let mut results: Vec<(u64, Option<(Hash, u64)>)> = Vec::with_capacity(staged.len());
        let dirty: Vec<(u64, u64)> = staged
            .iter()
            .filter(|(idx, _)| **idx < live_blocks)
            .map(|(idx, s)| (*idx, s.extent.min(size - idx * bs)))
            .collect();
        // A sliding window of uploads: the next block is read and hashed while earlier ones
        // are on the wire. Returning early drops the set, which cancels the uploads left.
        // A lone upload (a small file's close) runs on this thread instead: handing it to
        // another and waiting to be woken would cost two thread wakes for nothing.
        let mut uploads = JoinSet::new();
        let alone = dirty
            .iter()
            .filter(|(idx, len)| uploaded.get(idx).is_none_or(|u| u.len != *len))
            .count()
            == 1;
        for (idx, len) in dirty {
            if let Some(done) = uploaded.get(&idx).filter(|u| u.len == len) {
                results.push((idx, done.hash.map(|h| (h, len))));
                continue;
            }
            let Some(block) = staged.get_mut(&idx) else {
                continue;
            };
            let buf = block.buffer.snapshot(len)?;
            let Some(hash) = content_hash(&buf) else {
                results.push((idx, None));
                continue;
            };
            let referenced = self.meta.read(|c| meta::hash_referenced(c, &hash))?;
            results.push((idx, Some((hash, len))));
            let blocks = self.blocks.clone();
            let upload = async move { blocks.upload(hash, buf, referenced).await };
            if alone {
                self.rt.block_on(upload)?;
                continue;
            }
            uploads.spawn_on(upload, &self.rt);
            if uploads.len() >= UPLOAD_PARALLELISM {
                self.rt.block_on(next_upload(&mut uploads))?;
            }
        }
        while !uploads.is_empty() {
            self.rt.block_on(next_upload(&mut uploads))?;
        }
        let mtime = state.mtime_ns.load(Ordering::Acquire);
        self.meta.write(|tx| -> FsResult<()> {
            let Some(mut inode) = meta::get_inode(tx, ino)? else {
                return Ok(()); // deleted meanwhile: nothing to record
            };
            for (idx, block) in &results {
                record_block(tx, ino, *idx, *block)?;
            }
            meta::delete_blocks_from(tx, ino, live_blocks)?;
            inode.size = size;
            inode.mtime_ns = mtime.max(inode.mtime_ns);
            inode.ctime_ns = inode.mtime_ns;
            meta::update_inode(tx, &inode)?;
            Ok(())
        })?;
        self.unstage_all(staged);
        state.size.store(CLEAN, Ordering::Release);
        Ok(())
    }

    /// Refuses to grow file `ino` from `size` to `new_size` past the volume's quota: the
    /// committed bytes of all files, with this one at its new size, must fit. Growth other
    /// files have staged but not flushed yet is not counted (the dirty budget bounds it).
    fn check_quota(&self, ino: u64, size: u64, new_size: u64) -> FsResult<()> {
        let Some(quota) = self.quota() else {
            return Ok(());
        };
        if new_size <= size {
            return Ok(());
        }
        let (all_files, this_file) = self
            .meta
            .read(|c| -> FsResult<(u64, u64)> { Ok((meta::file_bytes(c)?, get(c, ino)?.size)) })?;
        if all_files.saturating_sub(this_file).saturating_add(new_size) > quota {
            return Err(FsError::NoSpace);
        }
        Ok(())
    }

    /// Sets a file's size; a cut inside a block re-stores that block shortened.
    pub(super) fn truncate(&self, ino: u64, new_size: u64) -> FsResult<()> {
        if new_size > MAX_FILE_SIZE {
            return Err(FsError::FileTooLarge);
        }
        let inode = self.meta.read(|c| get(c, ino))?;
        if inode.is_dir() {
            return Err(FsError::IsDir);
        }
        if !inode.is_file() {
            return Err(FsError::Invalid("truncate of a special file"));
        }
        self.check_quota(ino, inode.size, new_size)?;
        let state = self.file_state(ino);
        let mut staged = lock(&state.staged);
        let bs = self.config.block_size;
        let cut = new_size % bs;
        if new_size < inode.size && cut != 0 {
            let block = self.stage(ino, &mut staged, new_size / bs, inode.size, false, 0)?;
            block.buffer.set_len(cut)?;
            block.version = self.next_version.fetch_add(1, Ordering::Relaxed);
            let kept = block.extent.min(cut);
            self.staging.discharge(block.extent - kept);
            block.extent = kept;
        }
        state.mtime_ns.store(now_ns(), Ordering::Release);
        state.size.store(new_size, Ordering::Release);
        self.flush_locked(ino, &state, &mut staged)
    }

    /// `close(2)` of one descriptor: its writes go into the inode table. The FUSE adapter
    /// has the kernel skip it (see `FuseFs::open_flags`); other callers use it.
    pub fn flush(&self, ino: u64, fh: u64) -> FsResult<()> {
        self.handle(fh)?;
        self.flush_file(ino)
    }

    /// The release of a handle, flushing the file's writes as `close` would have.
    pub fn release(&self, ino: u64, fh: u64) -> FsResult<()> {
        if self.release_handle(ino, fh)? {
            self.flush_released(ino)
        } else {
            Ok(())
        }
    }

    /// The release of a handle, without the flush: frees the inode when this was the last
    /// handle on a file unlinked meanwhile, and says whether the file has writes left for
    /// [`Fs::flush_released`] to record. The kernel sends a release without making anyone
    /// wait for it, so that flush can run later, elsewhere than on a FUSE thread.
    pub fn release_handle(&self, ino: u64, fh: u64) -> FsResult<bool> {
        if lock(&self.handles).remove(&fh).is_none() {
            return Err(FsError::BadHandle);
        }
        let Some(state) = lock(&self.files).get(&ino).cloned() else {
            return Ok(false);
        };
        let last = state.opens.fetch_sub(1, Ordering::AcqRel) == 1;
        if last && !self.config.read_only {
            match self.meta.read(|c| meta::get_inode(c, ino)) {
                Ok(inode) if inode.as_ref().is_some_and(|i| i.nlink == 0) => {
                    self.meta.write(|tx| meta::delete_inode(tx, ino))?;
                    self.forget_file(ino);
                    return Ok(false);
                }
                Ok(_) => {}
                Err(e) => {
                    // Its writes, if any, are left to the closer's retries.
                    state.flush_failed.store(true, Ordering::Release);
                    return Err(e.into());
                }
            }
        }
        if self.config.read_only || state.size.load(Ordering::Acquire) == CLEAN {
            self.drop_state_if_idle(ino, &state);
            return Ok(false);
        }
        Ok(true)
    }

    /// Records the writes a released handle left on file `ino` (see [`Fs::release_handle`]),
    /// and forgets the file's state if no handle has it open any more. A failure leaves the
    /// writes staged, and readable, for a later try (see [`Fs::failed_flushes`]). A caller
    /// other than a kernel request takes [`Fs::change`] around it.
    pub fn flush_released(&self, ino: u64) -> FsResult<()> {
        let Some(state) = lock(&self.files).get(&ino).cloned() else {
            return Ok(()); // flushed and forgotten meanwhile
        };
        let mut staged = lock(&state.staged);
        self.flush_locked(ino, &state, &mut staged)?;
        drop(staged);
        self.drop_state_if_idle(ino, &state);
        Ok(())
    }

    /// The files whose writes a flush failed to record (the store was unreachable), and no
    /// later one recorded: no other flush of them may come soon (a closed file's next one is
    /// an `fsync` of its directory, a rename, a snapshot or the unmount).
    pub fn failed_flushes(&self) -> Vec<u64> {
        lock(&self.files)
            .iter()
            .filter(|(_, s)| s.flush_failed.load(Ordering::Acquire))
            .map(|(ino, _)| *ino)
            .collect()
    }

    /// The size of every file with writes the inode table does not record yet, which
    /// `statfs` counts as used: a file just closed, say, whose writes are being recorded.
    pub(super) fn unrecorded_sizes(&self) -> Vec<(u64, u64)> {
        lock(&self.files)
            .iter()
            .map(|(ino, s)| (*ino, s.size.load(Ordering::Acquire)))
            .filter(|(_, size)| *size != CLEAN)
            .collect()
    }

    /// Removes `state`, file `ino`'s, from the map once no handle has it open and nothing of
    /// it is staged; not a state that replaced it meanwhile.
    fn drop_state_if_idle(&self, ino: u64, state: &Arc<FileState>) {
        let mut files = lock(&self.files);
        if state.size.load(Ordering::Acquire) == CLEAN
            && state.opens.load(Ordering::Acquire) == 0
            && files.get(&ino).is_some_and(|s| Arc::ptr_eq(s, state))
        {
            files.remove(&ino);
        }
    }

    /// `fsync(2)`: the file's data and the metadata naming it are durable in the store.
    pub fn fsync(&self, ino: u64) -> FsResult<()> {
        if self.config.read_only {
            return Ok(());
        }
        self.flush_file(ino)?;
        self.sync_metadata()
    }

    /// `fsync(2)` of a directory: the namespace, and what the files hold, are durable in the
    /// store. Every file's writes are recorded first, not only those of files whose release
    /// arrived: the kernel does not wait for a release, so it may still be on its way.
    pub fn fsyncdir(&self) -> FsResult<()> {
        self.flush_all()?;
        self.sync_metadata()
    }
}

#[cfg(test)]
mod tests {
    use super::{OpenHandle, SEQUENTIAL_SLACK, pieces};

    #[test]
    fn reads_served_out_of_order_continue_a_stream_and_random_ones_do_not() {
        const KIB: u64 = 1 << 10;
        let handle = OpenHandle::new(1, false);
        // The kernel's read-ahead of one stream, served by threads in another order.
        let stream = [(0, 256), (512, 768), (256, 512), (768, 1024), (1024, 1280)];
        for (start, end) in stream {
            assert!(
                handle.continues_stream(start * KIB, end * KIB),
                "{start} KiB"
            );
        }
        // A jump elsewhere is not sequential, nor is one read that lands close by chance,
        // but a second one in a row starts a stream again.
        let far = 100 * SEQUENTIAL_SLACK;
        assert!(!handle.continues_stream(far, far + 4 * KIB));
        assert!(!handle.continues_stream(3 * SEQUENTIAL_SLACK, 3 * SEQUENTIAL_SLACK + 4 * KIB));
        assert!(!handle.continues_stream(far, far + 4 * KIB));
        assert!(!handle.continues_stream(far + 64 * KIB, far + 68 * KIB));
        assert!(handle.continues_stream(far + 128 * KIB, far + 132 * KIB));
    }

    #[test]
    fn pieces_split_at_block_boundaries() {
        let got: Vec<_> = pieces(5, 20, 8)
            .map(|p| (p.idx, p.start, p.len, p.at))
            .collect();
        assert_eq!(
            got,
            [(0, 5, 3, 0), (1, 0, 8, 3), (2, 0, 8, 11), (3, 0, 1, 19)]
        );
        assert_eq!(pieces(0, 0, 8).count(), 0);
    }
}
