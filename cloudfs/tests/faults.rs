//! The engine under store failures, injected into the in-memory store: failing, slow and hung
//! puts of blocks and of metadata (generations, lease renewals), failing block reads. Each must
//! surface as `EIO` within a bounded time (never as success, a hang, a panic or zeros), and the
//! store must never end up with metadata that names a block it does not hold.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use cloudfs::cas::{block_key, hash_block};
use cloudfs::closer::{Closer, MAX_BACKLOG};
use cloudfs::fs::{Fs, FsResult, SetAttr};
use cloudfs::meta;
use cloudfs::store::Fault;
use common::{ROOT, TEST_LEASE_TTL, TestFs, pattern};

const BS: u64 = 4096;
/// Longer than anything here may take: past it an operation counts as hung.
const HANG_LIMIT: Duration = Duration::from_secs(60);

fn fail_puts(prefix: &str) -> Fault {
    Fault::FailPuts {
        prefix: prefix.to_owned(),
    }
}

#[track_caller]
fn assert_eio<T: Debug>(result: FsResult<T>, what: &str) {
    match result {
        Err(e) => assert_eq!(e.errno(), libc::EIO, "{what} failed, but not with EIO: {e}"),
        Ok(value) => panic!("{what} succeeded ({value:?}) although the store fails"),
    }
}

/// Runs `f` on its own thread and returns its result; fails the test (instead of hanging)
/// when `f` has not returned within `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => value,
        Err(RecvTimeoutError::Timeout) => panic!("operation still running after {limit:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("operation panicked"),
    }
}

