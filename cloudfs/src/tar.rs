//! Server-side TAR exports: `cloudfs export tar` lays a directory of a volume out as a tar
//! stream whose file data are byte ranges of the blocks already in the pool, and has the store
//! write it as one composite object (on Swift a static large object: headers and padding are
//! inline data segments, nothing is copied; on the local store a real tar file).
//!
//! The stream is POSIX pax: long names, link targets, sizes of 8 GiB and more, large ids and
//! sub-second mtimes go in pax records; files with holes use the GNU sparse 1.0 layout (GNU
//! tar, bsdtar and Python's tarfile restore them sparse), so a sparse 10 GiB file costs its
//! data only. Hard links are tar hard links; xattrs are `SCHILY.xattr` records; sockets are
//! skipped.
//!
//! Every export keeps a record, `exports-meta/<name>/record.json`, naming each block its
//! object references: garbage collection treats those blocks as live until the export is
//! deleted. Nested manifests live beside it.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use bytes::Bytes;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::cas::{BlockStore, block_key};
use crate::meta::{self, Hash, Inode, MetaError, MetaStore, ROOT_INO};
use crate::snapshot;
use crate::store::{ObjectStore, Piece, StoreError, list_all, unix_now_secs};
use crate::volume::{self, VolumeError};

/// Errors of exports.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "invalid export name {0:?}: use 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    InvalidName(String),
    #[error("an export named {0} exists already; delete it first (cloudfs export delete)")]
    Exists(String),
    #[error("no export named {0}")]
    NotFound(String),
    #[error("volume {volume} has no directory {dir}")]
    NoSuchDirectory { volume: String, dir: String },
    #[error("{dir} in volume {volume} is not a directory")]
    NotADirectory { volume: String, dir: String },
    #[error("export record {key} is damaged: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type ExportResult<T> = Result<T, ExportError>;

/// What to export: a directory of a volume's newest replicated state or of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSource {
    pub volume: String,
    pub snapshot: Option<String>,
    /// `/`-separated path from the volume's root; empty for the root.
    pub dir: String,
}

/// What `cloudfs export tar/list` report of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    pub name: String,
    /// The object holding the tar.
    pub object: String,
    pub volume: String,
    pub snapshot: Option<String>,
    pub dir: String,
    /// The metadata generation (or snapshot) the tar was laid out from.
    pub generation: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// Tar entries (directories, files, links…).
    pub entries: u64,
    /// Length of the tar stream.
    pub tar_bytes: u64,
    /// Of which file data taken from existing blocks.
    pub referenced_bytes: u64,
    /// Distinct blocks referenced.
    pub blocks: u64,
    /// Sockets (which tar cannot hold) left out.
    pub skipped: u64,
}

/// `exports-meta/<name>/record.json`.
#[derive(Debug, Serialize, Deserialize)]
struct ExportRecord {
    #[serde(flatten)]
    info: ExportInfo,
    /// Hex names of the blocks the export references.
    block_hashes: Vec<String>,
}

const META_PREFIX: &str = "exports-meta/";
const RECORD_NAME: &str = "record.json";

fn object_key(name: &str) -> String {
    format!("exports/{name}")
}

fn meta_prefix(name: &str) -> String {
    format!("{META_PREFIX}{name}/")
}

fn record_key(name: &str) -> String {
    format!("{}{RECORD_NAME}", meta_prefix(name))
}

fn parts_prefix(name: &str) -> String {
    format!("{}part-", meta_prefix(name))
}

fn validate_export_name(name: &str) -> ExportResult<()> {
    volume::validate_name(name).map_err(|_| ExportError::InvalidName(name.to_owned()))
}

