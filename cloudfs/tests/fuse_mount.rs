//! Real FUSE mounts of the `cloudfs` binary, driven through the kernel with `std::fs` and
//! `libc`: every POSIX operation a user does (with the errno of each refusal), a directory of
//! 10,000 files, a 10 GiB sparse file, mmap, concurrent writers, persistence through a remount
//! from the store alone, read-only mounts, CLI errors and a `kill -9` of the mount process.
//!
//! Needs root (or `fusermount3`) and `/dev/fuse`. Every test formats its own volume in its own
//! temp dir and keeps its pid files in its own run dir, so the tests run in parallel.
//!
//! With `CLOUDFS_TEST_STORE=swift` the same tests run against Swift (the one `tests/swift/swift.sh`
//! starts): each test formats its volume in a container of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudfs::cas::{block_key, hash_block};

mod mount_harness;

use mount_harness::*;

fn assert_zeros(got: &[u8], what: &str) {
    if let Some(at) = got.iter().position(|b| *b != 0) {
        panic!("{what}: non-zero byte at offset {at}");
    }
}

/// Asserts that `result` failed with `errno`.
fn assert_errno<T: std::fmt::Debug>(result: io::Result<T>, errno: i32, what: &str) {
    match result {
        Ok(value) => panic!("{what}: succeeded ({value:?}), expected errno {errno}"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(errno), "{what}: got {e}"),
    }
}

fn read_at(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("pread of {len} bytes at {offset}: {e}"));
    buf
}

/// The names `readdir` lists in `dir`, sorted, duplicates kept.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .into_string()
                .expect("UTF-8 name")
        })
        .collect();
    names.sort();
    names
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

fn c_str(s: &str) -> CString {
    CString::new(s).expect("string without NUL")
}

/// A libc return value: `-1` means `errno`.
fn cvt<T: PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (from, to) = (c_path(from), c_path(to));
    // SAFETY: two valid NUL-terminated paths, resolved relative to the working directory.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

