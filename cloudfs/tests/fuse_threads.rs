//! How a mount's threads share the FUSE requests: one stuck in the object store does not hold
//! up the others, whether one thread at a time reads requests and polls for the next (the
//! default, `--poll-window`) or every thread sleeps on the device (`--poll-window 0`).
//!
//! On the local store only (`CLOUDFS_TEST_STORE` unset): the test swaps a block of the store
//! for a named pipe, so that reading the block waits until the test writes it into the pipe.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

mod mount_harness;

use mount_harness::*;

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).expect("listing the store") {
        let path = entry.expect("a store entry").path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn mkfifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL in the path");
    // SAFETY: c_path is a valid NUL-terminated string for the duration of the call.
    let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) };
    assert_eq!(
        rc,
        0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn a_read_waiting_for_the_store_does_not_hold_up_other_requests(extra: &[&str]) {
    let mut h = Harness::new();
    let store = h
        .local_store_dir()
        .expect("a local store: these tests swap one of its files for a pipe");
    h.mount(&[]);
    let want = pattern(7, 50_000); // less than one 64 KiB block
    let path = h.at("waits.bin");
    fs::write(&path, &want).expect("write");
    File::open(&path).and_then(|f| f.sync_all()).expect("fsync");
    h.umount();

    // The metadata's chunks are blocks too: the file's is the one holding its bytes.
    let block = files_under(&store.join("blocks"))
        .into_iter()
        .find(|block| fs::read(block).is_ok_and(|bytes| bytes == want))
        .expect("the file's block in the store");
    let bytes = want.clone();
    fs::remove_file(&block).expect("removing the block");
    mkfifo(&block);

    h.mount(extra); // with an empty cache: the read goes to the store
    let reader = std::thread::spawn(move || fs::read(&path));
    // The mount is reading the block once the pipe has a reader; opening its other end
    // without writing keeps that read waiting.
    let pipe = wait_for("the mount to read the block", || {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&block)
            .ok()
    });
    let (answers, answered) = mpsc::channel();
    let mnt = h.mnt();
    std::thread::spawn(move || {
        let others = (|| {
            fs::write(mnt.join("meanwhile"), b"created")?;
            let names = fs::read_dir(&mnt)?.count();
            Ok::<_, std::io::Error>((names, fs::read(mnt.join("meanwhile"))?))
        })();
        let _ = answers.send(others);
    });
    let others = answered.recv_timeout(WAIT);
    // Let the waiting read finish whatever happened, so that the mount can be unmounted.
    let mut pipe = pipe;
    // Blocking again: the block may be larger than what the pipe buffers.
    // SAFETY: fcntl on an fd the File owns, with no pointers.
    let rc = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETFL, 0) };
    assert_eq!(rc, 0, "fcntl: {}", std::io::Error::last_os_error());
    pipe.write_all(&bytes)
        .expect("writing the block into the pipe");
    drop(pipe);
    let waited = reader.join().expect("the reading thread");

    let (names, created) = others
        .expect("other requests were answered while a read waited for the store")
        .expect("the other requests succeeded");
    assert_eq!((names, created.as_slice()), (2, &b"created"[..]));
    assert_same(
        &waited.expect("the read that waited"),
        &want,
        "the read that waited",
    );
    h.umount();
}

#[test]
fn with_the_reader_polling() {
    a_read_waiting_for_the_store_does_not_hold_up_other_requests(&[]);
}

#[test]
fn with_every_thread_on_the_device() {
    a_read_waiting_for_the_store_does_not_hold_up_other_requests(&["--poll-window", "0"]);
}

#[test]
fn with_one_thread_polling_and_one_to_spare() {
    a_read_waiting_for_the_store_does_not_hold_up_other_requests(&["--threads", "2"]);
}
