//! Content-addressed blocks: naming (`blocks/<h0h1>/<h2h3>/<hash>`), deduplicated uploads, and
//! the bounded on-disk read cache with verified whole-block fetches.
//!
//! Blocks are immutable and named by the BLAKE3-256 digest of their bytes, so a block that the
//! pool already holds is never uploaded again and a cached block can never be stale.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::OnceCell;

use crate::buffers;
use crate::direct_io::DirectIo;
use crate::meta::Hash;
use crate::metrics::{CacheTier, EngineMetrics};
use crate::store::{ObjectStore, StoreError, unix_now_secs};

/// Errors of the block layer.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("block {key} is corrupt: its content does not match its name")]
    Corrupt { key: String },
    #[error("object store did not answer within {secs}s for {key}")]
    TimedOut { key: String, secs: u64 },
    #[error("block cache I/O error: {0}")]
    Cache(#[from] io::Error),
}

pub type CasResult<T> = Result<T, CasError>;

pub fn hash_block(data: &[u8]) -> Hash {
    blake3::hash(data).into()
}

/// The object key of a block.
pub fn block_key(hash: &Hash) -> String {
    let hex = hex::encode(hash);
    format!("blocks/{}/{}/{}", &hex[0..2], &hex[2..4], hex)
}

/// Where `fsck --verify` moves a damaged block: out of `blocks/`, so that no write
/// deduplicates against it; the damaged copy stays for inspection until a mount stores that
/// content again.
pub fn quarantine_key(hash: &Hash) -> String {
    format!("{QUARANTINE_PREFIX}{}", hex::encode(hash))
}

const QUARANTINE_PREFIX: &str = "damaged/";

/// The hash named by a block key, if `key` is one.
pub fn parse_block_key(key: &str) -> Option<Hash> {
    let hex = key.strip_prefix("blocks/")?.rsplit('/').next()?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex, &mut hash).ok()?;
    (block_key(&hash) == key).then_some(hash)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The least-recently-used index of the cache directory's files.
#[derive(Debug, Default)]
struct CacheIndex {
    entries: HashMap<Hash, (u64, u64)>,
    by_age: BTreeMap<u64, Hash>,
    bytes: u64,
    tick: u64,
}

impl CacheIndex {
    fn touch(&mut self, hash: &Hash) -> bool {
        let Some((_, tick)) = self.entries.get_mut(hash) else {
            return false;
        };
        self.by_age.remove(tick);
        self.tick += 1;
        *tick = self.tick;
        self.by_age.insert(self.tick, *hash);
        true
    }

    fn insert(&mut self, hash: Hash, size: u64) {
        if self.touch(&hash) {
            return;
        }
        self.tick += 1;
        self.entries.insert(hash, (size, self.tick));
        self.by_age.insert(self.tick, hash);
        self.bytes += size;
    }

    fn pop_oldest(&mut self) -> Option<Hash> {
        let (_, hash) = self.by_age.pop_first()?;
        if let Some((size, _)) = self.entries.remove(&hash) {
            self.bytes -= size;
        }
        Some(hash)
    }
}

/// A bounded directory of verified whole blocks.
#[derive(Debug)]
pub struct BlockCache {
    dir: PathBuf,
    budget: u64,
    index: Mutex<CacheIndex>,
    direct: DirectIo,
}

