//! Garbage collection on `MemStore`: what is reclaimed, what every kind of root keeps, dry
//! runs, and an interrupted run resumed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cloudfs::cas::{BlockCache, BlockStore, block_key, hash_block};
use cloudfs::gc::{self, GcOptions, GcReport};
use cloudfs::store::{Fault, ObjectStore, unix_now_secs};
use cloudfs::{inspect, snapshot, tar};
use common::{ROOT, TestFs, pattern};

const HOUR: i64 = 3600;

fn blocks(t: &TestFs, name: &str) -> BlockStore {
    let store: Arc<dyn ObjectStore> = t.store.clone();
    let cache = BlockCache::open(&t.dir.path().join(name), 16 << 20).expect("cache");
    BlockStore::new(store, cache, Duration::from_secs(30))
}

fn collect(t: &TestFs, grace: Duration, dry_run: bool) -> Result<GcReport, gc::GcError> {
    let options = GcOptions {
        grace,
        dry_run,
        state_dir: t.dir.path().join("gc-state"),
    };
    let scratch = blocks(t, "gc-blocks");
    t.rt.block_on(gc::collect(t.store.as_ref(), &scratch, &options))
}

fn present(t: &TestFs, data: &[u8]) -> bool {
    t.store.keys().contains(&block_key(&hash_block(data)))
}

/// Pushes enough new generations that the retained ones no longer hold older states.
fn roll_generations(t: &TestFs) {
    for i in 0..6 {
        t.write_file(ROOT, &format!("roll-{i}"), format!("roll {i}").as_bytes());
        t.fs.sync_all().expect("sync");
    }
}

fn unlink(t: &TestFs, name: &str) {
    t.fs.unlink(ROOT, name.as_bytes()).expect("unlink");
}

#[test]
fn gc_reclaims_what_no_volume_clone_or_snapshot_references() {
    let t = TestFs::new(64 << 10);
    let store: Arc<dyn ObjectStore> = t.store.clone();
    let scratch = blocks(&t, "scratch");
    let (live, pinned, cloned, dropped) = (
        pattern(50_000, 1),
        pattern(50_000, 2),
        pattern(50_000, 3),
        pattern(50_000, 4),
    );
    let snapshot_of = |name: &str| {
        t.rt.block_on(snapshot::create(
            store.as_ref(),
            &scratch,
            "vol",
            name,
            t.dir.path(),
        ))
        .expect("snapshot")
    };
    // A clone made from a snapshot that is then deleted.
    t.write_file(ROOT, "live", &live);
    t.write_file(ROOT, "cloned", &cloned);
    t.fs.sync_all().expect("sync");
    snapshot_of("for-clone");
    t.rt.block_on(snapshot::clone_volume(
        store.as_ref(),
        "vol",
        Some("for-clone"),
        "copy",
    ))
    .expect("clone");
    t.rt.block_on(snapshot::delete(store.as_ref(), "vol", "for-clone"))
        .expect("delete snapshot");
    // Files only a snapshot still holds.
    t.write_file(ROOT, "pinned", &pinned);
    t.write_file(ROOT, "dropped", &dropped);
    t.fs.sync_all().expect("sync");
    snapshot_of("keep");
    for name in ["pinned", "cloned", "dropped"] {
        unlink(&t, name);
    }
    t.fs.sync_all().expect("sync");
    roll_generations(&t);
    let stored_before = t.store.keys().len();
    t.store.backdate(2 * HOUR);

    let dry = collect(&t, gc::DEFAULT_GRACE, true).expect("dry run");
    assert!(dry.dry_run && dry.deleted == 0, "{dry:?}");
    assert_eq!(
        t.store.keys().len(),
        stored_before,
        "a dry run deletes nothing"
    );
    assert_eq!((dry.volumes, dry.snapshots), (2, 1), "{dry:?}");
    let report = collect(&t, gc::DEFAULT_GRACE, false).expect("gc");
    assert!(present(&t, &pinned) && present(&t, &dropped), "{report:?}");
    let fsck = t.rt.block_on(inspect::fsck(
        store.as_ref(),
        &scratch,
        "vol",
        &t.dir.path().join("fsck-pinned"),
        false,
    ));
    let orphans = fsck.expect("fsck").orphans;
    let pinned_key = block_key(&hash_block(&pinned));
    assert!(
        !orphans.contains(&pinned_key),
        "a snapshot's block is no orphan: {orphans:?}"
    );

    t.rt.block_on(snapshot::delete(store.as_ref(), "vol", "keep"))
        .expect("delete snapshot");
    let dry = collect(&t, gc::DEFAULT_GRACE, true).expect("dry run");
    let report = collect(&t, gc::DEFAULT_GRACE, false).expect("gc");
    assert!(!report.resumed, "{report:?}");
    assert!(report.deleted >= 1, "{report:?}");
    assert_eq!(
        report.candidates, dry.candidates,
        "the dry run predicted it"
    );
    assert_eq!(report.bytes_reclaimed, report.candidate_bytes);
    assert_eq!(
        report.scanned,
        report.referenced + report.recent + report.candidates
    );
    assert!(!present(&t, &dropped), "referenced by nothing: reclaimed");
    assert!(
        !present(&t, &pinned),
        "referenced only by deleted snapshots: reclaimed"
    );
    assert!(present(&t, &live), "a live file keeps its block");
    assert!(present(&t, &cloned), "a clone keeps its block");

    for volume in ["vol", "copy"] {
        let fsck = t.rt.block_on(inspect::fsck(
            store.as_ref(),
            &scratch,
            volume,
            &t.dir.path().join(format!("fsck-{volume}")),
            true,
        ));
        let fsck = fsck.expect("fsck");
        assert!(fsck.problems.is_empty(), "{volume}: {:?}", fsck.problems);
    }
    let again = collect(&t, gc::DEFAULT_GRACE, false).expect("gc again");
    assert_eq!(again.deleted, 0, "nothing left to reclaim: {again:?}");
}

