//! Model-based test of the `fs` layer: random sequences of namespace and data operations run
//! against the engine (on the in-memory store, 4 KiB blocks) and against a small reference
//! model of POSIX semantics. Every step must succeed or fail as the model predicts, and after
//! every step the whole tree (names, types, contents, sizes, link counts, hard-link identity,
//! symlink targets, xattrs) must match; while no file is open, the engine must also hold no
//! inode beyond those the tree names.
//!
//! Besides the namespace operations, writes may keep their file open (and unflushed) across
//! the next few operations, `fsync` makes the metadata durable, `Remount` syncs and reopens the
//! volume from the store alone, and `Crash` reopens it without syncing: the model then expects
//! exactly the tree of the last sync, each file as last flushed (by a close, `fsync`, truncate,
//! or `O_TRUNC`) before it.
//!
//! Paths are resolved the way the kernel hands them to a FUSE file system: component by
//! component with `lookup`, without following symlinks (a symlink in the middle of a path is
//! `ENOTDIR`). Writes through a symlink are skipped, as the kernel follows symlinks before
//! `open` reaches the file system. When several errors apply at once, the model reports the
//! one the engine checks first (POSIX lets an implementation report any of them).
//!
//! `PROPTEST_CASES` sets the number of cases (64 by default). Failing seeds are persisted in
//! `tests/proptest-regressions/model.txt`; shrunk failures are kept below as plain tests.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use cloudfs::fs::{Fs, FsError, FsResult, RenameMode, SetAttr, XattrMode};
use common::{ME, ROOT, TestFs};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, FileFailurePersistence};

const BLOCK: u64 = 4096;
const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const XATTR_NAMES: [&str; 2] = ["user.x", "user.y"];
const SYMLINK_TARGETS: [&str; 3] = ["a", "../b/c", "/elsewhere"];

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// A path below the root, as its components.
#[derive(Clone, PartialEq, Eq)]
struct P(Vec<&'static str>);

/// `p("a/b")`: the path `/a/b` (the form `P`'s `Debug` prints, to paste failures as tests).
fn p(path: &'static str) -> P {
    P(path.split('/').collect())
}

impl fmt::Debug for P {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p({:?})", self.0.join("/"))
    }
}

impl P {
    fn parent(&self) -> &[&'static str] {
        &self.0[..self.0.len() - 1]
    }

    fn name(&self) -> &'static str {
        self.0.last().expect("paths are never empty")
    }
}

/// One `write` through an open handle: `len` bytes at `offset`, zeros when `seed` is 0.
#[derive(Debug, Clone, Copy)]
struct W {
    offset: u64,
    len: usize,
    seed: u8,
}

impl W {
    fn bytes(&self) -> Vec<u8> {
        if self.seed == 0 {
            vec![0; self.len]
        } else {
            common::pattern(self.len, self.seed)
        }
    }

    fn apply_to(&self, content: &mut Vec<u8>) {
        let start = self.offset as usize;
        let end = start + self.len;
        if content.len() < end {
            content.resize(end, 0);
        }
        content[start..end].copy_from_slice(&self.bytes());
    }
}

/// One step; `T` names files: a concrete path `P`, or a `Target` the generator picked, made
/// concrete against the model's tree when the step runs.
#[derive(Debug, Clone)]
enum Op<T = P> {
    /// `open(O_CREAT | O_RDWR)`, plus `O_EXCL` / `O_TRUNC`, then `close`.
    Create {
        path: T,
        excl: bool,
        trunc: bool,
    },
    /// `open(O_RDWR)`, the writes, `close`; the file stays open (its writes unflushed) until
    /// `hold` more operations have run.
    Write {
        path: T,
        writes: Vec<W>,
        hold: u8,
    },
    /// `truncate(2)` (`setattr` with a size).
    Truncate {
        path: T,
        size: u64,
    },
    Rename {
        from: T,
        to: T,
        mode: RenameMode,
    },
    Link {
        from: T,
        to: T,
    },
    Unlink(T),
    Mkdir(T),
    Rmdir(T),
    Symlink {
        path: T,
        target: &'static str,
    },
    SetXattr {
        path: T,
        name: &'static str,
        value: Vec<u8>,
        mode: XattrMode,
    },
    RemoveXattr {
        path: T,
        name: &'static str,
    },
    /// `fsync(2)` (`fsyncdir` for a directory): the file's writes, and the metadata of the
    /// whole volume, are durable in the store.
    Fsync(T),
    /// Unmount cleanly (sync everything), then mount again from the store alone.
    Remount,
    /// Mount again from the store alone, without syncing (the machine died), once the dead
    /// mount's write lease expired (which takes a second: crashes are rare in the mix).
    Crash,
}

