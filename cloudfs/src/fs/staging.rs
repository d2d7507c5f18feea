//! Where the bytes of dirty blocks wait for their upload: in memory while a small budget
//! allows (a sequential writer's blocks then go from the FUSE write straight to the upload,
//! never through the page cache), in anonymous files of the staging directory otherwise.
//! The pool also keeps the count of staged bytes the dirty budget is checked against.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::lock;
use crate::{buffers, direct_io};

/// Emptied staging files kept for reuse: creating and deleting a file per written block costs
/// more (inode allocation) than the write itself for small files.
const SPARE_STAGING_FILES: usize = 64;

/// A share of the memory budget, given back when dropped.
#[derive(Debug)]
struct Reservation {
    used: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Where an in-memory block starts in its buffer: at the first address aligned for direct
/// I/O, so that the upload can hand the bytes to the disk without copying them first.
fn front(buf: &[u8]) -> usize {
    if buf.is_empty() {
        0 // not allocated yet, or allocated aligned and not written yet
    } else {
        padding(buf.as_ptr())
    }
}

fn padding(at: *const u8) -> usize {
    (direct_io::ALIGN - at as usize % direct_io::ALIGN) % direct_io::ALIGN
}

/// An in-memory block buffer: a reused allocation, padded up to an aligned [`front`].
fn block_vec(block_size: usize) -> Vec<u8> {
    let mut buf = buffers::take(block_size + direct_io::ALIGN);
    buf.resize(padding(buf.as_ptr()), 0);
    buf
}

#[derive(Debug)]
enum Storage {
    /// Being written: the block's bytes start at [`front`] (empty before the first write).
    Memory(Vec<u8>),
    /// Handed to an upload as it was; the next write copies it back into `Memory`.
    Shared(Bytes),
    File(File),
}

/// The bytes of one staged block.
#[derive(Debug)]
pub(super) struct BlockBuffer {
    storage: Storage,
    block_size: usize,
    _reservation: Option<Reservation>,
}

impl BlockBuffer {
    /// The bytes of an in-memory buffer, writable (a shared one is copied first).
    fn memory(&mut self) -> Option<&mut Vec<u8>> {
        if let Storage::Shared(bytes) = &self.storage {
            let mut copy = block_vec(self.block_size);
            copy.extend_from_slice(bytes);
            self.storage = Storage::Memory(copy);
        }
        match &mut self.storage {
            Storage::Memory(data) => {
                if data.capacity() == 0 {
                    *data = block_vec(self.block_size);
                }
                Some(data)
            }
            Storage::Shared(_) | Storage::File(_) => None,
        }
    }

    pub(super) fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        if let Storage::File(file) = &self.storage {
            return file.write_all_at(data, offset);
        }
        if let Some(memory) = self.memory() {
            let start = front(memory) + offset as usize;
            if memory.len() < start {
                memory.resize(start, 0);
            }
            // Overwrite what is there, append the rest (no zero-filling first).
            let overlap = (memory.len() - start).min(data.len());
            memory[start..start + overlap].copy_from_slice(&data[..overlap]);
            memory.extend_from_slice(&data[overlap..]);
        }
        Ok(())
    }

    /// Fills `out` from `offset`, as far as the buffer reaches; returns the bytes read.
    pub(super) fn read_at(&self, out: &mut [u8], offset: u64) -> io::Result<usize> {
        let held: &[u8] = match &self.storage {
            Storage::Memory(data) => &data[front(data)..],
            Storage::Shared(bytes) => bytes,
            Storage::File(file) => return read_exact_at(file, out, offset),
        };
        let start = (offset as usize).min(held.len());
        let n = out.len().min(held.len() - start);
        out[..n].copy_from_slice(&held[start..start + n]);
        Ok(n)
    }

    /// Cuts the buffer to `len` bytes, or extends it with zeros.
    pub(super) fn set_len(&mut self, len: u64) -> io::Result<()> {
        if let Storage::File(file) = &self.storage {
            return file.set_len(len);
        }
        if let Some(memory) = self.memory() {
            memory.resize(front(memory) + len as usize, 0);
        }
        Ok(())
    }

