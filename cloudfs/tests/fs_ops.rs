//! The `fs` layer driven without the kernel, on the in-memory store.

mod common;

use cloudfs::fs::{FsError, RenameMode, SetAttr, XattrMode};
use common::{ME, ROOT, TestFs};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn files_round_trip_through_a_remount() {
    let mut t = TestFs::new(64 << 10);
    let data = pattern(300_000, 1);
    let ino = t.write_file(ROOT, "f", &data);
    assert_eq!(t.read_all(ino), data);
    t.remount();
    let ino = t.fs.lookup(ROOT, b"f").expect("lookup").ino;
    assert_eq!(t.read_all(ino), data);
}

#[test]
fn random_writes_reupload_only_touched_blocks() {
    let t = TestFs::new(64 << 10);
    let mut data = pattern(10 * 65536, 2);
    let ino = t.write_file(ROOT, "f", &data);
    let before = t.store.put_count();
    t.write_at(ino, 3 * 65536 + 100, b"patch");
    data[3 * 65536 + 100..3 * 65536 + 105].copy_from_slice(b"patch");
    assert_eq!(t.store.put_count() - before, 1, "one block re-uploaded");
    assert_eq!(t.read_all(ino), data);
}

#[test]
fn identical_content_is_stored_once() {
    let t = TestFs::new(64 << 10);
    let data = pattern(5 * 65536, 3);
    t.write_file(ROOT, "a", &data);
    let before = t.store.put_count();
    t.write_file(ROOT, "b", &data);
    assert_eq!(
        t.store.put_count(),
        before,
        "no block uploaded for the copy"
    );
}

#[test]
fn sparse_files_and_truncate() {
    let t = TestFs::new(64 << 10);
    let ino = t.create(ROOT, "sparse");
    t.write_at(ino, 10 << 20, b"tail");
    let attr = t.fs.getattr(ino).expect("getattr");
    assert_eq!(attr.size, (10 << 20) + 4);
    let fh = t.fs.open(ino, libc::O_RDONLY).expect("open");
    assert_eq!(t.fs.read(ino, fh, 5 << 20, 8).expect("read"), vec![0u8; 8]);
    assert_eq!(
        t.fs.read(ino, fh, 10 << 20, 100).expect("read"),
        &b"tail"[..]
    );
    t.fs.release(ino, fh).expect("release");

    // Cut inside a block, grow again: the cut-off bytes read back as zeros.
    let data = pattern(200_000, 4);
    let f = t.write_file(ROOT, "t", &data);
    t.fs.setattr(
        f,
        SetAttr {
            size: Some(70_000),
            ..SetAttr::default()
        },
    )
    .expect("truncate down");
    t.fs.setattr(
        f,
        SetAttr {
            size: Some(150_000),
            ..SetAttr::default()
        },
    )
    .expect("truncate up");
    let mut expected = data[..70_000].to_vec();
    expected.resize(150_000, 0);
    assert_eq!(t.read_all(f), expected);
}

#[test]
fn namespace_operations() {
    let t = TestFs::new(64 << 10);
    let d = t.fs.mkdir(ME, ROOT, b"d", 0o755, 0).expect("mkdir").ino;
    let f = t.write_file(d, "f", b"x");
    assert!(matches!(t.fs.rmdir(ROOT, b"d"), Err(FsError::NotEmpty)));
    assert!(matches!(t.fs.unlink(ROOT, b"d"), Err(FsError::IsDir)));
    t.fs.link(f, ROOT, b"hard").expect("link");
    assert_eq!(t.fs.getattr(f).expect("attr").nlink, 2);
    t.fs.symlink(ME, ROOT, b"sym", b"d/f").expect("symlink");
    let sym = t.fs.lookup(ROOT, b"sym").expect("lookup").ino;
    assert_eq!(t.fs.readlink(sym).expect("readlink"), b"d/f");
    assert_eq!(t.fs.getattr(ROOT).expect("attr").nlink, 3);

    // Directory into itself.
    let sub = t.fs.mkdir(ME, d, b"sub", 0o755, 0).expect("mkdir").ino;
    assert!(matches!(
        t.fs.rename(ROOT, b"d", sub, b"x", RenameMode::Replace),
        Err(FsError::Invalid(_))
    ));
    // Replace, no-replace, exchange.
    t.write_file(ROOT, "other", b"y");
    assert!(matches!(
        t.fs.rename(ROOT, b"other", ROOT, b"hard", RenameMode::NoReplace),
        Err(FsError::Exists)
    ));
    t.fs.rename(ROOT, b"other", d, b"f", RenameMode::Exchange)
        .expect("exchange");
    assert_eq!(
        t.read_all(t.fs.lookup(ROOT, b"other").expect("l").ino),
        b"x"
    );
    // Renaming a name onto another name of the same inode changes nothing.
    t.fs.rename(ROOT, b"other", ROOT, b"hard", RenameMode::Replace)
        .expect("same inode");
    assert_eq!(t.fs.getattr(f).expect("attr").nlink, 2);
    t.fs.rename(d, b"f", ROOT, b"hard", RenameMode::Replace)
        .expect("replace");
    assert_eq!(t.fs.getattr(f).expect("attr").nlink, 1);
    assert_eq!(t.read_all(t.fs.lookup(ROOT, b"hard").expect("l").ino), b"y");
    t.fs.rename(d, b"sub", ROOT, b"sub2", RenameMode::Replace)
        .expect("move dir");
    assert_eq!(t.fs.getattr(d).expect("attr").nlink, 2);
    assert_eq!(t.fs.lookup(sub, b"..").expect("dotdot").ino, ROOT);
    assert_eq!(t.names(ROOT), ["d", "hard", "other", "sub2", "sym"]);
}

