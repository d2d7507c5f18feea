//! Volumes: `format`, `open` (rebuild the SQLite working copy from the store), and the
//! replication of that working copy back into the store.
//!
//! Store layout of a volume (see the design): `volumes/<volume>/config.json` (written once,
//! create-only) and `volumes/<volume>/meta/gen-<epoch>-<seq>` generation manifests. A
//! generation lists the BLAKE3 hashes of the database file cut into chunks (64 KiB, larger
//! for large databases, see `chunk_size_for`); the chunks are ordinary CAS blocks, so an
//! unchanged chunk is never uploaded twice. Manifest names are never reused (the epoch grows
//! with every read-write open, the sequence with every sync), so an eventually consistent
//! store can never serve a stale copy under a current name.
//!
//! `volumes/<volume>/meta/latest.json` points at the newest generation. It is the one object
//! overwritten in place, and only a hint: readers that cannot list the store (TempURL
//! credentials) start from it and probe forward for newer generations, and a read-write open
//! takes the newer of it and the listing (a listing may lag behind the newest writes). A stale
//! pointer can only name an older, still consistent generation.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use crate::cas::{BlockStore, CasError, hash_block};
use crate::fs::{FsError, FsResult, MetadataSync, now_ns};
use crate::lease::StoreLease;
use crate::meta::{Hash, MetaError, MetaStore};
use crate::store::{ObjectStore, StoreError, list_all, unix_now_secs};

pub const FORMAT_VERSION: u32 = 1;
pub const DEFAULT_BLOCK_SIZE: u64 = 8 << 20;
/// Metadata chunks fetched, or uploaded, at once while a database is rebuilt or replicated.
const CHUNK_TRANSFERS: usize = 16;
const MIN_BLOCK_SIZE: u64 = 4 << 10;
const MAX_BLOCK_SIZE: u64 = 64 << 20;
/// The database is replicated in chunks of at least this size: a change re-uploads the chunks
/// holding the pages it touched, so smaller chunks upload less per change (and name more
/// chunks per generation). Each generation records the size it was cut with.
const CHUNK_SIZE: u64 = 64 << 10;
/// Past this many chunks of `CHUNK_SIZE`, chunks grow (by powers of two) up to
/// `LARGEST_GROWN_CHUNK`: opening a large volume (a mount, a snapshot, a rollback) fetches
/// every chunk, and the store's round trips, not its bandwidth, would set how long that
/// takes. The cap bounds what a small change re-uploads (a chunk per page it touches) and
/// what a change of chunk size re-uploads at once (the whole database).
const TARGET_CHUNKS: u64 = 128;
const LARGEST_GROWN_CHUNK: u64 = 1 << 20;
const MIN_CHUNK_SIZE: u64 = 4 << 10;
const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Generations kept besides the newest (older ones are deleted after each sync).
const KEEP_GENERATIONS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(
        "invalid volume name {0:?}: use 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    InvalidName(String),
    #[error("invalid block size {0}: must be a power of two from 4 KiB to 64 MiB")]
    InvalidBlockSize(u64),
    #[error("volume {0} already exists")]
    Exists(String),
    #[error("volume {0} does not exist")]
    NotFound(String),
    #[error("volume {volume} is damaged: {reason}")]
    Corrupt { volume: String, reason: String },
    #[error("volume {volume} was formatted by a newer cloudfs (format {found})")]
    TooNew { volume: String, found: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blocks(#[from] CasError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("local cache I/O error: {0}")]
    Io(#[from] io::Error),
    #[error(
        "volume {volume} is mounted read-write by {holder} (its lease expires in {expires_in_secs}s \
         unless renewed); mount it --read-only, or unmount it there first"
    )]
    LeaseHeld {
        volume: String,
        holder: String,
        expires_in_secs: u64,
    },
    #[error("lost the write lease of volume {volume} (epoch {epoch}) to another mount")]
    LeaseLost { volume: String, epoch: u64 },
    #[error("volume {volume} has a snapshot named {name} already")]
    SnapshotExists { volume: String, name: String },
    #[error("volume {volume} has no snapshot named {name}")]
    SnapshotNotFound { volume: String, name: String },
}

pub type VolumeResult<T> = Result<T, VolumeError>;

/// `volumes/<volume>/config.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeConfig {
    pub format_version: u32,
    pub name: String,
    pub block_size: u64,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// The most bytes its files may hold (`statfs` reports it as the size); none: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
}