impl<T> Op<T> {
    /// The same operation on the names `f` makes of `self`'s.
    fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> Op<U> {
        match self {
            Op::Create { path, excl, trunc } => Op::Create {
                path: f(path),
                excl: *excl,
                trunc: *trunc,
            },
            Op::Write { path, writes, hold } => Op::Write {
                path: f(path),
                writes: writes.clone(),
                hold: *hold,
            },
            Op::Truncate { path, size } => Op::Truncate {
                path: f(path),
                size: *size,
            },
            Op::Rename { from, to, mode } => Op::Rename {
                from: f(from),
                to: f(to),
                mode: *mode,
            },
            Op::Link { from, to } => Op::Link {
                from: f(from),
                to: f(to),
            },
            Op::Unlink(path) => Op::Unlink(f(path)),
            Op::Mkdir(path) => Op::Mkdir(f(path)),
            Op::Rmdir(path) => Op::Rmdir(f(path)),
            Op::Symlink { path, target } => Op::Symlink {
                path: f(path),
                target,
            },
            Op::SetXattr {
                path,
                name,
                value,
                mode,
            } => Op::SetXattr {
                path: f(path),
                name,
                value: value.clone(),
                mode: *mode,
            },
            Op::RemoveXattr { path, name } => Op::RemoveXattr {
                path: f(path),
                name,
            },
            Op::Fsync(path) => Op::Fsync(f(path)),
            Op::Remount => Op::Remount,
            Op::Crash => Op::Crash,
        }
    }
}

/// A name as the generator picks it: mostly one the tree has or one inside a directory it
/// has, so that operations collide; sometimes any path at all, to reach the error cases.
#[derive(Debug, Clone)]
enum Target {
    /// A name the tree has (of any type); `a` while the tree is empty.
    Existing(Index),
    /// A name, taken or not, inside a directory the tree has (the root included).
    Inside(Index, &'static str),
    /// Any path, often naming nothing.
    Anywhere(P),
}

/// Names of an operation that can be made concrete against the model's tree.
trait Resolve: fmt::Debug {
    fn resolve(&self, model: &Model) -> P;
}

impl Resolve for P {
    fn resolve(&self, _: &Model) -> P {
        self.clone()
    }
}

impl Resolve for Target {
    fn resolve(&self, model: &Model) -> P {
        match self {
            Target::Existing(i) => {
                let names = model.paths(|_| true);
                if names.is_empty() {
                    p("a")
                } else {
                    P(names[i.index(names.len())].clone())
                }
            }
            Target::Inside(i, name) => {
                let mut dirs = model.paths(Node::is_dir);
                dirs.push(Vec::new());
                let mut path = dirs.swap_remove(i.index(dirs.len()));
                path.push(name);
                P(path)
            }
            Target::Anywhere(path) => path.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&NAMES[..])
}

fn anywhere() -> impl Strategy<Value = Target> {
    prop::collection::vec(name(), 1..=3).prop_map(|names| Target::Anywhere(P(names)))
}

/// What an operation acts on: mostly a name the tree has.
fn existing() -> impl Strategy<Value = Target> {
    prop_oneof![
        6 => any::<Index>().prop_map(Target::Existing),
        1 => (any::<Index>(), name()).prop_map(|(i, name)| Target::Inside(i, name)),
        1 => anywhere(),
    ]
}

/// What an operation creates or renames onto: mostly a name in a directory the tree has.
fn fresh() -> impl Strategy<Value = Target> {
    prop_oneof![
        3 => (any::<Index>(), name()).prop_map(|(i, name)| Target::Inside(i, name)),
        2 => any::<Index>().prop_map(Target::Existing),
        1 => anywhere(),
    ]
}

/// Anywhere in the first blocks, right around a block boundary, or well beyond.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0..3 * BLOCK,
        2 => (1..=3u64, 0..32u64).prop_map(|(k, d)| k * BLOCK - 16 + d),
        1 => 3 * BLOCK..6 * BLOCK,
    ]
}

fn write() -> impl Strategy<Value = W> {
    let len = prop_oneof![2 => 1usize..64, 1 => 1usize..2 * BLOCK as usize + 64];
    let seed = prop_oneof![1 => Just(0u8), 4 => 1u8..];
    (offset(), len, seed).prop_map(|(offset, len, seed)| W { offset, len, seed })
}

/// Mostly closed at once; else held open across a few more operations.
fn hold() -> impl Strategy<Value = u8> {
    prop_oneof![3 => Just(0u8), 1 => 1u8..=4]
}

fn rename_mode() -> impl Strategy<Value = RenameMode> {
    prop_oneof![
        2 => Just(RenameMode::Replace),
        1 => Just(RenameMode::NoReplace),
        1 => Just(RenameMode::Exchange),
    ]
}

fn xattr_mode() -> impl Strategy<Value = XattrMode> {
    prop::sample::select(vec![XattrMode::Any, XattrMode::Create, XattrMode::Replace])
}