#[test]
fn unlinked_open_files_stay_readable_until_released() {
    let t = TestFs::new(64 << 10);
    let ino = t.write_file(ROOT, "f", b"still here");
    let fh = t.fs.open(ino, libc::O_RDONLY).expect("open");
    t.fs.unlink(ROOT, b"f").expect("unlink");
    assert_eq!(
        t.fs.read(ino, fh, 0, 100).expect("read"),
        &b"still here"[..]
    );
    t.fs.release(ino, fh).expect("release");
    assert!(matches!(t.fs.getattr(ino), Err(FsError::NotFound)));
}

#[test]
fn xattrs() {
    let t = TestFs::new(64 << 10);
    let ino = t.create(ROOT, "f");
    t.fs.setxattr(ino, b"user.a", b"1", XattrMode::Create)
        .expect("set");
    assert!(matches!(
        t.fs.setxattr(ino, b"user.a", b"2", XattrMode::Create),
        Err(FsError::Exists)
    ));
    assert!(matches!(
        t.fs.setxattr(ino, b"user.b", b"2", XattrMode::Replace),
        Err(FsError::NoAttribute)
    ));
    t.fs.setxattr(ino, b"user.b", b"2", XattrMode::Any)
        .expect("set");
    assert_eq!(t.fs.getxattr(ino, b"user.a").expect("get"), b"1");
    assert_eq!(
        t.fs.listxattr(ino).expect("list"),
        [b"user.a".to_vec(), b"user.b".to_vec()]
    );
    t.fs.removexattr(ino, b"user.a").expect("remove");
    assert!(matches!(
        t.fs.getxattr(ino, b"user.a"),
        Err(FsError::NoAttribute)
    ));
}

#[test]
fn dropping_capabilities_looks_again_once_they_are_set_again() {
    let t = TestFs::new(64 << 10);
    let tool = t.write_file(ROOT, "tool", b"#!/bin/sh\n");
    let other = t.write_file(ROOT, "other", b"x");
    let set_capabilities = |ino| {
        t.fs.setxattr(ino, b"security.capability", b"caps", XattrMode::Any)
            .expect("set capabilities")
    };
    let has_capabilities = |ino| t.fs.getxattr(ino, b"security.capability").is_ok();
    t.fs.drop_capabilities(tool).expect("none to drop");
    set_capabilities(tool);
    set_capabilities(other);
    t.fs.setxattr(tool, b"user.note", b"kept", XattrMode::Any)
        .expect("set");
    let fh = t.fs.open(tool, libc::O_WRONLY).expect("open");
    t.fs.drop_capabilities(tool).expect("drop");
    assert!(!has_capabilities(tool));
    assert_eq!(t.fs.getxattr(tool, b"user.note").expect("get"), b"kept");
    assert!(has_capabilities(other), "a file nobody wrote keeps them");
    set_capabilities(tool); // while the file is open, after a write looked
    t.fs.drop_capabilities(tool).expect("drop again");
    assert!(!has_capabilities(tool), "set again, dropped again");
    t.fs.release(tool, fh).expect("release");
    t.fs.drop_capabilities(other).expect("drop");
    assert!(!has_capabilities(other));
}