impl BlockCache {
    /// Opens the cache directory, adopting the blocks a previous mount left there.
    pub fn open(dir: &Path, budget: u64) -> io::Result<BlockCache> {
        fs::create_dir_all(dir)?;
        let cache = BlockCache {
            dir: dir.to_path_buf(),
            budget,
            index: Mutex::new(CacheIndex::default()),
            direct: DirectIo::default(),
        };
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let mut hash = [0u8; 32];
            match hex::decode_to_slice(name.as_encoded_bytes(), &mut hash) {
                Ok(()) => lock(&cache.index).insert(hash, entry.metadata()?.len()),
                Err(_) => fs::remove_file(entry.path())?,
            }
        }
        cache.evict();
        Ok(cache)
    }

    fn path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(hex::encode(hash))
    }

    /// Reads `len` bytes at `offset` of a cached block, `None` when it is not cached.
    pub fn read(&self, hash: &Hash, offset: u64, len: usize) -> Option<Bytes> {
        if !lock(&self.index).touch(hash) {
            return None;
        }
        let file = File::open(self.path(hash)).ok()?;
        let mut buf = buffers::take(len);
        buf.resize(len, 0);
        let mut filled = 0;
        while filled < len {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        buf.truncate(filled);
        Some(buffers::into_bytes(buf))
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        lock(&self.index).entries.contains_key(hash)
    }

    /// Adds a verified block, evicting the least recently used ones past the budget.
    pub fn insert(&self, hash: &Hash, data: &[u8]) -> io::Result<()> {
        if data.len() as u64 > self.budget || self.contains(hash) {
            return Ok(());
        }
        let path = self.path(hash);
        let tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        self.direct.write_file(tmp.as_file(), data)?;
        tmp.persist(&path).map_err(|e| e.error)?;
        lock(&self.index).insert(*hash, data.len() as u64);
        self.evict();
        Ok(())
    }

    fn evict(&self) {
        loop {
            let victim = {
                let mut index = lock(&self.index);
                if index.bytes <= self.budget {
                    return;
                }
                index.pop_oldest()
            };
            match victim {
                Some(hash) => {
                    let _ = fs::remove_file(self.path(&hash));
                }
                None => return,
            }
        }
    }

    pub fn bytes(&self) -> u64 {
        lock(&self.index).bytes
    }
}

/// The engine's access to blocks: deduplicated uploads, cached and verified downloads.
#[derive(Debug)]
pub struct BlockStore {
    store: Arc<dyn ObjectStore>,
    cache: Arc<BlockCache>,
    /// Hashes seen in the store, and when, so dedup costs no round trip for them.
    known: Mutex<HashMap<Hash, Instant>>,
    inflight: Mutex<HashMap<Hash, Arc<OnceCell<Bytes>>>>,
    /// Blocks `fsck --verify` found damaged: uploaded again however sure dedup is.
    damaged: Mutex<HashSet<Hash>>,
    hot: Mutex<HotBlocks>,
    /// Cache writes handed to the background and not done yet (each holds a block).
    pending_cache_writes: Arc<AtomicUsize>,
    timeout: Duration,
    metrics: EngineMetrics,
}

const KNOWN_LIMIT: usize = 1 << 20;
/// Most cache writes left to the background at once: past this a reader writes its block
/// itself, so a disk slower than the store slows reads instead of piling up blocks in memory.
const BACKGROUND_CACHE_WRITES: usize = 4;

/// How long the engine trusts that a block it saw in the store is still there while no
/// metadata names it: a block found older than this by a dedup check is uploaded again, and
/// a block seen (or uploaded) longer ago than this is checked again. So a block the engine
/// starts to reference was written or refreshed at most this long before, which is what
/// lets garbage collection delete unreferenced blocks older than its grace period (which
/// must exceed twice this) while volumes are being written.
pub const REFRESH_AGE: Duration = Duration::from_secs(600);
/// Most memory the recently read whole blocks may hold.
const HOT_BUDGET: u64 = 64 << 20;
/// Least, however small the cache: a sequential reader's block and those read ahead of it
/// must stay, or every request into a block would fetch all of it again.
const HOT_FLOOR: u64 = 32 << 20;

/// The few whole blocks used last, in memory, so that a sequential reader's many requests
/// into one block cost no file I/O. Bounded in bytes (but the newest block always stays);
/// the least recently used go first.
#[derive(Debug, Default)]
struct HotBlocks {
    entries: std::collections::VecDeque<(Hash, Bytes)>,
    bytes: u64,
    budget: u64,
}

impl HotBlocks {
    fn contains(&self, hash: &Hash) -> bool {
        self.entries.iter().any(|(h, _)| h == hash)
    }

    fn get(&mut self, hash: &Hash) -> Option<Bytes> {
        let at = self.entries.iter().position(|(h, _)| h == hash)?;
        let entry = self.entries.remove(at)?;
        let data = entry.1.clone();
        self.entries.push_back(entry);
        Some(data)
    }

    fn insert(&mut self, hash: Hash, data: Bytes) {
        if self.get(&hash).is_some() {
            return;
        }
        self.bytes += data.len() as u64;
        self.entries.push_back((hash, data));
        while self.bytes > self.budget && self.entries.len() > 1 {
            if let Some((_, old)) = self.entries.pop_front() {
                self.bytes -= old.len() as u64;
            }
        }
    }
}

