//! Garbage collection of a pool's blocks.
//!
//! **Mark**: every block a root names goes into an on-disk sorted set (a SQLite table in the
//! state directory, so memory stays bounded however many blocks the pool holds). The roots
//! are the metadata generations every volume still has in the store (their database chunks
//! and every block their files list) and the manifest every snapshot pins; a clone is a
//! volume, so it is covered the same way.
//!
//! **Sweep**: the `blocks/` listing is read page by page. A block no root names and last
//! written before `start − grace` is checked once more (HEAD) and deleted in bulk.
//!
//! **Why it is safe while volumes are mounted and written.** A block uploaded after the mark
//! started is newer than the cutoff. A block a mount starts to reference after the mark read
//! that volume was uploaded, or refreshed, at most [`REFRESH_AGE`] before (see `cas`), so it
//! is newer than the cutoff too as long as the grace exceeds twice that plus the metadata
//! sync lag: hence [`SAFE_GRACE`]. A volume whose newest generation vanished while it was
//! being read (pruned by its mount) is listed again, so the mark always holds a generation
//! that was the newest at some point after the run started.
//!
//! **Interrupted runs** resume: the state directory keeps the mark and how far the sweep got.
//! The mark stays valid for a later sweep because the cutoff is relative to when it started.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::cas::{BlockStore, REFRESH_AGE, parse_block_key};
use crate::meta::{Hash, MetaError};
use crate::snapshot;
use crate::store::{ObjectMeta, ObjectStore, StoreError, unix_now_secs};
use crate::tar::{self, ExportError};
use crate::volume::{self, Generation, VolumeError};

/// The grace period `cloudfs gc` uses unless told otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// The shortest grace that is safe while volumes of the pool are being written.
pub const SAFE_GRACE: Duration = Duration::from_secs(2 * REFRESH_AGE.as_secs() + 600);
/// Blocks listed per page.
const PAGE: usize = 10_000;
/// Candidates checked again at once before they are deleted.
const RECHECKS_IN_FLIGHT: usize = 16;
/// How often a volume whose generations keep vanishing is listed again.
const MAX_RELISTS: usize = 5;
/// How old an interrupted run may be and still be resumed rather than started afresh.
const RESUMABLE_FOR: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("garbage-collection state {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("garbage-collection state I/O: {0}")]
    Io(#[from] io::Error),
    #[error(
        "the store cannot list objects (TempURL-only credentials); garbage collection needs \
         account credentials"
    )]
    NeedsListing,
    #[error(
        "the metadata generations of volume {0} kept changing while they were read; run gc again"
    )]
    Unsettled(String),
}

pub type GcResult<T> = Result<T, GcError>;

/// How to run a collection.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Unreferenced blocks written more recently than this before the run started are kept.
    pub grace: Duration,
    /// Report what would be deleted; delete nothing.
    pub dry_run: bool,
    /// Where the mark set and progress live (one directory per pool).
    pub state_dir: PathBuf,
}

/// What a collection found and did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Continued an interrupted run (its mark and sweep progress).
    pub resumed: bool,
    pub volumes: u64,
    /// Metadata generations, snapshots and exports read as roots.
    pub generations: u64,
    pub snapshots: u64,
    #[serde(default)]
    pub exports: u64,
    /// Distinct blocks the roots name.
    pub marked: u64,
    /// Block objects listed.
    pub scanned: u64,
    /// Listed blocks a root names.
    pub referenced: u64,
    /// Listed blocks no root names but written within the grace period.
    pub recent: u64,
    /// Unreferenced blocks older than the grace period (deleted unless a dry run).
    pub candidates: u64,
    pub candidate_bytes: u64,
    pub deleted: u64,
    pub bytes_reclaimed: u64,
    pub seconds: f64,
}

/// How a run named with `cloudfs gc --report-as` ended, kept in the pool for whoever
/// started it (the operator's collection Jobs, whose output it may not be able to read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredOutcome {
    /// Seconds since the Unix epoch when the run ended.
    pub finished_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<GcReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn outcome_key(name: &str) -> String {
    format!("gc-reports/{name}.json")
}

/// Keeps the outcome of run `name` in the pool.
pub async fn store_outcome(
    store: &dyn ObjectStore,
    name: &str,
    outcome: Result<&GcReport, String>,
) -> GcResult<()> {
    volume::validate_name(name)?;
    let (report, error) = match outcome {
        Ok(report) => (Some(report.clone()), None),
        Err(error) => (None, Some(error)),
    };
    let stored = StoredOutcome {
        finished_at: unix_now_secs(),
        report,
        error,
    };
    let json = serde_json::to_vec_pretty(&stored).map_err(io::Error::other)?;
    store.put(&outcome_key(name), json.into()).await?;
    Ok(())
}