#[test]
fn readdir_offsets_are_stable_while_entries_change() {
    let t = TestFs::new(64 << 10);
    for i in 0..50 {
        t.create(ROOT, &format!("f{i:02}"));
    }
    let first = t.fs.readdir(ROOT, 0, 12).expect("readdir");
    let resume = first.last().expect("entries").offset;
    t.fs.unlink(ROOT, b"f00").expect("unlink");
    t.create(ROOT, "new");
    let mut seen: Vec<String> = first
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect();
    let mut offset = resume;
    loop {
        let batch = t.fs.readdir(ROOT, offset, 7).expect("readdir");
        let Some(last) = batch.last() else { break };
        offset = last.offset;
        seen.extend(
            batch
                .iter()
                .map(|e| String::from_utf8_lossy(&e.name).into_owned()),
        );
    }
    for i in 1..50 {
        let name = format!("f{i:02}");
        assert_eq!(seen.iter().filter(|n| **n == name).count(), 1, "{name}");
    }
}

#[test]
fn bad_input_is_refused_not_panicked_on() {
    let t = TestFs::new(64 << 10);
    let long = vec![b'a'; 300];
    assert!(matches!(
        t.fs.mkdir(ME, ROOT, &long, 0o755, 0),
        Err(FsError::NameTooLong)
    ));
    assert!(matches!(
        t.fs.lookup(ROOT, &long),
        Err(FsError::NameTooLong)
    ));
    assert!(matches!(
        t.fs.mkdir(ME, 999, b"x", 0o755, 0),
        Err(FsError::NotFound)
    ));
    assert!(matches!(
        t.fs.read(ROOT, 12345, 0, 10),
        Err(FsError::BadHandle)
    ));
    let f = t.create(ROOT, "f");
    assert!(matches!(
        t.fs.mkdir(ME, f, b"x", 0o755, 0),
        Err(FsError::NotDir)
    ));
    assert!(matches!(t.fs.readlink(f), Err(FsError::Invalid(_))));
    assert!(matches!(
        t.fs.open(ROOT, libc::O_RDONLY),
        Err(FsError::IsDir)
    ));
    assert_eq!(FsError::NotFound.errno(), libc::ENOENT);
}

#[test]
fn a_sealed_directory_refuses_every_change_until_unsealed() {
    use cloudfs::fs::SEAL_XATTR;
    let mut t = TestFs::new(64 << 10);
    let dir = t.fs.mkdir(ME, ROOT, b"d", 0o755, 0).expect("mkdir").ino;
    let sub = t.fs.mkdir(ME, dir, b"sub", 0o755, 0).expect("mkdir").ino;
    let file = t.write_file(sub, "f", b"sealed content");
    let outside = t.write_file(ROOT, "outside", b"free");
    t.fs.setxattr(dir, SEAL_XATTR, b"1", XattrMode::Any)
        .expect("seal");
    assert_eq!(t.fs.getxattr(dir, SEAL_XATTR).expect("sealed"), b"1");
    assert!(matches!(
        t.fs.setxattr(file, SEAL_XATTR, b"1", XattrMode::Any),
        Err(FsError::NotDir)
    ));

    let refused = |what: &str, result: Result<(), FsError>| {
        assert!(
            matches!(result, Err(FsError::NotPermitted)),
            "{what}: {result:?}"
        );
    };
    let t_ref = &t;
    refused("write", t_ref.fs.open(file, libc::O_RDWR).map(|_| ()));
    refused(
        "create",
        t_ref
            .fs
            .create(ME, sub, b"new", 0o644, 0, libc::O_RDWR)
            .map(|_| ()),
    );
    refused("unlink", t_ref.fs.unlink(sub, b"f"));
    refused("rmdir of the sealed dir", t_ref.fs.rmdir(ROOT, b"d"));
    refused(
        "rename out",
        t_ref
            .fs
            .rename(sub, b"f", ROOT, b"stolen", RenameMode::Replace),
    );
    refused(
        "rename in",
        t_ref
            .fs
            .rename(ROOT, b"outside", sub, b"moved", RenameMode::Replace),
    );
    refused(
        "chmod",
        t_ref
            .fs
            .setattr(
                file,
                SetAttr {
                    mode: Some(0o600),
                    ..SetAttr::default()
                },
            )
            .map(|_| ()),
    );
    refused(
        "xattr",
        t_ref.fs.setxattr(file, b"user.x", b"1", XattrMode::Any),
    );
    refused("hard link", t_ref.fs.link(outside, sub, b"l").map(|_| ()));
    assert_eq!(t.read_all(file), b"sealed content", "reads still work");
    t.write_at(outside, 0, b"FREE");

    // The seal is metadata: it survives a remount.
    t.remount();
    let dir = t.fs.lookup(ROOT, b"d").expect("d").ino;
    let sub = t.fs.lookup(dir, b"sub").expect("sub").ino;
    let file = t.fs.lookup(sub, b"f").expect("f").ino;
    assert!(matches!(
        t.fs.open(file, libc::O_RDWR),
        Err(FsError::NotPermitted)
    ));
    t.fs.removexattr(dir, SEAL_XATTR).expect("unseal");
    assert!(matches!(
        t.fs.removexattr(dir, SEAL_XATTR),
        Err(FsError::NoAttribute)
    ));
    t.write_at(file, 0, b"SEALED");
    t.fs.unlink(sub, b"f").expect("unlink after unsealing");
}