/// `volumes/<volume>/meta/latest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LatestPointer {
    epoch: u64,
    seq: u64,
}

/// How many generations past the pointer a reader looks for (a pointer a few syncs behind).
const POINTER_PROBES: u64 = 8;

/// A generation manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Generation {
    epoch: u64,
    seq: u64,
    db_size: u64,
    chunk_size: u64,
    chunks: Vec<String>,
    created_at_ns: i64,
}

pub fn validate_name(name: &str) -> VolumeResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidName(name.to_owned()))
    }
}

fn config_key(volume: &str) -> String {
    format!("volumes/{volume}/config.json")
}

fn generations_prefix(volume: &str) -> String {
    format!("volumes/{volume}/meta/gen-")
}

fn generation_key(volume: &str, epoch: u64, seq: u64) -> String {
    format!("{}{epoch:020}-{seq:020}", generations_prefix(volume))
}

fn pointer_key(volume: &str) -> String {
    format!("volumes/{volume}/meta/latest.json")
}

/// The content of `latest.json` naming generation `seq` of `epoch`.
fn pointer_json(epoch: u64, seq: u64) -> io::Result<Bytes> {
    serde_json::to_vec(&LatestPointer { epoch, seq })
        .map(Bytes::from)
        .map_err(io::Error::other)
}

fn parse_generation_key(volume: &str, key: &str) -> Option<(u64, u64)> {
    let rest = key.strip_prefix(&generations_prefix(volume))?;
    let (epoch, seq) = rest.split_once('-')?;
    Some((epoch.parse().ok()?, seq.parse().ok()?))
}

fn corrupt(volume: &str, reason: impl Into<String>) -> VolumeError {
    VolumeError::Corrupt {
        volume: volume.to_owned(),
        reason: reason.into(),
    }
}

pub async fn read_config(store: &dyn ObjectStore, volume: &str) -> VolumeResult<VolumeConfig> {
    validate_name(volume)?;
    let raw = match store.get(&config_key(volume), None).await {
        Ok(raw) => raw,
        Err(StoreError::NotFound(_)) => return Err(VolumeError::NotFound(volume.to_owned())),
        Err(e) => return Err(e.into()),
    };
    let config: VolumeConfig =
        serde_json::from_slice(&raw).map_err(|e| corrupt(volume, format!("config.json: {e}")))?;
    if config.format_version > FORMAT_VERSION {
        return Err(VolumeError::TooNew {
            volume: volume.to_owned(),
            found: config.format_version,
        });
    }
    Ok(config)
}

/// Deletes a volume: its config first (from then on it no longer exists), then its
/// generations, snapshots and lease records. Its blocks stay until garbage collection finds
/// them unreferenced (clones keep theirs). Fails while the volume is mounted read-write; run
/// again, it finishes an interrupted delete. Returns the objects deleted.
pub async fn delete_volume(store: &dyn ObjectStore, volume: &str) -> VolumeResult<u64> {
    validate_name(volume)?;
    let prefix = format!("volumes/{volume}/");
    if list_all(store, &prefix).await?.is_empty() {
        return Err(VolumeError::NotFound(volume.to_owned()));
    }
    StoreLease::acquire(
        store,
        volume,
        &crate::lease::holder_id(),
        std::time::Duration::from_secs(60),
    )
    .await?;
    store.delete(&config_key(volume)).await?;
    let mut deleted = 1;
    for object in list_all(store, &prefix).await? {
        store.delete(&object.key).await?;
        deleted += 1;
    }
    Ok(deleted)
}