/// Relative frequencies: out of about 120 operations, one crash (see `Op::Crash`).
fn op() -> impl Strategy<Value = Op<Target>> {
    let xattr_name = || prop::sample::select(&XATTR_NAMES[..]);
    prop_oneof![
        12 => (fresh(), any::<bool>(), any::<bool>())
            .prop_map(|(path, excl, trunc)| Op::Create { path, excl, trunc }),
        16 => (existing(), prop::collection::vec(write(), 1..=3), hold())
            .prop_map(|(path, writes, hold)| Op::Write { path, writes, hold }),
        8 => (existing(), prop_oneof![Just(0), offset()])
            .prop_map(|(path, size)| Op::Truncate { path, size }),
        16 => (existing(), fresh(), rename_mode())
            .prop_map(|(from, to, mode)| Op::Rename { from, to, mode }),
        8 => (existing(), fresh()).prop_map(|(from, to)| Op::Link { from, to }),
        8 => existing().prop_map(Op::Unlink),
        12 => fresh().prop_map(Op::Mkdir),
        8 => existing().prop_map(Op::Rmdir),
        4 => (fresh(), prop::sample::select(&SYMLINK_TARGETS[..]))
            .prop_map(|(path, target)| Op::Symlink { path, target }),
        8 => (existing(), xattr_name(), prop::collection::vec(any::<u8>(), 0..4), xattr_mode())
            .prop_map(|(path, name, value, mode)| Op::SetXattr { path, name, value, mode }),
        4 => (existing(), xattr_name())
            .prop_map(|(path, name)| Op::RemoveXattr { path, name }),
        6 => existing().prop_map(Op::Fsync),
        4 => Just(Op::Remount),
        1 => Just(Op::Crash),
    ]
}

// ---------------------------------------------------------------------------------------------
// Outcomes and trees, as both sides report them
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
struct Errno(i32);

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            libc::ENOENT => "ENOENT",
            libc::EEXIST => "EEXIST",
            libc::ENOTDIR => "ENOTDIR",
            libc::EISDIR => "EISDIR",
            libc::ENOTEMPTY => "ENOTEMPTY",
            libc::EINVAL => "EINVAL",
            libc::EPERM => "EPERM",
            libc::ENODATA => "ENODATA",
            libc::EIO => "EIO",
            other => return write!(f, "errno {other}"),
        };
        f.write_str(name)
    }
}

const ENOENT: Errno = Errno(libc::ENOENT);
const EEXIST: Errno = Errno(libc::EEXIST);
const ENOTDIR: Errno = Errno(libc::ENOTDIR);
const EISDIR: Errno = Errno(libc::EISDIR);
const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
const EINVAL: Errno = Errno(libc::EINVAL);
const EPERM: Errno = Errno(libc::EPERM);
const ENODATA: Errno = Errno(libc::ENODATA);

type Outcome = Result<(), Errno>;

/// File contents, printed as a summary (length, non-zero runs, digest) rather than bytes.
#[derive(Clone, PartialEq, Eq)]
struct Content(Vec<u8>);

impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut runs = Vec::new();
        let mut start = None;
        for (i, byte) in self.0.iter().chain([&0]).enumerate() {
            match (start, *byte != 0) {
                (None, true) => start = Some(i),
                (Some(s), false) => {
                    runs.push(s..i);
                    start = None;
                }
                _ => {}
            }
        }
        let digest = cloudfs::cas::hash_block(&self.0);
        write!(
            f,
            "{} bytes, non-zero at {runs:?}, blake3 {:02x}{:02x}{:02x}{:02x}",
            self.0.len(),
            digest[0],
            digest[1],
            digest[2],
            digest[3]
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Shape {
    Dir,
    File { size: u64, content: Content },
    Symlink { size: u64, target: String },
}

/// One name of the tree, as seen through it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    shape: Shape,
    nlink: u32,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// The first path (in sorted order) naming the same inode: hard-link identity.
    same_as: String,
}

/// The whole tree by path (`/` is the root, then `/a`, `/a/b`, ...).
type Tree = BTreeMap<String, Entry>;