#[test]
fn a_directory_tree_is_copied_in_metadata_and_diverges_copy_on_write() {
    use cloudfs::fs::SNAPSHOT_TREE_XATTR;
    let mut t = TestFs::new(64 << 10);
    let src = t.fs.mkdir(ME, ROOT, b"src", 0o755, 0).expect("mkdir").ino;
    let sub = t.fs.mkdir(ME, src, b"sub", 0o700, 0).expect("mkdir").ino;
    let big = pattern(200_000, 7);
    let file = t.write_file(sub, "big", &big);
    t.write_file(src, "small", b"small");
    t.fs.link(file, src, b"big-link").expect("link inside");
    t.fs.link(file, ROOT, b"outside-link")
        .expect("link outside");
    t.fs.symlink(ME, src, b"sym", b"sub/big").expect("symlink");
    t.fs.setxattr(file, b"user.tag", b"v", XattrMode::Any)
        .expect("xattr");
    t.fs.sync_all().expect("sync");

    let value = format!("{ROOT}:copy");
    t.fs.setxattr(src, SNAPSHOT_TREE_XATTR, value.as_bytes(), XattrMode::Any)
        .expect("copy the tree");
    let copy = t.fs.lookup(ROOT, b"copy").expect("copy").ino;
    assert_ne!(copy, src);
    let copy_sub = t.fs.lookup(copy, b"sub").expect("sub").ino;
    let copy_big = t.fs.lookup(copy_sub, b"big").expect("big");
    assert_ne!(copy_big.ino, file);
    assert_eq!(
        copy_big.nlink, 2,
        "its link inside the tree, not the one outside"
    );
    assert_eq!(
        t.fs.lookup(copy, b"big-link").expect("link").ino,
        copy_big.ino
    );
    assert_eq!(t.read_all(copy_big.ino), big);
    assert_eq!(
        t.fs.readlink(t.fs.lookup(copy, b"sym").expect("sym").ino)
            .expect("readlink"),
        b"sub/big"
    );
    assert_eq!(
        t.fs.getxattr(copy_big.ino, b"user.tag").expect("xattr"),
        b"v"
    );
    assert_eq!(t.fs.getattr(copy_sub).expect("sub").mode & 0o777, 0o700);
    assert_eq!(t.fs.getattr(copy).expect("copy").nlink, 3);

    // Copy-on-write: a change to the copy leaves the original alone.
    t.write_at(copy_big.ino, 10, b"CHANGED");
    assert_eq!(t.read_all(file), big);
    assert!(matches!(
        t.fs.snapshot_tree(src, ROOT, b"copy"),
        Err(FsError::Exists)
    ));
    assert!(matches!(
        t.fs.snapshot_tree(src, sub, b"inside"),
        Err(FsError::Invalid(_))
    ));
    t.remount();
    let copy = t.fs.lookup(ROOT, b"copy").expect("copy after remount").ino;
    let copy_sub = t.fs.lookup(copy, b"sub").expect("sub").ino;
    let copied = t.fs.lookup(copy_sub, b"big").expect("big").ino;
    let mut changed = big.clone();
    changed[10..17].copy_from_slice(b"CHANGED");
    assert_eq!(t.read_all(copied), changed);
}