fn set_xattr(path: &Path, name: &str, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let (path, name) = (c_path(path), c_str(name));
    // SAFETY: valid C strings and a value buffer of the given length.
    cvt(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// `getxattr` into a buffer of `capacity` bytes.
fn get_xattr_with(path: &Path, name: &str, capacity: usize) -> io::Result<Vec<u8>> {
    let (path, name) = (c_path(path), c_str(name));
    let mut buf = vec![0u8; capacity];
    // SAFETY: valid C strings and a writable buffer of `capacity` bytes.
    let len = cvt(unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(len as usize);
    Ok(buf)
}

fn get_xattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    get_xattr_with(path, name, 64 * KIB as usize)
}

fn list_xattr(path: &Path) -> io::Result<BTreeSet<String>> {
    let path = c_path(path);
    let mut buf = vec![0u8; 64 * KIB as usize];
    // SAFETY: a valid C string and a writable buffer of the given length.
    let len = cvt(unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    Ok(buf[..len as usize]
        .split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect())
}

fn remove_xattr(path: &Path, name: &str) -> io::Result<()> {
    let (path, name) = (c_path(path), c_str(name));
    // SAFETY: valid C strings.
    cvt(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
}

fn access(path: &Path, mode: libc::c_int) -> io::Result<()> {
    let path = c_path(path);
    // SAFETY: a valid C string.
    cvt(unsafe { libc::access(path.as_ptr(), mode) }).map(drop)
}

fn mkfifo(path: &Path, mode: libc::mode_t) -> io::Result<()> {
    let path = c_path(path);
    // SAFETY: a valid C string.
    cvt(unsafe { libc::mkfifo(path.as_ptr(), mode) }).map(drop)
}

fn truncate(path: &Path, len: i64) -> io::Result<()> {
    let path = c_path(path);
    // SAFETY: a valid C string.
    cvt(unsafe { libc::truncate(path.as_ptr(), len) }).map(drop)
}

fn statvfs(path: &Path) -> libc::statvfs {
    let path = c_path(path);
    // SAFETY: statvfs is plain old data, and is fully written on success.
    let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a writable statvfs.
    cvt(unsafe { libc::statvfs(path.as_ptr(), &mut out) }).expect("statvfs");
    out
}

/// `utimensat` with explicit `(seconds, nanoseconds)` or `UTIME_NOW` / `UTIME_OMIT` in the
/// nanoseconds.
fn utimensat(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let path = c_path(path);
    let spec = |(sec, nsec): (i64, i64)| libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    let times = [spec(atime), spec(mtime)];
    // SAFETY: a valid C string and an array of two timespecs.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).expect("lstat").mode() & 0o7777
}

fn system_time(sec: u64, nsec: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(sec, nsec)
}

fn epoch_seconds_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A shared memory mapping of the start of a file, unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(file: &File, len: usize, writable: bool) -> io::Result<Mapping> {
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a new shared mapping of an open descriptor; MAP_FAILED is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, and `&mut self` makes this the only view (mapped writable).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast(), self.len) }
    }

    fn sync(&self) -> io::Result<()> {
        // SAFETY: the range is exactly this live mapping.
        cvt(unsafe { libc::msync(self.ptr, self.len, libc::MS_SYNC) }).map(drop)
    }

    /// How many of the mapped file's pages the page cache holds (touching none of them).
    fn resident_pages(&self) -> usize {
        let page = page_size();
        let mut resident = vec![0u8; self.len.div_ceil(page)];
        // SAFETY: the range is exactly this live mapping; `resident` has a byte per page.
        cvt(unsafe { libc::mincore(self.ptr, self.len, resident.as_mut_ptr()) }).expect("mincore");
        resident.iter().filter(|r| *r & 1 != 0).count()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; no slice of it outlives `self`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

// ---------------------------------------------------------------------------------------------
// A tree of every kind of object, and a comparable snapshot of a tree
// ---------------------------------------------------------------------------------------------

const BIG_LEN: usize = 3 * MIB as usize + 12_345;
const SPARSE_TAIL_AT: u64 = 5 * MIB;

/// Fills `root` with directories, files (small, multi-block, empty, sparse), a hard link, a
/// symlink, a FIFO, xattrs, modes, owners and explicit times. Returns the number of regular
/// files and their total size.
fn populate(root: &Path) -> (u64, u64) {
    let docs = root.join("docs");
    fs::create_dir_all(docs.join("nested/deep")).expect("mkdir -p");
    let readme = docs.join("readme.txt");
    fs::write(&readme, b"cloudfs keeps this\n").expect("write readme");
    let big = docs.join("nested/big.bin");
    fs::write(&big, pattern(7, BIG_LEN)).expect("write big.bin");
    let empty = root.join("empty");
    File::create(&empty).expect("create empty");
    File::create(root.join("sparse"))
        .and_then(|f| f.write_all_at(b"tail", SPARSE_TAIL_AT))
        .expect("write sparse");
    fs::hard_link(&readme, docs.join("readme-link.txt")).expect("link");
    std::os::unix::fs::symlink("docs/nested/big.bin", root.join("latest")).expect("symlink");
    mkfifo(&docs.join("pipe"), 0o640).expect("mkfifo");
    set_xattr(&big, "user.origin", b"persistence\0test", 0).expect("setxattr on a file");
    set_xattr(&docs, "user.dir", b"yes", 0).expect("setxattr on a directory");
    std::os::unix::fs::chown(&empty, Some(1000), Some(1001)).expect("chown");
    set_mode(&readme, 0o600);
    set_mode(&docs, 0o750);
    utimensat(&big, (1_500_000_000, 111), (1_600_000_000, 222)).expect("utimensat");
    let readme_len = fs::metadata(&readme).expect("stat readme").len();
    (4, readme_len + BIG_LEN as u64 + SPARSE_TAIL_AT + 4)
}

/// Everything observable about one path.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    size: u64,
    mtime: (i64, i64),
    atime: (i64, i64),
    /// BLAKE3 of a regular file's bytes.
    content: Option<String>,
    target: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("directory entry").path();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let kind = meta.file_type();
            let xattrs = if kind.is_file() || kind.is_dir() {
                list_xattr(&path)
                    .expect("listxattr")
                    .into_iter()
                    .map(|name| {
                        let value = get_xattr(&path, &name).expect("getxattr");
                        (name, value)
                    })
                    .collect()
            } else {
                BTreeMap::new()
            };
            let node = Node {
                ino: meta.ino(),
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                nlink: meta.nlink(),
                size: meta.len(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                atime: (meta.atime(), meta.atime_nsec()),
                content: kind.is_file().then(|| {
                    blake3::hash(&fs::read(&path).expect("read"))
                        .to_hex()
                        .to_string()
                }),
                target: kind
                    .is_symlink()
                    .then(|| fs::read_link(&path).expect("readlink")),
                xattrs,
            };
            if kind.is_dir() {
                walk(root, &path, out);
            }
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            out.insert(rel, node);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// POSIX operations
// ---------------------------------------------------------------------------------------------

#[test]
fn open_flags_offsets_and_truncate() {
    let mut h = Harness::new();
    h.mount(&[]);
    let path = h.at("file.txt");

    File::create(&path)
        .and_then(|mut f| f.write_all(b"hello world"))
        .expect("create + write");
    assert_content(&path, b"hello world");
    assert_eq!(fs::metadata(&path).expect("stat").len(), 11);
    assert_errno(
        OpenOptions::new().write(true).create_new(true).open(&path),
        libc::EEXIST,
        "O_CREAT|O_EXCL on an existing file",
    );
    assert_errno(
        File::open(h.at("missing")),
        libc::ENOENT,
        "open of a missing file",
    );
    assert_errno(
        OpenOptions::new().write(true).open(h.mnt()),
        libc::EISDIR,
        "opening a directory for writing",
    );

    let mut kept = String::new();
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .and_then(|mut f| f.read_to_string(&mut kept))
        .expect("O_CREAT on an existing file");
    assert_eq!(
        kept, "hello world",
        "O_CREAT without O_TRUNC keeps the content"
    );

    OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(b", again"))
        .expect("O_APPEND");
    assert_content(&path, b"hello world, again");

    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("O_TRUNC");
    assert_eq!(f.metadata().expect("fstat").len(), 0, "O_TRUNC empties");
    f.write_all(b"fresh").expect("write after O_TRUNC");
    drop(f);
    assert_content(&path, b"fresh");

    // pwrite/pread across 64 KiB block boundaries, leaving a hole at the front.
    let path = h.at("offsets.bin");
    let data = pattern(1, 300_000);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create offsets.bin");
    f.write_all_at(&data, 100_000).expect("pwrite at 100000");
    f.write_all_at(b"head", 0).expect("pwrite at 0");
    f.write_all_at(b"PATCH", 200_000).expect("pwrite over data");
    let mut want = vec![0u8; 400_000];
    want[..4].copy_from_slice(b"head");
    want[100_000..].copy_from_slice(&data);
    want[200_000..200_005].copy_from_slice(b"PATCH");
    assert_eq!(f.metadata().expect("fstat").len(), 400_000);
    assert_same(
        &read_at(&f, 165_000, 1000),
        &want[165_000..166_000],
        "pread",
    );
    assert_zeros(&read_at(&f, 4, 99_996), "the hole before the data");
    drop(f);
    assert_content(&path, &want);

    // Cut inside a block, grow again: the cut-off bytes come back as zeros.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("reopen");
    f.set_len(150_000).expect("truncate down");
    assert_eq!(f.metadata().expect("fstat").len(), 150_000);
    f.set_len(250_000).expect("truncate up");
    want.truncate(150_000);
    want.resize(250_000, 0);
    assert_same(&read_at(&f, 0, 250_000), &want, "after cut and grow");
    f.write_all_at(b"end", 249_997)
        .expect("write after truncate");
    want[249_997..].copy_from_slice(b"end");
    drop(f);
    assert_content(&path, &want);
    truncate(&path, 70_000).expect("truncate(2) by path");
    want.truncate(70_000);
    assert_content(&path, &want);

    // The same on one descriptor whose writes are not flushed yet.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("reopen");
    let tail = pattern(2, 100_000);
    f.write_all_at(&tail, 70_000).expect("append with pwrite");
    f.set_len(120_000).expect("cut unflushed data");
    f.set_len(180_000).expect("grow again");
    want.extend_from_slice(&tail[..50_000]);
    want.resize(180_000, 0);
    assert_same(
        &read_at(&f, 0, 180_000),
        &want,
        "cut and grow of unflushed data",
    );
    drop(f);
    assert_content(&path, &want);
}

#[test]
fn directories_and_renames() {
    let mut h = Harness::new();
    h.mount(&[]);
    let p = |rel: &str| h.at(rel);

    fs::create_dir_all(p("a/b")).expect("mkdir a/b");
    fs::write(p("a/b/f"), b"file f").expect("create a/b/f");
    assert_eq!(
        fs::metadata(p("a")).expect("stat").nlink(),
        3,
        "a: ., .. and b/.."
    );
    assert_errno(
        fs::create_dir(p("a")),
        libc::EEXIST,
        "mkdir of an existing name",
    );
    assert_errno(
        fs::remove_dir(p("a")),
        libc::ENOTEMPTY,
        "rmdir of a non-empty dir",
    );
    assert_errno(fs::remove_dir(p("a/b/f")), libc::ENOTDIR, "rmdir of a file");
    assert_errno(
        fs::remove_file(p("a")),
        libc::EISDIR,
        "unlink of a directory",
    );
    assert_errno(
        File::create(p("a/b/f/x")),
        libc::ENOTDIR,
        "file under a file",
    );
    assert_eq!(names(&p("a")), ["b"]);
    assert_errno(
        File::create(p(&"n".repeat(256))),
        libc::ENAMETOOLONG,
        "a 256-byte name",
    );
    File::create(p(&"n".repeat(255))).expect("a 255-byte name");
    fs::remove_file(p(&"n".repeat(255))).expect("unlink the 255-byte name");

    // Files: plain rename, then replacing an existing file (which keeps the source inode).
    fs::rename(p("a/b/f"), p("a/g")).expect("rename a file");
    assert_errno(
        fs::metadata(p("a/b/f")),
        libc::ENOENT,
        "old name after rename",
    );
    assert_content(&p("a/g"), b"file f");
    fs::write(p("a/h"), b"old h").expect("create a/h");
    let g_ino = fs::metadata(p("a/g")).expect("stat g").ino();
    fs::rename(p("a/g"), p("a/h")).expect("rename over an existing file");
    assert_content(&p("a/h"), b"file f");
    assert_eq!(fs::metadata(p("a/h")).expect("stat h").ino(), g_ino);
    assert_eq!(names(&p("a")), ["b", "h"]);

    // Directories: rename in place, then move under another directory with its contents.
    fs::rename(p("a/b"), p("a/c")).expect("rename a directory");
    fs::write(p("a/c/inner"), b"inner").expect("create a/c/inner");
    fs::create_dir(p("d")).expect("mkdir d");
    fs::rename(p("a/c"), p("d/c")).expect("move a directory under another");
    assert_content(&p("d/c/inner"), b"inner");
    assert_eq!(fs::metadata(p("a")).expect("stat a").nlink(), 2);
    assert_eq!(fs::metadata(p("d")).expect("stat d").nlink(), 3);
    assert_errno(
        fs::rename(p("d"), p("d/c/x")),
        libc::EINVAL,
        "moving a directory into its own subdirectory",
    );
    fs::create_dir_all(p("e/x")).expect("mkdir e/x");
    assert_errno(
        fs::rename(p("d/c"), p("e")),
        libc::ENOTEMPTY,
        "dir over non-empty dir",
    );
    assert_errno(
        fs::rename(p("d/c"), p("a/h")),
        libc::ENOTDIR,
        "dir over a file",
    );
    assert_errno(
        fs::rename(p("a/h"), p("e")),
        libc::EISDIR,
        "file over a dir",
    );
    fs::create_dir(p("empty")).expect("mkdir empty");
    fs::rename(p("e"), p("empty")).expect("dir over an empty dir");
    assert!(
        p("empty/x").is_dir(),
        "the moved directory keeps its contents"
    );
    assert_errno(
        fs::metadata(p("e")),
        libc::ENOENT,
        "old name of a moved dir",
    );

    // renameat2: RENAME_NOREPLACE and RENAME_EXCHANGE.
    fs::write(p("p"), b"P").expect("create p");
    fs::write(p("q"), b"Q").expect("create q");
    assert_errno(
        renameat2(&p("p"), &p("q"), libc::RENAME_NOREPLACE),
        libc::EEXIST,
        "RENAME_NOREPLACE onto an existing name",
    );
    assert_content(&p("p"), b"P");
    assert_content(&p("q"), b"Q");
    renameat2(&p("p"), &p("r"), libc::RENAME_NOREPLACE).expect("RENAME_NOREPLACE to a new name");
    renameat2(&p("r"), &p("q"), libc::RENAME_EXCHANGE).expect("RENAME_EXCHANGE of two files");
    assert_content(&p("r"), b"Q");
    assert_content(&p("q"), b"P");
    renameat2(&p("q"), &p("d"), libc::RENAME_EXCHANGE).expect("RENAME_EXCHANGE file <-> dir");
    assert_content(&p("d"), b"P");
    assert_content(&p("q/c/inner"), b"inner");
    assert_errno(
        renameat2(&p("r"), &p("nothing"), libc::RENAME_EXCHANGE),
        libc::ENOENT,
        "RENAME_EXCHANGE with a missing target",
    );

    fs::remove_dir_all(p("q")).expect("rm -r q");
    fs::remove_dir_all(p("empty")).expect("rm -r empty");
    for file in ["a/h", "d", "r"] {
        fs::remove_file(p(file)).expect("unlink");
    }
    fs::remove_dir(p("a")).expect("rmdir a");
    assert_eq!(names(&h.mnt()), Vec::<String>::new(), "everything removed");
}

#[test]
fn links_symlinks_modes_owners_and_times() {
    let mut h = Harness::new();
    h.mount(&[]);
    let (orig, alias) = (h.at("orig"), h.at("alias"));

    fs::write(&orig, b"data").expect("create orig");
    fs::hard_link(&orig, &alias).expect("link");
    let (m1, m2) = (
        fs::metadata(&orig).expect("stat"),
        fs::metadata(&alias).expect("stat"),
    );
    assert_eq!((m1.nlink(), m2.nlink()), (2, 2));
    assert_eq!(m1.ino(), m2.ino(), "a hard link is the same inode");
    OpenOptions::new()
        .append(true)
        .open(&alias)
        .and_then(|mut f| f.write_all(b" via alias"))
        .expect("write through the link");
    assert_content(&orig, b"data via alias");
    fs::remove_file(&orig).expect("unlink orig");
    assert_eq!(fs::metadata(&alias).expect("stat").nlink(), 1);
    assert_content(&alias, b"data via alias");
    let open = h.at("open-then-unlinked");
    let mut held = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&open)
        .expect("create");
    held.write_all(b"still here").expect("write");
    fs::remove_file(&open).expect("unlink an open file");
    assert_errno(
        fs::metadata(&open),
        libc::ENOENT,
        "stat of the unlinked name",
    );
    held.write_all(b", after unlink")
        .expect("write after unlink");
    assert_eq!(held.metadata().expect("fstat").nlink(), 0);
    assert_same(
        &read_at(&held, 0, 24),
        b"still here, after unlink",
        "read after unlink",
    );
    drop(held);
    fs::create_dir(h.at("dir")).expect("mkdir");
    assert_errno(
        fs::hard_link(&alias, &alias),
        libc::EEXIST,
        "link onto an existing name",
    );
    assert_errno(
        fs::hard_link(h.at("dir"), h.at("dirlink")),
        libc::EPERM,
        "link of a dir",
    );

    let sym = h.at("sym");
    std::os::unix::fs::symlink("alias", &sym).expect("symlink");
    assert_eq!(fs::read_link(&sym).expect("readlink"), Path::new("alias"));
    assert!(
        fs::symlink_metadata(&sym)
            .expect("lstat")
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::metadata(&sym).expect("stat through").ino(), m2.ino());
    assert_content(&sym, b"data via alias");
    let dangling = h.at("dangling");
    std::os::unix::fs::symlink("nowhere", &dangling).expect("dangling symlink");
    assert_eq!(
        fs::read_link(&dangling).expect("readlink"),
        Path::new("nowhere")
    );
    assert_errno(
        fs::metadata(&dangling),
        libc::ENOENT,
        "following a dangling symlink",
    );
    assert_errno(
        std::os::unix::fs::symlink("x", &sym),
        libc::EEXIST,
        "symlink onto an existing name",
    );

    std::os::unix::fs::chown(&alias, Some(1234), Some(5678)).expect("chown");
    let meta = fs::metadata(&alias).expect("stat");
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    set_mode(&alias, 0o640);
    assert_eq!(mode_of(&alias), 0o640);
    set_mode(&alias, 0o4755);
    assert_eq!(mode_of(&alias), 0o4755);
    set_mode(&h.at("dir"), 0o700);
    assert_eq!(mode_of(&h.at("dir")), 0o700);
    assert!(fs::metadata(h.at("dir")).expect("stat").is_dir());

    // Explicit times with nanoseconds, then UTIME_OMIT / UTIME_NOW.
    File::options()
        .write(true)
        .open(&alias)
        .and_then(|f| {
            f.set_times(
                FileTimes::new()
                    .set_accessed(system_time(1_500_000_000, 123_456_789))
                    .set_modified(system_time(1_600_000_000, 987_654_321)),
            )
        })
        .expect("futimens");
    let meta = fs::metadata(&alias).expect("stat");
    assert_eq!(
        (meta.atime(), meta.atime_nsec()),
        (1_500_000_000, 123_456_789)
    );
    assert_eq!(
        (meta.mtime(), meta.mtime_nsec()),
        (1_600_000_000, 987_654_321)
    );
    let before = epoch_seconds_now();
    utimensat(&alias, (0, libc::UTIME_OMIT), (0, libc::UTIME_NOW)).expect("utimensat");
    let meta = fs::metadata(&alias).expect("stat");
    assert_eq!(
        (meta.atime(), meta.atime_nsec()),
        (1_500_000_000, 123_456_789)
    );
    assert!(
        (before - 1..=epoch_seconds_now() + 1).contains(&meta.mtime()),
        "UTIME_NOW set mtime to {}",
        meta.mtime()
    );
    // An explicit mtime set on a descriptor with unflushed writes (cp -p, tar) is the last word.
    let mut f = OpenOptions::new().write(true).open(&alias).expect("open");
    f.write_all(b"copied").expect("write");
    f.set_times(FileTimes::new().set_modified(system_time(1_700_000_000, 42)))
        .expect("futimens after a write");
    drop(f);
    let meta = fs::metadata(&alias).expect("stat");
    assert_eq!((meta.mtime(), meta.mtime_nsec()), (1_700_000_000, 42));
    utimensat(&alias, (1_000, 5), (2_000, 6)).expect("utimensat explicit");
    fs::write(&alias, b"rewritten").expect("rewrite");
    let meta = fs::metadata(&alias).expect("stat");
    assert!(meta.mtime() >= before, "a write moves mtime to now");
    assert_eq!(meta.atime(), 1_000, "writing does not touch atime");
}

#[test]
fn statfs_xattrs_access_and_fifos() {
    let mut h = Harness::new();
    h.mount(&[]);

    let before = statvfs(&h.mnt());
    assert_eq!(before.f_namemax, 255);
    assert!(before.f_bsize > 0 && before.f_frsize > 0);
    assert!(before.f_blocks > 0 && before.f_bfree <= before.f_blocks);
    assert!(before.f_files > 0 && before.f_ffree <= before.f_files);
    fs::write(h.at("mib"), pattern(2, MIB as usize)).expect("write 1 MiB");
    let after = statvfs(&h.mnt());
    let used = |s: &libc::statvfs| (s.f_blocks - s.f_bfree) * s.f_frsize;
    assert!(
        used(&after) >= used(&before) + MIB,
        "statfs shows the new MiB as used"
    );
    assert!(
        after.f_ffree < before.f_ffree,
        "statfs counts the new inode"
    );

    let file = h.at("mib");
    assert_errno(
        get_xattr(&file, "user.color"),
        libc::ENODATA,
        "getxattr missing",
    );
    set_xattr(&file, "user.color", b"blue", 0).expect("setxattr");
    assert_eq!(get_xattr(&file, "user.color").expect("getxattr"), b"blue");
    assert_errno(
        set_xattr(&file, "user.color", b"green", libc::XATTR_CREATE),
        libc::EEXIST,
        "XATTR_CREATE of an existing attribute",
    );
    assert_errno(
        set_xattr(&file, "user.size", b"1", libc::XATTR_REPLACE),
        libc::ENODATA,
        "XATTR_REPLACE of a missing attribute",
    );
    set_xattr(&file, "user.color", b"red", libc::XATTR_REPLACE).expect("XATTR_REPLACE");
    set_xattr(&file, "user.size", b"\0\x01\xff", libc::XATTR_CREATE).expect("XATTR_CREATE");
    assert_eq!(get_xattr(&file, "user.color").expect("getxattr"), b"red");
    assert_eq!(
        get_xattr(&file, "user.size").expect("getxattr"),
        b"\0\x01\xff"
    );
    assert_errno(
        get_xattr_with(&file, "user.color", 2),
        libc::ERANGE,
        "getxattr into a too small buffer",
    );
    assert_eq!(
        list_xattr(&file).expect("listxattr"),
        BTreeSet::from(["user.color".into(), "user.size".into()])
    );
    remove_xattr(&file, "user.color").expect("removexattr");
    assert_errno(
        get_xattr(&file, "user.color"),
        libc::ENODATA,
        "getxattr removed",
    );
    assert_errno(
        remove_xattr(&file, "user.color"),
        libc::ENODATA,
        "removexattr twice",
    );
    assert_eq!(
        list_xattr(&file).expect("listxattr"),
        BTreeSet::from(["user.size".into()])
    );
    set_xattr(&h.mnt(), "user.on-root", b"dir", 0).expect("setxattr on a directory");
    assert_eq!(
        get_xattr(&h.mnt(), "user.on-root").expect("getxattr"),
        b"dir"
    );

    access(&file, libc::F_OK).expect("access F_OK");
    access(&file, libc::R_OK | libc::W_OK).expect("access R_OK|W_OK");
    assert_errno(
        access(&h.at("nope"), libc::F_OK),
        libc::ENOENT,
        "access missing",
    );
    set_mode(&file, 0o644);
    assert_errno(
        access(&file, libc::X_OK),
        libc::EACCES,
        "X_OK without any x bit",
    );
    set_mode(&file, 0o755);
    access(&file, libc::X_OK).expect("access X_OK");

    let fifo = h.at("pipe");
    mkfifo(&fifo, 0o600).expect("mkfifo");
    let meta = fs::symlink_metadata(&fifo).expect("lstat fifo");
    assert!(meta.file_type().is_fifo(), "mkfifo makes a FIFO");
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_errno(
        mkfifo(&fifo, 0o600),
        libc::EEXIST,
        "mkfifo of an existing name",
    );
    let mut pipe = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open the FIFO");
    pipe.write_all(b"through the pipe")
        .expect("write to the FIFO");
    let mut buf = [0u8; 16];
    pipe.read_exact(&mut buf).expect("read from the FIFO");
    assert_eq!(&buf, b"through the pipe");
}

#[test]
fn readdir_of_ten_thousand_files() {
    const COUNT: usize = 10_000;
    let mut h = Harness::new();
    h.mount(&[]);
    let dir = h.at("many");
    fs::create_dir(&dir).expect("mkdir");
    let name = |i: usize| format!("f{i:05}");
    let want: BTreeSet<String> = (0..COUNT).map(name).collect();
    for (i, n) in want.iter().enumerate() {
        let mut f = File::create(dir.join(n)).expect("create");
        if i % 1000 == 7 {
            f.write_all(n.as_bytes()).expect("write");
        }
    }
    let listed = names(&dir);
    assert_eq!(listed.len(), COUNT, "readdir lists each file exactly once");
    assert!(
        listed.iter().eq(want.iter()),
        "readdir lists exactly the created names"
    );
    for i in [0, 7, 4007, 9999] {
        let meta = fs::metadata(dir.join(name(i))).expect("stat");
        assert!(meta.is_file());
        assert_eq!(meta.len(), if i % 1000 == 7 { 6 } else { 0 });
    }
    assert_content(&dir.join(name(4007)), b"f04007");
    for n in &want {
        fs::remove_file(dir.join(n)).expect("unlink");
    }
    assert!(names(&dir).is_empty(), "all deleted");
    fs::remove_dir(&dir).expect("rmdir of the emptied dir");
}

#[test]
fn sparse_ten_gib_file() {
    const SIZE: u64 = 10 * GIB;
    let mut h = Harness::with_block_size("1MiB");
    h.mount(&[]);
    let path = h.at("sparse.img");
    // 15 writes spread over the file at unaligned offsets, and one that ends exactly at 10 GiB.
    let mut regions: Vec<(u64, Vec<u8>)> = (0..15u64)
        .map(|i| {
            (
                i * (SIZE / 16) + i * 12_345,
                pattern(100 + i, 3000 + i as usize * 100),
            )
        })
        .collect();
    regions.push((SIZE - 4 * KIB, pattern(200, 4 * KIB as usize)));

    let f = File::create(&path).expect("create");
    for (offset, data) in &regions {
        f.write_all_at(data, *offset).expect("scattered pwrite");
    }
    drop(f);

    let f = File::open(&path).expect("reopen");
    assert_eq!(f.metadata().expect("fstat").len(), SIZE);
    for (offset, data) in &regions {
        assert_same(
            &read_at(&f, *offset, data.len()),
            data,
            "a scattered region",
        );
    }
    for pair in regions.windows(2) {
        let ((start, data), (next, _)) = (&pair[0], &pair[1]);
        let end = start + data.len() as u64;
        assert_zeros(&read_at(&f, end, 512), "just after a region");
        assert_zeros(&read_at(&f, next - 512, 512), "just before a region");
        assert_zeros(
            &read_at(&f, (end + next) / 2, 64 * KIB as usize),
            "between regions",
        );
    }
    let mut tail = [0u8; 16];
    assert_eq!(f.read_at(&mut tail, SIZE).expect("read at EOF"), 0);
}

#[test]
fn mmap_writes_and_reads() {
    let mut h = Harness::new();
    h.mount(&[]);
    let open_rw = |path: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .expect("open read-write")
    };

    // Write a whole new file through a shared mapping.
    let path = h.at("mapped.bin");
    let mut want = pattern(11, 300_000);
    let file = open_rw(&path);
    file.set_len(want.len() as u64).expect("size the file");
    let mut map = Mapping::new(&file, want.len(), true).expect("mmap read-write");
    map.bytes_mut().copy_from_slice(&want);
    map.sync().expect("msync");
    drop(map);
    drop(file);
    assert_content(&path, &want);

    // Patch the middle of an existing file through a mapping.
    let file = open_rw(&path);
    let mut map = Mapping::new(&file, want.len(), true).expect("mmap read-write");
    map.bytes_mut()[70_000..70_010].copy_from_slice(b"0123456789");
    map.sync().expect("msync");
    drop(map);
    drop(file);
    want[70_000..70_010].copy_from_slice(b"0123456789");
    assert_content(&path, &want);

    // Read a file written with write(2) through a mapping.
    let path = h.at("source.bin");
    let data = pattern(12, 200_000);
    fs::write(&path, &data).expect("write source");
    let file = File::open(&path).expect("open");
    let map = Mapping::new(&file, data.len(), false).expect("mmap read-only");
    assert_same(map.bytes(), &data, "read through a mapping");
}

/// Ends every request of the FUSE connection serving `mnt` (a forced unmount aborts it, even
/// when it then fails as busy): the way out of a hang that would otherwise outlive the test,
/// since a killed server does not end writeback its own threads wait for. A system call, not
/// `umount -f`: a process hung in a page fault cannot fork.
fn abort_fuse_connection(mnt: &Path) {
    let mnt = CString::new(mnt.as_os_str().as_bytes()).expect("mountpoint without NUL");
    // SAFETY: a NUL-terminated path that lives through the call.
    unsafe { libc::umount2(mnt.as_ptr(), libc::MNT_FORCE) };
}

/// A mapping of a file created read-write (a handle that bypasses the page cache) is written
/// back while another handle has the file open: the writeback of the mapping's pages must not
/// wait for those very pages (it did once, forever; the writer's page faults hung with it).
#[test]
fn a_mapping_of_a_new_file_is_written_back_while_another_handle_has_it_open() {
    const LEN: usize = 256 << 10;
    let mut h = Harness::new();
    h.mount(&[]);
    let path = h.at("mapped-new.bin");
    let want = pattern(41, LEN);
    let (done, finished) = std::sync::mpsc::channel();
    let (writer_path, writer_want) = (path.clone(), want.clone());
    // In a thread of its own, so that a hang is noticed and ended.
    std::thread::spawn(move || {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&writer_path)
            .expect("create read-write");
        file.set_len(LEN as u64).expect("size the file");
        let other = File::open(&writer_path).expect("open for reading");
        let mut map = Mapping::new(&file, LEN, true).expect("mmap read-write");
        map.bytes_mut().copy_from_slice(&writer_want);
        let synced = map.sync();
        let _ = done.send((synced, read_at(&other, 0, LEN)));
    });
    match finished.recv_timeout(Duration::from_secs(60)) {
        Ok((synced, read)) => {
            synced.expect("msync");
            assert_same(&read, &want, "read through the other handle");
        }
        Err(_) => {
            abort_fuse_connection(&h.mnt());
            panic!("writing through the mapping hung");
        }
    }
    assert_content(&path, &want);
}