type Steps = Vec<(&'static str, FsResult<()>)>;

/// `open`, `write` of `data` at 0, `flush` (close), `fsync`, `release`: each step's result.
fn write_through(fs: &Fs, ino: u64, data: &[u8]) -> Steps {
    let fh = match fs.open(ino, libc::O_RDWR) {
        Ok(fh) => fh,
        Err(e) => return vec![("open", Err(e))],
    };
    vec![
        ("write", fs.write(ino, fh, 0, data).map(drop)),
        ("flush", fs.flush(ino, fh)),
        ("fsync", fs.fsync(ino)),
        ("release", fs.release(ino, fh)),
    ]
}

/// `write_through` on another thread; fails the test if it takes `limit` or longer.
fn write_through_within(t: &TestFs, ino: u64, data: &[u8], limit: Duration) -> Steps {
    let (fs, data) = (t.fs.clone(), data.to_vec());
    within(limit, move || write_through(&fs, ino, &data))
}

/// The steps named in `failing` failed with `EIO`; every other one succeeded.
#[track_caller]
fn assert_steps(steps: Steps, failing: &[&str]) {
    assert_eq!(steps.len(), 4, "open failed: {steps:?}");
    for (step, result) in steps {
        if failing.contains(&step) {
            assert_eio(result, step);
        } else {
            result.unwrap_or_else(|e| panic!("{step} failed: {e}"));
        }
    }
}

/// Every block the volume's live metadata names is in the store.
#[track_caller]
fn assert_metadata_names_only_stored_blocks(t: &TestFs) {
    let stored: HashSet<String> = t.store.keys().into_iter().collect();
    let named =
        t.fs.meta()
            .read(meta::distinct_blocks)
            .expect("list the blocks the metadata names");
    assert!(!named.is_empty(), "the volume holds data");
    for (hash, _) in named {
        let key = block_key(&hash);
        assert!(
            stored.contains(&key),
            "metadata names {key}, which the store lacks"
        );
    }
}

/// Every file of the volume by path, read to its end (any failure fails the test).
fn read_everything(t: &TestFs) -> BTreeMap<String, Vec<u8>> {
    fn walk(t: &TestFs, dir: u64, path: &str, out: &mut BTreeMap<String, Vec<u8>>) {
        for (name, inode) in t.entries(dir) {
            let child = format!("{path}/{name}");
            if inode.is_dir() {
                walk(t, inode.ino, &child, out);
            } else if inode.is_file() {
                let data = t
                    .try_read_all(inode.ino)
                    .unwrap_or_else(|e| panic!("reading {child}: {e}"));
                assert_eq!(data.len() as u64, inode.size, "length of {child}");
                out.insert(child, data);
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(t, ROOT, "", &mut files);
    files
}

/// Whether the volume's live metadata names no block at all.
fn names_no_block(t: &TestFs) -> bool {
    t.fs.meta()
        .read(meta::distinct_blocks)
        .expect("list the blocks the metadata names")
        .is_empty()
}

fn lookup(t: &TestFs, name: &str) -> u64 {
    t.fs.lookup(ROOT, name.as_bytes()).expect("lookup").ino
}

// ---------------------------------------------------------------------------------------------
// (a) failing block puts
// ---------------------------------------------------------------------------------------------

#[test]
fn failing_block_puts_fail_flush_and_fsync_with_eio_and_the_data_can_be_written_again() {
    let mut t = TestFs::new(BS);
    let ino = t.create(ROOT, "f");
    let data = pattern(3 * BS as usize + 100, 7);
    t.store.set_faults(vec![fail_puts("blocks/")]);
    let steps = write_through_within(&t, ino, &data, HANG_LIMIT);
    assert_steps(steps, &["flush", "fsync", "release"]);

    t.store.set_faults(Vec::new());
    t.write_at(ino, 0, &data);
    assert_eq!(t.read_all(ino), data);
    t.remount();
    assert_eq!(t.read_all(lookup(&t, "f")), data);
}

/// A file closed while the store fails (its release's flush fails, and no `close` waits for a
/// flush through FUSE) keeps its writes staged and readable, and is left to record: a
/// directory sync fails while the store does, and records them once it is back.
#[test]
fn writes_whose_release_failed_stay_staged_until_a_sync_records_them() {
    let mut t = TestFs::new(BS);
    let ino = t.create(ROOT, "f");
    let data = pattern(3 * BS as usize + 100, 5);
    t.store.set_faults(vec![fail_puts("blocks/")]);
    let fh = t.fs.open(ino, libc::O_WRONLY).expect("open");
    t.fs.write(ino, fh, 0, &data).expect("write");
    assert_eio(t.fs.release(ino, fh), "release");
    let reader = t.fs.open(ino, libc::O_RDONLY).expect("open to read");
    let read = t.fs.read(ino, reader, 0, 1 << 20).expect("read");
    assert_eq!(read, data, "staged writes read back");
    assert_eio(
        t.fs.release(ino, reader),
        "release of a reader (it flushes too)",
    );
    assert_eq!(t.fs.failed_flushes(), [ino], "left to record");
    assert_eio(t.fs.fsyncdir(), "a directory sync while the store fails");
    assert!(
        names_no_block(&t),
        "metadata names blocks that were not stored"
    );

    t.store.set_faults(Vec::new());
    t.fs.fsyncdir()
        .expect("a directory sync once the store is back");
    assert!(t.fs.failed_flushes().is_empty(), "recorded");
    assert_metadata_names_only_stored_blocks(&t);
    t.remount_without_sync();
    assert_eq!(t.read_all(lookup(&t, "f")), data);
}

/// As the FUSE adapter releases handles: the release only says what is left to record, and the
/// closer's workers record it; one whose flush failed is tried again until the store takes it.
#[test]
fn the_closer_records_released_writes_once_the_store_takes_them() {
    let t = TestFs::with_timeout(BS, Duration::from_millis(300));
    let closer = Closer::start(&t.fs, t.rt.handle());
    let ino = t.create(ROOT, "f");
    let data = pattern(2 * BS as usize + 7, 11);
    t.store.set_faults(vec![fail_puts("blocks/")]);
    let fh = t.fs.open(ino, libc::O_WRONLY).expect("open");
    t.fs.write(ino, fh, 0, &data).expect("write");
    assert!(
        t.fs.release_handle(ino, fh).expect("release"),
        "the release left writes to record"
    );
    closer.flush_later(ino);
    let started = std::time::Instant::now();
    while t.fs.failed_flushes().is_empty() {
        assert!(
            started.elapsed() < HANG_LIMIT,
            "the worker's flush never failed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        names_no_block(&t),
        "metadata names blocks that were not stored"
    );

    t.store.set_faults(Vec::new());
    let started = std::time::Instant::now();
    while names_no_block(&t) {
        assert!(
            started.elapsed() < HANG_LIMIT,
            "the writes were never recorded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_metadata_names_only_stored_blocks(&t);
    assert_eq!(t.read_all(ino), data);
}

/// A writer faster than the store is held at its next open for writing while `MAX_BACKLOG`
/// released files wait for the closer's workers, and goes ahead once they drain. (The
/// workers wait for a frozen file system: a snapshot holds them as a slow store would.)
#[test]
fn opens_for_writing_wait_while_the_closer_is_behind() {
    let t = TestFs::new(BS);
    let closer = Arc::new(Closer::start(&t.fs, t.rt.handle()));
    let frozen = t.fs.freeze().expect("freeze");
    for i in 0..MAX_BACKLOG {
        let ino = t.create(ROOT, &format!("f{i}"));
        let fh = t.fs.open(ino, libc::O_WRONLY).expect("open");
        t.fs.write(ino, fh, 0, &pattern(100, i as u8))
            .expect("write");
        assert!(
            t.fs.release_handle(ino, fh).expect("release"),
            "left to record"
        );
        closer.flush_later(ino);
    }
    let (opened, waited) = mpsc::channel();
    let opener = closer.clone();
    std::thread::spawn(move || {
        opener.wait_for_room();
        let _ = opened.send(());
    });
    assert!(
        waited.recv_timeout(Duration::from_millis(300)).is_err(),
        "an open went ahead of {MAX_BACKLOG} files waiting to be recorded"
    );
    drop(frozen);
    waited
        .recv_timeout(HANG_LIMIT)
        .expect("the open goes ahead once files are recorded");
    t.fs.sync_all().expect("sync");
    assert_metadata_names_only_stored_blocks(&t);
}

// ---------------------------------------------------------------------------------------------
// (b) slow puts past the store timeout
// ---------------------------------------------------------------------------------------------

/// How soon a store timeout of 300 ms must surface as `EIO`.
const EIO_WITHIN: Duration = Duration::from_secs(10);

/// Puts of keys under `prefix` take `delay`, longer than the 300 ms store timeout, at a time
/// the mount's lease renewal is due: the steps named in `failing` must fail with `EIO` within
/// `EIO_WITHIN`, and once puts are fast again one `fsync` stores what was written.
fn slow_puts_surface_as_eio(prefix: &str, delay: Duration, failing: &[&str]) {
    let mut t = TestFs::with_timeout(BS, Duration::from_millis(300));
    let ino = t.create(ROOT, "f");
    let data = pattern(2 * BS as usize + 10, 9);
    std::thread::sleep(TEST_LEASE_TTL / 2); // the next metadata sync renews the lease
    t.store.set_faults(vec![Fault::SlowPuts {
        prefix: prefix.to_owned(),
        delay,
    }]);
    let steps = write_through_within(&t, ino, &data, EIO_WITHIN);
    assert_steps(steps, failing);

    t.store.set_faults(Vec::new());
    t.fs.fsync(ino).expect("fsync once the store is fast again");
    t.remount_without_sync();
    assert_eq!(t.read_all(lookup(&t, "f")), data);
}

const SLOW: Duration = Duration::from_secs(2);
/// A store that has stopped answering, as far as any test can tell.
const HUNG: Duration = Duration::from_secs(3600);

#[test]
fn slow_block_puts_time_out_as_eio() {
    slow_puts_surface_as_eio("blocks/", SLOW, &["flush", "fsync", "release"]);
}

#[test]
fn slow_metadata_puts_time_out_as_eio() {
    slow_puts_surface_as_eio("volumes/", SLOW, &["fsync"]);
}

#[test]
fn hung_block_puts_time_out_as_eio() {
    slow_puts_surface_as_eio("blocks/", HUNG, &["flush", "fsync", "release"]);
}

#[test]
fn hung_metadata_puts_time_out_as_eio() {
    slow_puts_surface_as_eio("volumes/", HUNG, &["fsync"]);
}

// ---------------------------------------------------------------------------------------------
// (c) metadata never names a block that was not stored
// ---------------------------------------------------------------------------------------------

/// A synced volume holding `f` (`old`, 6 blocks) and `g`, then a rewrite of `f` as `new` whose
/// flush failed because one of its blocks (in the second upload batch) could not be stored,
/// while the others could.
struct FailedFlush {
    t: TestFs,
    old: Vec<u8>,
    new: Vec<u8>,
    g: Vec<u8>,
}

fn failed_flush() -> FailedFlush {
    let t = TestFs::new(BS);
    let old = pattern(6 * BS as usize + 100, 1);
    let g = pattern(BS as usize + 1, 2);
    let ino = t.write_file(ROOT, "f", &old);
    t.write_file(ROOT, "g", &g);
    t.fs.sync_all().expect("sync");

    let mut new = pattern(6 * BS as usize + 300, 3);
    new[BS as usize..2 * BS as usize].fill(0); // a hole
    let doomed = block_key(&hash_block(&new[5 * BS as usize..6 * BS as usize]));
    t.store.set_faults(vec![fail_puts(&doomed)]);
    let steps = write_through_within(&t, ino, &new, HANG_LIMIT);
    assert_steps(steps, &["flush", "fsync", "release"]);
    assert!(!t.store.keys().contains(&doomed), "the doomed block failed");
    assert_metadata_names_only_stored_blocks(&t);
    t.store.set_faults(Vec::new());
    FailedFlush { t, old, new, g }
}

/// After recovery every file reads back in full: `g` unchanged, `f` either all old or all new.
#[track_caller]
fn assert_old_or_new(failed: &FailedFlush) {
    let files = read_everything(&failed.t);
    assert_eq!(files.len(), 2, "files: {:?}", files.keys());
    assert_eq!(files["/g"], failed.g, "g");
    let f = &files["/f"];
    assert!(
        *f == failed.old || *f == failed.new,
        "f is neither its old nor its new content ({} bytes)",
        f.len()
    );
}

#[test]
fn a_crash_after_a_failed_flush_leaves_consistent_metadata() {
    let mut failed = failed_flush();
    failed.t.remount_without_sync();
    assert_metadata_names_only_stored_blocks(&failed.t);
    assert_old_or_new(&failed);
}

#[test]
fn a_sync_after_a_failed_flush_stores_every_block_it_names() {
    let mut failed = failed_flush();
    failed.t.fs.sync_all().expect("sync once the store is back");
    failed.t.remount_without_sync();
    assert_metadata_names_only_stored_blocks(&failed.t);
    assert_old_or_new(&failed);
}

// ---------------------------------------------------------------------------------------------
// (d) failing metadata generation puts
// ---------------------------------------------------------------------------------------------

/// A volume whose `f` was fsynced as `v1`, then rewritten as `v2` and joined by an empty `g`
/// while generation puts failed (every `fsync` of that failed with `EIO`); puts work again.
fn failed_metadata_sync() -> (TestFs, Vec<u8>, Vec<u8>) {
    let t = TestFs::new(BS);
    let v1 = pattern(2 * BS as usize + 5, 1);
    let ino = t.write_file(ROOT, "f", &v1);
    t.fs.fsync(ino).expect("fsync v1");

    t.store.set_faults(vec![fail_puts("volumes/")]);
    let v2 = pattern(3 * BS as usize, 2);
    let steps = write_through_within(&t, ino, &v2, HANG_LIMIT);
    assert_steps(steps, &["fsync"]);
    let g = t.create(ROOT, "g");
    assert_eio(t.fs.fsync(g), "fsync of g");
    assert_eio(t.fs.fsyncdir(), "fsyncdir");
    t.store.set_faults(Vec::new());
    (t, v1, v2)
}

#[test]
fn after_failed_metadata_syncs_a_remount_sees_the_last_fsynced_state() {
    let (mut t, v1, _) = failed_metadata_sync();
    t.remount_without_sync();
    assert_eq!(read_everything(&t), BTreeMap::from([("/f".to_owned(), v1)]));
}

#[test]
fn once_generation_puts_work_again_fsync_carries_the_changes() {
    let (mut t, _, v2) = failed_metadata_sync();
    t.fs.fsyncdir().expect("fsyncdir once the store is back");
    t.remount_without_sync();
    assert_eq!(
        read_everything(&t),
        BTreeMap::from([("/f".to_owned(), v2), ("/g".to_owned(), Vec::new())])
    );
}

// ---------------------------------------------------------------------------------------------
// (e) failing block reads
// ---------------------------------------------------------------------------------------------

#[test]
fn failing_block_gets_make_reads_fail_with_eio() {
    let mut t = TestFs::new(BS);
    let data = pattern(3 * BS as usize + 100, 5);
    t.write_file(ROOT, "f", &data);
    t.remount(); // a fresh block cache: every read must go to the store
    let ino = lookup(&t, "f");
    t.store.set_faults(vec![Fault::FailGets {
        prefix: "blocks/".to_owned(),
    }]);

    let fh = t.fs.open(ino, libc::O_RDONLY).expect("open");
    assert_eio(t.fs.read(ino, fh, 0, data.len() as u32), "whole-block read");
    assert_eio(t.fs.read(ino, fh, BS + 10, 16), "ranged read");
    t.fs.release(ino, fh).expect("release of a reader");

    // A partial write, and a truncation inside a block, have to read the block they change:
    // they fail too, and change nothing.
    let fh = t.fs.open(ino, libc::O_RDWR).expect("open");
    assert_eio(t.fs.write(ino, fh, 10, b"patch"), "partial-block write");
    t.fs.release(ino, fh)
        .expect("release of a writer that wrote nothing");
    let cut = SetAttr {
        size: Some(BS + 10),
        ..SetAttr::default()
    };
    assert_eio(t.fs.setattr(ino, cut), "truncation inside a block");
    assert_eq!(t.fs.getattr(ino).expect("getattr").size, data.len() as u64);

    t.store.set_faults(Vec::new());
    assert_eq!(t.read_all(ino), data);
}
