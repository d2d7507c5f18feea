//! Finding a volume's newest metadata generation without listings (Swift with only a TempURL
//! key): through the `latest.json` pointer and forward probing, on `MemStore`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cloudfs::fs::XattrMode;
use cloudfs::mount::{Engine, EngineConfig, MountError, open_engine};
use cloudfs::store::{Fault, ObjectStore, list_all};
use common::{ROOT, TEST_LEASE_TTL, TestFs, pattern};

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

/// The chunk size of the newest generation in the store.
fn newest_chunk_size(t: &TestFs) -> u64 {
    let keys =
        t.rt.block_on(list_all(t.store.as_ref(), "volumes/vol/meta/gen-"))
            .expect("list generations");
    let newest = keys
        .iter()
        .map(|object| object.key.clone())
        .max_by_key(|key| {
            let (epoch, seq) = key
                .rsplit_once("gen-")
                .and_then(|(_, n)| n.split_once('-'))
                .expect("gen-<epoch>-<seq>");
            (
                epoch.parse::<u64>().expect("epoch"),
                seq.parse::<u64>().expect("seq"),
            )
        })
        .expect("a generation");
    let raw = t.rt.block_on(t.store.get(&newest, None)).expect("get");
    let manifest: serde_json::Value = serde_json::from_slice(&raw).expect("JSON");
    manifest["chunk_size"].as_u64().expect("chunk_size")
}

#[test]
fn a_database_that_outgrows_its_chunk_size_is_cut_afresh_and_reopens_whole() {
    let mut t = TestFs::new(64 << 10);
    write_and_publish(&t, "small", b"before the growth");
    assert_eq!(newest_chunk_size(&t), 64 << 10);

    // 150 xattrs of 60 KiB take the database past 128 chunks of 64 KiB.
    let value = |i: usize| pattern(60 << 10, i as u8);
    for i in 0..150 {
        t.fs.setxattr(
            ROOT,
            format!("user.pad{i}").as_bytes(),
            &value(i),
            XattrMode::Create,
        )
        .expect("setxattr");
    }
    write_and_publish(&t, "after", b"after the growth");
    assert!(newest_chunk_size(&t) > 64 << 10, "the chunks grew");

    t.remount();
    assert_eq!(
        t.read_all(t.fs.lookup(ROOT, b"small").expect("small").ino),
        b"before the growth"
    );
    assert_eq!(
        t.read_all(t.fs.lookup(ROOT, b"after").expect("after").ino),
        b"after the growth"
    );
    for i in 0..150 {
        assert!(
            t.fs.getxattr(ROOT, format!("user.pad{i}").as_bytes())
                .expect("getxattr")
                == value(i),
            "user.pad{i}"
        );
    }
    // The reopened mount goes on from the grown chunks.
    write_and_publish(&t, "later", b"after the reopen");
    t.remount();
    assert_eq!(
        t.read_all(t.fs.lookup(ROOT, b"later").expect("later").ino),
        b"after the reopen"
    );
}