/// What a write-only handle writes reaches a reader that holds the file open and re-reads
/// it between the writes (its pages cached), and a mapping of the file, and moves the size:
/// the page cache must not keep stale bytes, as a tailing reader of a log would see.
#[test]
fn writes_reach_readers_holding_the_file_open_with_pages_cached() {
    let mut h = Harness::new();
    h.mount(&[]);
    let path = h.at("shared.bin");
    let mut want = pattern(21, 100_000);
    fs::write(&path, &want).expect("write");
    let reader = File::open(&path).expect("open for reading");
    let map = Mapping::new(&reader, want.len(), false).expect("mmap read-only");
    let writer = OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open write-only");
    let mut appender = OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open to append");
    assert_same(&read_at(&reader, 0, want.len()), &want, "first read");

    writer
        .write_all_at(b"overwritten", 50_000)
        .expect("overwrite");
    want[50_000..50_011].copy_from_slice(b"overwritten");
    assert_same(
        &read_at(&reader, 0, want.len()),
        &want,
        "after an overwrite",
    );
    assert_same(
        &map.bytes()[49_990..50_020],
        &want[49_990..50_020],
        "the mapping",
    );

    // Appends into the cached last, partial page, read as they come.
    for piece in [&b"log line one\n"[..], b"two\n", b"three\n"] {
        appender.write_all(piece).expect("append");
        want.extend_from_slice(piece);
        assert_eq!(reader.metadata().expect("fstat").len(), want.len() as u64);
        assert_same(&read_at(&reader, 0, want.len()), &want, "after an append");
    }
    drop((writer, appender, map));
    assert_content(&path, &want);
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size")
}

/// Whether this kernel maps files opened with direct I/O coherently (Linux 6.9): cloudfs
/// bypasses the page cache only then.
fn kernel_maps_direct_io_files() -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (6, 9)
}

#[test]
fn writes_that_start_a_file_bypass_the_page_cache_and_updates_in_place_keep_it() {
    const LEN: usize = 1 << 20;
    let mut h = Harness::new();
    h.mount(&[]);
    let path = h.at("pages.bin");
    fs::write(&path, pattern(31, LEN)).expect("write");
    // Opened before the writers: its mapping shows what they leave in the page cache.
    let observer = File::open(&path).expect("open for reading");
    let map = Mapping::new(&observer, LEN, false).expect("mmap");

    let data = pattern(32, LEN);
    let mut writer = File::create(&path).expect("open write-only, truncating");
    writer.write_all(&data).expect("write");
    let bypassed = map.resident_pages();
    drop(writer);
    let updater = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open read-write");
    updater.write_all_at(&data, 0).expect("write in place");
    assert_same(&read_at(&updater, 0, LEN), &data, "read back in place");
    let cached = map.resident_pages();
    let all = LEN / page_size();
    if kernel_maps_direct_io_files() {
        assert_eq!(bypassed, 0, "pages cached by a write-only handle");
    } else {
        assert_eq!(
            bypassed, all,
            "pages cached by a write-only handle (old kernel)"
        );
    }
    assert_eq!(
        cached, all,
        "pages cached by a read-write handle on a full file"
    );
    assert_same(map.bytes(), &data, "the mapping");
    drop((updater, map, observer));
    assert_content(&path, &data);
}

/// What the kernel cached of a file outlives closing it: a later open reads it without a
/// request. A rollback drops it: later opens, and a handle and a mapping open across it,
/// read the restored bytes. (The later open alone does not tell the two mechanisms apart:
/// the background drop for open handles is usually done by then.)
#[test]
fn cached_pages_outlive_a_close_but_not_a_rollback() {
    const LEN: usize = 1 << 20;
    let mut h = Harness::new();
    let store = h.store_url();
    h.mount(&["--sync-interval", "3600"]);
    let (path, other) = (h.at("kept.bin"), h.at("other.bin"));
    let (old, new) = (pattern(41, LEN), pattern(42, LEN));
    fs::write(&path, &old).expect("write");
    fs::write(&other, &old).expect("write");
    h.cloudfs_ok(&["snapshot", "create", &store, VOLUME, "old"]);
    fs::write(&path, &new).expect("overwrite");
    fs::write(&other, &new).expect("overwrite");
    // Read through the page cache, then closed.
    assert_content(&path, &new);
    assert_content(&other, &new);
    let kept = File::open(&path).expect("open again");
    let map = Mapping::new(&kept, LEN, false).expect("mmap");
    assert_eq!(
        map.resident_pages(),
        LEN / page_size(),
        "pages an earlier reader cached, after another open"
    );
    assert_same(map.bytes(), &new, "the mapping before the rollback");

    h.cloudfs_ok(&["rollback", &store, VOLUME, "old"]);
    assert_content(&other, &old);
    // The pages of open files are dropped just after the rollback answers.
    wait_for("the rolled-back bytes through a handle kept open", || {
        (read_at(&kept, 0, LEN) == old).then_some(())
    });
    assert_same(map.bytes(), &old, "the mapping after the rollback");
    assert_content(&path, &old);
}

