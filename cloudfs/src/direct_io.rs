//! Writing and reading whole files around the page cache. A block written to the block cache
//! or to the local store is not read back soon, and copying it into the page cache first costs
//! more CPU than producing it: every page of a new file is a fresh page to allocate, fill and
//! later write back. Direct I/O hands the bytes to the disk as they are when they sit at an
//! aligned address, else from a reused aligned copy. A block read whole is kept in memory by
//! the engine's hot-block cache, so a second copy in the page cache would only cost a fresh
//! page per 4 KiB and a memory copy: it is read straight into a reused aligned buffer.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

use crate::buffers;

/// Direct I/O moves whole units of this size (the largest logical block size of common disks)
/// from memory aligned to it.
pub const ALIGN: usize = 4096;

/// Writes and reads files of one directory, around the page cache while its file system
/// allows.
#[derive(Debug)]
pub struct DirectIo {
    /// Cleared when the file system refuses direct I/O once: later writes and reads skip
    /// trying.
    supported: AtomicBool,
}

impl Default for DirectIo {
    fn default() -> Self {
        DirectIo {
            supported: AtomicBool::new(true),
        }
    }
}

impl DirectIo {
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

    /// The whole content of `file`, which is `len` bytes long.
    pub fn read_file(&self, file: &File, len: usize) -> io::Result<Bytes> {
        if self.supported.load(Ordering::Relaxed) {
            match read_direct(file, len) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.supported.store(false, Ordering::Relaxed);
                    set_direct(file, false)?;
                }
                done => return done,
            }
        }
        // From offset 0: a refused direct `pread` leaves the file position where it was.
        let mut buf = buffers::take(len);
        (&*file).read_to_end(&mut buf)?;
        check_length(buf.len(), len)?;
        Ok(buffers::into_bytes(buf))
    }
}

fn check_length(read: usize, len: usize) -> io::Result<()> {
    if read == len {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("read {read} bytes of a file of {len}"),
        ))
    }
}

/// The `len` bytes of `file` with direct I/O, into an aligned, reused buffer (`EINVAL` where
/// direct I/O is unsupported).
fn read_direct(file: &File, len: usize) -> io::Result<Bytes> {
    set_direct(file, true)?;
    let padded = len.next_multiple_of(ALIGN);
    let mut buf = buffers::take(padded + ALIGN);
    let start = (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN;
    buf.resize(start, 0);
    let mut done = 0;
    // Whole units at aligned offsets; a read of less than whole units is the end of the file
    // (reading on from an unaligned offset is refused by some file systems).
    while done < len && done.is_multiple_of(ALIGN) {
        let spare = &mut buf.spare_capacity_mut()[done..padded];
        // SAFETY: reads at most `spare.len()` bytes into memory `buf` owns and does not use
        // otherwise meanwhile; they are counted as initialised only below, once written.
        let read = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                done as libc::off_t,
            )
        };
        match read {
            n if n < 0 => return Err(io::Error::last_os_error()),
            0 => break,
            n => done += n as usize,
        }
    }
    check_length(done.min(len), len)?;
    // SAFETY: `resize` initialised the first `start` bytes, `pread` the `done` after them.
    unsafe { buf.set_len(start + done) };
    Ok(buffers::into_bytes(buf).slice(start..start + len))
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
        let writer = DirectIo::default();
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

    /// Whole files read back exactly, with direct I/O and without, and a file shorter than
    /// expected is an error, not a short result.
    #[test]
    fn files_read_back_exactly_whatever_their_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let readers = [
            DirectIo::default(),
            DirectIo {
                supported: AtomicBool::new(false),
            },
        ];
        for len in [0, 1, ALIGN - 1, ALIGN, 3 * ALIGN + 17, (1 << 20) + 5] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let path = dir.path().join(format!("f{len}"));
            std::fs::write(&path, &data).expect("write");
            for reader in &readers {
                let file = File::open(&path).expect("open");
                let read = reader.read_file(&file, len).expect("read");
                assert!(read == data, "{len} bytes");
                let file = File::open(&path).expect("open");
                let short = reader.read_file(&file, len + 1).expect_err("too short");
                assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof);
            }
        }
    }
}
