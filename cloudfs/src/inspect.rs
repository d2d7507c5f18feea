//! Offline inspection of a volume from the store: `stat` (usage and dedup) and `fsck`
//! (structural checks of the inode table, missing blocks, orphaned blocks in the pool).

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

use futures::StreamExt;

use crate::cas::{BlockStore, block_key, hash_block, parse_block_key, quarantine_key};
use crate::gc::{self, GcResult};
use crate::meta::{self, Hash, MetaError, ROOT_INO};
use crate::store::{ObjectStore, StoreError, list_all};
use crate::volume::{self, OpenedVolume, VolumeResult};

/// What `cloudfs stat` prints.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VolumeStats {
    pub volume: String,
    pub block_size: u64,
    /// The most bytes the files may hold; none: unlimited.
    pub quota_bytes: Option<u64>,
    pub files: u64,
    pub directories: u64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub blocks: u64,
    pub dedup_ratio: f64,
}

/// Opens the newest replicated state of a volume read-only in a scratch directory.
async fn open_snapshot(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    name: &str,
    scratch: &Path,
) -> VolumeResult<OpenedVolume> {
    volume::open(store, blocks, name, &scratch.join(format!("{name}.db"))).await
}

/// The usage an inode table records, and the distinct blocks it references.
pub(crate) struct Measured {
    pub usage: meta::Usage,
    pub stored_bytes: u64,
    pub blocks: u64,
}

pub(crate) fn measure(meta: &meta::MetaStore) -> Result<Measured, MetaError> {
    let (usage, distinct) = meta
        .read(|c| -> Result<_, MetaError> { Ok((meta::usage(c)?, meta::distinct_blocks(c)?)) })?;
    Ok(Measured {
        usage,
        stored_bytes: distinct.iter().map(|(_, len)| len).sum(),
        blocks: distinct.len() as u64,
    })
}

pub async fn stats(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    name: &str,
    scratch: &Path,
) -> VolumeResult<VolumeStats> {
    let opened = open_snapshot(store, blocks, name, scratch).await?;
    let Measured {
        usage,
        stored_bytes,
        blocks,
    } = measure(&opened.meta)?;
    Ok(VolumeStats {
        volume: name.to_owned(),
        block_size: opened.config.block_size,
        quota_bytes: opened.config.quota_bytes,
        files: usage.files,
        directories: usage.directories,
        logical_bytes: usage.logical_bytes,
        stored_bytes,
        blocks,
        dedup_ratio: if stored_bytes == 0 {
            1.0
        } else {
            usage.logical_bytes as f64 / stored_bytes as f64
        },
    })
}

/// What `cloudfs fsck` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FsckReport {
    pub volume: String,
    pub files_checked: u64,
    pub blocks_checked: u64,
    /// Damage: each makes the volume unclean.
    pub problems: Vec<String>,
    /// Blocks in the pool that no volume references (harmless; garbage collection frees them).
    pub orphans: Vec<String>,
    /// Blocks re-read and checked against their hash (`--verify`).
    pub verified_blocks: u64,
    /// Damaged blocks moved out of `blocks/` (`--verify`), by their new key.
    pub quarantined: Vec<String>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The path of an inode, for reports (`?` where the chain is broken).