/// The kernel drops a direct write's range before the write, but a reader may cache the old
/// bytes again while it is on its way and close: the next open then drops the file's pages
/// instead of keeping them.
#[test]
fn an_open_after_a_direct_write_does_not_keep_the_pages() {
    const LEN: usize = 1 << 20;
    let mut h = Harness::new();
    h.mount(&[]);
    let path = h.at("written.bin");
    let data = pattern(43, LEN);
    fs::write(&path, &data).expect("write");
    let writer = OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open write-only");
    assert_content(&path, &data); // cached, after the writer's open
    writer.write_all_at(b"direct", 0).expect("write directly");
    let reader = File::open(&path).expect("open to read");
    let map = Mapping::new(&reader, LEN, false).expect("mmap");
    let all = LEN / page_size();
    if kernel_maps_direct_io_files() {
        assert_eq!(map.resident_pages(), 0, "pages kept past a direct write");
    } else {
        assert_eq!(
            map.resident_pages(),
            all,
            "pages (old kernel: no direct writes)"
        );
    }
    let mut want = data;
    want[..6].copy_from_slice(b"direct");
    assert_same(map.bytes(), &want, "the mapping");
    drop((map, reader));
    let again = File::open(&path).expect("open once more");
    let map = Mapping::new(&again, LEN, false).expect("mmap");
    assert_eq!(map.resident_pages(), all, "pages kept again");
}

/// How many `op` requests the mount serving metrics at `socket` answered so far.
fn served(socket: &Path, op: &str) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let exposition = rt
        .block_on(cloudfs_metrics::scrape(socket, Duration::from_secs(10)))
        .expect("scrape the mount's metrics");
    exposition
        .lines()
        .filter(|line| {
            line.starts_with("cloudfs_fs_operation_duration_seconds_count{")
                && line.contains(&format!("op=\"{op}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// No `close` waits for a flush request, whatever the handle was opened for: the release
/// that follows has the writes recorded in the background instead (their block, which only
/// that flush uploads, reaches the store with neither `fsync` nor unmount), and what was
/// written and closed reads back at once, from this mount and from a fresh one after an
/// unmount.
#[test]
fn no_close_waits_for_a_flush() {
    let mut h = Harness::new();
    let socket = h.root().join("metrics.sock");
    h.mount(&["--metrics", &format!("unix:{}", utf8(&socket))]);
    let (flushes, releases) = (served(&socket, "flush"), served(&socket, "release"));
    fs::write(h.at("f"), b"read many times").expect("write");
    for _ in 0..20 {
        assert_content(&h.at("f"), b"read many times");
    }
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(h.at("f"))
        .expect("open read-write");
    f.write_all(b"READ").expect("overwrite");
    drop(f);
    assert_content(&h.at("f"), b"READ many times");
    assert_eq!(served(&socket, "flush"), flushes, "flush requests");
    wait_for("every handle released", || {
        (served(&socket, "release") >= releases + 23).then_some(())
    });
    let block = block_key(&hash_block(b"READ many times"));
    wait_for("the written block stored", || {
        h.object_keys("blocks/").contains(&block).then_some(())
    });
    h.umount();
    h.mount(&[]);
    assert_content(&h.at("f"), b"READ many times");
}

/// Whether the kernel can be told to look a name up again without dropping it (Linux 6.2 on),
/// which lets a writable mount have it keep names and attributes for long (see `fuse.rs`).
fn kernel_expires_names() -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    version >= (6, 2)
}

/// A writable mount is its volume's only writer, so the kernel keeps the names and attributes
/// it was told (where it can be told of a rollback, see above) and asks for them no more;
/// a subtree copy, which the kernel does not see, shows in its parent's attributes at once.
#[test]
fn the_kernel_keeps_names_and_attributes_of_a_writable_mount() {
    const FILES: u64 = 50;
    let mut h = Harness::new();
    let socket = h.root().join("metrics.sock");
    h.mount(&["--metrics", &format!("unix:{}", utf8(&socket))]);
    fs::create_dir(h.at("d")).expect("mkdir");
    for i in 0..FILES {
        fs::write(h.at(&format!("d/f{i}")), b"cached").expect("write");
    }
    let stat_all = || {
        for i in 0..FILES {
            let meta = fs::metadata(h.at(&format!("d/f{i}"))).expect("stat");
            assert_eq!(meta.len(), 6);
        }
    };
    stat_all();
    // Past the second that a kernel which cannot be told of a rollback trusts them.
    std::thread::sleep(Duration::from_millis(1500));
    let asked = || served(&socket, "lookup") + served(&socket, "getattr");
    let before = asked();
    stat_all();
    if kernel_expires_names() {
        assert_eq!(asked(), before, "names and attributes asked for again");
    } else {
        assert!(asked() >= before + FILES, "names kept past a second");
    }

    let links = fs::metadata(h.mnt()).expect("stat the root").nlink();
    h.cloudfs_ok(&["snapshot", "tree", utf8(&h.at("d")), utf8(&h.at("copy"))]);
    assert_eq!(
        fs::metadata(h.mnt()).expect("stat the root").nlink(),
        links + 1,
        "the copy's parent, at once"
    );
    assert_eq!(
        fs::metadata(h.at("copy/f7")).expect("stat the copy").len(),
        6
    );
}

#[test]
fn concurrent_writers() {
    const WRITERS: u64 = 8;
    const LEN: usize = 8 * MIB as usize;
    let mut h = Harness::with_block_size("8MiB");
    h.mount(&[]);
    let path = |i: u64| h.at(&format!("writer-{i}.bin"));
    std::thread::scope(|scope| {
        for i in 0..WRITERS {
            let path = path(i);
            scope.spawn(move || {
                let data = pattern(1000 + i, LEN);
                let mut f = File::create(&path).expect("create");
                for chunk in data.chunks(MIB as usize) {
                    f.write_all(chunk).expect("write");
                }
            });
        }
    });
    for i in 0..WRITERS {
        assert_content(&path(i), &pattern(1000 + i, LEN));
    }
}

// ---------------------------------------------------------------------------------------------
// Persistence, read-only mounts, the CLI, crashes
// ---------------------------------------------------------------------------------------------

#[test]
fn everything_persists_through_a_remount_from_the_store() {
    let mut h = Harness::with_block_size("1MiB");
    h.mount(&[]);
    let (files, bytes) = populate(&h.mnt());
    let before = snapshot(&h.mnt());
    h.umount();

    h.mount(&[]);
    let after = snapshot(&h.mnt());
    assert_eq!(
        after, before,
        "the tree after a remount from the store alone"
    );
    assert_content(&h.at("docs/nested/big.bin"), &pattern(7, BIG_LEN));
    h.umount();

    h.fsck_is_clean();
    let stat = h.stat();
    assert_eq!(stat["files"], files, "cloudfs stat: files ({stat})");
    assert_eq!(
        stat["logical_bytes"], bytes,
        "cloudfs stat: logical bytes ({stat})"
    );
}

#[test]
fn read_only_mount_serves_reads_and_refuses_writes() {
    let mut h = Harness::new();
    h.mount(&[]);
    populate(&h.mnt());
    let before = snapshot(&h.mnt());
    h.umount();

    h.mount(&["--read-only"]);
    assert_eq!(
        snapshot(&h.mnt()),
        before,
        "a read-only mount shows the volume"
    );
    let readme = h.at("docs/readme.txt");
    assert_content(&readme, b"cloudfs keeps this\n");
    let erofs = libc::EROFS;
    assert_errno(File::create(h.at("new")), erofs, "create");
    assert_errno(
        OpenOptions::new().write(true).open(&readme),
        erofs,
        "open for write",
    );
    assert_errno(fs::create_dir(h.at("newdir")), erofs, "mkdir");
    assert_errno(fs::remove_file(&readme), erofs, "unlink");
    assert_errno(fs::rename(&readme, h.at("moved")), erofs, "rename");
    assert_errno(
        std::os::unix::fs::symlink("x", h.at("newlink")),
        erofs,
        "symlink",
    );
    assert_errno(
        fs::set_permissions(&readme, fs::Permissions::from_mode(0o644)),
        erofs,
        "chmod",
    );
    assert_errno(truncate(&readme, 0), erofs, "truncate");
    assert_errno(set_xattr(&readme, "user.x", b"1", 0), erofs, "setxattr");
    assert_errno(access(&readme, libc::W_OK), erofs, "access W_OK");
    h.umount();
    h.fsck_is_clean();
}

/// Runs `cloudfs args`, which must fail with exactly one `cloudfs: ...` line on stderr that
/// mentions `needle`, and no panic or backtrace.
fn assert_cli_error(h: &Harness, args: &[&str], needle: &str) {
    let out = h.cloudfs(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "cloudfs {args:?} should fail");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "cloudfs {args:?}: one stderr line, got {stderr:?}"
    );
    assert!(
        lines[0].starts_with("cloudfs: ") && lines[0].contains(needle),
        "cloudfs {args:?}: expected a message mentioning {needle:?}, got {stderr:?}"
    );
    for noise in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(noise), "cloudfs {args:?}: {stderr:?}");
    }
}

#[test]
fn cli_errors_are_one_line_messages() {
    let mut h = Harness::new();
    let store = h.store_url();
    let root = h.root().to_path_buf();
    let (mnt_path, cache_path) = (h.mnt(), root.join("cache/cli"));
    let (mnt, cache) = (utf8(&mnt_path), utf8(&cache_path));
    let missing_mnt = root.join("no-such-dir");
    let missing_store = format!("file://{}", utf8(&root.join("no-such-store")));

    assert_cli_error(
        &h,
        &[
            "mount",
            &store,
            VOLUME,
            utf8(&missing_mnt),
            "--cache-dir",
            cache,
        ],
        "does not exist",
    );
    assert_cli_error(
        &h,
        &["mount", &store, "nosuchvol", mnt, "--cache-dir", cache],
        "volume nosuchvol does not exist",
    );
    assert!(
        !is_mountpoint(&h.mnt()),
        "a failed mount leaves nothing mounted"
    );
    assert_cli_error(&h, &["format", &store, VOLUME], "already exists");
    assert_cli_error(&h, &["format", &missing_store, "other"], "no-such-store");
    assert_cli_error(
        &h,
        &["mount", &missing_store, VOLUME, mnt, "--cache-dir", cache],
        "no-such-store",
    );
    assert_cli_error(
        &h,
        &["fsck", &store, "nosuchvol"],
        "volume nosuchvol does not exist",
    );
    assert_cli_error(&h, &["umount", mnt], "not a cloudfs mount");

    h.mount(&[]);
    assert_cli_error(
        &h,
        &["mount", &store, VOLUME, mnt, "--cache-dir", cache],
        "already a mountpoint",
    );
    fs::write(h.at("still-works"), b"yes").expect("the first mount still works");
    assert_content(&h.at("still-works"), b"yes");
}