/// Exports `source` as a tar in the object `exports/<name>` of the same pool. Metadata only
/// on Swift: the object's segments are the blocks themselves.
pub async fn export_tar(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    source: &ExportSource,
    name: &str,
    scratch: &Path,
) -> ExportResult<ExportInfo> {
    validate_export_name(name)?;
    let db_path = scratch.join(format!("export-{name}.db"));
    let opened = match &source.snapshot {
        Some(snap) => snapshot::open(store, blocks, &source.volume, snap, &db_path).await?,
        None => volume::open(store, blocks, &source.volume, &db_path).await?,
    };
    let layout = lay_out(
        &opened.meta,
        &source.volume,
        &source.dir,
        opened.config.block_size,
    )?;
    drop(opened.meta);
    let info = ExportInfo {
        name: name.to_owned(),
        object: object_key(name),
        volume: source.volume.clone(),
        snapshot: source.snapshot.clone(),
        dir: format!("/{}", source.dir.trim_matches('/')),
        generation: opened.generation,
        created_at: unix_now_secs(),
        entries: layout.entries,
        tar_bytes: layout.pieces.iter().map(Piece::len).sum(),
        referenced_bytes: layout
            .pieces
            .iter()
            .filter(|p| matches!(p, Piece::Object { .. }))
            .map(Piece::len)
            .sum(),
        blocks: layout.blocks.len() as u64,
        skipped: layout.skipped,
    };
    let record = ExportRecord {
        info: info.clone(),
        block_hashes: layout.blocks.iter().map(hex::encode).collect(),
    };
    let json = serde_json::to_vec_pretty(&record)
        .map_err(|e| VolumeError::Io(std::io::Error::other(e)))?;
    // The record goes first: from then on garbage collection keeps the blocks the object
    // is about to reference.
    if !store
        .put_if_absent(&record_key(name), Bytes::from(json))
        .await?
    {
        return Err(ExportError::Exists(name.to_owned()));
    }
    tracing::info!(
        name,
        entries = info.entries,
        tar_bytes = info.tar_bytes,
        "writing the export"
    );
    if let Err(e) = store
        .put_composite(&info.object, &layout.pieces, &parts_prefix(name))
        .await
    {
        if let Err(cleanup) = remove(store, name).await {
            tracing::warn!(name, error = %cleanup, "could not remove the failed export");
        }
        return Err(e.into());
    }
    Ok(info)
}

/// Every export of the pool, by name.
pub async fn list(store: &dyn ObjectStore) -> ExportResult<Vec<ExportInfo>> {
    let mut exports = Vec::new();
    for key in record_keys(store).await? {
        if let Some(record) = read_record(store, &key).await? {
            exports.push(record.info);
        }
    }
    Ok(exports)
}

/// Calls `mark` with each export's name and the blocks it references (garbage-collection
/// roots), one export at a time: memory holds one record's hashes, however many exports the
/// pool has.
pub(crate) async fn for_each_referenced_blocks<E: From<ExportError>>(
    store: &dyn ObjectStore,
    mut mark: impl FnMut(&str, Vec<Hash>) -> Result<(), E>,
) -> Result<(), E> {
    for key in record_keys(store).await? {
        let Some(record) = read_record(store, &key).await? else {
            continue;
        };
        let mut hashes = Vec::with_capacity(record.block_hashes.len());
        for hex_hash in &record.block_hashes {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(hex_hash, &mut hash).map_err(|e| ExportError::Corrupt {
                key: key.clone(),
                reason: format!("block {hex_hash}: {e}"),
            })?;
            hashes.push(hash);
        }
        drop(record.block_hashes);
        mark(&record.info.name, hashes)?;
    }
    Ok(())
}

/// The keys of every export's record.
async fn record_keys(store: &dyn ObjectStore) -> ExportResult<Vec<String>> {
    let suffix = format!("/{RECORD_NAME}");
    Ok(list_all(store, META_PREFIX)
        .await?
        .into_iter()
        .map(|object| object.key)
        .filter(|key| key.ends_with(&suffix))
        .collect())
}

/// The record at `key`, or `None` when it was deleted since it was listed.
async fn read_record(store: &dyn ObjectStore, key: &str) -> ExportResult<Option<ExportRecord>> {
    let raw = match store.get(key, None).await {
        Ok(raw) => raw,
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&raw)
        .map(Some)
        .map_err(|e| ExportError::Corrupt {
            key: key.to_owned(),
            reason: e.to_string(),
        })
}