    /// The first `len` bytes (zero-filled past the end), without a copy where they are in
    /// memory.
    pub(super) fn snapshot(&mut self, len: u64) -> io::Result<Bytes> {
        let len = len as usize;
        match &mut self.storage {
            Storage::File(file) => {
                let mut data = buffers::take(len);
                data.resize(len, 0);
                read_exact_at(file, &mut data, 0)?;
                Ok(buffers::into_bytes(data))
            }
            Storage::Shared(bytes) if bytes.len() == len => Ok(bytes.clone()),
            Storage::Shared(_) | Storage::Memory(_) => {
                let mut data = self.memory().map(std::mem::take).unwrap_or_default();
                let start = front(&data);
                data.resize(start + len, 0);
                let bytes = buffers::into_bytes(data).slice(start..);
                self.storage = Storage::Shared(bytes.clone());
                Ok(bytes)
            }
        }
    }
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Hands out block buffers and keeps the staging accounts.
#[derive(Debug)]
pub(super) struct StagingPool {
    dir: PathBuf,
    block_size: u64,
    memory_budget: u64,
    memory_used: Arc<AtomicU64>,
    /// Dirty bytes held in buffers, checked against the dirty budget.
    staged: AtomicU64,
    spare_files: Mutex<Vec<File>>,
}

impl StagingPool {
    pub(super) fn new(dir: PathBuf, block_size: u64, memory_budget: u64) -> StagingPool {
        StagingPool {
            dir,
            block_size,
            memory_budget,
            memory_used: Arc::new(AtomicU64::new(0)),
            staged: AtomicU64::new(0),
            spare_files: Mutex::new(Vec::new()),
        }
    }

    /// An empty buffer: in memory when a whole block still fits in the memory budget.
    pub(super) fn buffer(&self) -> io::Result<BlockBuffer> {
        let block_size = self.block_size as usize;
        let reserved = self
            .memory_used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + self.block_size <= self.memory_budget).then_some(used + self.block_size)
            })
            .is_ok();
        if reserved {
            return Ok(BlockBuffer {
                storage: Storage::Memory(Vec::new()),
                block_size,
                _reservation: Some(Reservation {
                    used: self.memory_used.clone(),
                    bytes: self.block_size,
                }),
            });
        }
        let file = match lock(&self.spare_files).pop() {
            Some(file) => file,
            None => tempfile::tempfile_in(&self.dir)?,
        };
        Ok(BlockBuffer {
            storage: Storage::File(file),
            block_size,
            _reservation: None,
        })
    }

    /// Takes back a buffer that is no longer needed (its file is kept for reuse).
    pub(super) fn recycle(&self, buffer: BlockBuffer) {
        if let Storage::File(file) = buffer.storage {
            let mut spare = lock(&self.spare_files);
            if spare.len() < SPARE_STAGING_FILES && file.set_len(0).is_ok() {
                spare.push(file);
            }
        }
    }

    pub(super) fn charge(&self, bytes: u64) {
        self.staged.fetch_add(bytes, Ordering::AcqRel);
    }

    pub(super) fn discharge(&self, bytes: u64) {
        self.staged.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub(super) fn staged_bytes(&self) -> u64 {
        self.staged.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_file_buffers_behave_alike() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = StagingPool::new(dir.path().to_owned(), 16, 16);
        let mut memory = pool.buffer().expect("buffer");
        let mut file = pool.buffer().expect("buffer");
        assert!(matches!(memory.storage, Storage::Memory(_)));
        assert!(matches!(file.storage, Storage::File(_)));
        for buffer in [&mut memory, &mut file] {
            buffer.write_at(b"abc", 2).expect("write");
            let shared = buffer.snapshot(6).expect("snapshot");
            assert_eq!(&shared[..], b"\0\0abc\0");
            buffer.write_at(b"Z", 0).expect("write after a snapshot");
            assert_eq!(&shared[..], b"\0\0abc\0", "a snapshot never changes");
            let mut out = [9u8; 8];
            let n = buffer.read_at(&mut out, 1).expect("read");
            assert_eq!(&out[..n], &b"\0abc\0"[..n]);
            buffer.set_len(3).expect("cut");
            assert_eq!(&buffer.snapshot(3).expect("snapshot")[..], b"Z\0a");
        }
        assert_eq!(pool.memory_used.load(Ordering::Acquire), 16);
        drop(memory);
        assert_eq!(pool.memory_used.load(Ordering::Acquire), 0);
        pool.recycle(file);
        assert_eq!(lock(&pool.spare_files).len(), 1);
    }
}