/// A read-write mount of the harness's volume on another mountpoint fails, naming the holder.
fn assert_mount_refused(h: &Harness, name: &str) {
    let mnt = h.root().join(format!("mnt-{name}"));
    fs::create_dir_all(&mnt).expect("second mountpoint");
    let out = h.mount_at(&mnt, name, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second read-write mount succeeded");
    assert!(stderr.contains("mounted read-write by"), "{stderr}");
    assert!(!is_mountpoint(&mnt));
}

/// The size of crash-test file `i`: 64..256 KiB.
fn crash_len(i: u64) -> usize {
    (64 * KIB + (i * 37 * KIB) % (192 * KIB)) as usize
}

/// Writes crash-test files `0..200` into `dir` and fsyncs each, recording in `durable` the
/// ones whose fsync returned; stops at the first error (the mount dies under it).
fn write_fsynced_files(dir: &Path, durable: &Mutex<Vec<u64>>) {
    for i in 0..200 {
        let written = File::create(dir.join(format!("c{i:03}"))).and_then(|mut f| {
            f.write_all(&pattern(5000 + i, crash_len(i)))?;
            f.sync_all()
        });
        if written.is_err() {
            return;
        }
        durable.lock().expect("durable list").push(i);
    }
}

#[test]
fn fsynced_files_survive_kill_9() {
    let mut h = Harness::new();
    h.mount(&["--lease-ttl", "2"]);
    // While the volume is mounted read-write, a second read-write mount is refused.
    assert_mount_refused(&h, "second");
    let dir = h.at("crash");
    fs::create_dir(&dir).expect("mkdir");
    std::os::unix::fs::symlink("c000", dir.join("first")).expect("symlink");
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .expect("fsync of the directory");
    let durable = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (dir, durable) = (dir.clone(), durable.clone());
        std::thread::spawn(move || write_fsynced_files(&dir, &durable))
    };
    wait_for("20 fsynced files", || {
        (durable.lock().expect("durable list").len() >= 20 || writer.is_finished()).then_some(())
    });
    h.kill_mount();
    writer.join().expect("writer thread");
    let durable = durable.lock().expect("durable list").clone();
    assert!(
        durable.len() >= 20,
        "only {} files were fsynced",
        durable.len()
    );

    // The dead mount's lease holds the volume until its TTL has passed.
    assert_mount_refused(&h, "after-crash");
    std::thread::sleep(Duration::from_secs(3));
    h.mount(&[]);
    assert_eq!(
        fs::read_link(dir.join("first")).expect("the fsynced directory entry"),
        Path::new("c000")
    );
    for &i in &durable {
        assert_content(
            &dir.join(format!("c{i:03}")),
            &pattern(5000 + i, crash_len(i)),
        );
    }
    h.umount();
    h.fsck_is_clean();
}

#[test]
fn read_only_mounts_run_beside_the_writer_and_follow_it() {
    let mut h = Harness::new();
    h.mount(&[]);
    write_durably(&h, "before", b"published");
    write_durably(&h, "rewritten", b"version 1");
    write_durably(&h, "restamped", b"version 1");
    let stamp = fs::metadata(h.at("restamped"))
        .and_then(|m| m.modified())
        .expect("mtime");
    let reader = h.mount_extra(VOLUME, "ro", &["--read-only", "--sync-interval", "1"]);
    assert_content(&reader.mnt.join("before"), b"published");
    // Cached by the reader's kernel, which keeps them past the close.
    for _ in 0..2 {
        assert_content(&reader.mnt.join("rewritten"), b"version 1");
        assert_content(&reader.mnt.join("restamped"), b"version 1");
    }
    let kept = File::open(reader.mnt.join("rewritten")).expect("open on the reader");
    assert_errno(
        fs::write(reader.mnt.join("x"), b"no"),
        libc::EROFS,
        "write on the reader",
    );

    // The writer publishes more; the reader picks it up without a remount.
    fs::write(h.at("after"), b"followed").expect("write");
    fs::remove_file(h.at("before")).expect("unlink");
    fs::write(h.at("rewritten"), b"version 2").expect("rewrite, same size");
    // Same size, and the modification time set back: only the newer generation tells.
    let restamped = OpenOptions::new()
        .write(true)
        .open(h.at("restamped"))
        .expect("open");
    restamped.write_all_at(b"version 2", 0).expect("rewrite");
    restamped
        .set_times(FileTimes::new().set_modified(stamp))
        .expect("set the mtime back");
    drop(restamped);
    sync_root(&h);
    wait_for("the reader to follow the writer", || {
        (fs::read(reader.mnt.join("after")).ok()? == b"followed"
            && !reader.mnt.join("before").exists())
        .then_some(())
    });
    // Later opens drop the pages kept of the older generation; a handle open across it
    // notices the new modification time.
    wait_for("the reader to read the rewritten files anew", || {
        (fs::read(reader.mnt.join("rewritten")).ok()? == b"version 2"
            && fs::read(reader.mnt.join("restamped")).ok()? == b"version 2"
            && read_at(&kept, 0, 9) == b"version 2")
            .then_some(())
    });
    drop((kept, reader));
    h.umount();
}