/// The outcome of run `name`, once it has ended.
pub async fn read_outcome(store: &dyn ObjectStore, name: &str) -> GcResult<Option<StoredOutcome>> {
    volume::validate_name(name)?;
    match store.get(&outcome_key(name), None).await {
        Ok(raw) => Ok(serde_json::from_slice(&raw).ok()),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Forgets the outcome of run `name` (when its record is pruned).
pub async fn delete_outcome(store: &dyn ObjectStore, name: &str) -> GcResult<()> {
    volume::validate_name(name)?;
    Ok(store.delete(&outcome_key(name)).await?)
}

/// The mark set and the run's progress, in `<state_dir>/marks.db`; or a throwaway mark set
/// (`scratch.db`, for dry runs and `fsck`) that always starts afresh and is not kept.
struct State {
    conn: Connection,
    path: PathBuf,
}

/// A run found in the state directory.
struct Run {
    started_at: i64,
    sweep_after: Option<String>,
    report: GcReport,
}

impl State {
    fn open(dir: &Path, throwaway: bool) -> GcResult<State> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(if throwaway { "scratch.db" } else { "marks.db" });
        if throwaway {
            remove_database(&path)?;
        }
        let conn = Connection::open(&path).map_err(|source| GcError::State {
            path: path.clone(),
            source,
        })?;
        let state = State { conn, path };
        state.sql(|c| {
            c.execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA cache_size = -65536;
                 CREATE TABLE IF NOT EXISTS run (
                     id          INTEGER PRIMARY KEY CHECK (id = 1),
                     started_at  INTEGER NOT NULL,
                     grace       INTEGER NOT NULL,
                     marked      INTEGER NOT NULL,
                     sweep_after TEXT,
                     report      TEXT NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS refs (hash BLOB PRIMARY KEY) WITHOUT ROWID;",
            )
        })?;
        Ok(state)
    }

    fn sql<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> GcResult<T> {
        f(&self.conn).map_err(|source| GcError::State {
            path: self.path.clone(),
            source,
        })
    }

    /// The interrupted run to resume: one whose mark completed, with the same grace, recent
    /// enough. Anything else is discarded.
    fn resumable(&self, grace: Duration) -> GcResult<Option<Run>> {
        let row = self.sql(|c| {
            c.query_row(
                "SELECT started_at, grace, marked, sweep_after, report FROM run",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, bool>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                },
            )
            .optional()
        })?;
        let run = row.and_then(|(started_at, run_grace, marked, sweep_after, report)| {
            let fresh = unix_now_secs() - started_at < RESUMABLE_FOR.as_secs() as i64;
            let same_grace = run_grace == grace.as_secs() as i64;
            let report = serde_json::from_str(&report).ok()?;
            (marked && fresh && same_grace).then_some(Run {
                started_at,
                sweep_after,
                report,
            })
        });
        if run.is_none() {
            self.sql(|c| c.execute_batch("DELETE FROM run; DELETE FROM refs;"))?;
        }
        Ok(run)
    }

    fn begin(&self, started_at: i64, grace: Duration) -> GcResult<()> {
        self.sql(|c| {
            c.execute(
                "INSERT INTO run (id, started_at, grace, marked, report) VALUES (1, ?1, ?2, 0, '{}')",
                params![started_at, grace.as_secs() as i64],
            )
        })?;
        Ok(())
    }

    fn add(&self, hashes: impl IntoIterator<Item = Hash>) -> GcResult<()> {
        self.sql(|c| {
            let tx = c.unchecked_transaction()?;
            {
                let mut insert =
                    tx.prepare_cached("INSERT OR IGNORE INTO refs (hash) VALUES (?1)")?;
                for hash in hashes {
                    insert.execute([&hash[..]])?;
                }
            }
            tx.commit()
        })
    }

    /// Adds every block the files of the volume database at `db` list.
    fn add_database(&self, db: &Path) -> GcResult<()> {
        let db = db.to_string_lossy().into_owned();
        self.sql(|c| {
            c.execute("ATTACH DATABASE ?1 AS vol", [&db])?;
            let added = c.execute(
                "INSERT OR IGNORE INTO refs (hash) SELECT DISTINCT hash FROM vol.blocks",
                [],
            );
            c.execute("DETACH DATABASE vol", [])?;
            added.map(|_| ())
        })
    }

    fn count(&self) -> GcResult<u64> {
        let count: i64 =
            self.sql(|c| c.query_row("SELECT count(*) FROM refs", [], |r| r.get(0)))?;
        Ok(count as u64)
    }

    fn contains(&self, hash: &Hash) -> GcResult<bool> {
        self.sql(|c| {
            c.prepare_cached("SELECT 1 FROM refs WHERE hash = ?1")?
                .exists([&hash[..]])
        })
    }

    fn save(&self, marked: bool, sweep_after: Option<&str>, report: &GcReport) -> GcResult<()> {
        let report = serde_json::to_string(report).map_err(io::Error::other)?;
        self.sql(|c| {
            c.execute(
                "UPDATE run SET marked = ?1, sweep_after = ?2, report = ?3",
                params![marked, sweep_after, report],
            )
        })?;
        Ok(())
    }

    /// Forgets the run: the next one starts afresh.
    fn finish(self) -> GcResult<()> {
        let path = self.path.clone();
        drop(self.conn);
        remove_database(&path)
    }
}