/// `getattr` racing the flushes of a growing file never reports less than what was written:
/// a flush that commits between reading the inode row and laying the unflushed size over it
/// used to hand back the old size.
#[test]
fn getattr_never_loses_a_size_to_a_concurrent_flush() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let t = TestFs::new(64 << 10);
    let ino = t.create(ROOT, "growing");
    let written = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (fs, written, done) = (t.fs.clone(), written.clone(), done.clone());
        std::thread::spawn(move || {
            let mut checks = 0u64;
            while !done.load(Ordering::Acquire) {
                let floor = written.load(Ordering::Acquire);
                let size = fs.getattr(ino).expect("getattr").size;
                assert!(
                    size >= floor,
                    "getattr said {size} after {floor} bytes were written"
                );
                checks += 1;
            }
            checks
        })
    };
    let fh = t.fs.open(ino, libc::O_WRONLY).expect("open");
    for i in 0..3000u64 {
        t.fs.write(ino, fh, i, b"x").expect("write");
        written.store(i + 1, Ordering::Release);
        t.fs.flush(ino, fh).expect("flush");
    }
    t.fs.release(ino, fh).expect("release");
    done.store(true, Ordering::Release);
    let checks = reader.join().expect("the reader saw every size");
    assert!(checks > 0);
}

#[test]
fn a_quota_refuses_growth_past_it_and_statfs_reports_it() {
    const QUOTA: u64 = 1 << 20;
    let t = TestFs::new(64 << 10);
    t.fs.set_quota(Some(QUOTA));
    let total = |t: &TestFs| {
        let st = t.fs.statfs().expect("statfs");
        (
            st.blocks * u64::from(st.block_size),
            st.blocks_free * u64::from(st.block_size),
        )
    };
    assert_eq!(total(&t), (QUOTA, QUOTA));
    let a = t.write_file(ROOT, "a", &common::pattern(700_000, 1));
    let (size, free) = total(&t);
    assert_eq!(size, QUOTA);
    assert!(free <= QUOTA - 700_000 && free > QUOTA - 710_000, "{free}");

    // Growth past the quota fails; growth within it and overwrites in place do not.
    let b = t.create(ROOT, "b");
    let fh = t.fs.open(b, libc::O_RDWR).expect("open");
    assert!(matches!(
        t.fs.write(b, fh, 0, &[7; 400_000]),
        Err(FsError::NoSpace)
    ));
    t.fs.write(b, fh, 0, &[7; 300_000])
        .expect("within the quota");
    t.fs.release(b, fh).expect("release");
    t.write_at(a, 0, &common::pattern(700_000, 2));
    let grow = SetAttr {
        size: Some(800_000),
        ..SetAttr::default()
    };
    assert!(matches!(t.fs.setattr(b, grow), Err(FsError::NoSpace)));
    assert_eq!(FsError::NoSpace.errno(), libc::ENOSPC);

    // Deleting frees room; lifting the quota ends the limit.
    t.fs.unlink(ROOT, b"a").expect("unlink");
    t.write_at(b, 300_000, &[8; 400_000]);
    t.fs.set_quota(None);
    t.write_at(b, 0, &vec![9; 3 << 20]);
    assert!(total(&t).0 >= 1 << 49, "unlimited again");
}

/// A block a writer filled is uploaded in the background, then recorded and its buffer freed
/// by the writer's next call; reading it and writing into it again before the file is
/// flushed must still see every write.
#[test]
fn blocks_recorded_after_their_background_upload_stay_readable_and_writable() {
    let t = TestFs::new(64 << 10);
    let mut data = pattern(4 * 65536, 9);
    let (inode, fh) =
        t.fs.create(ME, ROOT, b"f", 0o644, 0o022, libc::O_RDWR)
            .expect("create");
    let ino = inode.ino;
    t.fs.write(ino, fh, 0, &data).expect("write");
    wait_for_blocks(&t, &data.chunks(65536).collect::<Vec<_>>());
    assert_eq!(t.read_handle(ino, fh).expect("read before flush"), data);

    t.fs.write(ino, fh, 65536 + 10, b"rewritten")
        .expect("rewrite");
    data[65536 + 10..65536 + 19].copy_from_slice(b"rewritten");
    t.fs.write(ino, fh, 3 * 65536, &[0u8; 65536])
        .expect("zero a block");
    data[3 * 65536..].fill(0);
    assert_eq!(t.read_handle(ino, fh).expect("read after rewrites"), data);
    t.fs.release(ino, fh).expect("release");
    assert_eq!(t.read_all(ino), data);
    assert_eq!(t.fs.getattr(ino).expect("getattr").size, data.len() as u64);
}