/// Deletes export `name`: the object first, then its nested manifests, then the record that
/// kept its blocks alive (garbage collection frees them once nothing else uses them).
pub async fn delete(store: &dyn ObjectStore, name: &str) -> ExportResult<()> {
    validate_export_name(name)?;
    if store.head(&record_key(name)).await?.is_none() {
        return Err(ExportError::NotFound(name.to_owned()));
    }
    remove(store, name).await
}

async fn remove(store: &dyn ObjectStore, name: &str) -> ExportResult<()> {
    store.delete(&object_key(name)).await?;
    let parts: Vec<String> = list_all(store, &parts_prefix(name))
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    store.delete_many(&parts).await?;
    store.delete(&record_key(name)).await?;
    Ok(())
}

/// A tar stream as pieces, with what it references.
struct Layout {
    pieces: Vec<Piece>,
    entries: u64,
    blocks: BTreeSet<Hash>,
    skipped: u64,
}

/// Lays out directory `dir` of the inode table as a tar stream.
fn lay_out(meta: &MetaStore, volume: &str, dir: &str, block_size: u64) -> ExportResult<Layout> {
    meta.read(|conn| -> ExportResult<Layout> {
        let top = resolve_dir(conn, volume, dir)?;
        let mut tar = TarWriter {
            pieces: Vec::new(),
            entries: 0,
            blocks: BTreeSet::new(),
            skipped: 0,
            block_size,
            first_paths: HashMap::new(),
        };
        // Depth first, each directory's entries by name: a directory's header precedes its
        // contents, as tar readers expect.
        let mut stack: Vec<(Vec<u8>, Inode)> = Vec::new();
        push_children(conn, &mut stack, &[], top)?;
        while let Some((path, inode)) = stack.pop() {
            tar.entry(conn, &path, &inode)?;
            if inode.is_dir() {
                push_children(conn, &mut stack, &path, inode.ino)?;
            }
        }
        tar.pieces.push(Piece::Inline(Bytes::from(vec![0u8; 1024])));
        Ok(Layout {
            pieces: tar.pieces,
            entries: tar.entries,
            blocks: tar.blocks,
            skipped: tar.skipped,
        })
    })
}

fn resolve_dir(conn: &Connection, volume: &str, dir: &str) -> ExportResult<u64> {
    let mut ino = ROOT_INO;
    for component in dir.split('/').filter(|c| !c.is_empty() && *c != ".") {
        let missing = || ExportError::NoSuchDirectory {
            volume: volume.to_owned(),
            dir: dir.to_owned(),
        };
        ino = meta::lookup(conn, ino, component.as_bytes())?.ok_or_else(missing)?;
        let inode = meta::get_inode(conn, ino)?.ok_or_else(missing)?;
        if !inode.is_dir() {
            return Err(ExportError::NotADirectory {
                volume: volume.to_owned(),
                dir: dir.to_owned(),
            });
        }
    }
    Ok(ino)
}

/// Pushes the entries of directory `dir` (at `path`) so that they pop in name order.
fn push_children(
    conn: &Connection,
    stack: &mut Vec<(Vec<u8>, Inode)>,
    path: &[u8],
    dir: u64,
) -> Result<(), MetaError> {
    let mut children = Vec::new();
    let mut after = 0;
    loop {
        let page = meta::read_dir(conn, dir, after, 10_000)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        children.extend(page);
    }
    children.sort_by(|a, b| b.name.cmp(&a.name));
    for child in children {
        let mut child_path = path.to_vec();
        if !child_path.is_empty() {
            child_path.push(b'/');
        }
        child_path.extend_from_slice(&child.name);
        stack.push((child_path, child.inode));
    }
    Ok(())
}

/// Appends entries to a tar stream.
struct TarWriter {
    pieces: Vec<Piece>,
    entries: u64,
    blocks: BTreeSet<Hash>,
    skipped: u64,
    block_size: u64,
    /// Where each multiply linked inode was first written (later names are hard links).
    first_paths: HashMap<u64, Vec<u8>>,
}