fn remove_database(path: &Path) -> GcResult<()> {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::remove_file(PathBuf::from(file)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}

/// Collects the garbage of the pool `store`: marks what every root names, then deletes the
/// unreferenced blocks older than the grace period. `blocks` fetches metadata chunks.
pub async fn collect(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    options: &GcOptions,
) -> GcResult<GcReport> {
    if !store.can_list() {
        return Err(GcError::NeedsListing);
    }
    let clock = Instant::now();
    let state = State::open(&options.state_dir, options.dry_run)?;
    let (started_at, sweep_after, mut report) = match state.resumable(options.grace)? {
        Some(run) => {
            tracing::info!(
                started_at = run.started_at,
                after = run.sweep_after.as_deref().unwrap_or(""),
                "resuming an interrupted garbage collection"
            );
            let report = GcReport {
                resumed: true,
                ..run.report
            };
            (run.started_at, run.sweep_after, report)
        }
        None => {
            let started_at = unix_now_secs();
            state.begin(started_at, options.grace)?;
            let mut report = GcReport::default();
            mark(store, blocks, &state, &options.state_dir, &mut report).await?;
            report.marked = state.count()?;
            state.save(true, None, &report)?;
            tracing::info!(marked = report.marked, "mark saved; sweeping blocks/");
            (started_at, None, report)
        }
    };
    report.dry_run = options.dry_run;
    let cutoff = started_at - options.grace.as_secs() as i64;
    sweep(
        store,
        &state,
        cutoff,
        sweep_after,
        options.dry_run,
        &mut report,
    )
    .await?;
    report.seconds += clock.elapsed().as_secs_f64();
    state.finish()?;
    tracing::info!(
        scanned = report.scanned,
        deleted = report.deleted,
        bytes_reclaimed = report.bytes_reclaimed,
        "garbage collection done"
    );
    Ok(report)
}

/// Which of the `pool`'s blocks no root names, whatever their age (`fsck`'s orphans). Marks
/// into a throwaway set under `scratch`.
pub(crate) async fn unreferenced<'a>(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    scratch: &Path,
    pool: impl IntoIterator<Item = &'a Hash>,
) -> GcResult<Vec<Hash>> {
    let state = State::open(scratch, true)?;
    mark(store, blocks, &state, scratch, &mut GcReport::default()).await?;
    let mut orphans = Vec::new();
    for hash in pool {
        if !state.contains(hash)? {
            orphans.push(*hash);
        }
    }
    state.finish()?;
    Ok(orphans)
}

/// Adds every block each root names to the mark set.
async fn mark(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    state: &State,
    state_dir: &Path,
    report: &mut GcReport,
) -> GcResult<()> {
    let scratch = state_dir.join("root.db");
    let mut marker = RootMarker {
        blocks,
        state,
        scratch: &scratch,
        seen: HashSet::new(),
    };
    for volume in volume::list_volumes(store).await? {
        report.volumes += 1;
        report.generations += mark_generations(store, &mut marker, &volume).await?;
        for (name, manifest) in snapshot::pinned_manifests(store, &volume).await? {
            marker
                .add(&volume, &format!("snapshot {name}"), &manifest)
                .await?;
            report.snapshots += 1;
        }
        tracing::info!(
            volume,
            generations = report.generations,
            snapshots = report.snapshots,
            "marked"
        );
    }
    // After the volumes: an export whose record this listing misses was laid out from a
    // generation marked above, or from a newer one whose new blocks the grace keeps.
    tar::for_each_referenced_blocks(store, |name, hashes| -> GcResult<()> {
        state.add(hashes)?;
        report.exports += 1;
        tracing::info!(export = name, "marked");
        Ok(())
    })
    .await?;
    remove_database(&scratch)
}