/// Every volume in the pool, by name.
pub async fn list_volumes(store: &dyn ObjectStore) -> VolumeResult<Vec<String>> {
    let mut names: Vec<String> = list_all(store, "volumes/")
        .await?
        .into_iter()
        .filter_map(|o| {
            let rest = o.key.strip_prefix("volumes/")?;
            let (name, file) = rest.split_once('/')?;
            (file == "config.json").then(|| name.to_owned())
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Creates a volume: its config and a first generation holding an empty root directory.
pub async fn format(
    store: &Arc<dyn ObjectStore>,
    blocks: &BlockStore,
    volume: &str,
    block_size: u64,
    uid: u32,
    gid: u32,
) -> VolumeResult<VolumeConfig> {
    validate_name(volume)?;
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(VolumeError::InvalidBlockSize(block_size));
    }
    let config = VolumeConfig {
        format_version: FORMAT_VERSION,
        name: volume.to_owned(),
        block_size,
        created_at: unix_now_secs(),
        quota_bytes: None,
    };
    let scratch = tempfile::tempdir()?;
    let db_path = scratch.path().join("meta.db");
    let meta = MetaStore::create(&db_path, uid, gid, now_ns())?;
    store.prepare().await?;
    write_config(store.as_ref(), &config).await?;
    let replica = Replicator::new(store.clone(), volume, 0, 0, Vec::new());
    replica.push(&meta, blocks).await?;
    Ok(config)
}

/// Sets (or with `None` lifts) the quota of `volume` in its `config.json`. A mount of it
/// applies the new value within one lease renewal, or at once through its control socket.
pub async fn set_quota(
    store: &dyn ObjectStore,
    volume: &str,
    quota_bytes: Option<u64>,
) -> VolumeResult<VolumeConfig> {
    let mut config = read_config(store, volume).await?;
    config.quota_bytes = quota_bytes;
    let json = serde_json::to_vec_pretty(&config).map_err(io::Error::other)?;
    store.put(&config_key(volume), Bytes::from(json)).await?;
    store.sync().await?;
    Ok(config)
}

/// Writes a new volume's `config.json`; fails with `Exists` if the volume exists.
pub(crate) async fn write_config(
    store: &dyn ObjectStore,
    config: &VolumeConfig,
) -> VolumeResult<()> {
    let json = serde_json::to_vec_pretty(config).map_err(io::Error::other)?;
    if !store
        .put_if_absent(&config_key(&config.name), Bytes::from(json))
        .await?
    {
        return Err(VolumeError::Exists(config.name.clone()));
    }
    Ok(())
}

/// The object key of the newest generation of a volume, if it has any.
pub async fn latest_generation_key(
    store: &dyn ObjectStore,
    volume: &str,
) -> VolumeResult<Option<String>> {
    Ok(latest_generation(store, volume)
        .await?
        .map(|(_, _, key)| key))
}

/// When the volume's metadata last reached the store (a generation or a segment), in seconds
/// since the Unix epoch; none for a volume with no replicated metadata.
pub async fn last_replicated(store: &dyn ObjectStore, volume: &str) -> VolumeResult<Option<i64>> {
    Ok(list_all(store, &format!("volumes/{volume}/meta/"))
        .await?
        .into_iter()
        .map(|object| object.modified)
        .max())
}

/// The epoch of the newest generation of a volume, if it has any.
pub async fn latest_generation_epoch(
    store: &dyn ObjectStore,
    volume: &str,
) -> VolumeResult<Option<u64>> {
    Ok(latest_generation(store, volume)
        .await?
        .map(|(epoch, _, _)| epoch))
}

/// The newest generation of a volume: the newer of what the listing shows (where the store
/// can list) and what the pointer leads to.
async fn latest_generation(
    store: &dyn ObjectStore,
    volume: &str,
) -> VolumeResult<Option<(u64, u64, String)>> {
    let listed = if store.can_list() {
        list_all(store, &generations_prefix(volume))
            .await?
            .into_iter()
            .filter_map(|o| {
                let (epoch, seq) = parse_generation_key(volume, &o.key)?;
                Some((epoch, seq, o.key))
            })
            .max()
    } else {
        None
    };
    let pointed = pointed_generation(store, volume).await?;
    Ok(listed.max(pointed))
}

/// The generation `latest.json` names, or the newest of the few after it in its epoch that
/// exist (the pointer may read stale where overwrites are eventually consistent).
async fn pointed_generation(
    store: &dyn ObjectStore,
    volume: &str,
) -> VolumeResult<Option<(u64, u64, String)>> {
    let key = pointer_key(volume);
    let raw = match store.get(&key, None).await {
        Ok(raw) => raw,
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let pointer: LatestPointer = match serde_json::from_slice(&raw) {
        Ok(pointer) => pointer,
        Err(e) => {
            tracing::warn!(volume, error = %e, "ignoring a damaged {key}");
            return Ok(None);
        }
    };
    // An epoch's generations are numbered without gaps, so the first missing one ends it.
    let mut seq = pointer.seq;
    while seq < pointer.seq + POINTER_PROBES
        && store
            .head(&generation_key(volume, pointer.epoch, seq + 1))
            .await?
            .is_some()
    {
        seq += 1;
    }
    Ok(Some((
        pointer.epoch,
        seq,
        generation_key(volume, pointer.epoch, seq),
    )))
}

impl Generation {
    /// The length of each chunk of the database, in order.
    pub(crate) fn chunk_lens(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.chunks.len() as u64).map(|i| {
            self.db_size
                .saturating_sub(i * self.chunk_size)
                .min(self.chunk_size)
        })
    }

    /// The chunks (CAS blocks) of the database, skipping any unreadable name.
    pub(crate) fn chunk_hashes(&self) -> impl Iterator<Item = Hash> + '_ {
        self.chunks.iter().filter_map(|hex_hash| {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(hex_hash, &mut hash).ok().map(|_| hash)
        })
    }
}

/// The object keys of a volume's generations in the store, oldest first.
pub(crate) async fn generation_keys(
    store: &dyn ObjectStore,
    volume: &str,
) -> VolumeResult<Vec<String>> {
    let mut keys: Vec<String> = list_all(store, &generations_prefix(volume))
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    keys.sort();
    Ok(keys)
}

/// A volume's metadata working copy, rebuilt from the store.
#[derive(Debug)]
pub struct OpenedVolume {
    pub config: VolumeConfig,
    pub meta: Arc<MetaStore>,
    /// Epoch of the generation it was rebuilt from.
    pub epoch: u64,
    /// Object key of that generation.
    pub generation: String,
    pub chunks: Vec<Hash>,
}

/// Downloads the newest generation of `volume` into `db_path` and opens it.
pub async fn open(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    volume: &str,
    db_path: &Path,
) -> VolumeResult<OpenedVolume> {
    let config = read_config(store, volume).await?;
    let (key, generation) = newest_generation(store, volume).await?;
    open_generation(blocks, config, &generation, &key, db_path).await
}

/// The newest generation of a volume: its object key and manifest.
pub(crate) async fn newest_generation(
    store: &dyn ObjectStore,
    volume: &str,
) -> VolumeResult<(String, Generation)> {
    let (_, _, key) = latest_generation(store, volume)
        .await?
        .ok_or_else(|| corrupt(volume, "no metadata generation in the store"))?;
    let generation = read_generation(store, volume, &key).await?;
    Ok((key, generation))
}

pub(crate) async fn read_generation(
    store: &dyn ObjectStore,
    volume: &str,
    key: &str,
) -> VolumeResult<Generation> {
    let raw = store.get(key, None).await?;
    serde_json::from_slice(&raw).map_err(|e| corrupt(volume, format!("generation {key}: {e}")))
}

/// Rebuilds the database a generation manifest describes (`label` names it in errors) into
/// `db_path` and opens it.
pub(crate) async fn open_generation(
    blocks: &BlockStore,
    config: VolumeConfig,
    generation: &Generation,
    label: &str,
    db_path: &Path,
) -> VolumeResult<OpenedVolume> {
    let chunks = rebuild_database(blocks, &config.name, generation, label, db_path).await?;
    let meta = MetaStore::open(db_path).map_err(|e| match e {
        MetaError::Corrupt(reason) => corrupt(&config.name, reason),
        other => other.into(),
    })?;
    Ok(OpenedVolume {
        config,
        meta: Arc::new(meta),
        epoch: generation.epoch,
        generation: label.to_owned(),
        chunks,
    })
}

/// Writes the database file a generation manifest of `volume` describes (`label` names it
/// in errors) to `db_path`, replacing any database there; returns its chunks.
pub(crate) async fn rebuild_database(
    blocks: &BlockStore,
    volume: &str,
    generation: &Generation,
    label: &str,
    db_path: &Path,
) -> VolumeResult<Vec<Hash>> {
    if let Some(dir) = db_path.parent() {
        fs::create_dir_all(dir)?;
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut path = db_path.as_os_str().to_owned();
        path.push(suffix);
        match fs::remove_file(PathBuf::from(path)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    let size_ok = (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&generation.chunk_size)
        && generation.chunks.len() as u64 == generation.db_size.div_ceil(generation.chunk_size);
    if !size_ok {
        return Err(corrupt(
            volume,
            format!("generation {label} does not cut its database into chunks consistently"),
        ));
    }
    let mut chunks = Vec::with_capacity(generation.chunks.len());
    for hex_hash in &generation.chunks {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(hex_hash, &mut hash)
            .map_err(|_| corrupt(volume, format!("generation {label} names a bad chunk")))?;
        chunks.push(hash);
    }
    let mut file = File::create(db_path)?;
    let mut written = 0u64;
    // Chunks are small and many (a 100,000-file volume has hundreds): fetched one by one,
    // the store's round trip, not its bandwidth, would set the time a mount or a snapshot
    // takes to open the database.
    let mut wanted = chunks.iter().zip(generation.chunk_lens());
    let mut fetched = futures::stream::FuturesOrdered::new();
    loop {
        while fetched.len() < CHUNK_TRANSFERS
            && let Some((hash, len)) = wanted.next()
        {
            fetched.push_back(blocks.fetch(hash, len));
        }
        let Some(data) = fetched.next().await else {
            break;
        };
        let data = data.map_err(|e| match e {
            CasError::Store(StoreError::NotFound(k)) => {
                corrupt(volume, format!("metadata chunk {k} is missing"))
            }
            CasError::Corrupt { key } => {
                corrupt(volume, format!("metadata chunk {key} is damaged"))
            }
            other => other.into(),
        })?;
        file.write_all(&data)?;
        written += data.len() as u64;
    }
    drop(fetched); // its (finished) fetches borrow `chunks`, returned below
    if written != generation.db_size {
        return Err(corrupt(volume, format!("generation {label} is short")));
    }
    file.sync_all()?;
    Ok(chunks)
}

/// The chunk size a database of `db_size` bytes is replicated in: `CHUNK_SIZE`, doubled
/// until at most `TARGET_CHUNKS` chunks cut it or it reaches `LARGEST_GROWN_CHUNK`.
fn chunk_size_for(db_size: u64) -> u64 {
    let mut size = CHUNK_SIZE;
    while size < LARGEST_GROWN_CHUNK && db_size.div_ceil(size) > TARGET_CHUNKS {
        size *= 2;
    }
    size
}

/// Writes `generation` as generation `seq` of `epoch` of `volume` (a new name; never an
/// overwrite) and points `latest.json` at it.
pub(crate) async fn publish_generation(
    store: &dyn ObjectStore,
    volume: &str,
    epoch: u64,
    seq: u64,
    generation: &Generation,
) -> VolumeResult<()> {
    let generation = Generation {
        epoch,
        seq,
        created_at_ns: now_ns(),
        ..generation.clone()
    };
    let json = serde_json::to_vec(&generation).map_err(io::Error::other)?;
    if !store
        .put_if_absent(&generation_key(volume, epoch, seq), Bytes::from(json))
        .await?
    {
        return Err(corrupt(
            volume,
            format!("generation {epoch}-{seq} exists already"),
        ));
    }
    store
        .put(&pointer_key(volume), pointer_json(epoch, seq)?)
        .await?;
    store.sync().await?;
    Ok(())
}

#[derive(Debug)]
struct ReplicaState {
    seq: u64,
    /// The last generation written: its key and manifest.
    latest: Option<(String, Generation)>,
    /// The chunks of the last generation written (or rebuilt from).
    chunks: Vec<Hash>,
    synced_writes: Option<u64>,
    written: Vec<String>,
    pruned_old_epochs: bool,
}

/// Pushes the working copy of a volume's database into the store as new generations.
#[derive(Debug)]
pub struct Replicator {
    store: Arc<dyn ObjectStore>,
    volume: String,
    epoch: u64,
    state: tokio::sync::Mutex<ReplicaState>,
}

impl Replicator {
    /// `chunks` are those of the generation the working copy was rebuilt from.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        volume: &str,
        epoch: u64,
        first_seq: u64,
        chunks: Vec<Hash>,
    ) -> Replicator {
        Replicator {
            store,
            volume: volume.to_owned(),
            epoch,
            state: tokio::sync::Mutex::new(ReplicaState {
                seq: first_seq,
                latest: None,
                chunks,
                synced_writes: None,
                written: Vec::new(),
                pruned_old_epochs: epoch == 0,
            }),
        }
    }

    /// Writes a new generation if anything committed since the last one.
    pub async fn push(&self, meta: &MetaStore, blocks: &BlockStore) -> VolumeResult<()> {
        let mut state = self.state.lock().await;
        self.push_locked(&mut state, meta, blocks).await
    }

    /// A generation holding everything committed so far (written now unless the last one
    /// does): its key and manifest.
    pub(crate) async fn checkpoint(
        &self,
        meta: &MetaStore,
        blocks: &BlockStore,
    ) -> VolumeResult<(String, Generation)> {
        let mut state = self.state.lock().await;
        if state.latest.is_none() {
            state.synced_writes = None;
        }
        self.push_locked(&mut state, meta, blocks).await?;
        state
            .latest
            .clone()
            .ok_or_else(|| corrupt(&self.volume, "no generation after a push"))
    }

    async fn push_locked(
        &self,
        state: &mut ReplicaState,
        meta: &MetaStore,
        blocks: &BlockStore,
    ) -> VolumeResult<()> {
        if state.synced_writes == Some(meta.writes()) {
            return Ok(());
        }
        let snapshot = tempfile::NamedTempFile::new_in(
            meta.path().parent().unwrap_or_else(|| Path::new(".")),
        )?;
        let writes = meta
            .with_quiesced_file(|path, writes| fs::copy(path, snapshot.path()).map(|_| writes))?
            .map_err(VolumeError::Io)?;
        let mut file = File::open(snapshot.path())?;
        let db_size = file.metadata()?.len();
        let chunk_size = chunk_size_for(db_size);
        let mut chunks = Vec::new();
        let mut uploads = futures::stream::FuturesUnordered::new();
        let mut buf = vec![0u8; chunk_size as usize];
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                match file.read(&mut buf[filled..])? {
                    0 => break,
                    n => filled += n,
                }
            }
            if filled == 0 {
                break;
            }
            let data = &buf[..filled];
            let hash = hash_block(data);
            // Content-addressed: a chunk equal to the last generation's at its place is in the
            // store already (after a change of chunk size, none is).
            if state.chunks.get(chunks.len()) != Some(&hash) {
                if uploads.len() >= CHUNK_TRANSFERS
                    && let Some(uploaded) = uploads.next().await
                {
                    uploaded?;
                }
                uploads.push(blocks.upload(hash, Bytes::copy_from_slice(data), false));
            }
            chunks.push(hash);
            if filled < buf.len() {
                break;
            }
        }
        while let Some(uploaded) = uploads.next().await {
            uploaded?;
        }
        let generation = Generation {
            epoch: self.epoch,
            seq: state.seq,
            db_size,
            chunk_size,
            chunks: chunks.iter().map(hex::encode).collect(),
            created_at_ns: now_ns(),
        };
        let key = generation_key(&self.volume, self.epoch, state.seq);
        let json = serde_json::to_vec(&generation).map_err(io::Error::other)?;
        // The generation is the commit point: every block it (and its files) name is durable
        // before it is written, and it is durable before the sync returns.
        blocks.timed(&key, self.store.sync()).await?;
        blocks
            .timed(&key, self.store.put(&key, Bytes::from(json)))
            .await?;
        blocks.timed(&key, self.store.sync()).await?;
        let pointer = pointer_json(self.epoch, state.seq)?;
        state.seq += 1;
        state.chunks = chunks;
        state.synced_writes = Some(writes);
        state.written.push(key.clone());
        state.latest = Some((key, generation));
        let pointer_key = pointer_key(&self.volume);
        let (pointed, pruned) = tokio::join!(
            blocks.timed(&pointer_key, self.store.put(&pointer_key, pointer)),
            self.prune(state)
        );
        pointed?;
        pruned?;
        Ok(())
    }

    /// Deletes generations beyond the newest few (older epochs' ones once per open).
    async fn prune(&self, state: &mut ReplicaState) -> VolumeResult<()> {
        if !state.pruned_old_epochs {
            let current = generation_key(&self.volume, self.epoch, 0);
            for old in list_all(self.store.as_ref(), &generations_prefix(&self.volume)).await? {
                if old.key < current {
                    self.store.delete(&old.key).await?;
                }
            }
            state.pruned_old_epochs = true;
        }
        while state.written.len() > KEEP_GENERATIONS + 1 {
            let old = state.written.remove(0);
            self.store.delete(&old).await?;
        }
        Ok(())
    }
}