/// The largest size the ustar header's 11 octal digits hold.
const USTAR_MAX_SIZE: u64 = 0o77777777777;
/// The largest uid/gid the ustar header's 7 octal digits hold.
const USTAR_MAX_ID: u32 = 0o7777777;

impl TarWriter {
    fn entry(&mut self, conn: &Connection, path: &[u8], inode: &Inode) -> ExportResult<()> {
        let mut header = EntryHeader::new(path, inode);
        if !inode.is_dir() && inode.nlink > 1 {
            if let Some(first) = self.first_paths.get(&inode.ino) {
                header.kind = ::tar::EntryType::Link;
                header.link = Some(first.clone());
                self.emit(header, &[]);
                return Ok(());
            }
            self.first_paths.insert(inode.ino, path.to_vec());
        }
        for name in meta::list_xattrs(conn, inode.ino)? {
            if let (Ok(name_text), Some(value)) = (
                std::str::from_utf8(&name),
                meta::get_xattr(conn, inode.ino, &name)?,
            ) {
                header
                    .records
                    .push((format!("SCHILY.xattr.{name_text}"), value));
            }
        }
        match inode.file_type() {
            libc::S_IFDIR => {
                header.kind = ::tar::EntryType::Directory;
                header.name.push(b'/');
                self.emit(header, &[]);
            }
            libc::S_IFREG => self.file(conn, header, inode)?,
            libc::S_IFLNK => {
                header.kind = ::tar::EntryType::Symlink;
                header.link = Some(meta::symlink_target(conn, inode.ino)?.unwrap_or_default());
                self.emit(header, &[]);
            }
            libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO => {
                header.kind = match inode.file_type() {
                    libc::S_IFCHR => ::tar::EntryType::Char,
                    libc::S_IFBLK => ::tar::EntryType::Block,
                    _ => ::tar::EntryType::Fifo,
                };
                header.device = Some((libc::major(inode.rdev as _), libc::minor(inode.rdev as _)));
                self.emit(header, &[]);
            }
            _ => {
                tracing::warn!(
                    path = %String::from_utf8_lossy(path),
                    "a tar cannot hold a socket: left out"
                );
                self.skipped += 1;
            }
        }
        Ok(())
    }

    /// A regular file: its data regions are byte ranges of its blocks; holes make it a GNU
    /// sparse 1.0 entry whose data area starts with the map of the regions.
    fn file(
        &mut self,
        conn: &Connection,
        mut header: EntryHeader,
        inode: &Inode,
    ) -> ExportResult<()> {
        let mut regions: Vec<(u64, Piece)> = Vec::new();
        for block in meta::blocks_in(conn, inode.ino, 0, i64::MAX as u64)? {
            let start = block.idx.saturating_mul(self.block_size);
            if start >= inode.size {
                continue;
            }
            let len = block.len.min(inode.size - start);
            if len == 0 {
                continue;
            }
            self.blocks.insert(block.hash);
            regions.push((
                start,
                Piece::Object {
                    key: block_key(&block.hash),
                    size: block.len,
                    range: 0..len,
                },
            ));
        }
        let data_len: u64 = regions.iter().map(|(_, p)| p.len()).sum();
        let pieces: Vec<Piece> = if data_len == inode.size {
            header.size = inode.size;
            regions.into_iter().map(|(_, piece)| piece).collect()
        } else {
            // GNU tar reads each region in whole 512-byte records, so every region but the
            // file's last is padded to one with the zeros the file holds there (block sizes
            // are multiples of 512, so the padding stays inside the block's span).
            let mut padded: Vec<(u64, u64, Piece, u64)> = Vec::with_capacity(regions.len());
            for (start, piece) in regions {
                let len = piece.len();
                let pad = len.next_multiple_of(512).min(inode.size - start) - len;
                padded.push((start, len + pad, piece, pad));
            }
            let map = sparse_map(
                padded.iter().map(|(start, len, ..)| (*start, *len)),
                inode.size,
            );
            header.size = map.len() as u64 + padded.iter().map(|(_, len, ..)| len).sum::<u64>();
            header.sparse(inode.size);
            let mut pieces = vec![Piece::Inline(Bytes::from(map))];
            for (_, _, piece, pad) in padded {
                pieces.push(piece);
                if pad > 0 {
                    pieces.push(Piece::Inline(Bytes::from(vec![0u8; pad as usize])));
                }
            }
            pieces
        };
        self.emit(header, &pieces);
        Ok(())
    }