fn child_path(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

/// Builds a `Tree` from entries tagged with an identity (inode or model node), filling in
/// `same_as` from the identities.
fn tree_of<K: Eq + std::hash::Hash>(tagged: BTreeMap<String, (K, Entry)>) -> Tree {
    let mut first: HashMap<K, String> = HashMap::new();
    tagged
        .into_iter()
        .map(|(path, (key, mut entry))| {
            entry.same_as = first.entry(key).or_insert_with(|| path.clone()).clone();
            (path, entry)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

type Id = usize;
const MODEL_ROOT: Id = 0;

#[derive(Debug, Clone)]
enum Kind {
    Dir(BTreeMap<&'static str, Id>),
    File(FileData),
    Symlink(&'static str),
}

/// A regular file's bytes: as callers see them, and as last flushed into the engine's
/// metadata (what a metadata sync makes durable).
#[derive(Debug, Clone, Default)]
struct FileData {
    content: Vec<u8>,
    flushed: Vec<u8>,
}

impl FileData {
    fn flush(&mut self) {
        self.flushed.clone_from(&self.content);
    }
}

#[derive(Debug, Clone)]
struct Node {
    kind: Kind,
    /// Names of a file or symlink (directories have exactly one).
    links: u32,
    xattrs: BTreeMap<&'static str, Vec<u8>>,
}

impl Node {
    fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir(_))
    }
}

#[derive(Debug, Clone)]
struct Model {
    nodes: HashMap<Id, Node>,
    next: Id,
    /// What the store's newest metadata generation holds: the tree as of the last sync, each
    /// file as last flushed by then. A crash brings it back. (`None` in that copy itself.)
    synced: Option<Box<Model>>,
}

impl Model {
    fn new() -> Model {
        let root = Node {
            kind: Kind::Dir(BTreeMap::new()),
            links: 1,
            xattrs: BTreeMap::new(),
        };
        let empty = Model {
            nodes: HashMap::from([(MODEL_ROOT, root)]),
            next: MODEL_ROOT + 1,
            synced: None,
        };
        Model {
            synced: Some(Box::new(empty.clone())),
            ..empty
        }
    }

    /// Flushes a file's writes into the metadata (nothing for other nodes or gone ones).
    fn flush(&mut self, id: Id) {
        if let Some(Node {
            kind: Kind::File(data),
            ..
        }) = self.nodes.get_mut(&id)
        {
            data.flush();
        }
    }

    /// A metadata sync: the store now holds the tree with every file as flushed.
    fn sync(&mut self) {
        let mut synced = Model {
            synced: None,
            ..self.clone()
        };
        for node in synced.nodes.values_mut() {
            if let Kind::File(data) = &mut node.kind {
                data.content.clone_from(&data.flushed);
            }
        }
        self.synced = Some(Box::new(synced));
    }

    /// A crash: the tree is what the store's newest generation holds.
    fn crash(&mut self) {
        let synced = self.synced.take().expect("a synced state");
        *self = Model {
            synced: Some(synced.clone()),
            ..*synced
        };
    }

    fn node(&self, id: Id) -> &Node {
        &self.nodes[&id]
    }

    fn node_mut(&mut self, id: Id) -> &mut Node {
        self.nodes.get_mut(&id).expect("live node")
    }

    fn entries(&self, dir: Id) -> Option<&BTreeMap<&'static str, Id>> {
        match &self.node(dir).kind {
            Kind::Dir(entries) => Some(entries),
            _ => None,
        }
    }

    fn entries_mut(&mut self, dir: Id) -> &mut BTreeMap<&'static str, Id> {
        match &mut self.node_mut(dir).kind {
            Kind::Dir(entries) => entries,
            _ => panic!("node {dir} is not a directory"),
        }
    }

    fn is_dir(&self, id: Id) -> bool {
        self.node(id).is_dir()
    }

    fn child(&self, dir: Id, name: &str) -> Option<Id> {
        self.entries(dir)?.get(name).copied()
    }

    /// Walks `path` from the root as successive `lookup`s do.
    fn resolve(&self, path: &[&str]) -> Result<Id, Errno> {
        path.iter().try_fold(MODEL_ROOT, |dir, name| {
            self.entries(dir)
                .ok_or(ENOTDIR)?
                .get(name)
                .copied()
                .ok_or(ENOENT)
        })
    }

    /// The directory holding `path`'s last component, and that component.
    fn parent(&self, path: &P) -> Result<(Id, &'static str), Errno> {
        let dir = self.resolve(path.parent())?;
        if !self.is_dir(dir) {
            return Err(ENOTDIR);
        }
        Ok((dir, path.name()))
    }

    fn add(&mut self, dir: Id, name: &'static str, kind: Kind) {
        let id = self.next;
        self.next += 1;
        let node = Node {
            kind,
            links: 1,
            xattrs: BTreeMap::new(),
        };
        self.nodes.insert(id, node);
        self.entries_mut(dir).insert(name, id);
    }

    /// Removes one name of `id` (already taken out of its directory).
    fn drop_link(&mut self, id: Id) {
        let node = self.node_mut(id);
        node.links -= 1;
        if node.links == 0 || node.is_dir() {
            self.nodes.remove(&id);
        }
    }

    /// Whether `ancestor` (a path) is `path` or one of the directories above it.
    fn contains(ancestor: &P, path: &[&str]) -> bool {
        path.starts_with(&ancestor.0)
    }

    /// Every name in the tree whose node passes `keep`, as paths from the root.
    fn paths(&self, keep: impl Fn(&Node) -> bool) -> Vec<Vec<&'static str>> {
        let mut out = Vec::new();
        let mut todo = vec![(MODEL_ROOT, Vec::new())];
        while let Some((dir, path)) = todo.pop() {
            for (name, child) in self.entries(dir).into_iter().flatten() {
                let mut child_path = path.clone();
                child_path.push(*name);
                if keep(self.node(*child)) {
                    out.push(child_path.clone());
                }
                if self.is_dir(*child) {
                    todo.push((*child, child_path));
                }
            }
        }
        out.sort();
        out
    }

    /// Whether a write through `op` would go to a symlink (skipped: see the module docs).
    fn writes_through_symlink(&self, op: &Op) -> bool {
        let Op::Write { path, .. } = op else {
            return false;
        };
        self.resolve(&path.0)
            .is_ok_and(|id| matches!(self.node(id).kind, Kind::Symlink(_)))
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        match op {
            Op::Create { path, excl, trunc } => {
                let (dir, name) = self.parent(path)?;
                match self.child(dir, name) {
                    None => self.add(dir, name, Kind::File(FileData::default())),
                    Some(_) if *excl => return Err(EEXIST),
                    Some(id) => match &mut self.node_mut(id).kind {
                        Kind::Dir(_) => return Err(EISDIR),
                        Kind::File(data) => {
                            if *trunc {
                                data.content.clear();
                            }
                            data.flush(); // by O_TRUNC, or else by the close
                        }
                        Kind::Symlink(_) => {}
                    },
                }
            }
            Op::Write { path, writes, hold } => {
                let id = self.resolve(&path.0)?;
                match &mut self.node_mut(id).kind {
                    Kind::Dir(_) => return Err(EISDIR),
                    Kind::File(data) => {
                        writes.iter().for_each(|w| w.apply_to(&mut data.content));
                        if *hold == 0 {
                            data.flush(); // by the close
                        }
                    }
                    Kind::Symlink(_) => unreachable!("writes through symlinks are skipped"),
                }
            }
            Op::Truncate { path, size } => {
                let id = self.resolve(&path.0)?;
                match &mut self.node_mut(id).kind {
                    Kind::Dir(_) => return Err(EISDIR),
                    Kind::File(data) => {
                        data.content.resize(*size as usize, 0);
                        data.flush();
                    }
                    Kind::Symlink(_) => return Err(EINVAL),
                }
            }
            Op::Rename { from, to, mode } => self.rename(from, to, *mode)?,
            Op::Link { from, to } => {
                let id = self.resolve(&from.0)?;
                let (dir, name) = self.parent(to)?;
                if self.is_dir(id) {
                    return Err(EPERM);
                }
                if self.child(dir, name).is_some() {
                    return Err(EEXIST);
                }
                self.entries_mut(dir).insert(name, id);
                self.node_mut(id).links += 1;
            }
            Op::Unlink(path) => self.remove(path, false)?,
            Op::Rmdir(path) => self.remove(path, true)?,
            Op::Mkdir(path) => self.make(path, Kind::Dir(BTreeMap::new()))?,
            Op::Symlink { path, target } => self.make(path, Kind::Symlink(target))?,
            Op::SetXattr {
                path,
                name,
                value,
                mode,
            } => {
                let id = self.resolve(&path.0)?;
                let xattrs = &mut self.node_mut(id).xattrs;
                match (mode, xattrs.contains_key(name)) {
                    (XattrMode::Create, true) => return Err(EEXIST),
                    (XattrMode::Replace, false) => return Err(ENODATA),
                    _ => {}
                }
                xattrs.insert(name, value.clone());
            }
            Op::RemoveXattr { path, name } => {
                let id = self.resolve(&path.0)?;
                self.node_mut(id).xattrs.remove(name).ok_or(ENODATA)?;
            }
            Op::Fsync(path) => {
                let id = self.resolve(&path.0)?;
                self.flush(id);
                self.sync();
            }
            Op::Remount => {
                let files: Vec<Id> = self.nodes.keys().copied().collect();
                files.into_iter().for_each(|id| self.flush(id));
                self.sync();
            }
            Op::Crash => self.crash(),
        }
        Ok(())
    }

    fn make(&mut self, path: &P, kind: Kind) -> Outcome {
        let (dir, name) = self.parent(path)?;
        if self.child(dir, name).is_some() {
            return Err(EEXIST);
        }
        self.add(dir, name, kind);
        Ok(())
    }

    fn remove(&mut self, path: &P, want_dir: bool) -> Outcome {
        let (dir, name) = self.parent(path)?;
        let id = self.child(dir, name).ok_or(ENOENT)?;
        match (want_dir, self.entries(id)) {
            (true, None) => return Err(ENOTDIR),
            (false, Some(_)) => return Err(EISDIR),
            (true, Some(entries)) if !entries.is_empty() => return Err(ENOTEMPTY),
            _ => {}
        }
        self.entries_mut(dir).remove(name);
        self.drop_link(id);
        Ok(())
    }

    fn rename(&mut self, from: &P, to: &P, mode: RenameMode) -> Outcome {
        let (src_dir, src_name) = self.parent(from)?;
        let (dst_dir, dst_name) = self.parent(to)?;
        let src = self.child(src_dir, src_name).ok_or(ENOENT)?;
        let dst = self.child(dst_dir, dst_name);
        if self.is_dir(src) && Self::contains(from, to.parent()) {
            return Err(EINVAL);
        }
        match (mode, dst) {
            (RenameMode::Exchange, None) => return Err(ENOENT),
            (RenameMode::Exchange, Some(dst)) => {
                if self.is_dir(dst) && Self::contains(to, from.parent()) {
                    return Err(EINVAL);
                }
                self.entries_mut(src_dir).insert(src_name, dst);
                self.entries_mut(dst_dir).insert(dst_name, src);
                return Ok(());
            }
            (RenameMode::NoReplace, Some(_)) => return Err(EEXIST),
            (_, Some(dst)) if dst == src => return Ok(()),
            (_, Some(dst)) => {
                match (self.entries(src), self.entries(dst)) {
                    (Some(_), None) => return Err(ENOTDIR),
                    (None, Some(_)) => return Err(EISDIR),
                    (Some(_), Some(entries)) if !entries.is_empty() => return Err(ENOTEMPTY),
                    _ => {}
                }
                self.entries_mut(dst_dir).remove(dst_name);
                self.drop_link(dst);
            }
            (_, None) => {}
        }
        self.entries_mut(src_dir).remove(src_name);
        self.entries_mut(dst_dir).insert(dst_name, src);
        Ok(())
    }

    fn tree(&self) -> Tree {
        let mut tagged = BTreeMap::new();
        self.walk(MODEL_ROOT, "/", &mut tagged);
        tree_of(tagged)
    }

    fn walk(&self, id: Id, path: &str, out: &mut BTreeMap<String, (Id, Entry)>) {
        let node = self.node(id);
        let (shape, nlink) = match &node.kind {
            Kind::Dir(entries) => {
                let mut subdirs = 0;
                for (name, child) in entries {
                    subdirs += u32::from(self.is_dir(*child));
                    self.walk(*child, &child_path(path, name), out);
                }
                (Shape::Dir, 2 + subdirs)
            }
            Kind::File(data) => (
                Shape::File {
                    size: data.content.len() as u64,
                    content: Content(data.content.clone()),
                },
                node.links,
            ),
            Kind::Symlink(target) => (
                Shape::Symlink {
                    size: target.len() as u64,
                    target: (*target).to_owned(),
                },
                node.links,
            ),
        };
        let xattrs = node
            .xattrs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let entry = Entry {
            shape,
            nlink,
            xattrs,
            same_as: String::new(),
        };
        out.insert(path.to_owned(), (id, entry));
    }
}

// ---------------------------------------------------------------------------------------------
// The engine side
// ---------------------------------------------------------------------------------------------

fn lookup_path(t: &TestFs, path: &[&str]) -> FsResult<u64> {
    path.iter()
        .try_fold(ROOT, |dir, name| Ok(t.fs.lookup(dir, name.as_bytes())?.ino))
}

/// The directory holding `path`'s last component (`ENOTDIR` if that is no directory, as the
/// kernel's path walk says), and that component.
fn parent_ino<'p>(t: &TestFs, path: &'p P) -> FsResult<(u64, &'p [u8])> {
    let dir = lookup_path(t, path.parent())?;
    if !t.fs.getattr(dir)?.is_dir() {
        return Err(FsError::NotDir);
    }
    Ok((dir, path.name().as_bytes()))
}