fn path_of(conn: &Connection, ino: u64) -> Result<String, MetaError> {
    let mut parts = Vec::new();
    let mut current = ino;
    for _ in 0..4096 {
        if current == ROOT_INO {
            break;
        }
        let row: Option<(i64, Vec<u8>)> = conn
            .query_row(
                "SELECT parent, name FROM dentries WHERE ino = ?1 LIMIT 1",
                [current as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match row {
            Some((parent, name)) => {
                parts.push(String::from_utf8_lossy(&name).into_owned());
                current = parent as u64;
            }
            None => {
                parts.push(format!("?(inode {current})"));
                break;
            }
        }
    }
    parts.reverse();
    Ok(format!("/{}", parts.join("/")))
}

fn structural_problems(conn: &Connection) -> Result<Vec<String>, MetaError> {
    let mut problems = Vec::new();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if integrity != "ok" {
        problems.push(format!("SQLite integrity check: {integrity}"));
    }
    let checks = [
        (
            "SELECT d.parent, d.name FROM dentries d LEFT JOIN inodes i ON i.ino = d.ino
             WHERE i.ino IS NULL",
            "entry names a missing inode",
        ),
        (
            "SELECT d.parent, d.name FROM dentries d JOIN inodes p ON p.ino = d.parent
             WHERE (p.mode & 61440) != 16384",
            "entry lives in a non-directory",
        ),
    ];
    for (sql, what) in checks {
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        for row in rows {
            let (parent, name) = row?;
            problems.push(format!(
                "{what}: {}/{}",
                path_of(conn, parent as u64)?,
                String::from_utf8_lossy(&name)
            ));
        }
    }
    let mut stmt = conn.prepare(
        "SELECT i.ino, i.nlink, (i.mode & 61440) = 16384,
                (SELECT count(*) FROM dentries d WHERE d.ino = i.ino),
                (SELECT count(*) FROM dentries d JOIN inodes c ON c.ino = d.ino
                  WHERE d.parent = i.ino AND (c.mode & 61440) = 16384)
         FROM inodes i WHERE i.nlink > 0",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get::<_, i64>(1)?,
            r.get::<_, bool>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    for row in rows {
        let (ino, nlink, is_dir, names, subdirs) = row?;
        let expected = if is_dir { 2 + subdirs } else { names };
        if ino != ROOT_INO && names == 0 {
            problems.push(format!("inode {ino} has links but no name"));
        } else if nlink != expected {
            problems.push(format!(
                "{}: link count {nlink}, expected {expected}",
                path_of(conn, ino)?
            ));
        }
    }
    Ok(problems)
}

/// Checks a volume's newest replicated state: the inode table's structure, every block it
/// names present with the right size, and with `verify` every such block re-read from the
/// store and checked against its hash. A damaged block is moved to [`quarantine_key`].
pub async fn fsck(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    name: &str,
    scratch: &Path,
    verify: bool,
) -> GcResult<FsckReport> {
    let opened = open_snapshot(store, blocks, name, scratch).await?;
    let mut report = FsckReport {
        volume: name.to_owned(),
        ..FsckReport::default()
    };
    let pool: HashMap<Hash, u64> = list_all(store, "blocks/")
        .await?
        .into_iter()
        .filter_map(|o| Some((parse_block_key(&o.key)?, o.size)))
        .collect();
    let (problems, usage) = opened
        .meta
        .read(|c| -> Result<_, MetaError> { Ok((structural_problems(c)?, meta::usage(c)?)) })?;
    report.problems = problems;
    report.files_checked = usage.files;
    let missing = opened.meta.read(|c| -> Result<Vec<String>, MetaError> {
        let mut missing = Vec::new();
        let mut stmt = c.prepare("SELECT ino, idx, hash, len FROM blocks ORDER BY ino, idx")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        for row in rows {
            let (ino, idx, hash, len) = row?;
            let hash: Hash = hash.try_into().unwrap_or([0; 32]);
            match pool.get(&hash) {
                Some(size) if *size == len as u64 => {}
                Some(size) => missing.push(format!(
                    "{} block {idx}: {} is {size} bytes, expected {len}",
                    path_of(c, ino as u64)?,
                    block_key(&hash)
                )),
                None => missing.push(format!(
                    "{} block {idx}: {} is missing",
                    path_of(c, ino as u64)?,
                    block_key(&hash)
                )),
            }
        }
        Ok(missing)
    })?;
    report.blocks_checked = opened.meta.read(meta::distinct_blocks)?.len() as u64;
    report.problems.extend(missing);
    if verify {
        verify_blocks(store, &opened.meta, &pool, &mut report).await?;
    }
    report.orphans = orphans(store, blocks, &pool, scratch).await?;
    Ok(report)
}

/// Blocks re-read at once by `fsck --verify`.
const VERIFY_IN_FLIGHT: usize = 8;

/// Re-reads every block the volume names (that the pool holds at the right size) and checks
/// it against its hash; reports each damaged one by the files naming it, and quarantines it.
async fn verify_blocks(
    store: &dyn ObjectStore,
    meta: &meta::MetaStore,
    pool: &HashMap<Hash, u64>,
    report: &mut FsckReport,
) -> VolumeResult<()> {
    let wanted: Vec<Hash> = meta
        .read(meta::distinct_blocks)?
        .into_iter()
        .filter(|(hash, len)| pool.get(hash) == Some(len))
        .map(|(hash, _)| hash)
        .collect();
    let total = wanted.len();
    let mut checks = futures::stream::iter(wanted)
        .map(|hash| async move {
            let key = block_key(&hash);
            match store.get(&key, None).await {
                Ok(data) => Ok((hash, (hash_block(&data) != hash).then_some(data))),
                Err(StoreError::NotFound(_)) => Ok((hash, None)), // collected meanwhile
                Err(e) => Err(e),
            }
        })
        .buffer_unordered(VERIFY_IN_FLIGHT);
    while let Some(checked) = checks.next().await {
        let (hash, damaged) = checked?;
        report.verified_blocks += 1;
        if report.verified_blocks.is_multiple_of(1000) {
            tracing::info!(verified = report.verified_blocks, total, "verifying blocks");
        }
        let Some(data) = damaged else { continue };
        let quarantined = quarantine_key(&hash);
        store.put(&quarantined, data).await?;
        store.delete(&block_key(&hash)).await?;
        let named_by = meta.read(|c| -> Result<Vec<String>, MetaError> {
            let mut stmt =
                c.prepare("SELECT ino, idx FROM blocks WHERE hash = ?1 ORDER BY ino, idx")?;
            let rows = stmt.query_map([&hash[..]], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })?;
            let mut named_by = Vec::new();
            for row in rows {
                let (ino, idx) = row?;
                named_by.push(format!("{} block {idx}", path_of(c, ino as u64)?));
            }
            Ok(named_by)
        })?;
        for place in named_by {
            report.problems.push(format!(
                "{place}: {} is damaged (its content does not match its name); moved to {quarantined}",
                block_key(&hash)
            ));
        }
        report.quarantined.push(quarantined);
    }
    Ok(())
}

/// Pool blocks that no volume, clone or snapshot references: what `cloudfs gc` collects once
/// they are older than its grace period.
async fn orphans(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    pool: &HashMap<Hash, u64>,
    scratch: &Path,
) -> GcResult<Vec<String>> {
    let marks = scratch.join("orphans");
    let unreferenced = gc::unreferenced(store, blocks, &marks, pool.keys()).await?;
    let mut orphans: Vec<String> = unreferenced.iter().map(block_key).collect();
    orphans.sort();
    Ok(orphans)
}