    /// Appends a header (and its pax header when it needs one), `data`, and the padding.
    fn emit(&mut self, header: EntryHeader, data: &[Piece]) {
        let size = header.size;
        for block in header.encode() {
            self.pieces.push(Piece::Inline(block));
        }
        self.pieces.extend(data.iter().cloned());
        let padding = (512 - size % 512) % 512;
        if padding > 0 {
            self.pieces
                .push(Piece::Inline(Bytes::from(vec![0u8; padding as usize])));
        }
        self.entries += 1;
    }
}

/// The GNU sparse 1.0 map: the count of regions, then each one's offset and length, in
/// decimal lines, padded to a 512-byte boundary. It always ends with an empty region at the
/// real size, as GNU tar writes it: GNU tar's reader drops a last data region without one.
fn sparse_map(regions: impl Iterator<Item = (u64, u64)>, real_size: u64) -> Vec<u8> {
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, len) in regions {
        match merged.last_mut() {
            Some((s, merged_len)) if *s + *merged_len == start => *merged_len += len,
            _ => merged.push((start, len)),
        }
    }
    merged.push((real_size, 0));
    let mut map = format!("{}\n", merged.len());
    for (start, len) in merged {
        map.push_str(&format!("{start}\n{len}\n"));
    }
    let mut bytes = map.into_bytes();
    bytes.resize(bytes.len().div_ceil(512) * 512, 0);
    bytes
}

/// One entry's header fields, before encoding.
struct EntryHeader {
    name: Vec<u8>,
    kind: ::tar::EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
    /// Bytes of the entry's data area.
    size: u64,
    link: Option<Vec<u8>>,
    device: Option<(u32, u32)>,
    /// Extra pax records.
    records: Vec<(String, Vec<u8>)>,
    /// Real size of a GNU sparse 1.0 entry.
    sparse_size: Option<u64>,
}

impl EntryHeader {
    fn new(path: &[u8], inode: &Inode) -> EntryHeader {
        EntryHeader {
            name: path.to_vec(),
            kind: ::tar::EntryType::Regular,
            mode: inode.mode & 0o7777,
            uid: inode.uid,
            gid: inode.gid,
            mtime_ns: inode.mtime_ns,
            size: 0,
            link: None,
            device: None,
            records: Vec::new(),
            sparse_size: None,
        }
    }

    fn sparse(&mut self, real_size: u64) {
        self.sparse_size = Some(real_size);
    }

