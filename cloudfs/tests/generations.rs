//! Finding a volume's newest metadata generation without listings (Swift with only a TempURL
//! key): through the `latest.json` pointer and forward probing, on `MemStore`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cloudfs::mount::{Engine, EngineConfig, MountError, open_engine};
use cloudfs::store::{Fault, ObjectStore};
use common::{ROOT, TEST_LEASE_TTL, TestFs};

const POINTER: &str = "volumes/vol/meta/latest.json";

fn config(t: &TestFs, name: &str, read_only: bool) -> EngineConfig {
    EngineConfig {
        cache_dir: t.dir.path().join(name),
        cache_size: 64 << 20,
        store_timeout: Duration::from_secs(30),
        read_only,
        lease_ttl: TEST_LEASE_TTL,
        snapshot: None,
    }
}

fn open(t: &TestFs, name: &str, read_only: bool) -> Result<Engine, MountError> {
    let store: Arc<dyn ObjectStore> = t.store.clone();
    open_engine(store, "vol", &config(t, name, read_only), t.rt.handle())
}

/// Writes `name` in the root directory of the writer and publishes a generation.
fn write_and_publish(t: &TestFs, name: &str, data: &[u8]) {
    t.write_file(ROOT, name, data);
    t.fs.sync_all().expect("sync");
}

fn read(engine: &Engine, name: &str) -> Vec<u8> {
    let ino = engine
        .fs
        .lookup(ROOT, name.as_bytes())
        .unwrap_or_else(|e| panic!("lookup {name}: {e}"))
        .ino;
    let fh = engine.fs.open(ino, libc::O_RDONLY).expect("open");
    let data = engine.fs.read(ino, fh, 0, 1 << 20).expect("read").to_vec();
    engine.fs.release(ino, fh).expect("release");
    data
}

#[test]
fn a_reader_that_cannot_list_finds_and_follows_the_newest_generation() {
    let t = TestFs::new(64 << 10);
    // Enough generations that the oldest are pruned.
    for i in 0..8 {
        write_and_publish(&t, &format!("f{i}"), format!("content {i}").as_bytes());
    }
    t.store.set_faults(vec![Fault::NoListings]);

    let reader = open(&t, "reader", true).expect("a read-only open without listings");
    for i in 0..8 {
        assert_eq!(
            read(&reader, &format!("f{i}")),
            format!("content {i}").as_bytes()
        );
    }
    match open(&t, "second-writer", false) {
        Err(e @ MountError::ReadWriteNeedsListing) => {
            assert!(e.to_string().contains("--read-only"), "{e}")
        }
        other => panic!("a read-write open without listings: {other:?}"),
    }

    write_and_publish(&t, "late", b"written after the reader opened");
    assert!(
        reader.refresh(t.rt.handle()).expect("refresh"),
        "a newer generation"
    );
    assert_eq!(read(&reader, "late"), b"written after the reader opened");
    assert!(
        !reader.refresh(t.rt.handle()).expect("refresh"),
        "nothing newer"
    );
}

#[test]
fn a_stale_pointer_leads_forward_to_the_newest_generation() {
    let t = TestFs::new(64 << 10);
    write_and_publish(&t, "first", b"1");
    let stale =
        t.rt.block_on(t.store.get(POINTER, None))
            .expect("the pointer");
    write_and_publish(&t, "second", b"2");
    write_and_publish(&t, "third", b"3");
    // As an eventually consistent store may serve an overwritten object's old bytes.
    t.store.tamper(POINTER, stale);
    t.store.set_faults(vec![Fault::NoListings]);

    let reader = open(&t, "reader", true).expect("open from a stale pointer");
    assert_eq!(read(&reader, "third"), b"3");
}

#[test]
fn the_writer_prefers_the_newer_of_listing_and_pointer() {
    let mut t = TestFs::new(64 << 10);
    write_and_publish(&t, "first", b"1");
    let stale =
        t.rt.block_on(t.store.get(POINTER, None))
            .expect("the pointer");
    write_and_publish(&t, "second", b"2");
    t.store.tamper(POINTER, stale);
    t.remount();
    assert_eq!(
        t.read_all(t.fs.lookup(ROOT, b"second").expect("second").ino),
        b"2"
    );
}