#[test]
fn gc_keeps_recent_blocks_and_resumes_after_an_interruption() {
    let t = TestFs::new(64 << 10);
    let (old, late) = (pattern(50_000, 5), pattern(50_000, 6));
    t.write_file(ROOT, "old", &old);
    t.fs.sync_all().expect("sync");
    unlink(&t, "old");
    roll_generations(&t);
    t.store.backdate(2 * HOUR);

    // The sweep fails at its first delete: the run stops after its mark.
    t.store.set_faults(vec![Fault::FailDeletes {
        prefix: "blocks/".into(),
    }]);
    collect(&t, Duration::ZERO, false).expect_err("deletes fail");
    assert!(present(&t, &old));

    // A block uploaded after that run started, which no metadata names (yet).
    let late_key = block_key(&hash_block(&late));
    t.rt.block_on(t.store.put(&late_key, late.clone().into()))
        .expect("put");

    t.store.set_faults(Vec::new());
    let report = collect(&t, Duration::ZERO, false).expect("gc");
    assert!(report.resumed, "continues the interrupted run: {report:?}");
    assert!(!present(&t, &old), "unreferenced and old: reclaimed");
    assert!(present(&t, &late), "uploaded after the run started: kept");
    assert!(report.recent >= 1, "{report:?}");

    let fresh = collect(&t, Duration::ZERO, false).expect("gc");
    assert!(!fresh.resumed, "a finished run leaves nothing to resume");
}

#[test]
fn a_block_found_old_by_dedup_is_uploaded_again() {
    let t = TestFs::new(64 << 10);
    let data = pattern(60_000, 7);
    let key = block_key(&hash_block(&data));
    t.rt.block_on(t.store.put(&key, data.clone().into()))
        .expect("put");
    t.store.backdate(2 * HOUR);
    let puts = t.store.put_count();
    t.write_file(ROOT, "revived", &data);
    t.fs.sync_all().expect("sync");
    let (_, modified) =
        t.rt.block_on(t.store.head(&key))
            .expect("head")
            .map(|m| (m.size, m.modified))
            .expect("present");
    let age = unix_now_secs() - modified;
    assert!(age < 60, "the old block was written again ({age}s old)");
    assert!(t.store.put_count() > puts);
}

#[test]
fn an_export_keeps_the_blocks_it_references_until_it_is_deleted() {
    let t = TestFs::new(64 << 10);
    let store: Arc<dyn ObjectStore> = t.store.clone();
    let scratch = blocks(&t, "scratch");
    let exported = pattern(50_000, 8);
    t.write_file(ROOT, "exported", &exported);
    t.fs.sync_all().expect("sync");
    let source = tar::parse_source("vol").expect("source");
    let info =
        t.rt.block_on(tar::export_tar(
            store.as_ref(),
            &scratch,
            &source,
            "all.tar",
            t.dir.path(),
        ))
        .expect("export");
    assert_eq!((info.entries, info.blocks), (1, 1), "{info:?}");
    unlink(&t, "exported");
    roll_generations(&t);
    t.store.backdate(2 * HOUR);

    let report = collect(&t, gc::DEFAULT_GRACE, false).expect("gc");
    assert_eq!(report.exports, 1, "{report:?}");
    assert!(present(&t, &exported), "an export keeps its block");
    let tar = t.rt.block_on(store.get(&info.object, None)).expect("get");
    assert_eq!(tar.len() as u64, info.tar_bytes);
    assert!(
        tar.windows(exported.len()).any(|w| w == &exported[..]),
        "the tar holds the file's data"
    );

    t.rt.block_on(tar::delete(store.as_ref(), "all.tar"))
        .expect("delete");
    let report = collect(&t, gc::DEFAULT_GRACE, false).expect("gc");
    assert_eq!(report.exports, 0, "{report:?}");
    assert!(!present(&t, &exported), "reclaimed once the export is gone");
    assert!(
        t.rt.block_on(tar::list(store.as_ref()))
            .expect("list")
            .is_empty()
    );
}