    /// The 512-byte blocks of the header: a pax extended header (type `x`) first when a
    /// field does not fit ustar.
    fn encode(mut self) -> Vec<Bytes> {
        let mut records = std::mem::take(&mut self.records);
        let mut ustar_name = self.name.clone();
        if let Some(real_size) = self.sparse_size {
            records.push(("GNU.sparse.major".into(), b"1".to_vec()));
            records.push(("GNU.sparse.minor".into(), b"0".to_vec()));
            records.push(("GNU.sparse.name".into(), self.name.clone()));
            records.push((
                "GNU.sparse.realsize".into(),
                real_size.to_string().into_bytes(),
            ));
            ustar_name = sparse_placeholder(&self.name);
        } else if self.name.len() > 100 {
            records.push(("path".into(), self.name.clone()));
        }
        if let Some(link) = self.link.as_ref().filter(|l| l.len() > 100) {
            records.push(("linkpath".into(), link.clone()));
        }
        if self.size > USTAR_MAX_SIZE {
            records.push(("size".into(), self.size.to_string().into_bytes()));
        }
        if self.uid > USTAR_MAX_ID {
            records.push(("uid".into(), self.uid.to_string().into_bytes()));
        }
        if self.gid > USTAR_MAX_ID {
            records.push(("gid".into(), self.gid.to_string().into_bytes()));
        }
        let (secs, nanos) = (
            self.mtime_ns.div_euclid(1_000_000_000),
            self.mtime_ns.rem_euclid(1_000_000_000),
        );
        if nanos != 0 || secs < 0 {
            records.push(("mtime".into(), format!("{secs}.{nanos:09}").into_bytes()));
        }
        let binary = records
            .iter()
            .any(|(_, value)| std::str::from_utf8(value).is_err());
        if binary {
            records.insert(0, ("hdrcharset".into(), b"BINARY".to_vec()));
        }
        let mut blocks = Vec::new();
        if !records.is_empty() {
            let body = pax_body(&records);
            let mut pax_name = b"PaxHeaders/".to_vec();
            pax_name.extend_from_slice(last_component(&self.name));
            let pax = ustar_block(
                &pax_name,
                ::tar::EntryType::XHeader,
                0o644,
                0,
                0,
                secs.max(0) as u64,
                body.len() as u64,
                None,
                None,
            );
            blocks.push(pax);
            let mut padded = body;
            padded.resize(padded.len().div_ceil(512) * 512, 0);
            blocks.push(Bytes::from(padded));
        }
        blocks.push(ustar_block(
            &ustar_name,
            self.kind,
            self.mode,
            self.uid.min(USTAR_MAX_ID),
            self.gid.min(USTAR_MAX_ID),
            secs.max(0) as u64,
            self.size.min(USTAR_MAX_SIZE),
            self.link.as_deref(),
            self.device,
        ));
        blocks
    }
}

/// `<dir>/GNUSparseFile.0/<name>`: the name GNU tar gives the ustar header of a sparse file
/// (readers that know the format use `GNU.sparse.name`).
fn sparse_placeholder(path: &[u8]) -> Vec<u8> {
    let name = last_component(path);
    let dir = &path[..path.len() - name.len()];
    let mut placeholder = dir.to_vec();
    placeholder.extend_from_slice(b"GNUSparseFile.0/");
    placeholder.extend_from_slice(name);
    placeholder
}

fn last_component(path: &[u8]) -> &[u8] {
    let trimmed = path.strip_suffix(b"/").unwrap_or(path);
    match trimmed.iter().rposition(|&b| b == b'/') {
        Some(slash) => &trimmed[slash + 1..],
        None => trimmed,
    }
}

/// Pax records: `<length> <key>=<value>\n`, the length counting itself.
fn pax_body(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (key, value) in records {
        let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        body.extend_from_slice(format!("{len} {key}=").as_bytes());
        body.extend_from_slice(value);
        body.push(b'\n');
    }
    body
}

/// One ustar header block. Names and link targets longer than the fields are cut (the pax
/// header carries them whole).
#[allow(clippy::too_many_arguments)]
fn ustar_block(
    name: &[u8],
    kind: ::tar::EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    size: u64,
    link: Option<&[u8]>,
    device: Option<(u32, u32)>,
) -> Bytes {
    let mut header = ::tar::Header::new_ustar();
    {
        let fields = header
            .as_ustar_mut()
            .unwrap_or_else(|| unreachable!("new_ustar"));
        let name = &name[..name.len().min(100)];
        fields.name[..name.len()].copy_from_slice(name);
        if let Some(link) = link {
            let link = &link[..link.len().min(100)];
            fields.linkname[..link.len()].copy_from_slice(link);
        }
    }
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(u64::from(uid));
    header.set_gid(u64::from(gid));
    header.set_mtime(mtime);
    header.set_size(size);
    if let Some((major, minor)) = device {
        // Infallible on a ustar header.
        let _ = header.set_device_major(major);
        let _ = header.set_device_minor(minor);
    }
    header.set_cksum();
    Bytes::copy_from_slice(header.as_bytes())
}