#[test]
fn snapshots_mount_beside_the_writer_clone_and_roll_back_through_the_cli() {
    let mut h = Harness::new();
    let store = h.store_url();
    h.mount(&[]);
    write_durably(&h, "kept", b"before the snapshot");
    let created = h.cloudfs_ok(&["snapshot", "create", &store, VOLUME, "s1", "--json"]);
    let created: serde_json::Value = serde_json::from_str(&created).expect("JSON");
    assert_eq!(created["files"], 1);
    fs::write(h.at("kept"), b"after the snapshot").expect("rewrite");
    fs::write(h.at("later"), b"new").expect("write");

    {
        let pinned = h.mount_extra(VOLUME, "s1", &["--read-only", "--snapshot", "s1"]);
        assert_content(&pinned.mnt.join("kept"), b"before the snapshot");
        assert!(!pinned.mnt.join("later").exists());
        assert_errno(
            fs::write(pinned.mnt.join("x"), b"x"),
            libc::EROFS,
            "a write into a snapshot",
        );
    }
    let listed = h.cloudfs_ok(&["snapshot", "list", &store, VOLUME, "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");

    // From where its mount's socket is not (another run directory: as from another
    // machine), the mount is asked through the store: it snapshots its state of that
    // instant, and rolls back in place (in the store alone, its lease would refuse that).
    let elsewhere = h.root().join("elsewhere");
    let from_elsewhere = |args: &[&str]| -> String {
        let mut all = vec!["--run-dir", utf8(&elsewhere)];
        all.extend_from_slice(args);
        h.cloudfs_ok(&all)
    };
    fs::write(h.at("fresh"), b"just written").expect("write");
    let remote = from_elsewhere(&["snapshot", "create", &store, VOLUME, "s2", "--json"]);
    let remote: serde_json::Value = serde_json::from_str(&remote).expect("JSON");
    assert_eq!(remote["files"], 3, "kept, later and fresh: {remote}");
    from_elsewhere(&["rollback", &store, VOLUME, "s1"]);
    // The kernel may serve names and attributes it cached for up to a second.
    let holds = |name: &str, want: &[u8]| fs::read(h.at(name)).is_ok_and(|got| got == want);
    wait_for("the mount switched to s1", || {
        (!h.at("later").exists() && !h.at("fresh").exists())
            .then_some(())
            .filter(|()| holds("kept", b"before the snapshot"))
    });
    assert!(
        h.object_keys(&format!("volumes/{VOLUME}/control/"))
            .is_empty(),
        "the requests and replies are gone"
    );
    from_elsewhere(&["rollback", &store, VOLUME, "s2"]);
    wait_for("the mount switched to s2", || {
        (holds("fresh", b"just written") && holds("kept", b"after the snapshot")).then_some(())
    });
    h.umount();
    h.cloudfs_ok(&["clone", &store, &format!("{VOLUME}@s1"), "copy"]);
    let rolled = h.cloudfs_ok(&["rollback", &store, VOLUME, "s1", "--json"]);
    let rolled: serde_json::Value = serde_json::from_str(&rolled).expect("JSON");
    let previous = rolled["previous_state"]
        .as_str()
        .expect("previous state")
        .to_owned();

    h.mount(&[]);
    assert_content(&h.at("kept"), b"before the snapshot");
    assert!(!h.at("later").exists(), "rolled back");
    {
        let before = h.mount_extra(
            VOLUME,
            "previous",
            &["--read-only", "--snapshot", &previous],
        );
        assert_content(&before.mnt.join("later"), b"new");
    }
    {
        let clone = h.mount_extra("copy", "copy", &[]);
        assert_content(&clone.mnt.join("kept"), b"before the snapshot");
    }
    h.umount();
    h.fsck_is_clean();
    let volumes = |h: &Harness| -> serde_json::Value {
        serde_json::from_str(&h.cloudfs_ok(&["volume", "list", &store, "--json"])).expect("JSON")
    };
    assert_eq!(volumes(&h), serde_json::json!(["copy", VOLUME]));
    h.cloudfs_ok(&["volume", "delete", &store, "copy"]);
    assert_eq!(volumes(&h), serde_json::json!([VOLUME]));
}

#[test]
fn sealed_directories_refuse_changes_through_the_mount() {
    let mut h = Harness::new();
    h.mount(&[]);
    fs::create_dir_all(h.at("archive/2026/empty")).expect("mkdir");
    fs::write(h.at("archive/2026/report"), b"final").expect("write");
    set_xattr(&h.at("archive/2026/report"), "user.tag", b"v1", 0).expect("setxattr");
    fs::write(h.at("outside"), b"not sealed").expect("write");
    h.cloudfs_ok(&["seal", utf8(&h.at("archive"))]);
    let before = snapshot(&h.at("archive"));

    let report = h.at("archive/2026/report");
    let dir = h.at("archive/2026");
    let refusals: Vec<(&str, io::Result<()>)> = vec![
        ("overwrite", fs::write(&report, b"changed")),
        (
            "open for writing",
            fs::OpenOptions::new().write(true).open(&report).map(drop),
        ),
        (
            "append",
            fs::OpenOptions::new().append(true).open(&report).map(drop),
        ),
        ("create", fs::write(dir.join("new"), b"x")),
        ("mkdir", fs::create_dir(dir.join("sub"))),
        ("rmdir", fs::remove_dir(dir.join("empty"))),
        ("unlink", fs::remove_file(&report)),
        (
            "symlink",
            std::os::unix::fs::symlink("report", dir.join("link")),
        ),
        ("mkfifo", mkfifo(&dir.join("fifo"), 0o644)),
        ("link in", fs::hard_link(h.at("outside"), dir.join("in"))),
        ("link out", fs::hard_link(&report, h.at("out"))),
        ("rename out", fs::rename(&report, h.at("stolen"))),
        ("rename in", fs::rename(h.at("outside"), dir.join("in"))),
        ("rename within", fs::rename(&report, dir.join("moved"))),
        (
            "rename of the sealed directory",
            fs::rename(h.at("archive"), h.at("elsewhere")),
        ),
        ("truncate", truncate(&report, 1)),
        (
            "chmod",
            fs::set_permissions(&report, fs::Permissions::from_mode(0o777)),
        ),
        (
            "chown",
            std::os::unix::fs::chown(&report, Some(1000), Some(1000)),
        ),
        ("utimes", utimensat(&report, (1, 0), (1, 0))),
        ("setxattr", set_xattr(&report, "user.tag", b"v2", 0)),
        ("removexattr", remove_xattr(&report, "user.tag")),
        (
            "chmod of the sealed directory",
            fs::set_permissions(h.at("archive"), fs::Permissions::from_mode(0o700)),
        ),
    ];
    for (what, result) in refusals {
        assert_errno(result, libc::EPERM, &format!("{what} in a sealed dir"));
    }
    // Reads are served as ever, and nothing changed.
    assert_content(&report, b"final");
    assert_eq!(get_xattr(&report, "user.tag").expect("getxattr"), b"v1");
    assert_eq!(names(&dir), ["empty", "report"]);
    assert_eq!(
        snapshot(&h.at("archive")),
        before,
        "the sealed tree changed"
    );
    assert_content(&h.at("outside"), b"not sealed");
    let outside = h.root().join("not-cloudfs");
    fs::create_dir_all(&outside).expect("mkdir");
    let refused = h.cloudfs(&["seal", utf8(&outside)]);
    assert!(!refused.status.success(), "sealing outside cloudfs");

    // Sealing is metadata: it survives a remount from the store.
    h.umount();
    h.mount(&[]);
    assert_errno(
        fs::write(h.at("archive/2026/report"), b"changed"),
        libc::EPERM,
        "overwrite after a remount",
    );
    h.cloudfs_ok(&["unseal", utf8(&h.at("archive"))]);
    fs::write(h.at("archive/2026/report"), b"changed").expect("write after unsealing");
    h.umount();
    h.fsck_is_clean();
}

#[test]
fn a_directory_tree_snapshot_through_the_cli_is_an_independent_copy() {
    let mut h = Harness::new();
    h.mount(&[]);
    fs::create_dir_all(h.at("project/src")).expect("mkdir");
    let data = pattern(11, 300 * KIB as usize);
    fs::write(h.at("project/src/data"), &data).expect("write");
    fs::write(h.at("project/readme"), b"hello").expect("write");
    h.cloudfs_ok(&[
        "snapshot",
        "tree",
        utf8(&h.at("project")),
        utf8(&h.at("project-v1")),
    ]);
    assert_content(&h.at("project-v1/src/data"), &data);
    assert_content(&h.at("project-v1/readme"), b"hello");
    fs::write(h.at("project-v1/readme"), b"changed in the copy").expect("write the copy");
    assert_content(&h.at("project/readme"), b"hello");
    let again = h.cloudfs(&[
        "snapshot",
        "tree",
        utf8(&h.at("project")),
        utf8(&h.at("project-v1")),
    ]);
    assert!(!again.status.success(), "copying onto an existing path");
    h.umount();
    h.fsck_is_clean();
}

/// Writes `name` and fsyncs it and the root directory (a new metadata generation).
fn write_durably(h: &Harness, name: &str, data: &[u8]) {
    let mut file = File::create(h.at(name)).expect("create");
    file.write_all(data).expect("write");
    file.sync_all().expect("fsync");
    sync_root(h);
}

/// Fsyncs the root directory: its metadata becomes a new generation in the store.
fn sync_root(h: &Harness) {
    File::open(h.mnt())
        .and_then(|d| d.sync_all())
        .expect("fsync the root");
}

/// Writes enough new generations that the ones the mount retains no longer name files
/// removed before.
fn roll_generations(h: &Harness) {
    for i in 0..6 {
        write_durably(h, &format!("roll-{i}"), format!("roll {i}").as_bytes());
    }
}

fn gc_report(h: &Harness, extra: &[&str]) -> serde_json::Value {
    let store = h.store_url();
    let state = h.root().join("gc-state");
    let mut args = vec!["gc", &store, "--state-dir", utf8(&state), "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&h.cloudfs_ok(&args)).expect("gc prints JSON")
}

#[test]
fn gc_through_the_cli_reclaims_only_blocks_nothing_references() {
    let mut h = Harness::with_block_size("1MiB");
    let store = h.store_url();
    h.mount(&[]);
    let (kept, pinned, cloned) = (
        pattern(1, 1 << 20),
        pattern(2, 3 << 20),
        pattern(3, 1 << 20),
    );
    write_durably(&h, "kept", &kept);
    write_durably(&h, "cloned", &cloned);
    h.cloudfs_ok(&["snapshot", "create", &store, VOLUME, "for-clone"]);
    h.cloudfs_ok(&["clone", &store, &format!("{VOLUME}@for-clone"), "copy"]);
    h.cloudfs_ok(&["snapshot", "delete", &store, VOLUME, "for-clone"]);
    write_durably(&h, "pinned", &pinned);
    h.cloudfs_ok(&["snapshot", "create", &store, VOLUME, "keep"]);
    fs::remove_file(h.at("pinned")).expect("rm");
    fs::remove_file(h.at("cloned")).expect("rm");
    roll_generations(&h);
    // Store clocks count whole seconds: let the blocks age past a zero grace.
    std::thread::sleep(Duration::from_secs(2));

    let report = gc_report(&h, &["--grace", "0s"]);
    assert_eq!(report["volumes"], 2, "{report}");
    assert_eq!(report["snapshots"], 1, "{report}");
    let scanned = report["scanned"].as_u64().expect("scanned");
    let referenced = report["referenced"].as_u64().expect("referenced");
    assert!(scanned >= referenced && referenced >= 5, "{report}");
    {
        // The snapshot outlived the generations that named its files, and their blocks.
        let pinned_view = h.mount_extra(VOLUME, "keep", &["--read-only", "--snapshot", "keep"]);
        assert_content(&pinned_view.mnt.join("pinned"), &pinned);
    }

    h.cloudfs_ok(&["snapshot", "delete", &store, VOLUME, "keep"]);
    let dry = gc_report(&h, &["--grace", "0s", "--dry-run"]);
    assert_eq!(dry["deleted"], 0, "{dry}");
    let pinned_blocks = 3;
    assert!(
        dry["candidates"].as_u64() >= Some(pinned_blocks),
        "the snapshot's own blocks: {dry}"
    );
    let done = gc_report(&h, &["--grace", "0s", "--report-as", "run-1"]);
    assert_eq!(done["deleted"], dry["candidates"], "{done}");
    assert!(done["bytes_reclaimed"].as_u64() >= Some(3 << 20), "{done}");
    // The outcome is kept in the pool too, for a starter that cannot read the output.
    assert_eq!(h.object_keys("gc-reports/"), ["gc-reports/run-1.json"]);
    let again = gc_report(&h, &["--grace", "1h"]);
    assert_eq!(again["deleted"], 0, "{again}");
    h.umount();

    // Everything still referenced is intact, from a fresh cache.
    h.mount(&[]);
    assert_content(&h.at("kept"), &kept);
    assert!(!h.at("pinned").exists());
    h.umount();
    h.fsck_is_clean();
    {
        let copy = h.mount_extra("copy", "copy", &[]);
        assert_content(&copy.mnt.join("cloned"), &cloned);
        assert_content(&copy.mnt.join("kept"), &kept);
    }
    let fsck = h.cloudfs(&["fsck", &store, "copy"]);
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // A deleted volume's blocks go with the next collection: `cloned` was only the clone's.
    h.cloudfs_ok(&["volume", "delete", &store, "copy", "--json"]);
    let after_delete = gc_report(&h, &["--grace", "0s"]);
    assert_eq!(after_delete["volumes"], 1, "{after_delete}");
    assert!(
        after_delete["bytes_reclaimed"].as_u64() >= Some(1 << 20),
        "{after_delete}"
    );
    h.mount(&[]);
    assert_content(&h.at("kept"), &kept);
    h.umount();
    h.fsck_is_clean();
}

#[test]
fn fsck_verify_names_the_file_of_a_damaged_block_and_new_writes_upload_it_afresh() {
    let mut h = Harness::new();
    let store = h.store_url();
    h.mount(&[]);
    let (good, hurt) = (pattern(11, 40_000), pattern(12, 40_000));
    fs::create_dir(h.at("dir")).expect("mkdir");
    write_durably(&h, "dir/good", &good);
    write_durably(&h, "dir/hurt", &hurt);
    h.umount();
    let key = {
        let hex = blake3::hash(&hurt).to_hex();
        format!("blocks/{}/{}/{hex}", &hex[0..2], &hex[2..4])
    };
    let mut damaged = hurt.clone();
    damaged[1234] ^= 0xff;
    h.overwrite_object(&key, &damaged);

    // Without --verify the sizes match: the damage goes unseen.
    h.cloudfs_ok(&["fsck", &store, VOLUME]);
    let out = h.cloudfs(&["fsck", &store, VOLUME, "--verify", "--json"]);
    assert!(!out.status.success(), "a damaged volume fails fsck");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let problems = report["problems"].to_string();
    assert!(problems.contains("/dir/hurt block 0"), "{report}");
    assert!(!problems.contains("good"), "{report}");
    assert_eq!(report["verified_blocks"], 2, "{report}");
    assert_eq!(report["quarantined"].as_array().map(Vec::len), Some(1));

    // The damaged block left `blocks/`, and mounts no longer trust it: writing that content
    // again (the file restored from a backup, say) uploads it, which repairs the file.
    h.mount(&[]);
    write_durably(&h, "again", &hurt);
    h.umount();
    h.fsck_is_clean();
    let out = h.cloudfs_ok(&["fsck", &store, VOLUME, "--verify", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        report["quarantined"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    h.mount(&[]);
    assert_content(&h.at("dir/hurt"), &hurt);
    h.umount();
}

// ---------------------------------------------------------------------------------------------
// Server-side TAR export
// ---------------------------------------------------------------------------------------------

/// Byte ranges `[start, end)` of `path` that hold data (`SEEK_DATA`/`SEEK_HOLE`).
fn data_ranges(path: &Path) -> Vec<(u64, u64)> {
    let file = File::open(path).expect("open for SEEK_DATA");
    let size = file.metadata().expect("metadata").len() as i64;
    let mut ranges = Vec::new();
    let mut at = 0i64;
    while at < size {
        // SAFETY: lseek on a descriptor owned by `file`.
        let start = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
        if start < 0 {
            break; // ENXIO: only a hole remains
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(file.as_raw_fd(), start, libc::SEEK_HOLE) };
        assert!(end > start, "SEEK_HOLE after {start} in {}", path.display());
        ranges.push((start as u64, end as u64));
        at = end;
    }
    ranges
}

/// Asserts two local files hold the same bytes, reading only where either has data (the
/// rest is holes in both, which read as zeros).
fn assert_same_sparse(got: &Path, want: &Path) {
    let size = fs::metadata(want).expect("stat").len();
    assert_eq!(
        fs::metadata(got).expect("stat").len(),
        size,
        "{}",
        got.display()
    );
    let (got_file, want_file) = (
        File::open(got).expect("open"),
        File::open(want).expect("open"),
    );
    let mut ranges = data_ranges(got);
    ranges.extend(data_ranges(want));
    for (start, end) in ranges {
        let mut at = start;
        while at < end {
            let len = (end - at).min(MIB) as usize;
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            got_file.read_exact_at(&mut a, at).expect("read");
            want_file.read_exact_at(&mut b, at).expect("read");
            assert!(
                a == b,
                "{} differs in {at}..{}",
                got.display(),
                at + len as u64
            );
            at += len as u64;
        }
    }
}

/// Asserts that the local trees `got` and `want` hold the same names, types, permissions,
/// mtimes (but of symlinks), link targets, hard links and bytes.
fn assert_same_tree(got: &Path, want: &Path) {
    let names = |dir: &Path| -> BTreeSet<std::ffi::OsString> {
        fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect()
    };
    let mut inodes: BTreeMap<u64, u64> = BTreeMap::new();
    let mut stack = vec![(got.to_path_buf(), want.to_path_buf())];
    while let Some((got_dir, want_dir)) = stack.pop() {
        assert_eq!(names(&got_dir), names(&want_dir), "{}", got_dir.display());
        for name in names(&want_dir) {
            let (g, w) = (got_dir.join(&name), want_dir.join(&name));
            let (gm, wm) = (
                fs::symlink_metadata(&g).expect("stat"),
                fs::symlink_metadata(&w).expect("stat"),
            );
            assert_eq!(gm.mode(), wm.mode(), "mode of {}", g.display());
            if wm.is_symlink() {
                assert_eq!(
                    fs::read_link(&g).ok(),
                    fs::read_link(&w).ok(),
                    "{}",
                    g.display()
                );
                continue;
            }
            assert_eq!(gm.mtime(), wm.mtime(), "mtime of {}", g.display());
            if wm.is_dir() {
                stack.push((g, w));
            } else if wm.is_file() {
                assert_same_sparse(&g, &w);
                // Hard links extract as hard links.
                let first = *inodes.entry(wm.ino()).or_insert(gm.ino());
                assert_eq!(first, gm.ino(), "hard link {}", g.display());
            }
        }
    }
}

/// The tree the export test writes, into the mount and into a local reference copy alike.
fn write_export_tree(root: &Path) {
    let set_mtime = |path: &Path, secs: u64| {
        let time = UNIX_EPOCH + Duration::from_secs(secs);
        File::open(path)
            .and_then(|f| f.set_times(FileTimes::new().set_modified(time).set_accessed(time)))
            .expect("set mtime");
    };
    fs::create_dir(root).expect("mkdir");
    // 1,154 blocks of 64 KiB: more segments than one Swift manifest holds.
    fs::write(
        root.join("big.bin"),
        pattern(41, (72 * MIB + 1234) as usize),
    )
    .expect("big");
    fs::write(root.join("small"), pattern(42, 100_000)).expect("small");
    fs::hard_link(root.join("small"), root.join("hard")).expect("hard link");
    File::create(root.join("empty")).expect("empty");
    fs::create_dir(root.join("empty-dir")).expect("mkdir");
    let long_dir = root.join("d".repeat(120));
    fs::create_dir(&long_dir).expect("mkdir");
    fs::write(long_dir.join("f".repeat(150)), pattern(43, 3000)).expect("long name");
    std::os::unix::fs::symlink("big.bin", root.join("link")).expect("symlink");
    std::os::unix::fs::symlink("t".repeat(200), root.join("long-link")).expect("symlink");
    fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").expect("script");
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o750)).expect("chmod");
    // Larger than 8 GiB, with data at the start, in the middle and in its last bytes.
    let sparse_size = 8 * GIB + 5 * MIB + 7;
    let sparse = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(root.join("sparse"))
        .expect("sparse");
    sparse.set_len(sparse_size).expect("truncate");
    sparse.write_all_at(&pattern(44, 100), 0).expect("write");
    sparse
        .write_all_at(&pattern(45, 200_000), 4 * GIB + 12_345)
        .expect("write");
    sparse
        .write_all_at(b"0123456789", sparse_size - 10)
        .expect("write");
    drop(sparse);
    for (name, secs) in [
        ("big.bin", 1_600_000_000),
        ("small", 1_600_000_100),
        ("empty", 1_600_000_200),
        ("run.sh", 1_600_000_300),
        ("sparse", 1_600_000_400),
    ] {
        set_mtime(&root.join(name), secs);
    }
    set_mtime(&long_dir.join("f".repeat(150)), 1_600_000_500);
    for dir in [long_dir.as_path(), &root.join("empty-dir"), root] {
        set_mtime(dir, 1_700_000_000);
    }
}

#[test]
fn export_tar_streams_through_curl_into_tar_as_the_same_tree() {
    let mut h = Harness::new();
    let store = h.store_url();
    let reference = h.root().join("reference");
    write_export_tree(&reference);
    h.mount(&[]);
    write_export_tree(&h.at("src"));
    h.umount();

    let swift = h.swift_container().map(|container| {
        let account = SwiftAccount::open().expect("the test Swift's account");
        account
            .block_on(
                account
                    .client
                    .set_container_temp_url_key(container, "export-key"),
            )
            .expect("set the container's TempURL key");
        (account, container.to_owned())
    });
    let usage = || {
        swift.as_ref().map(|(account, container)| {
            account
                .block_on(account.client.head_container(container))
                .expect("HEAD container")
                .expect("the container exists")
        })
    };
    let before = usage();
    let out = h.cloudfs_ok(&[
        "export",
        "tar",
        &store,
        &format!("{VOLUME}:/src"),
        "src.tar",
        "--temp-url",
        "--json",
    ]);
    let export: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let url = export["url"].as_str().expect("a URL").to_owned();
    assert_eq!(export["object"], "exports/src.tar", "{export}");
    assert!(
        export["referenced_bytes"].as_u64() > Some(72 * MIB),
        "{export}"
    );

    if let (Some(before), Some(after)) = (before, usage()) {
        // Only the manifests, the nested ones and the export record are new; no block is
        // copied (a copy would add the 72 MiB file at least).
        let grown = after.bytes_used - before.bytes_used;
        eprintln!(
            "export: {} objects, {grown} bytes added for a {} byte tar",
            after.object_count - before.object_count,
            export["tar_bytes"]
        );
        assert!(
            after.object_count - before.object_count >= 3,
            "nested manifests"
        );
        assert!(grown < 2 * MIB, "the container grew by {grown} bytes");
    }

    // The export is a garbage-collection root: with its files gone from the volume, the
    // blocks it streams stay (on the local store it is a tar file of its own).
    h.mount(&[]);
    fs::remove_dir_all(h.at("src")).expect("rm -r src");
    roll_generations(&h);
    h.umount();
    std::thread::sleep(Duration::from_secs(2));
    let collected = gc_report(&h, &["--grace", "0s"]);
    assert_eq!(collected["exports"], 1, "{collected}");

    let extracted = h.root().join("extracted");
    fs::create_dir(&extracted).expect("mkdir");
    let untar = run(Command::new("bash").args([
        "-c",
        &format!(
            "set -o pipefail; curl -sSf '{url}' | tar -x -C '{}'",
            extracted.display()
        ),
    ]))
    .expect("curl | tar");
    assert!(
        untar.status.success(),
        "curl | tar -x: {}",
        String::from_utf8_lossy(&untar.stderr)
    );
    assert_same_tree(&extracted, &reference);
    // The extracted sparse file is sparse again.
    let sparse = fs::metadata(extracted.join("sparse")).expect("stat");
    assert!(
        sparse.blocks() * 512 < 64 * MIB,
        "{} bytes allocated",
        sparse.blocks() * 512
    );

    let listed: serde_json::Value =
        serde_json::from_str(&h.cloudfs_ok(&["export", "list", &store, "--json"])).expect("JSON");
    assert_eq!(listed[0]["name"], "src.tar", "{listed}");
    let again = h.cloudfs(&["export", "tar", &store, VOLUME, "src.tar"]);
    assert!(!again.status.success(), "a second export of the same name");
    h.cloudfs_ok(&["export", "delete", &store, "src.tar"]);
    let gone = run(Command::new("curl").args(["-sSf", "-o", "/dev/null", &url])).expect("curl");
    assert!(!gone.status.success(), "the export is still served");
    let listed = h.cloudfs_ok(&["export", "list", &store, "--json"]);
    assert_eq!(listed.trim(), "[]");
}

// ---------------------------------------------------------------------------------------------
// Snapshots and rollback of a mounted volume, through its control socket
// ---------------------------------------------------------------------------------------------

/// The content of record file `i` of the snapshot-consistency test.
fn record(i: usize) -> Vec<u8> {
    pattern(1000 + i as u64, 20_000 + (i % 7) * 3000)
}

/// Checks one snapshot of the writer's volume: the journal is whole lines `0..j`, every
/// record it names is complete, and no record beyond the next one exists. Returns `j`.
fn check_prefix_consistent(root: &Path) -> usize {
    let journal = fs::read_to_string(root.join("journal")).unwrap_or_default();
    assert!(
        journal.is_empty() || journal.ends_with('\n'),
        "torn journal line"
    );
    let lines: Vec<usize> = journal
        .lines()
        .map(|l| l.parse().expect("a journal line"))
        .collect();
    assert_eq!(lines, (0..lines.len()).collect::<Vec<_>>(), "journal order");
    for i in 0..lines.len() {
        assert_content(&root.join(format!("rec-{i:05}")), &record(i));
    }
    assert!(
        !root.join(format!("rec-{:05}", lines.len() + 1)).exists(),
        "a record written after the journal's last line"
    );
    lines.len()
}

#[test]
fn a_snapshot_of_a_mounted_volume_is_one_instant_while_a_writer_writes() {
    let mut h = Harness::new();
    let store = h.store_url();
    // No periodic sync: what the snapshots hold can only come through the mount.
    h.mount(&["--sync-interval", "3600"]);

    // Written and closed, and written but still open: both are in a snapshot taken now.
    fs::write(h.at("closed"), b"closed, never synced").expect("write");
    let mut open = File::create(h.at("still-open")).expect("create");
    open.write_all(b"written, not closed").expect("write");
    h.cloudfs_ok(&["snapshot", "create", &store, VOLUME, "instant"]);
    drop(open);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (root, stop) = (h.mnt(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 100_000 {
                fs::write(root.join(format!("rec-{i:05}")), record(i)).expect("record");
                let mut journal = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(root.join("journal"))
                    .expect("journal");
                journal
                    .write_all(format!("{i}\n").as_bytes())
                    .expect("append");
                i += 1;
            }
            i
        })
    };
    let mut taken = Vec::new();
    for n in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let name = format!("busy-{n}");
        let out = h.cloudfs_ok(&["snapshot", "create", &store, VOLUME, &name, "--json"]);
        let info: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(info["name"], name.as_str(), "{info}");
        taken.push(name);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().expect("the writer");

    {
        let snap = h.mount_extra(VOLUME, "instant", &["--snapshot", "instant"]);
        assert_content(&snap.mnt.join("closed"), b"closed, never synced");
        assert_content(&snap.mnt.join("still-open"), b"written, not closed");
    }
    let mut seen = Vec::new();
    for name in &taken {
        let snap = h.mount_extra(VOLUME, name, &["--snapshot", name]);
        seen.push(check_prefix_consistent(&snap.mnt));
    }
    eprintln!("records in the snapshots: {seen:?} of {written} written");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "later snapshots hold more: {seen:?}"
    );
    assert!(seen[2] > 0 && seen[2] <= written, "{seen:?} of {written}");
    // The live volume went on: it holds everything.
    assert_eq!(check_prefix_consistent(&h.mnt()), written);
}

/// A tmpfs mounted on a directory, unmounted when dropped (lazily: the test may have failed
/// with a file open on it).
struct TmpfsMount(PathBuf);

impl TmpfsMount {
    fn on(dir: &Path) -> TmpfsMount {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "cloudfs-test", utf8(dir)])
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs on {}", dir.display());
        TmpfsMount(dir.to_owned())
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn rollback_of_a_mounted_volume_switches_it_in_place() {
    let mut h = Harness::new();
    let store = h.store_url();
    h.mount(&["--sync-interval", "3600"]);
    let (a1, a2, b) = (pattern(1, 150_000), pattern(2, 90_000), pattern(3, 5_000));
    fs::write(h.at("a"), &a1).expect("write");
    fs::write(h.at("b"), &b).expect("write");
    fs::create_dir(h.at("dir")).expect("mkdir");
    fs::create_dir(h.at("mountpoint")).expect("mkdir");
    fs::set_permissions(h.at("dir"), fs::Permissions::from_mode(0o755)).expect("chmod");
    h.cloudfs_ok(&["snapshot", "create", &store, VOLUME, "good"]);

    fs::set_permissions(h.at("dir"), fs::Permissions::from_mode(0o700)).expect("chmod");
    // What a pod mounts on a directory of its volume (a ConfigMap, an emptyDir).
    let nested = TmpfsMount::on(&h.at("mountpoint"));
    fs::write(h.at("mountpoint/on-tmpfs"), b"mounted").expect("write on the tmpfs");
    fs::write(h.at("a"), &a2).expect("overwrite");
    fs::remove_file(h.at("b")).expect("rm");
    fs::write(h.at("c"), b"made after the snapshot").expect("write");
    let c_ino = fs::metadata(h.at("c")).expect("stat").ino();
    let mut open_c = File::open(h.at("c")).expect("open");

    let out = h.cloudfs_ok(&["rollback", &store, VOLUME, "good", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let previous = report["previous_state"].as_str().expect("name").to_owned();
    assert!(previous.starts_with("pre-rollback-"), "{report}");

    // The kernel is told to look up again every name it may have cached, just after the
    // rollback (or, on kernels before Linux 6.2, trusts them for a second only).
    wait_for("the rolled-back names and attributes", || {
        (!h.at("c").exists()
            && h.at("b").exists()
            && fs::metadata(h.at("a")).is_ok_and(|m| m.len() == a1.len() as u64)
            && fs::metadata(h.at("dir")).is_ok_and(|m| m.mode() & 0o777 == 0o755))
        .then_some(())
    });
    assert!(
        fs::read(h.at("mountpoint/on-tmpfs")).is_ok_and(|b| b == b"mounted"),
        "a mount on a directory the rollback kept stays mounted"
    );
    drop(nested);
    assert_content(&h.at("a"), &a1);
    assert_content(&h.at("b"), &b);
    let mut buf = Vec::new();
    let stale = open_c.read_to_end(&mut buf);
    assert!(
        stale.is_err() || buf.is_empty(),
        "a handle on a file the snapshot lacks reads nothing of it"
    );
    // New files never reuse the inode number of one the rollback removed.
    fs::write(h.at("d"), b"after the rollback").expect("write");
    assert_ne!(fs::metadata(h.at("d")).expect("stat").ino(), c_ino);

    {
        let before = h.mount_extra(VOLUME, "previous", &["--snapshot", &previous]);
        assert_content(&before.mnt.join("a"), &a2);
        assert_content(&before.mnt.join("c"), b"made after the snapshot");
        assert!(!before.mnt.join("b").exists());
    }
    // The rolled-back state is what the store holds, from a fresh cache.
    h.umount();
    h.mount(&[]);
    assert_content(&h.at("a"), &a1);
    assert_content(&h.at("b"), &b);
    assert!(!h.at("c").exists());
    assert_content(&h.at("d"), b"after the rollback");
    h.umount();
    h.fsck_is_clean();
}

#[test]
fn a_subtree_snapshot_of_100000_files_is_quick_and_stores_no_block() {
    let mut h = Harness::new();
    // No periodic sync: nothing but the copy itself could add objects meanwhile.
    h.mount(&["--sync-interval", "3600"]);
    // 1,000 files sharing one block, then 99 copies of their directory: 100,000 files.
    let content = pattern(7, 3000);
    fs::create_dir_all(h.at("tree/d000")).expect("mkdir");
    for i in 0..1000 {
        fs::write(h.at(&format!("tree/d000/f{i:04}")), &content).expect("write");
    }
    for k in 1..100 {
        h.cloudfs_ok(&[
            "snapshot",
            "tree",
            utf8(&h.at("tree/d000")),
            utf8(&h.at(&format!("tree/d{k:03}"))),
        ]);
    }
    let blocks_before = h.object_keys("blocks/");

    let started = std::time::Instant::now();
    h.cloudfs_ok(&[
        "snapshot",
        "tree",
        utf8(&h.at("tree")),
        utf8(&h.at("tree-copy")),
    ]);
    let took = started.elapsed();
    eprintln!("subtree snapshot of 100,000 files: {took:.2?}");
    assert_eq!(h.object_keys("blocks/"), blocks_before, "no block stored");

    assert_content(&h.at("tree-copy/d099/f0999"), &content);
    assert_eq!(fs::read_dir(h.at("tree-copy")).expect("ls").count(), 100);
    fs::write(h.at("tree-copy/d050/f0001"), b"changed").expect("write the copy");
    assert_content(&h.at("tree/d050/f0001"), &content);
    h.umount();
}

/// Puts block-named objects nothing references (`on_swift` of them on Swift, `local`
/// otherwise) and lets them age past a zero grace (store clocks count whole seconds).
fn put_garbage(h: &Harness, on_swift: u32, local: u32) -> Vec<String> {
    let garbage = if h.swift_container().is_some() {
        on_swift
    } else {
        local
    };
    let keys: Vec<String> = (0..garbage)
        .map(|i: u32| {
            let hex = blake3::hash(&i.to_le_bytes()).to_hex();
            format!("blocks/{}/{}/{hex}", &hex[0..2], &hex[2..4])
        })
        .collect();
    h.put_objects(&keys, b"garbage");
    std::thread::sleep(Duration::from_secs(2));
    keys
}

/// A `cloudfs gc` process, started with `args`, once it has logged that its mark is saved
/// (the sweep comes next), and the rest of its log. Its standard output is piped.
fn gc_until_mark_saved(
    h: &Harness,
    args: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let store = h.store_url();
    let mut gc = Command::new(CLOUDFS)
        .args(["gc", &store])
        .args(args)
        .env("CLOUDFS_RUN_DIR", h.run_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start gc");
    let stderr = gc.stderr.take().expect("stderr");
    let (line_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in io::BufRead::lines(io::BufReader::new(stderr)).map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        match lines.recv_timeout(WAIT) {
            Ok(line) if line.contains("mark saved") => return (gc, lines),
            Ok(_) => {}
            Err(e) => {
                sigkill(gc.id() as i32);
                let _ = gc.wait();
                panic!("gc did not report its mark: {e}");
            }
        }
    }
}

#[test]
fn gc_killed_midway_finishes_the_job_when_run_again() {
    let mut h = Harness::new();
    h.mount(&[]);
    let kept = pattern(5, 200_000);
    write_durably(&h, "kept", &kept);
    h.umount();
    let keys = put_garbage(&h, 3000, 30_000);
    let state = h.root().join("gc-state");
    let (mut gc, _) = gc_until_mark_saved(&h, &["--grace", "0s", "--state-dir", utf8(&state)]);
    sigkill(gc.id() as i32);
    let status = gc.wait().expect("wait for gc");
    assert!(!status.success(), "gc was killed midway");

    let report = gc_report(&h, &["--grace", "0s"]);
    assert_eq!(report["resumed"], true, "{report}");
    let left: BTreeSet<String> = h.object_keys("blocks/").into_iter().collect();
    assert!(
        keys.iter().all(|key| !left.contains(key)),
        "garbage left after the second run: {report}"
    );
    let again = gc_report(&h, &["--grace", "0s"]);
    assert_eq!(
        (&again["resumed"], &again["deleted"]),
        (&false.into(), &0.into())
    );
    h.mount(&[]);
    assert_content(&h.at("kept"), &kept);
    h.umount();
    h.fsck_is_clean();
}

#[test]
fn blocks_a_mounted_writer_uploads_after_the_mark_survive_the_sweep() {
    let mut h = Harness::new();
    h.mount(&[]);
    let early = pattern(21, 300_000);
    write_durably(&h, "early", &early);
    let keys = put_garbage(&h, 2000, 20_000);
    std::thread::sleep(Duration::from_secs(2));

    // The mark is done and names none of the blocks written below: GC is held between its
    // mark and its sweep while the mounted writer goes on.
    let state = h.root().join("gc-state");
    let (mut gc, log) = gc_until_mark_saved(
        &h,
        &["--grace", "2s", "--json", "--state-dir", utf8(&state)],
    );
    let gc_pid = gc.id() as i32;
    send_signal(gc_pid, libc::SIGSTOP);
    let late: Vec<Vec<u8>> = (0..4u64).map(|i| pattern(40 + i, 200_000)).collect();
    let wrote = std::panic::catch_unwind(|| {
        // Still running (not done already), held before its sweep.
        wait_for("gc to stop", || {
            let stat = fs::read_to_string(format!("/proc/{gc_pid}/stat")).ok()?;
            let state = stat.rsplit(')').next()?.trim_start().chars().next()?;
            (state == 'T').then_some(())
        });
        for (i, data) in late.iter().enumerate() {
            write_durably(&h, &format!("late-{i}"), data);
        }
        // Older than the grace by the time the sweep sees them: only a cutoff taken when the
        // run started (not when the sweep does) keeps them.
        std::thread::sleep(Duration::from_secs(3));
    });
    send_signal(gc_pid, libc::SIGCONT);
    if let Err(panic) = wrote {
        sigkill(gc_pid);
        let _ = gc.wait();
        std::panic::resume_unwind(panic);
    }
    let out = gc.wait_with_output().expect("wait for gc");
    assert!(
        out.status.success(),
        "gc failed: {}",
        log.try_iter().collect::<Vec<_>>().join("\n")
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("gc prints JSON");
    assert!(
        report["deleted"].as_u64() >= Some(keys.len() as u64),
        "{report}"
    );
    let left: BTreeSet<String> = h.object_keys("blocks/").into_iter().collect();
    assert!(keys.iter().all(|key| !left.contains(key)), "garbage left");

    // Everything the writer wrote comes back from the store, with a fresh cache.
    h.umount();
    h.mount(&[]);
    assert_content(&h.at("early"), &early);
    for (i, data) in late.iter().enumerate() {
        assert_content(&h.at(&format!("late-{i}")), data);
    }
    h.umount();
    h.fsck_is_clean();
}

/// `snapshot` of a tree without inode numbers: a rollback gives the snapshot's files numbers
/// the volume never used.
fn contents(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut tree = snapshot(root);
    for node in tree.values_mut() {
        node.ino = 0;
    }
    tree
}

#[test]
fn clones_and_rollbacks_are_the_snapshot_byte_for_byte_and_clones_diverge_alone() {
    let mut h = Harness::new();
    let store = h.store_url();
    h.mount(&[]);
    populate(&h.mnt());
    sync_root(&h);
    h.cloudfs_ok(&["snapshot", "create", &store, VOLUME, "s1"]);
    let want = contents(&h.mnt());
    // The source moves on.
    fs::write(h.at("docs/readme.txt"), b"rewritten after s1").expect("rewrite");
    fs::remove_file(h.at("sparse")).expect("rm");
    fs::write(h.at("after-s1"), b"source only").expect("write");
    sync_root(&h);
    let source = contents(&h.mnt());

    h.cloudfs_ok(&["clone", &store, &format!("{VOLUME}@s1"), "copy"]);
    {
        let clone = h.mount_extra("copy", "copy", &[]);
        assert_eq!(contents(&clone.mnt), want, "the clone is not the snapshot");
        fs::write(clone.mnt.join("docs/nested/big.bin"), b"the clone's own").expect("write");
        fs::write(clone.mnt.join("clone-only"), b"clone").expect("create");
        fs::remove_file(clone.mnt.join("latest")).expect("rm");
        File::open(&clone.mnt)
            .and_then(|d| d.sync_all())
            .expect("fsync the clone");
    }
    assert_eq!(
        contents(&h.mnt()),
        source,
        "the clone's writes reached the source"
    );

    // The mounted source rolls back in place, and stays rolled back in the store.
    h.cloudfs_ok(&["rollback", &store, VOLUME, "s1"]);
    wait_for("the mount switched to s1", || {
        (contents(&h.mnt()) == want).then_some(())
    });
    h.umount();
    h.mount(&[]);
    assert_eq!(
        contents(&h.mnt()),
        want,
        "the rolled-back volume from the store"
    );
    h.umount();
    {
        let clone = h.mount_extra("copy", "copy-again", &[]);
        assert_content(&clone.mnt.join("docs/nested/big.bin"), b"the clone's own");
        assert_content(&clone.mnt.join("clone-only"), b"clone");
        assert!(!clone.mnt.join("latest").exists());
        assert_content(&clone.mnt.join("docs/readme.txt"), b"cloudfs keeps this\n");
        assert!(!clone.mnt.join("after-s1").exists());
    }
    h.fsck_is_clean();
}

#[test]
fn a_quota_is_what_df_reports_and_writes_past_it_fail_with_enospc() {
    let mut h = Harness::new();
    let store = h.store_url();
    h.cloudfs_ok(&["volume", "set-quota", &store, VOLUME, "2MiB"]);
    h.mount(&[]);
    let size = |h: &Harness| {
        let st = statvfs(&h.mnt());
        st.f_blocks * st.f_frsize
    };
    assert_eq!(size(&h), 2 * MIB);
    fs::write(h.at("a"), pattern(1, (3 * MIB / 2) as usize)).expect("within the quota");
    assert_errno(
        fs::write(h.at("b"), pattern(2, MIB as usize)),
        libc::ENOSPC,
        "a write past the quota",
    );

    // Raised while mounted: the mount applies it at once.
    h.cloudfs_ok(&["volume", "set-quota", &store, VOLUME, "4MiB"]);
    assert_eq!(size(&h), 4 * MIB);
    fs::write(h.at("b"), pattern(2, MIB as usize)).expect("within the raised quota");
    h.umount();
    let stat: serde_json::Value =
        serde_json::from_str(&h.cloudfs_ok(&["stat", &store, VOLUME, "--json"])).expect("JSON");
    assert_eq!(stat["quota_bytes"], 4 * MIB, "{stat}");
    h.mount(&[]);
    assert_eq!(size(&h), 4 * MIB, "the quota persists");
    h.umount();
    h.cloudfs_ok(&["volume", "set-quota", &store, VOLUME, "none"]);
    h.mount(&[]);
    assert!(size(&h) >= 1 << 49, "unlimited");
    h.umount();
}

/// Runs `script` in `sh`, with `path` as `$1`, as user and group `id` (no supplementary
/// groups, no capabilities).
fn as_user(id: u32, script: &str, path: &Path) {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new("sh");
    command.args(["-c", script, "sh"]).arg(path).uid(id).gid(id);
    let out = run(&mut command).unwrap_or_else(|e| panic!("running `{script}` as {id}: {e}"));
    assert!(
        out.status.success(),
        "`{script}` as {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The kernel leaves dropping the set-ID bits to cloudfs (so that a write need not ask for
/// `security.capability` first); they must go exactly when a local file system drops them.
#[test]
fn set_id_bits_drop_on_unprivileged_writes_and_truncates_and_on_chown() {
    let mut h = Harness::new();
    set_mode(h.root(), 0o755); // the other user reaches the mount through the test's dir
    h.mount(&[]);
    let path = h.at("tool");
    fs::write(&path, b"#!/bin/sh\n").expect("write");
    std::os::unix::fs::chown(&path, Some(1000), Some(1000)).expect("chown");

    set_mode(&path, 0o6775);
    OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(b"# root\n"))
        .expect("append as root");
    assert_eq!(mode_of(&path), 0o6775, "a write with CAP_FSETID keeps them");

    // File capabilities (revision 2: effective, CAP_NET_BIND_SERVICE permitted) go on any
    // write, as on a local file system.
    let mut caps = vec![1, 0, 0, 2];
    caps.extend_from_slice(&(1u32 << 10).to_le_bytes()); // CAP_NET_BIND_SERVICE
    caps.extend_from_slice(&[0; 12]);
    set_xattr(&path, "security.capability", &caps, 0).expect("set file capabilities");
    OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(b"# root again\n"))
        .expect("append as root");
    assert_errno(
        get_xattr(&path, "security.capability"),
        libc::ENODATA,
        "file capabilities after a write",
    );

    OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(20))
        .expect("truncate as root");
    assert_eq!(
        mode_of(&path),
        0o6775,
        "a truncate with CAP_FSETID keeps them"
    );

    for (what, script) in [
        ("write", "printf '# user\\n' >> \"$1\""),
        ("truncate", "truncate -s 5 \"$1\""),
        ("open with O_TRUNC", ": > \"$1\""),
    ] {
        set_mode(&path, 0o6775);
        as_user(1000, script, &path);
        assert_eq!(mode_of(&path), 0o775, "{what} by the owner drops both");
    }

    set_mode(&path, 0o6764);
    as_user(1000, "printf x >> \"$1\"", &path);
    assert_eq!(
        mode_of(&path),
        0o2764,
        "set-group-ID without group execute (mandatory locking) stays"
    );

    set_mode(&path, 0o6775);
    std::os::unix::fs::chown(&path, Some(1001), None).expect("chown by root");
    assert_eq!(mode_of(&path), 0o775, "a chown drops them, even by root");

    let dir = h.at("shared");
    fs::create_dir(&dir).expect("mkdir");
    set_mode(&dir, 0o2775);
    std::os::unix::fs::chown(&dir, Some(1000), Some(1000)).expect("chown a directory");
    assert_eq!(
        mode_of(&dir),
        0o2775,
        "a directory keeps its set-group-ID bit"
    );
    assert_content(&path, b"x");
}
