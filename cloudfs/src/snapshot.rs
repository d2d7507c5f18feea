//! Named volume snapshots, clones and rollback, all metadata only. A snapshot pins a copy of
//! a generation manifest in `volumes/<volume>/snapshots/<name>.json`; the manifest names the
//! database chunks, which (like the file blocks the database names) are ordinary CAS blocks,
//! so taking, cloning and rolling back copy no data, and metadata retention never prunes a
//! snapshot. A clone is a new volume whose first generation is that manifest; a rollback
//! publishes it as the volume's newest generation under a fresh lease epoch, after pinning the
//! state it replaces as an automatic snapshot.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::cas::BlockStore;
use crate::inspect;
use crate::lease::{StoreLease, holder_id};
use crate::meta::MetaError;
use crate::store::{ObjectStore, StoreError, list_all, unix_now_secs};
use crate::volume::{
    self, FORMAT_VERSION, Generation, OpenedVolume, VolumeConfig, VolumeError, VolumeResult,
};

/// What `cloudfs snapshot list/show` report of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub volume: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// The object key of the generation it was taken from.
    pub generation: String,
    pub files: u64,
    pub directories: u64,
    /// Sum of the file sizes.
    pub logical_bytes: u64,
    /// Bytes of the distinct blocks it references.
    pub stored_bytes: u64,
    /// Bytes of the blocks (data and metadata) that neither the volume's newest state nor
    /// any other of its snapshots references: what deleting it frees, unless a clone or an
    /// export holds them too. Computed by [`list_with_unique_bytes`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_bytes: Option<u64>,
}

/// `volumes/<volume>/snapshots/<name>.json`.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotRecord {
    #[serde(flatten)]
    info: SnapshotInfo,
    manifest: Generation,
}

/// How long the lease taken by an offline rollback outlives a crash of the rollback.
const ROLLBACK_LEASE_TTL: Duration = Duration::from_secs(60);

fn snapshots_prefix(volume: &str) -> String {
    format!("volumes/{volume}/snapshots/")
}

fn snapshot_key(volume: &str, name: &str) -> String {
    format!("{}{name}.json", snapshots_prefix(volume))
}

fn not_found(volume: &str, name: &str) -> VolumeError {
    VolumeError::SnapshotNotFound {
        volume: volume.to_owned(),
        name: name.to_owned(),
    }
}

async fn read_record(
    store: &dyn ObjectStore,
    volume: &str,
    name: &str,
) -> VolumeResult<SnapshotRecord> {
    volume::validate_name(volume)?;
    volume::validate_name(name)?;
    let key = snapshot_key(volume, name);
    let raw = match store.get(&key, None).await {
        Ok(raw) => raw,
        Err(StoreError::NotFound(_)) => return Err(not_found(volume, name)),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&raw).map_err(|e| VolumeError::Corrupt {
        volume: volume.to_owned(),
        reason: format!("snapshot {name}: {e}"),
    })
}

/// Pins the newest replicated state of `volume` as snapshot `name`, with the usage of that
/// state. A mounted volume's newest replicated state is its last metadata sync (`fsync`, the
/// sync interval, unmount).
pub async fn create(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    volume: &str,
    name: &str,
    scratch: &Path,
) -> VolumeResult<SnapshotInfo> {
    volume::validate_name(name)?;
    let config = volume::read_config(store, volume).await?;
    let (generation, manifest) = volume::newest_generation(store, volume).await?;
    let opened = volume::open_generation(
        blocks,
        config,
        &manifest,
        &generation,
        &scratch.join(format!("snapshot-{name}.db")),
    )
    .await?;
    let measured = inspect::measure(&opened.meta)?;
    pin(store, volume, name, generation, manifest, &measured).await
}

/// Pins generation `generation` (its `manifest`, whose usage is `measured`) of `volume` as
/// snapshot `name`.
pub(crate) async fn pin(
    store: &dyn ObjectStore,
    volume: &str,
    name: &str,
    generation: String,
    manifest: Generation,
    measured: &inspect::Measured,
) -> VolumeResult<SnapshotInfo> {
    volume::validate_name(name)?;
    let info = SnapshotInfo {
        name: name.to_owned(),
        volume: volume.to_owned(),
        created_at: unix_now_secs(),
        generation,
        files: measured.usage.files,
        directories: measured.usage.directories,
        logical_bytes: measured.usage.logical_bytes,
        stored_bytes: measured.stored_bytes,
        unique_bytes: None,
    };
    let record = SnapshotRecord {
        info: info.clone(),
        manifest,
    };
    let json = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
    if !store
        .put_if_absent(&snapshot_key(volume, name), Bytes::from(json))
        .await?
    {
        return Err(VolumeError::SnapshotExists {
            volume: volume.to_owned(),
            name: name.to_owned(),
        });
    }
    store.sync().await?;
    Ok(info)
}

