//! Volume snapshots, mounting a snapshot, clones and offline rollback, on `MemStore`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cloudfs::cas::{BlockCache, BlockStore};
use cloudfs::fs::FsError;
use cloudfs::mount::{Engine, EngineConfig, MountError, open_engine};
use cloudfs::snapshot;
use cloudfs::store::ObjectStore;
use cloudfs::volume::VolumeError;
use common::{ROOT, TEST_LEASE_TTL, TestFs};

fn store(t: &TestFs) -> Arc<dyn ObjectStore> {
    t.store.clone()
}

fn scratch_blocks(t: &TestFs, name: &str) -> BlockStore {
    let cache = BlockCache::open(&t.dir.path().join(name), 16 << 20).expect("cache");
    BlockStore::new(store(t), cache, Duration::from_secs(30))
}

fn open(
    t: &TestFs,
    volume: &str,
    cache: &str,
    snapshot: Option<&str>,
    read_only: bool,
) -> Result<Engine, MountError> {
    let config = EngineConfig {
        cache_dir: t.dir.path().join(cache),
        cache_size: 64 << 20,
        store_timeout: Duration::from_secs(30),
        read_only,
        lease_ttl: TEST_LEASE_TTL,
        snapshot: snapshot.map(str::to_owned),
    };
    open_engine(store(t), volume, &config, t.rt.handle())
}

fn content(engine: &Engine, name: &str) -> Option<Vec<u8>> {
    let ino = match engine.fs.lookup(ROOT, name.as_bytes()) {
        Ok(inode) => inode.ino,
        Err(FsError::NotFound) => return None,
        Err(e) => panic!("lookup {name}: {e}"),
    };
    let fh = engine.fs.open(ino, libc::O_RDONLY).expect("open");
    let data = engine.fs.read(ino, fh, 0, 1 << 20).expect("read").to_vec();
    engine.fs.release(ino, fh).expect("release");
    Some(data)
}

fn write(t: &TestFs, name: &str, data: &[u8]) {
    match t.fs.lookup(ROOT, name.as_bytes()) {
        Ok(inode) => {
            let fh =
                t.fs.open(inode.ino, libc::O_RDWR | libc::O_TRUNC)
                    .expect("open");
            t.fs.write(inode.ino, fh, 0, data).expect("write");
            t.fs.release(inode.ino, fh).expect("release");
        }
        Err(_) => {
            t.write_file(ROOT, name, data);
        }
    }
    t.fs.sync_all().expect("sync");
}

#[test]
fn snapshots_pin_a_state_to_mount_clone_and_roll_back_to() {
    let mut t = TestFs::new(64 << 10);
    let blocks = scratch_blocks(&t, "scratch-blocks");
    let scratch = tempfile::tempdir().expect("scratch");
    let store = store(&t);
    write(&t, "a", b"v1");

    let info =
        t.rt.block_on(snapshot::create(
            store.as_ref(),
            &blocks,
            "vol",
            "s1",
            scratch.path(),
        ))
        .expect("create s1");
    assert_eq!((info.files, info.logical_bytes), (1, 2));
    write(&t, "a", b"version 2");
    write(&t, "b", b"new file");
    assert!(matches!(
        t.rt.block_on(snapshot::create(
            store.as_ref(),
            &blocks,
            "vol",
            "s1",
            scratch.path()
        )),
        Err(VolumeError::SnapshotExists { .. })
    ));
    let listed =
        t.rt.block_on(snapshot::list(store.as_ref(), "vol"))
            .expect("list");
    assert_eq!(listed, vec![info.clone()]);
    assert_eq!(
        t.rt.block_on(snapshot::show(store.as_ref(), "vol", "s1"))
            .expect("show"),
        info
    );
    assert!(matches!(
        t.rt.block_on(snapshot::show(store.as_ref(), "vol", "nope")),
        Err(VolumeError::SnapshotNotFound { .. })
    ));

    // Mounted beside the live writer, the snapshot shows the pinned state.
    let pinned = open(&t, "vol", "snap-cache", Some("s1"), true).expect("open the snapshot");
    assert_eq!(content(&pinned, "a").as_deref(), Some(&b"v1"[..]));
    assert_eq!(content(&pinned, "b"), None);
    assert!(matches!(
        open(&t, "vol", "snap-rw", Some("s1"), false),
        Err(MountError::SnapshotNeedsReadOnly)
    ));

    // A clone shares the blocks (nothing but its config and first generation is written)
    // and diverges on its own.
    let puts = t.store.put_count();
    t.rt.block_on(snapshot::clone_volume(
        store.as_ref(),
        "vol",
        Some("s1"),
        "copy",
    ))
    .expect("clone");
    assert_eq!(t.store.put_count() - puts, 3, "config, generation, pointer");
    assert!(matches!(
        t.rt.block_on(snapshot::clone_volume(store.as_ref(), "vol", None, "copy")),
        Err(VolumeError::Exists(_))
    ));
    {
        let copy = open(&t, "copy", "copy-cache", None, false).expect("open the clone");
        assert_eq!(content(&copy, "a").as_deref(), Some(&b"v1"[..]));
        copy.fs
            .create(common::ME, ROOT, b"only-in-copy", 0o644, 0, libc::O_RDWR)
            .expect("create in the clone");
        copy.fs.shutdown().expect("unmount the clone");
    }
    assert!(t.fs.lookup(ROOT, b"only-in-copy").is_err());

    // Rollback refuses a mounted volume, then works offline and keeps the state it replaced.
    assert!(matches!(
        t.rt.block_on(snapshot::rollback(
            store.as_ref(),
            &blocks,
            "vol",
            "s1",
            None,
            scratch.path()
        )),
        Err(VolumeError::LeaseHeld { .. })
    ));
    t.fs.shutdown().expect("unmount");
    let report =
        t.rt.block_on(snapshot::rollback(
            store.as_ref(),
            &blocks,
            "vol",
            "s1",
            Some("before-s1"),
            scratch.path(),
        ))
        .expect("rollback");
    assert_eq!(report.previous_state, "before-s1", "the name asked for");
    t.open_again();
    let live = open(&t, "vol", "after-rollback", None, true).expect("read-only open");
    assert_eq!(content(&live, "a").as_deref(), Some(&b"v1"[..]));
    assert_eq!(content(&live, "b"), None);
    let before = open(
        &t,
        "vol",
        "pre-rollback",
        Some(&report.previous_state),
        true,
    )
    .expect("open the automatic snapshot");
    assert_eq!(content(&before, "a").as_deref(), Some(&b"version 2"[..]));
    assert_eq!(content(&before, "b").as_deref(), Some(&b"new file"[..]));

    t.rt.block_on(snapshot::delete(store.as_ref(), "vol", "s1"))
        .expect("delete");
    let names: Vec<String> =
        t.rt.block_on(snapshot::list(store.as_ref(), "vol"))
            .expect("list")
            .into_iter()
            .map(|s| s.name)
            .collect();
    assert_eq!(names, vec![report.previous_state]);
    assert!(matches!(
        t.rt.block_on(snapshot::delete(store.as_ref(), "vol", "s1")),
        Err(VolumeError::SnapshotNotFound { .. })
    ));
}