/// A handle a `Write` left open, on the mount it was opened on.
struct Held {
    fs: Arc<Fs>,
    ino: u64,
    fh: u64,
    /// The model's node for the file.
    node: Id,
    /// Operations to run before it is closed.
    ops_left: u8,
}

/// Runs `op` on the engine; a `Write` that holds its file open leaves `(ino, fh)` in `held`.
fn run_op(t: &mut TestFs, op: &Op, held: &mut Option<(u64, u64)>) -> FsResult<()> {
    match op {
        Op::Create { path, excl, trunc } => {
            let (dir, name) = parent_ino(t, path)?;
            let mut flags = libc::O_RDWR;
            if *excl {
                flags |= libc::O_EXCL;
            }
            if *trunc {
                flags |= libc::O_TRUNC;
            }
            let (inode, fh) = t.fs.create(ME, dir, name, 0o644, 0o022, flags)?;
            t.fs.release(inode.ino, fh)
        }
        Op::Write { path, writes, hold } => {
            let ino = lookup_path(t, &path.0)?;
            let fh = t.fs.open(ino, libc::O_RDWR)?;
            let written = writes
                .iter()
                .try_for_each(|w| t.fs.write(ino, fh, w.offset, &w.bytes()).map(drop));
            if *hold > 0 && written.is_ok() {
                *held = Some((ino, fh));
                return Ok(());
            }
            let released = t.fs.release(ino, fh);
            written.and(released)
        }
        Op::Truncate { path, size } => {
            let ino = lookup_path(t, &path.0)?;
            let attr = SetAttr {
                size: Some(*size),
                ..SetAttr::default()
            };
            t.fs.setattr(ino, attr).map(drop)
        }
        Op::Rename { from, to, mode } => {
            let (src_dir, src_name) = parent_ino(t, from)?;
            let (dst_dir, dst_name) = parent_ino(t, to)?;
            t.fs.rename(src_dir, src_name, dst_dir, dst_name, *mode)
        }
        Op::Link { from, to } => {
            let ino = lookup_path(t, &from.0)?;
            let (dir, name) = parent_ino(t, to)?;
            t.fs.link(ino, dir, name).map(drop)
        }
        Op::Unlink(path) => {
            let (dir, name) = parent_ino(t, path)?;
            t.fs.unlink(dir, name)
        }
        Op::Rmdir(path) => {
            let (dir, name) = parent_ino(t, path)?;
            t.fs.rmdir(dir, name)
        }
        Op::Mkdir(path) => {
            let (dir, name) = parent_ino(t, path)?;
            t.fs.mkdir(ME, dir, name, 0o755, 0o022).map(drop)
        }
        Op::Symlink { path, target } => {
            let (dir, name) = parent_ino(t, path)?;
            t.fs.symlink(ME, dir, name, target.as_bytes()).map(drop)
        }
        Op::SetXattr {
            path,
            name,
            value,
            mode,
        } => {
            let ino = lookup_path(t, &path.0)?;
            t.fs.setxattr(ino, name.as_bytes(), value, *mode)
        }
        Op::RemoveXattr { path, name } => {
            let ino = lookup_path(t, &path.0)?;
            t.fs.removexattr(ino, name.as_bytes())
        }
        Op::Fsync(path) => {
            let ino = lookup_path(t, &path.0)?;
            if t.fs.getattr(ino)?.is_dir() {
                t.fs.fsyncdir()
            } else {
                t.fs.fsync(ino)
            }
        }
        Op::Remount => t.try_remount(),
        Op::Crash => {
            t.remount_without_sync();
            Ok(())
        }
    }
}

