//! Reusable block-sized buffers. The read and write paths move whole blocks (8 MiB by default);
//! a fresh allocation that large is mapped anew each time (the mount maps every large buffer,
//! see `mount`), and the kernel then faults in and zeroes every page of it. A few buffers kept
//! from block to block skip that work.

use std::sync::Mutex;

use bytes::Bytes;

/// Buffers kept for reuse; the mount's resident memory may hold this many more blocks.
const KEPT: usize = 4;
/// Smaller buffers are cheap to allocate and not worth keeping.
const SMALLEST_KEPT: usize = 1 << 20;

/// Free buffers waiting for reuse.
pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// The process's pool, shared by the block store and the file system's flushes.
static POOL: BufferPool = BufferPool::new();

/// An empty buffer with room for at least `capacity` bytes, reused when one is free.
pub fn take(capacity: usize) -> Vec<u8> {
    POOL.take(capacity)
}

/// `buf` as `Bytes`, given back for reuse when the last clone of them is dropped.
pub fn into_bytes(buf: Vec<u8>) -> Bytes {
    POOL.wrap(buf)
}

impl BufferPool {
    const fn new() -> BufferPool {
        BufferPool {
            free: Mutex::new(Vec::new()),
        }
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take(&self, capacity: usize) -> Vec<u8> {
        if capacity >= SMALLEST_KEPT {
            let mut free = self.free();
            if let Some(at) = free.iter().position(|b| b.capacity() >= capacity) {
                let mut buf = free.swap_remove(at);
                buf.clear();
                return buf;
            }
        }
        Vec::with_capacity(capacity)
    }

    fn wrap(&'static self, buf: Vec<u8>) -> Bytes {
        if buf.capacity() < SMALLEST_KEPT {
            return Bytes::from(buf);
        }
        Bytes::from_owner(Returned { buf, pool: self })
    }
}

/// Owns a buffer behind `Bytes` and gives it back to its pool when dropped.
struct Returned {
    buf: Vec<u8>,
    pool: &'static BufferPool,
}

impl AsRef<[u8]> for Returned {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Returned {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut free = self.pool.free();
        if free.len() < KEPT {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static TEST_POOL: BufferPool = BufferPool::new();

    #[test]
    fn a_buffer_comes_back_when_its_last_bytes_are_dropped() {
        let mut buf = TEST_POOL.take(2 << 20);
        buf.extend_from_slice(&[7u8; 1000]);
        let address = buf.as_ptr();
        let bytes = TEST_POOL.wrap(buf);
        let clone = bytes.slice(10..20);
        drop(bytes);
        let other = TEST_POOL.take(2 << 20);
        assert_ne!(other.as_ptr(), address, "still in use");
        assert_eq!(&clone[..], &[7u8; 10][..]);
        drop(clone);
        let again = TEST_POOL.take(2 << 20);
        assert_eq!(again.as_ptr(), address);
        assert!(again.is_empty());
    }

    #[test]
    fn small_buffers_and_buffers_past_the_limit_are_not_kept() {
        static POOL: BufferPool = BufferPool::new();
        let small = POOL.wrap(vec![1u8; 10]);
        drop(small);
        assert!(POOL.free().is_empty());
        let many: Vec<Bytes> = (0..KEPT + 2)
            .map(|_| POOL.wrap(Vec::with_capacity(SMALLEST_KEPT)))
            .collect();
        drop(many);
        assert_eq!(POOL.free().len(), KEPT);
    }
}