/// The generation manifest snapshot `name` pins.
pub(crate) async fn pinned_manifest(
    store: &dyn ObjectStore,
    volume: &str,
    name: &str,
) -> VolumeResult<Generation> {
    Ok(read_record(store, volume, name).await?.manifest)
}

/// Every snapshot of `volume`, oldest first.
pub async fn list(store: &dyn ObjectStore, volume: &str) -> VolumeResult<Vec<SnapshotInfo>> {
    volume::read_config(store, volume).await?;
    let mut snapshots: Vec<SnapshotInfo> = records(store, volume)
        .await?
        .into_iter()
        .map(|record| record.info)
        .collect();
    snapshots.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
    Ok(snapshots)
}

/// [`list`], with each snapshot's unique bytes. Rebuilds the database of every snapshot (each
/// distinct one once) and of the newest state under `scratch`, and counts the references of
/// every block in an on-disk table there, so memory stays bounded.
pub async fn list_with_unique_bytes(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    volume: &str,
    scratch: &Path,
) -> VolumeResult<Vec<SnapshotInfo>> {
    let mut snapshots = list(store, volume).await?;
    let mut manifests: HashMap<String, Generation> =
        pinned_manifests(store, volume).await?.into_iter().collect();
    let (_, newest) = volume::newest_generation(store, volume).await?;
    std::fs::create_dir_all(scratch)?;
    let refs_path = scratch.join("unique-refs.db");
    let _ = std::fs::remove_file(&refs_path);
    let refs = rusqlite::Connection::open(&refs_path).map_err(MetaError::from)?;
    refs.execute_batch(
        "PRAGMA journal_mode = OFF;
         PRAGMA synchronous = OFF;
         CREATE TABLE refs (
             hash  BLOB NOT NULL,
             owner INTEGER NOT NULL,
             len   INTEGER NOT NULL,
             PRIMARY KEY (hash, owner)
         ) WITHOUT ROWID;",
    )
    .map_err(MetaError::from)?;
    // Owner 0 is the newest state, snapshot i is owner i + 1.
    let owners = std::iter::once((0, newest)).chain(
        snapshots
            .iter()
            .enumerate()
            .filter_map(|(i, info)| Some((i + 1, manifests.remove(&info.name)?))),
    );
    let db = scratch.join("unique-owner.db");
    for (owner, manifest) in owners {
        let chunks = volume::rebuild_database(blocks, volume, &manifest, "snapshot", &db).await?;
        let attached = db.to_string_lossy().into_owned();
        let counted = (|| -> rusqlite::Result<()> {
            refs.execute("ATTACH ?1 AS owned", [&attached])?;
            refs.execute(
                "INSERT OR IGNORE INTO refs SELECT hash, ?1, len FROM owned.blocks",
                [owner as i64],
            )?;
            refs.execute("DETACH owned", [])?;
            let mut insert =
                refs.prepare_cached("INSERT OR IGNORE INTO refs VALUES (?1, ?2, ?3)")?;
            for (hash, len) in chunks.iter().zip(manifest.chunk_lens()) {
                insert.execute(rusqlite::params![&hash[..], owner as i64, len as i64])?;
            }
            Ok(())
        })();
        counted.map_err(MetaError::from)?;
    }
    let _ = std::fs::remove_file(&db);
    let mut unique: HashMap<i64, u64> = HashMap::new();
    let totals = (|| -> rusqlite::Result<()> {
        let mut stmt = refs.prepare(
            "SELECT owner, SUM(len) FROM refs WHERE hash IN
                 (SELECT hash FROM refs GROUP BY hash HAVING COUNT(*) = 1)
             GROUP BY owner",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (owner, bytes) = row?;
            unique.insert(owner, bytes as u64);
        }
        Ok(())
    })();
    totals.map_err(MetaError::from)?;
    drop(refs);
    let _ = std::fs::remove_file(&refs_path);
    for (i, info) in snapshots.iter_mut().enumerate() {
        info.unique_bytes = Some(unique.get(&(i as i64 + 1)).copied().unwrap_or(0));
    }
    Ok(snapshots)
}