/// `result`, or what failed as a message.
fn or_say<T>(result: FsResult<T>, what: impl fmt::Display) -> Result<T, String> {
    result.map_err(|e| format!("{what} failed: {e}"))
}

/// The engine's whole tree, read through `readdir`, `lookup`, `getattr`, `read`, `readlink`
/// and the xattr calls. Files held open are read through their open handle: a fresh handle's
/// close would flush them.
fn engine_tree(t: &TestFs, held: &[Held]) -> Result<Tree, String> {
    let open: HashMap<u64, u64> = held
        .iter()
        .filter(|h| Arc::ptr_eq(&h.fs, &t.fs))
        .map(|h| (h.ino, h.fh))
        .collect();
    let root = or_say(t.fs.getattr(ROOT), "getattr of /")?;
    let mut tagged = BTreeMap::new();
    engine_walk(t, &open, "/", root, &mut tagged)?;
    Ok(tree_of(tagged))
}

fn engine_walk(
    t: &TestFs,
    open: &HashMap<u64, u64>,
    path: &str,
    inode: cloudfs::meta::Inode,
    out: &mut BTreeMap<String, (u64, Entry)>,
) -> Result<(), String> {
    let ino = inode.ino;
    let shape = match inode.file_type() {
        libc::S_IFDIR => {
            for (name, child) in t.entries(ino) {
                let child_path = child_path(path, &name);
                let looked_up = or_say(t.fs.lookup(ino, name.as_bytes()), &child_path)?;
                if looked_up.ino != child.ino {
                    return Err(format!("lookup and readdir disagree on {child_path}"));
                }
                if child.is_dir() {
                    let dotdot = or_say(t.fs.lookup(child.ino, b".."), "lookup of ..")?;
                    if dotdot.ino != ino {
                        return Err(format!("'..' of {child_path} is not {path}"));
                    }
                }
                engine_walk(t, open, &child_path, child, out)?;
            }
            Shape::Dir
        }
        libc::S_IFREG => {
            let read = match open.get(&ino) {
                Some(fh) => t.read_handle(ino, *fh),
                None => t.try_read_all(ino),
            };
            Shape::File {
                size: inode.size,
                content: Content(or_say(read, format!("reading {path}"))?),
            }
        }
        libc::S_IFLNK => Shape::Symlink {
            size: inode.size,
            target: String::from_utf8_lossy(&or_say(t.fs.readlink(ino), "readlink")?).into_owned(),
        },
        other => return Err(format!("{path} has unexpected file type {other:o}")),
    };
    let mut xattrs = BTreeMap::new();
    for name in or_say(t.fs.listxattr(ino), "listxattr")? {
        let value = or_say(t.fs.getxattr(ino, &name), "getxattr")?;
        xattrs.insert(String::from_utf8_lossy(&name).into_owned(), value);
    }
    let entry = Entry {
        shape,
        nlink: inode.nlink,
        xattrs,
        same_as: String::new(),
    };
    out.insert(path.to_owned(), (ino, entry));
    Ok(())
}