/// Parses `VOLUME[@SNAPSHOT][:DIR]`.
pub fn parse_source(text: &str) -> ExportResult<ExportSource> {
    let (volume_part, dir) = match text.split_once(':') {
        Some((volume, dir)) => (volume, dir.to_owned()),
        None => (text, String::new()),
    };
    let (volume, snapshot) = match volume_part.split_once('@') {
        Some((volume, snapshot)) => (volume, Some(snapshot.to_owned())),
        None => (volume_part, None),
    };
    volume::validate_name(volume)?;
    if let Some(snapshot) = &snapshot {
        volume::validate_name(snapshot)?;
    }
    Ok(ExportSource {
        volume: volume.to_owned(),
        snapshot,
        dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        for value_len in [0, 1, 85, 86, 87, 88, 89, 90, 994, 995, 996, 997, 5000] {
            let body = pax_body(&[("path".into(), vec![b'x'; value_len])]);
            let (len, _) = std::str::from_utf8(&body)
                .expect("UTF-8")
                .split_once(' ')
                .expect("a length");
            assert_eq!(len.parse::<usize>().ok(), Some(body.len()), "{value_len}");
        }
    }

    #[test]
    fn sparse_maps_merge_adjacent_regions_and_end_at_the_real_size() {
        let map = sparse_map([(0, 512), (512, 100), (4096, 10)].into_iter(), 10_000);
        assert_eq!(map.len(), 512);
        let text = std::str::from_utf8(&map)
            .expect("UTF-8")
            .trim_end_matches('\0');
        assert_eq!(text, "3\n0\n612\n4096\n10\n10000\n0\n");
        let empty = sparse_map(std::iter::empty(), 1 << 40);
        assert!(empty.starts_with(b"1\n1099511627776\n0\n"));
    }

    #[test]
    fn headers_carry_what_ustar_cannot_in_pax_records() {
        let inode = Inode {
            ino: 2,
            mode: libc::S_IFREG | 0o640,
            uid: 1 << 22,
            gid: 7,
            size: 10 << 30,
            nlink: 1,
            rdev: 0,
            atime_ns: 0,
            mtime_ns: 1_500_000_000_250_000_000,
            ctime_ns: 0,
            generation: 0,
        };
        let long_name = vec![b'n'; 150];
        let mut header = EntryHeader::new(&long_name, &inode);
        header.size = inode.size;
        let blocks = header.encode();
        assert_eq!(blocks.len(), 3, "pax header, its records, the ustar header");
        let records = String::from_utf8_lossy(&blocks[1]);
        for wanted in [
            format!("path={}\n", "n".repeat(150)),
            format!("size={}\n", 10u64 << 30),
            format!("uid={}\n", 1 << 22),
            "mtime=1500000000.250000000\n".to_owned(),
        ] {
            assert!(records.contains(&wanted), "{wanted:?} in {records:?}");
        }
        assert!(!records.contains("gid="), "7 fits ustar");
        let ustar = ::tar::Header::from_byte_slice(&blocks[2]);
        assert_eq!(ustar.mode().ok(), Some(0o640));
        assert_eq!(ustar.mtime().ok(), Some(1_500_000_000));
        assert_eq!(ustar.cksum().ok(), {
            let mut copy = ustar.clone();
            copy.set_cksum();
            copy.cksum().ok()
        });

        let short = EntryHeader::new(b"a/b", &inode).encode();
        assert_eq!(short.len(), 3, "sub-second mtime still needs pax");
        let whole_seconds = Inode {
            mtime_ns: 1_000_000_000,
            uid: 0,
            ..inode
        };
        assert_eq!(EntryHeader::new(b"a/b", &whole_seconds).encode().len(), 1);
    }

    #[test]
    fn sources_parse() {
        let source = parse_source("vol@snap:/a/b").expect("parse");
        assert_eq!(
            source,
            ExportSource {
                volume: "vol".into(),
                snapshot: Some("snap".into()),
                dir: "/a/b".into(),
            }
        );
        assert_eq!(parse_source("vol").expect("parse").dir, "");
        assert!(parse_source("../x").is_err());
        assert!(parse_source("vol@:x").is_err());
    }
}
