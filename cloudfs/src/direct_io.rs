//! Writing whole files around the page cache. A block written to the block cache or to the
//! local store is not read back soon, and copying it into the page cache first costs more CPU
//! than producing it: every page of a new file is a fresh page to allocate, fill and later
//! write back. Direct I/O hands the bytes to the disk as they are when they sit at an aligned
//! address, else from a reused aligned copy.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::buffers;

/// Direct I/O moves whole units of this size (the largest logical block size of common disks)
/// from memory aligned to it.
pub const ALIGN: usize = 4096;

/// Writes files of one directory, around the page cache while its file system allows.
#[derive(Debug)]
pub struct DirectWriter {
    /// Cleared when the file system refuses direct I/O once: later writes skip trying.
    supported: AtomicBool,
}

impl Default for DirectWriter {
    fn default() -> Self {
        DirectWriter {
            supported: AtomicBool::new(true),
        }
    }
}

impl DirectWriter {
    /// Writes `data` as the whole content of the empty, writable `file`.
    pub fn write_file(&self, file: &File, data: &[u8]) -> io::Result<()> {
        if self.supported.load(Ordering::Relaxed) {
            match write_direct(file, data) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // A file system without direct I/O (or one refusing the alignment).
                    self.supported.store(false, Ordering::Relaxed);
                    set_direct(file, false)?;
                    file.set_len(0)?;
                }
                done => return done,
            }
        }
        // At offset 0 whatever a refused direct write left as the file position.
        file.write_all_at(data, 0)
    }
}

/// Turns `O_DIRECT` on or off for an open file.
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` owns for the duration of the calls.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `data` into `file` with direct I/O: whole aligned units, then the padding of the last unit
/// cut off again (`EINVAL` where direct I/O is unsupported). Data already at an aligned
/// address goes to the disk as it is; only its last partial unit, or data elsewhere, is
/// copied into an aligned buffer first.
fn write_direct(file: &File, data: &[u8]) -> io::Result<()> {
    set_direct(file, true)?;
    let in_place = if (data.as_ptr() as usize).is_multiple_of(ALIGN) {
        data.len() / ALIGN * ALIGN
    } else {
        0
    };
    (&*file).write_all(&data[..in_place])?;
    let rest = &data[in_place..];
    if !rest.is_empty() {
        let padded = rest.len().next_multiple_of(ALIGN);
        let mut buf = buffers::take(padded + ALIGN);
        let start = (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN;
        buf.resize(start, 0);
        buf.extend_from_slice(rest);
        buf.resize(start + padded, 0);
        let written = (&*file).write_all(&buf[start..]);
        drop(buffers::into_bytes(buf));
        written?;
    }
    file.set_len(data.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files are written in whole direct-I/O units; the padding must not stay, and a file
    /// system without direct I/O gets the same bytes.
    #[test]
    fn files_hold_exactly_their_bytes_whatever_their_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = DirectWriter::default();
        let source: Vec<u8> = (0..(1 << 20) + 2 * ALIGN)
            .map(|i| (i % 253) as u8 + 1)
            .collect();
        let aligned = (ALIGN - source.as_ptr() as usize % ALIGN) % ALIGN;
        for len in [0, 1, ALIGN - 1, ALIGN, 3 * ALIGN + 17, 1 << 20] {
            // From an aligned address (written in place) and from an unaligned one (copied).
            for start in [aligned, aligned + 1] {
                let data = &source[start..start + len];
                let path = dir.path().join(format!("f{len}-{start}"));
                let file = File::create(&path).expect("create");
                writer.write_file(&file, data).expect("write");
                drop(file);
                assert!(
                    std::fs::read(&path).expect("read") == data,
                    "{len} at {start}"
                );
            }
        }
    }
}