/// How many inodes the engine's table holds, whatever their link count.
fn engine_inodes(t: &TestFs) -> Result<usize, String> {
    let count = t.fs.meta().read(|c| {
        c.query_row("SELECT count(*) FROM inodes", [], |r| r.get::<_, i64>(0))
            .map_err(cloudfs::meta::MetaError::from)
    });
    count
        .map(|n| n as usize)
        .map_err(|e| format!("counting inodes: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Running a sequence
// ---------------------------------------------------------------------------------------------

/// The entries where two trees differ, one line each (empty when they are equal).
fn tree_diff(engine: &Tree, model: &Tree) -> String {
    let paths: std::collections::BTreeSet<&String> = engine.keys().chain(model.keys()).collect();
    paths
        .into_iter()
        .filter(|path| engine.get(*path) != model.get(*path))
        .map(|path| {
            format!(
                "  {path}:\n    engine: {:?}\n    model:  {:?}\n",
                engine.get(path),
                model.get(path)
            )
        })
        .collect()
}

/// Runs one operation on both sides: same outcome; then, once the handles earlier writes
/// held open for long enough are closed, same tree, and (while no handle is open) no inode
/// beyond those the tree names.
fn step(t: &mut TestFs, model: &mut Model, op: &Op, held: &mut Vec<Held>) -> Result<(), String> {
    let expected = model.apply(op);
    let mut opened = None;
    let got = run_op(t, op, &mut opened);
    if got.as_ref().map_err(|e| Errno(e.errno())).copied() != expected {
        return Err(format!(
            "{op:?}: the model expects {expected:?}, the engine said {got:?}"
        ));
    }
    held.iter_mut().for_each(|h| h.ops_left -= 1);
    let (due, open): (Vec<Held>, Vec<Held>) = held.drain(..).partition(|h| h.ops_left == 0);
    *held = open;
    if let (Some((ino, fh)), Op::Write { path, hold, .. }) = (opened, op) {
        held.push(Held {
            fs: t.fs.clone(),
            ino,
            fh,
            node: model
                .resolve(&path.0)
                .expect("the model has the file written"),
            ops_left: *hold,
        });
    }
    for Held {
        fs, ino, fh, node, ..
    } in due
    {
        or_say(fs.release(ino, fh), "closing a file held open")?;
        // The close flushes the file, unless the mount it belongs to is gone.
        if Arc::ptr_eq(&fs, &t.fs) {
            model.flush(node);
        }
    }
    let diff = tree_diff(&engine_tree(t, held)?, &model.tree());
    if !diff.is_empty() {
        return Err(format!("after {op:?} the trees differ:\n{diff}"));
    }
    if held.iter().all(|h| !Arc::ptr_eq(&h.fs, &t.fs)) {
        let (engine, model) = (engine_inodes(t)?, model.nodes.len());
        if engine != model {
            return Err(format!(
                "after {op:?} the engine holds {engine} inodes, the tree names {model}"
            ));
        }
    }
    Ok(())
}

/// Runs `ops` on a fresh volume and on the model, comparing outcomes and trees after every
/// step, and once more after a final remount. A failure lists the concrete operations run.
fn run<T: Resolve>(ops: &[Op<T>]) -> Result<(), TestCaseError> {
    let mut t = TestFs::new(BLOCK);
    let mut model = Model::new();
    let mut trace = Vec::new();
    let mut held = Vec::new();
    for op in ops.iter().chain([&Op::Remount]) {
        let op = op.map(|name| name.resolve(&model));
        if model.writes_through_symlink(&op) {
            continue;
        }
        trace.push(op.clone());
        step(&mut t, &mut model, &op, &mut held).map_err(|why| {
            TestCaseError::fail(format!(
                "{why}\nthe operations (and a final remount): {trace:#?}"
            ))
        })?;
    }
    Ok(())
}

/// Runs a fixed sequence as a plain test.
fn replay(ops: &[Op]) {
    if let Err(e) = run(ops) {
        panic!("{e}");
    }
}

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions/model.txt",
        ))),
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn engine_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed sequences (shrunk failures and hand-picked corner cases)
// ---------------------------------------------------------------------------------------------