/// Runs a volume operation of several store requests, failing it once `limit` has passed.
pub async fn bounded<T>(
    limit: std::time::Duration,
    operation: impl Future<Output = VolumeResult<T>>,
) -> VolumeResult<T> {
    tokio::time::timeout(limit, operation)
        .await
        .unwrap_or_else(|_| {
            Err(VolumeError::Blocks(CasError::TimedOut {
                key: "volume lease".into(),
                secs: limit.as_secs(),
            }))
        })
}

/// What the file system calls to make its metadata durable: the replicator of its volume,
/// which keeps the volume's write lease alive and stops once it is lost.
#[derive(Debug)]
pub struct VolumeSync {
    pub replicator: Replicator,
    pub lease: StoreLease,
    pub store: Arc<dyn ObjectStore>,
    pub meta: Arc<MetaStore>,
    pub blocks: Arc<BlockStore>,
    pub rt: Handle,
    pub last_renewal: std::sync::Mutex<std::time::Instant>,
}

impl VolumeSync {
    async fn renew_if_due(&self) -> VolumeResult<()> {
        let due = crate::fs::lock(&self.last_renewal).elapsed() >= self.lease.ttl() / 3;
        if !due {
            return Ok(());
        }
        let renewal = bounded(self.blocks.timeout(), self.lease.renew(self.store.as_ref()));
        // Also learns, meanwhile, of blocks an `fsck --verify` found damaged since.
        let (renewed, ()) = tokio::join!(renewal, self.blocks.refresh_damaged());
        match renewed {
            Ok(()) => {
                *crate::fs::lock(&self.last_renewal) = std::time::Instant::now();
                Ok(())
            }
            Err(lost @ VolumeError::LeaseLost { .. }) => Err(lost),
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed; retrying at the next sync");
                Ok(())
            }
        }
    }
}