impl BlockStore {
    pub fn new(store: Arc<dyn ObjectStore>, cache: BlockCache, timeout: Duration) -> BlockStore {
        BlockStore {
            store,
            known: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            damaged: Mutex::new(HashSet::new()),
            hot: Mutex::new(HotBlocks {
                budget: (cache.budget / 8).clamp(HOT_FLOOR, HOT_BUDGET),
                ..HotBlocks::default()
            }),
            cache: Arc::new(cache),
            pending_cache_writes: Arc::new(AtomicUsize::new(0)),
            timeout,
            metrics: EngineMetrics::new(),
        }
    }

    /// Counts cache hits and misses in `metrics`.
    pub fn with_metrics(mut self, metrics: EngineMetrics) -> BlockStore {
        self.metrics = metrics;
        self
    }

    /// The longest one store request may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Bounds a store request in time, so a hung store surfaces as an error, never a hang.
    pub async fn timed<T>(
        &self,
        key: &str,
        request: impl Future<Output = Result<T, StoreError>>,
    ) -> CasResult<T> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(CasError::TimedOut {
                key: key.to_owned(),
                secs: self.timeout.as_secs(),
            }),
        }
    }

    pub fn mark_known(&self, hash: &Hash) {
        let mut known = lock(&self.known);
        if known.len() >= KNOWN_LIMIT {
            known.clear();
        }
        known.insert(*hash, Instant::now());
    }

    fn is_known(&self, hash: &Hash) -> bool {
        lock(&self.known)
            .get(hash)
            .is_some_and(|seen| seen.elapsed() < REFRESH_AGE)
    }

    /// Stores `data` (whose digest is `hash`) unless the pool already has it; `referenced`
    /// says the volume's metadata already names this hash, so it is known to be stored.
    pub async fn upload(&self, hash: Hash, data: Bytes, referenced: bool) -> CasResult<()> {
        if lock(&self.damaged).contains(&hash) {
            return self.replace_damaged(hash, data).await;
        }
        if referenced || self.is_known(&hash) {
            return Ok(());
        }
        let key = block_key(&hash);
        let present = self.timed(&key, self.store.head(&key)).await?;
        let refresh_before = unix_now_secs() - REFRESH_AGE.as_secs() as i64;
        let trusted = match present {
            // An old block nothing may reference any more is written again, so that garbage
            // collection sees it as new (see `REFRESH_AGE`).
            Some(m) if m.size == data.len() as u64 && m.modified >= refresh_before => {
                self.store.puts_are_durable() || self.holds_intact(&hash, &key).await?
            }
            _ => false,
        };
        if !trusted {
            self.timed(&key, self.store.put(&key, data)).await?;
        }
        self.mark_known(&hash);
        Ok(())
    }

    /// Learns which blocks `fsck --verify` quarantined (when the store can list). Not
    /// knowing is no error: the blocks stay trusted until the next try.
    pub async fn refresh_damaged(&self) {
        if !self.store.can_list() {
            return;
        }
        let listing = crate::store::list_all(self.store.as_ref(), QUARANTINE_PREFIX);
        let listed = match self.timed(QUARANTINE_PREFIX, listing).await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(error = %e, "could not list the blocks fsck found damaged");
                return;
            }
        };
        let mut damaged = lock(&self.damaged);
        for object in listed {
            let mut hash = [0u8; 32];
            let name = &object.key[QUARANTINE_PREFIX.len()..];
            if hex::decode_to_slice(name, &mut hash).is_ok() {
                damaged.insert(hash);
            }
        }
    }

    /// Stores a good copy of a block found damaged, which repairs every file naming it, and
    /// then drops the quarantined copy.
    async fn replace_damaged(&self, hash: Hash, data: Bytes) -> CasResult<()> {
        let key = block_key(&hash);
        self.timed(&key, self.store.put(&key, data)).await?;
        let quarantined = quarantine_key(&hash);
        self.timed(&quarantined, self.store.delete(&quarantined))
            .await?;
        lock(&self.damaged).remove(&hash);
        tracing::info!(block = key, "stored a good copy of a damaged block");
        self.mark_known(&hash);
        Ok(())
    }

    /// Whether the stored object `key` really holds block `hash` (it may not after a machine
    /// crash on a store whose puts become durable only at `sync`).
    async fn holds_intact(&self, hash: &Hash, key: &str) -> CasResult<bool> {
        match self.timed(key, self.store.get(key, None)).await {
            Ok(data) => Ok(hash_block(&data) == *hash),
            Err(CasError::Store(StoreError::NotFound(_))) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// How many blocks of `block_size` bytes ahead of a sequential reader may be fetched:
    /// where fetched blocks are not cached on disk, half the blocks the memory for hot blocks
    /// holds (maybe none), or blocks read ahead would push each other out before they are
    /// read: the other half keeps the reader's block and those it just left, which were used
    /// more recently than the blocks still ahead, and fetches finishing out of order.
    pub fn read_ahead_limit(&self, block_size: u64) -> u64 {
        if self.store.reads_are_local() {
            lock(&self.hot).budget / block_size.max(1) / 2
        } else {
            u64::MAX
        }
    }

    /// Whether block `hash` is neither in memory nor in the disk cache nor being fetched:
    /// whether reading ahead should fetch it.
    pub fn needs_fetch(&self, hash: &Hash) -> bool {
        !lock(&self.hot).contains(hash)
            && !lock(&self.inflight).contains_key(hash)
            && !self.cache.contains(hash)
    }

    /// A whole block, verified against its hash, from the cache or the store (one download
    /// per block however many readers want it at once).
    pub async fn fetch(&self, hash: &Hash, len: u64) -> CasResult<Bytes> {
        if let Some(data) = lock(&self.hot).get(hash) {
            self.metrics.cache_hit(CacheTier::Memory);
            return Ok(data);
        }
        if let Some(data) = self.cache.read(hash, 0, len as usize) {
            self.metrics.cache_hit(CacheTier::Disk);
            lock(&self.hot).insert(*hash, data.clone());
            return Ok(data);
        }
        self.metrics.cache_miss();
        let cell = lock(&self.inflight).entry(*hash).or_default().clone();
        let result = cell
            .get_or_try_init(|| async {
                let key = block_key(hash);
                let data = self.timed(&key, self.store.get(&key, None)).await?;
                if hash_block(&data) != *hash {
                    return Err(CasError::Corrupt { key });
                }
                self.mark_known(hash);
                lock(&self.hot).insert(*hash, data.clone());
                if !self.store.reads_are_local() {
                    self.cache_in_background(*hash, data.clone());
                }
                Ok(data)
            })
            .await
            .cloned();
        lock(&self.inflight).remove(hash);
        result
    }

    /// Adds a fetched block to the disk cache without making its reader wait, unless
    /// [`BACKGROUND_CACHE_WRITES`] are pending already. The cache is best effort: a failed
    /// write is logged.
    fn cache_in_background(&self, hash: Hash, data: Bytes) {
        let insert = move |cache: &BlockCache| {
            if let Err(e) = cache.insert(&hash, &data) {
                tracing::warn!(error = %e, "could not add a block to the cache");
            }
        };
        let pending = self.pending_cache_writes.clone();
        if pending.fetch_add(1, Ordering::AcqRel) >= BACKGROUND_CACHE_WRITES {
            insert(&self.cache);
            pending.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || {
            insert(&cache);
            pending.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// `len` bytes at `offset` of a block of `block_len` bytes: from the cache when it holds
    /// the block, else by fetching (and caching) the whole verified block when `whole`, else by
    /// a ranged GET of just those bytes (for random reads).
    pub async fn read(
        &self,
        hash: &Hash,
        block_len: u64,
        offset: u64,
        len: u64,
        whole: bool,
    ) -> CasResult<Bytes> {
        let hot = lock(&self.hot).get(hash);
        if whole || hot.is_some() {
            let block = match hot {
                Some(block) => {
                    self.metrics.cache_hit(CacheTier::Memory);
                    block
                }
                None => self.fetch(hash, block_len).await?,
            };
            let start = (offset as usize).min(block.len());
            let end = (offset + len).min(block.len() as u64) as usize;
            return Ok(block.slice(start..end));
        }
        if let Some(data) = self.cache.read(hash, offset, len as usize) {
            self.metrics.cache_hit(CacheTier::Disk);
            return Ok(data);
        }
        self.metrics.cache_miss();
        let key = block_key(hash);
        self.timed(&key, self.store.get(&key, Some(offset..offset + len)))
            .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::MemStore;

    #[test]
    fn block_keys_round_trip() {
        let hash = hash_block(b"abc");
        let key = block_key(&hash);
        assert!(key.starts_with(&format!("blocks/{}/", &hex::encode(hash)[..2])));
        assert_eq!(parse_block_key(&key), Some(hash));
        assert_eq!(parse_block_key("blocks/aa/bb/zz"), None);
        assert_eq!(parse_block_key("volumes/x"), None);
    }

    #[test]
    fn cache_evicts_least_recently_used_within_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = BlockCache::open(dir.path(), 250).expect("open");
        let blocks: Vec<(Hash, Vec<u8>)> = (0..3u8)
            .map(|i| {
                let data = vec![i; 100];
                (hash_block(&data), data)
            })
            .collect();
        cache.insert(&blocks[0].0, &blocks[0].1).expect("insert");
        cache.insert(&blocks[1].0, &blocks[1].1).expect("insert");
        assert!(cache.read(&blocks[0].0, 0, 10).is_some()); // 0 is now the most recent
        cache.insert(&blocks[2].0, &blocks[2].1).expect("insert");
        assert!(cache.bytes() <= 250);
        assert!(cache.contains(&blocks[0].0));
        assert!(!cache.contains(&blocks[1].0));
        let reopened = BlockCache::open(dir.path(), 250).expect("reopen");
        assert_eq!(reopened.bytes(), 200);
    }

    /// Cache files are written in whole direct-I/O units; the padding must not stay.
    #[test]
    fn cache_files_hold_exactly_their_block_whatever_its_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = BlockCache::open(dir.path(), 1 << 30).expect("open");
        for len in [
            1,
            crate::direct_io::ALIGN - 1,
            crate::direct_io::ALIGN,
            3 * crate::direct_io::ALIGN + 17,
            1 << 20,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8 + 1).collect();
            let hash = hash_block(&data);
            cache.insert(&hash, &data).expect("insert");
            let file = std::fs::metadata(cache.path(&hash)).expect("cache file");
            assert_eq!(file.len(), len as u64);
            assert!(cache.read(&hash, 0, len).expect("cached") == data, "{len}");
        }
        let reopened = BlockCache::open(dir.path(), 1 << 30).expect("reopen");
        assert_eq!(reopened.bytes(), cache.bytes());
    }

    #[test]
    fn damaged_objects_on_a_lazily_durable_store_are_rewritten_not_deduplicated() {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        let dir = tempfile::tempdir().expect("tempdir");
        let local = Arc::new(crate::store::LocalStore::open(dir.path()).expect("store"));
        let blocks = BlockStore::new(
            local.clone(),
            BlockCache::open(&dir.path().join("cache"), 1 << 20).expect("cache"),
            Duration::from_secs(5),
        );
        rt.block_on(async {
            let data = Bytes::from(vec![5u8; 4096]);
            let hash = hash_block(&data);
            // What a machine crash can leave: the name, the size, but not the bytes.
            local
                .put(&block_key(&hash), Bytes::from(vec![0u8; 4096]))
                .await
                .expect("put");
            blocks
                .upload(hash, data.clone(), false)
                .await
                .expect("upload");
            let stored = local.get(&block_key(&hash), None).await.expect("get");
            assert_eq!(stored, data);
        });
    }

    /// Reading ahead skips blocks held or being fetched, and on a local store stays within
    /// what the hot blocks' memory holds.
    #[test]
    fn read_ahead_fetches_only_missing_blocks_and_fits_local_hot_memory() {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        let dir = tempfile::tempdir().expect("tempdir");
        let local = Arc::new(crate::store::LocalStore::open(dir.path()).expect("store"));
        let cache = BlockCache::open(&dir.path().join("cache"), 1 << 20).expect("cache");
        let blocks = BlockStore::new(local.clone(), cache, Duration::from_secs(5));
        let block_size = 4 << 20;
        assert_eq!(
            blocks.read_ahead_limit(block_size),
            HOT_FLOOR / block_size / 2
        );
        assert_eq!(blocks.read_ahead_limit(HOT_FLOOR), 0);
        let data = Bytes::from(vec![3u8; 1000]);
        let hash = hash_block(&data);
        rt.block_on(async {
            local.put(&block_key(&hash), data).await.expect("put");
            assert!(blocks.needs_fetch(&hash));
            blocks.fetch(&hash, 1000).await.expect("fetch");
            assert!(!blocks.needs_fetch(&hash));
        });
        let (_rt, _dir, _mem, remote) = over_mem_store();
        assert_eq!(remote.read_ahead_limit(block_size), u64::MAX);
    }

    /// A runtime, a temp dir, an in-memory store and blocks over it cached in the temp dir.
    pub(crate) fn over_mem_store() -> (
        tokio::runtime::Runtime,
        tempfile::TempDir,
        Arc<MemStore>,
        BlockStore,
    ) {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        let dir = tempfile::tempdir().expect("tempdir");
        let mem = Arc::new(MemStore::new());
        let blocks = BlockStore::new(
            mem.clone(),
            BlockCache::open(dir.path(), 1 << 20).expect("cache"),
            Duration::from_secs(5),
        );
        (rt, dir, mem, blocks)
    }

    #[test]
    fn uploads_dedup_and_fetches_verify() {
        let (rt, dir, mem, blocks) = over_mem_store();
        rt.block_on(async {
            let data = Bytes::from(vec![7u8; 1000]);
            let h1 = hash_block(&data);
            blocks
                .upload(h1, data.clone(), false)
                .await
                .expect("upload");
            blocks
                .upload(h1, data.clone(), false)
                .await
                .expect("upload");
            assert_eq!(mem.put_count(), 1);
            mem.tamper(&block_key(&h1), Bytes::from(vec![8u8; 1000]));
            let fresh = BlockStore::new(
                mem.clone(),
                BlockCache::open(&dir.path().join("other"), 1 << 20).expect("cache"),
                Duration::from_secs(5),
            );
            assert!(matches!(
                fresh.fetch(&h1, 1000).await,
                Err(CasError::Corrupt { .. })
            ));
        });
    }

    #[test]
    fn fetched_blocks_reach_the_disk_cache_in_the_background_or_inline_when_many_are_pending() {
        let (rt, _dir, mem, blocks) = over_mem_store();
        let block = |n: u8| {
            let data = Bytes::from(vec![n; 1000]);
            (hash_block(&data), data)
        };
        let (first, second) = (block(1), block(2));
        rt.block_on(async {
            for (hash, data) in [&first, &second] {
                mem.put(&block_key(hash), data.clone()).await.expect("put");
            }
            assert_eq!(blocks.fetch(&first.0, 1000).await.expect("fetch"), first.1);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !blocks.cache.contains(&first.0) {
                assert!(
                    Instant::now() < deadline,
                    "the block never reached the cache"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // With the background full, the reader writes the block before it returns.
            blocks
                .pending_cache_writes
                .store(BACKGROUND_CACHE_WRITES, Ordering::Release);
            assert_eq!(
                blocks.fetch(&second.0, 1000).await.expect("fetch"),
                second.1
            );
            assert!(blocks.cache.contains(&second.0));
            assert_eq!(
                blocks.pending_cache_writes.load(Ordering::Acquire),
                BACKGROUND_CACHE_WRITES
            );
        });
    }

    #[test]
    fn hot_blocks_keep_the_recently_used_and_always_the_newest() {
        let block = |n: u8| (hash_block(&[n]), Bytes::from(vec![n; 100]));
        let mut hot = HotBlocks {
            budget: 250,
            ..HotBlocks::default()
        };
        let (a, b, c) = (block(1), block(2), block(3));
        hot.insert(a.0, a.1.clone());
        hot.insert(b.0, b.1.clone());
        assert!(hot.get(&a.0).is_some()); // a is now used more recently than b
        hot.insert(c.0, c.1.clone());
        assert!(
            hot.get(&b.0).is_none(),
            "the least recently used goes first"
        );
        assert!(hot.get(&a.0).is_some() && hot.get(&c.0).is_some());

        // A block larger than the whole budget still stays while it is the newest.
        let big = (hash_block(b"big"), Bytes::from(vec![0u8; 1000]));
        hot.insert(big.0, big.1.clone());
        assert_eq!(hot.get(&big.0), Some(big.1));
        assert_eq!(hot.entries.len(), 1);
        assert_eq!(hot.bytes, 1000);
    }
}