#[test]
fn writes_across_block_boundaries_and_beyond_eof_survive_a_remount() {
    let w = |offset, len, seed| W { offset, len, seed };
    replay(&[
        Op::Create {
            path: p("a"),
            excl: true,
            trunc: false,
        },
        Op::Write {
            path: p("a"),
            writes: vec![w(BLOCK - 10, 30, 1), w(5 * BLOCK + 7, 100, 2), w(10, 5, 0)],
            hold: 1,
        },
        Op::Truncate {
            path: p("a"),
            size: 2 * BLOCK + 3,
        },
        Op::Truncate {
            path: p("a"),
            size: 4 * BLOCK,
        },
        Op::Remount,
        Op::Write {
            path: p("a"),
            writes: vec![w(2 * BLOCK, 8, 3)],
            hold: 0,
        },
    ]);
}

#[test]
fn renames_of_directories_keep_link_counts() {
    let rename = |from, to, mode| Op::Rename {
        from: p(from),
        to: p(to),
        mode,
    };
    replay(&[
        Op::Mkdir(p("a")),
        Op::Mkdir(p("a/b")),
        Op::Mkdir(p("c")),
        Op::Mkdir(p("d")),
        rename("c", "d", RenameMode::Replace), // onto an empty directory, same parent
        rename("a/b", "d", RenameMode::Replace), // onto an empty directory, other parent
        rename("a", "d/c", RenameMode::NoReplace),
        rename("d", "d/c/x", RenameMode::Replace), // into itself
        rename("d/c", "d", RenameMode::Exchange),  // with its own parent
        Op::Create {
            path: p("f"),
            excl: true,
            trunc: false,
        },
        rename("f", "d/c", RenameMode::Exchange), // a file for a directory
        Op::Remount,
    ]);
}

#[test]
fn a_file_unlinked_while_open_does_not_outlive_a_crash() {
    replay(&[
        Op::Mkdir(p("d")),
        Op::Create {
            path: p("a"),
            excl: true,
            trunc: false,
        },
        Op::Write {
            path: p("a"),
            writes: vec![W {
                offset: BLOCK - 1,
                len: 2,
                seed: 1,
            }],
            hold: 3,
        },
        Op::Unlink(p("a")),
        Op::Fsync(p("d")), // the store's metadata now holds the unlinked, open inode
        Op::Crash,
    ]);
}