impl VolumeSync {
    /// A generation of everything committed so far (see [`Replicator::checkpoint`]).
    pub(crate) async fn checkpoint(&self) -> VolumeResult<(String, Generation)> {
        self.renew_if_due().await?;
        self.replicator.checkpoint(&self.meta, &self.blocks).await
    }
}

impl MetadataSync for VolumeSync {
    fn sync(&self) -> FsResult<()> {
        self.rt
            .block_on(async {
                self.renew_if_due().await?;
                self.replicator.push(&self.meta, &self.blocks).await
            })
            .map_err(|e| FsError::Replication(Box::new(e)))
    }

    fn release(&self) -> FsResult<()> {
        let release = bounded(
            self.blocks.timeout(),
            self.lease.release(self.store.as_ref()),
        );
        self.rt
            .block_on(release)
            .map_err(|e| FsError::Replication(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "vol-1", "A.b_c"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    /// A generation of `db` cut into `chunk_size` chunks, its chunks uploaded.
    async fn generation_of(db: &[u8], chunk_size: u64, blocks: &BlockStore) -> Generation {
        let mut chunks = Vec::new();
        for chunk in db.chunks(chunk_size as usize) {
            let hash = hash_block(chunk);
            blocks
                .upload(hash, Bytes::copy_from_slice(chunk), false)
                .await
                .expect("upload");
            chunks.push(hex::encode(hash));
        }
        Generation {
            epoch: 1,
            seq: 0,
            db_size: db.len() as u64,
            chunk_size,
            chunks,
            created_at_ns: 0,
        }
    }

    #[test]
    fn large_databases_are_cut_into_larger_chunks() {
        assert_eq!(chunk_size_for(0), CHUNK_SIZE);
        assert_eq!(chunk_size_for(TARGET_CHUNKS * CHUNK_SIZE), CHUNK_SIZE);
        assert_eq!(
            chunk_size_for(TARGET_CHUNKS * CHUNK_SIZE + 1),
            2 * CHUNK_SIZE
        );
        assert_eq!(chunk_size_for(20 << 20), 256 << 10);
        assert_eq!(chunk_size_for(200 << 20), LARGEST_GROWN_CHUNK);
        assert_eq!(chunk_size_for(u64::MAX), LARGEST_GROWN_CHUNK);
    }

    #[test]
    fn a_generation_rebuilds_with_the_chunk_size_it_was_cut_with() {
        let (rt, dir, _mem, blocks) = crate::cas::tests::over_mem_store();
        let db: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let path = dir.path().join("rebuilt.db");
        for chunk_size in [CHUNK_SIZE, 256 << 10] {
            let generation = rt.block_on(generation_of(&db, chunk_size, &blocks));
            rt.block_on(rebuild_database(&blocks, "v", &generation, "g", &path))
                .expect("rebuild");
            assert!(std::fs::read(&path).expect("read") == db, "{chunk_size}");
        }
        let mut inconsistent = rt.block_on(generation_of(&db, CHUNK_SIZE, &blocks));
        inconsistent.chunk_size = 256 << 10;
        let refused = rt.block_on(rebuild_database(&blocks, "v", &inconsistent, "g", &path));
        assert!(
            matches!(refused, Err(VolumeError::Corrupt { .. })),
            "{refused:?}"
        );
    }

    #[test]
    fn generation_keys_sort_numerically() {
        let a = generation_key("v", 2, 9);
        let b = generation_key("v", 2, 10);
        let c = generation_key("v", 10, 0);
        assert!(a < b && b < c);
        assert_eq!(parse_generation_key("v", &b), Some((2, 10)));
    }
}