/// The manifest every snapshot of `volume` pins, by snapshot name (garbage-collection roots).
pub(crate) async fn pinned_manifests(
    store: &dyn ObjectStore,
    volume: &str,
) -> VolumeResult<Vec<(String, Generation)>> {
    Ok(records(store, volume)
        .await?
        .into_iter()
        .map(|record| (record.info.name, record.manifest))
        .collect())
}

async fn records(store: &dyn ObjectStore, volume: &str) -> VolumeResult<Vec<SnapshotRecord>> {
    let prefix = snapshots_prefix(volume);
    let mut records = Vec::new();
    for object in list_all(store, &prefix).await? {
        let Some(name) = object.key[prefix.len()..].strip_suffix(".json") else {
            continue;
        };
        match read_record(store, volume, name).await {
            Ok(record) => records.push(record),
            Err(VolumeError::SnapshotNotFound { .. }) => {} // deleted meanwhile
            Err(e) => return Err(e),
        }
    }
    Ok(records)
}

pub async fn show(store: &dyn ObjectStore, volume: &str, name: &str) -> VolumeResult<SnapshotInfo> {
    Ok(read_record(store, volume, name).await?.info)
}

/// Deletes a snapshot (its blocks stay until garbage collection finds them unreferenced).
pub async fn delete(store: &dyn ObjectStore, volume: &str, name: &str) -> VolumeResult<()> {
    read_record(store, volume, name).await?;
    store.delete(&snapshot_key(volume, name)).await?;
    Ok(())
}

/// Rebuilds a snapshot's database into `db_path`, read-only (for `mount --snapshot`).
pub async fn open(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    volume: &str,
    name: &str,
    db_path: &Path,
) -> VolumeResult<OpenedVolume> {
    let config = volume::read_config(store, volume).await?;
    let record = read_record(store, volume, name).await?;
    let label = snapshot_key(volume, name);
    volume::open_generation(blocks, config, &record.manifest, &label, db_path).await
}

/// Creates `new_volume` from the newest replicated state of `volume`, or from its snapshot
/// `snapshot`. The two share every block and diverge independently from then on.
pub async fn clone_volume(
    store: &dyn ObjectStore,
    volume: &str,
    snapshot: Option<&str>,
    new_volume: &str,
) -> VolumeResult<VolumeConfig> {
    volume::validate_name(new_volume)?;
    let source = volume::read_config(store, volume).await?;
    let manifest = match snapshot {
        Some(name) => read_record(store, volume, name).await?.manifest,
        None => volume::newest_generation(store, volume).await?.1,
    };
    let config = VolumeConfig {
        format_version: FORMAT_VERSION,
        name: new_volume.to_owned(),
        block_size: source.block_size,
        created_at: unix_now_secs(),
        quota_bytes: source.quota_bytes,
    };
    volume::write_config(store, &config).await?;
    volume::publish_generation(store, new_volume, 0, 0, &manifest).await?;
    Ok(config)
}

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackReport {
    pub volume: String,
    pub snapshot: String,
    /// The automatic snapshot holding the state rolled back from.
    pub previous_state: String,
}

/// The snapshot a rollback pins the replaced state under: `wanted`, else
/// `pre-rollback-<unix time>`.
pub(crate) fn previous_state_name(wanted: Option<&str>) -> String {
    wanted.map_or_else(
        || format!("pre-rollback-{}", unix_now_secs()),
        str::to_owned,
    )
}

/// Rolls an unmounted volume back to snapshot `name`. Takes the volume's write lease (so a
/// read-write mount elsewhere makes it fail with `LeaseHeld`), pins the current state as the
/// snapshot `pre-rollback-<unix time>`, then publishes the snapshot's state as the newest
/// generation.
pub async fn rollback(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    volume: &str,
    name: &str,
    previous_state: Option<&str>,
    scratch: &Path,
) -> VolumeResult<RollbackReport> {
    volume::read_config(store, volume).await?;
    let target = read_record(store, volume, name).await?;
    let lease = StoreLease::acquire(store, volume, &holder_id(), ROLLBACK_LEASE_TTL).await?;
    let result = async {
        let previous_state = previous_state_name(previous_state);
        create(store, blocks, volume, &previous_state, scratch).await?;
        volume::publish_generation(store, volume, lease.epoch(), 0, &target.manifest).await?;
        Ok::<_, VolumeError>(RollbackReport {
            volume: volume.to_owned(),
            snapshot: name.to_owned(),
            previous_state,
        })
    }
    .await;
    let released = lease.release(store).await;
    let report = result?;
    released?;
    Ok(report)
}