/// Marks the generations `volume` has in the store; returns how many were read.
async fn mark_generations(
    store: &dyn ObjectStore,
    marker: &mut RootMarker<'_>,
    volume: &str,
) -> GcResult<u64> {
    let mut read = 0;
    for _ in 0..MAX_RELISTS {
        let keys = volume::generation_keys(store, volume).await?;
        let Some(newest) = keys.last().cloned() else {
            return Ok(read); // being created or deleted: its blocks are new, or garbage
        };
        let mut newest_read = false;
        for key in keys {
            match volume::read_generation(store, volume, &key).await {
                Ok(generation) => {
                    marker.add(volume, &key, &generation).await?;
                    read += 1;
                    newest_read |= key == newest;
                }
                Err(VolumeError::Store(StoreError::NotFound(_))) => {} // pruned meanwhile
                Err(e) => return Err(e.into()),
            }
        }
        if newest_read {
            return Ok(read);
        }
    }
    Err(GcError::Unsettled(volume.to_owned()))
}

/// Adds roots (generation manifests) to the mark set, each distinct one once.
struct RootMarker<'a> {
    blocks: &'a BlockStore,
    state: &'a State,
    /// Where a root's database is rebuilt to be read.
    scratch: &'a Path,
    /// Digests of the chunk lists already marked.
    seen: HashSet<[u8; 32]>,
}

impl RootMarker<'_> {
    async fn add(&mut self, volume: &str, label: &str, manifest: &Generation) -> GcResult<()> {
        let chunks: Vec<Hash> = manifest.chunk_hashes().collect();
        let mut digest = blake3::Hasher::new();
        for chunk in &chunks {
            digest.update(chunk);
        }
        if !self.seen.insert(*digest.finalize().as_bytes()) {
            return Ok(());
        }
        self.state.add(chunks)?;
        volume::rebuild_database(self.blocks, volume, manifest, label, self.scratch).await?;
        self.state.add_database(self.scratch)
    }
}

/// Deletes (unless `dry_run`) the listed blocks no root names that were last written before
/// `cutoff`, starting after key `after`.
async fn sweep(
    store: &dyn ObjectStore,
    state: &State,
    cutoff: i64,
    mut after: Option<String>,
    dry_run: bool,
    report: &mut GcReport,
) -> GcResult<()> {
    loop {
        let page = store.list("blocks/", after.as_deref(), PAGE).await?;
        let mut unreferenced = Vec::new();
        for object in page.objects {
            report.scanned += 1;
            let Some(hash) = parse_block_key(&object.key) else {
                continue; // not a block: not ours to delete
            };
            if state.contains(&hash)? {
                report.referenced += 1;
            } else if object.modified >= cutoff {
                report.recent += 1;
            } else {
                unreferenced.push(object);
            }
        }
        let condemned = still_old(store, unreferenced, cutoff).await?;
        let bytes: u64 = condemned.iter().map(|o| o.size).sum();
        report.candidates += condemned.len() as u64;
        report.candidate_bytes += bytes;
        if !dry_run && !condemned.is_empty() {
            let keys: Vec<String> = condemned.into_iter().map(|o| o.key).collect();
            store.delete_many(&keys).await?;
            report.deleted += keys.len() as u64;
            report.bytes_reclaimed += bytes;
        }
        after = page.next_marker;
        if !dry_run {
            state.save(true, after.as_deref(), report)?;
        }
        tracing::info!(
            scanned = report.scanned,
            referenced = report.referenced,
            candidates = report.candidates,
            deleted = report.deleted,
            "sweeping"
        );
        if after.is_none() {
            return Ok(());
        }
    }
}

/// The candidates that, asked again, still exist and are still older than `cutoff` (a mount
/// may have refreshed one since the listing).
async fn still_old(
    store: &dyn ObjectStore,
    candidates: Vec<ObjectMeta>,
    cutoff: i64,
) -> GcResult<Vec<ObjectMeta>> {
    let checked: Vec<GcResult<Option<ObjectMeta>>> = futures::stream::iter(candidates)
        .map(|object| async move {
            Ok(store
                .head(&object.key)
                .await?
                .filter(|now| now.modified < cutoff)
                .map(|now| ObjectMeta {
                    size: now.size,
                    ..object
                }))
        })
        .buffered(RECHECKS_IN_FLIGHT)
        .collect()
        .await;
    checked.into_iter().filter_map(Result::transpose).collect()
}