#[test]
fn deleting_a_volume_leaves_its_clones_whole() {
    let t = TestFs::new(64 << 10);
    let store = store(&t);
    write(&t, "a", b"shared content");
    t.rt.block_on(snapshot::clone_volume(store.as_ref(), "vol", None, "copy"))
        .expect("clone");
    assert!(matches!(
        t.rt.block_on(cloudfs::volume::delete_volume(store.as_ref(), "vol")),
        Err(VolumeError::LeaseHeld { .. })
    ));
    t.fs.shutdown().expect("unmount");
    t.rt.block_on(cloudfs::volume::delete_volume(store.as_ref(), "vol"))
        .expect("delete");
    assert_eq!(
        t.rt.block_on(cloudfs::volume::list_volumes(store.as_ref()))
            .expect("list"),
        vec!["copy".to_owned()]
    );
    assert!(
        t.store
            .keys()
            .iter()
            .all(|k| !k.starts_with("volumes/vol/")),
        "no metadata of the deleted volume is left"
    );
    assert!(matches!(
        t.rt.block_on(cloudfs::volume::delete_volume(store.as_ref(), "vol")),
        Err(VolumeError::NotFound(_))
    ));
    let copy = open(&t, "copy", "copy-cache", None, true).expect("open the clone");
    assert_eq!(content(&copy, "a").as_deref(), Some(&b"shared content"[..]));
}

#[test]
fn unique_bytes_count_what_only_that_snapshot_references() {
    let t = TestFs::new(64 << 10);
    let blocks = scratch_blocks(&t, "scratch-blocks");
    let scratch = tempfile::tempdir().expect("scratch");
    let store = store(&t);
    let (shared, only_s2) = (common::pattern(300_000, 1), common::pattern(640_000, 2));
    let create = |name: &str| {
        t.rt.block_on(snapshot::create(
            store.as_ref(),
            &blocks,
            "vol",
            name,
            scratch.path(),
        ))
        .expect("create")
    };
    let unique = || -> Vec<(String, u64)> {
        t.rt.block_on(snapshot::list_with_unique_bytes(
            store.as_ref(),
            &blocks,
            "vol",
            &scratch.path().join("unique"),
        ))
        .expect("list")
        .into_iter()
        .map(|info| (info.name, info.unique_bytes.expect("computed")))
        .collect()
    };
    write(&t, "shared", &shared);
    create("s1");
    write(&t, "only-s2", &only_s2);
    create("s2");
    t.fs.unlink(ROOT, b"shared").expect("unlink");
    t.fs.unlink(ROOT, b"only-s2").expect("unlink");
    write(&t, "live", b"the newest state");

    let listed = unique();
    let (s1, s2) = (listed[0].1, listed[1].1);
    assert!(
        s2 >= only_s2.len() as u64 && s2 < (only_s2.len() + shared.len()) as u64,
        "{listed:?}"
    );
    assert!(s1 < shared.len() as u64, "s2 shares its data: {listed:?}");

    t.rt.block_on(snapshot::delete(store.as_ref(), "vol", "s1"))
        .expect("delete");
    let listed = unique();
    assert!(
        listed[0].1 >= (only_s2.len() + shared.len()) as u64,
        "alone now: {listed:?}"
    );
}