/// What the store holds of a file being written (a snapshot, a follower, or a crash sees it):
/// its stored size and how many blocks are recorded.
fn stored_extent(t: &TestFs, ino: u64) -> (u64, usize) {
    t.fs.meta()
        .read(|c| -> cloudfs::meta::MetaResult<(u64, usize)> {
            let size = cloudfs::meta::get_inode(c, ino)?.map_or(0, |i| i.size);
            Ok((
                size,
                cloudfs::meta::blocks_in(c, ino, 0, u64::MAX >> 1)?.len(),
            ))
        })
        .expect("stored metadata")
}

fn wait_for_blocks(t: &TestFs, blocks: &[&[u8]]) {
    let keys: Vec<String> = blocks
        .iter()
        .map(|block| cloudfs::cas::block_key(&cloudfs::cas::hash_block(block)))
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !keys.iter().all(|k| t.store.keys().contains(k)) {
        assert!(std::time::Instant::now() < deadline, "background uploads");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
}

/// Blocks uploaded in the background are recorded only once no block before them is still
/// staged: the stored file is always a prefix of the writes, never one with a hole.
#[test]
fn background_uploads_are_recorded_only_as_a_prefix_of_the_file() {
    let t = TestFs::new(64 << 10);
    let bs = 65536;
    let mut data = pattern(4 * bs, 3);
    let (inode, fh) =
        t.fs.create(ME, ROOT, b"f", 0o644, 0o022, libc::O_RDWR)
            .expect("create");
    let ino = inode.ino;
    t.fs.write(ino, fh, 0, &data[..100]).expect("start block 0");
    t.fs.write(ino, fh, bs as u64, &data[bs..])
        .expect("blocks 1-3");
    wait_for_blocks(
        &t,
        &[&data[bs..2 * bs], &data[2 * bs..3 * bs], &data[3 * bs..]],
    );
    t.fs.write(ino, fh, 100, &data[100..200])
        .expect("more of block 0");
    assert_eq!(stored_extent(&t, ino), (0, 0), "block 0 is still staged");

    t.fs.write(ino, fh, 200, &data[200..bs])
        .expect("fill block 0");
    wait_for_blocks(&t, &[&data[..bs]]);
    data.extend_from_slice(b"tail");
    t.fs.write(ino, fh, 4 * bs as u64, b"tail")
        .expect("start block 4");
    assert_eq!(stored_extent(&t, ino), (4 * bs as u64, 4));
    assert_eq!(t.read_handle(ino, fh).expect("read"), data);
    t.fs.release(ino, fh).expect("release");
    assert_eq!(stored_extent(&t, ino), (data.len() as u64, 5));
    assert_eq!(t.read_all(ino), data);
}

/// A rename records the writes of the files it moves first (a closed file's are otherwise
/// recorded in the background): a generation never has the new name on a file whose data
/// is not recorded, replacing the old file.
#[test]
fn a_rename_records_the_writes_of_the_file_it_moves() {
    /// Creates `name` holding `data`, written and released but not yet recorded.
    fn written_unrecorded(t: &TestFs, name: &str, data: &[u8]) -> u64 {
        let ino = t.create(ROOT, name);
        let fh = t.fs.open(ino, libc::O_WRONLY).expect("open");
        t.fs.write(ino, fh, 0, data).expect("write");
        assert!(
            t.fs.release_handle(ino, fh).expect("release"),
            "the release leaves the writes to record"
        );
        ino
    }
    fn recorded_size(t: &TestFs, ino: u64) -> u64 {
        t.fs.meta()
            .read(|c| cloudfs::meta::get_inode(c, ino))
            .expect("read the table")
            .expect("the file")
            .size
    }

    let t = TestFs::new(4096);
    t.write_file(ROOT, "target", b"old contents");
    let tmp = written_unrecorded(&t, "tmp", b"new contents");
    t.fs.rename(ROOT, b"tmp", ROOT, b"target", RenameMode::Replace)
        .expect("rename");
    assert_eq!(recorded_size(&t, tmp), 12, "the moved file");

    // An exchange moves the file at the new name too.
    let other = written_unrecorded(&t, "other", b"other");
    t.fs.rename(ROOT, b"target", ROOT, b"other", RenameMode::Exchange)
        .expect("exchange");
    assert_eq!(recorded_size(&t, other), 5, "the file exchanged with it");
}
