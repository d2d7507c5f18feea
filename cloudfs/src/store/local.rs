//! `LocalStore`: the embedded object store, one file per object under a directory.
//!
//! Writes go to a temporary file in `<root>/.tmp`, then are renamed (or hard-linked, for
//! create-only writes) into place, so an object is either absent or complete, even with several
//! processes writing the same directory at once. Plain puts are not fsynced one by one: the
//! engine calls `sync` (one `syncfs` of the store's file system) before it commits metadata
//! naming them, which makes many small writes cost one flush instead of two each. Create-only
//! writes (volume configs, leases) are fsynced with their directory at once.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListPage, ObjectMeta, ObjectStore, Piece, StoreError, StoreResult, validate_key};
use crate::buffers;
use crate::direct_io::DirectIo;

const TMP_DIR: &str = ".tmp";
/// Objects this large (data blocks) are written, and read whole, around the page cache (see
/// `direct_io`); smaller ones (metadata, small files' blocks) are cheaper through it.
const DIRECT_IO_MIN: usize = 1 << 20;

#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    tmp_counter: AtomicU64,
    direct: Arc<DirectIo>,
}

impl LocalStore {
    /// Opens a store rooted at an existing directory.
    pub fn open(root: &Path) -> StoreResult<LocalStore> {
        let meta = fs::metadata(root).map_err(|e| {
            StoreError::Unavailable(format!("store directory {}: {e}", root.display()))
        })?;
        if !meta.is_dir() {
            return Err(StoreError::Unavailable(format!(
                "store path {} is not a directory",
                root.display()
            )));
        }
        fs::create_dir_all(root.join(TMP_DIR)).map_err(|e| StoreError::io(TMP_DIR, e))?;
        Ok(LocalStore {
            root: root.to_path_buf(),
            tmp_counter: AtomicU64::new(0),
            direct: Arc::default(),
        })
    }

    fn path_of(&self, key: &str) -> StoreResult<PathBuf> {
        validate_key(key)?;
        if key == TMP_DIR || key.starts_with(".tmp/") {
            return Err(StoreError::InvalidKey(key.to_owned()));
        }
        Ok(self.root.join(key))
    }

    fn temp_path(&self) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let nonce: u64 = rand_nonce();
        self.root
            .join(TMP_DIR)
            .join(format!("{}-{n}-{nonce:016x}", std::process::id()))
    }

    /// Has `fill` write a fresh temp file (fsynced when `durable`) and hands it to `place`,
    /// which moves it to its final name; the temp file is removed whatever happens.
    fn write_via_temp(
        &self,
        key: &str,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
        durable: bool,
        place: impl FnOnce(&Path, &Path) -> io::Result<bool>,
    ) -> StoreResult<bool> {
        let dest = self.path_of(key)?;
        let tmp = self.temp_path();
        let result = (|| {
            let mut file = File::create(&tmp)?;
            fill(&mut file)?;
            if durable {
                file.sync_all()?;
            }
            let parent = dest.parent().unwrap_or(&self.root);
            fs::create_dir_all(parent)?;
            let placed = place(&tmp, &dest)?;
            if durable {
                File::open(parent)?.sync_all()?;
            }
            Ok(placed)
        })();
        let _ = fs::remove_file(&tmp);
        result.map_err(|e| StoreError::io(key, e))
    }

    fn list_sync(&self, prefix: &str, marker: Option<&str>, limit: usize) -> StoreResult<ListPage> {
        let mut objects = Vec::new();
        let mut walk = Walk {
            prefix,
            marker: marker.unwrap_or(""),
            limit,
            out: &mut objects,
            truncated: false,
        };
        walk.dir(&self.root, "")
            .map_err(|e| StoreError::io(prefix, e))?;
        let more = walk.truncated;
        Ok(ListPage::new(objects, more))
    }
}

fn rand_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn modified_secs(meta: &fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64)
}

/// A depth-first walk that yields keys in lexicographic order and stops after `limit`.
struct Walk<'a> {
    prefix: &'a str,
    marker: &'a str,
    limit: usize,
    out: &'a mut Vec<ObjectMeta>,
    truncated: bool,
}

impl Walk<'_> {
    fn dir(&mut self, path: &Path, key_prefix: &str) -> io::Result<()> {
        let entries = match fs::read_dir(path) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        // Sort as keys sort: a directory `a` holds keys `a/…`, which sort after `a-b`.
        let mut children = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if key_prefix.is_empty() && name == TMP_DIR {
                continue;
            }
            let is_dir = entry.file_type()?.is_dir();
            let key = if is_dir {
                format!("{key_prefix}{name}/")
            } else {
                format!("{key_prefix}{name}")
            };
            children.push((key, is_dir, entry.path()));
        }
        children.sort();
        for (key, is_dir, child) in children {
            if self.truncated {
                return Ok(());
            }
            if is_dir {
                let relevant = key.starts_with(self.prefix) || self.prefix.starts_with(&key);
                let before_marker = key.as_str() < self.marker && !self.marker.starts_with(&key);
                if relevant && !before_marker {
                    self.dir(&child, &key)?;
                }
            } else if key.starts_with(self.prefix) && key.as_str() > self.marker {
                if self.out.len() == self.limit {
                    self.truncated = true;
                    return Ok(());
                }
                let meta = fs::metadata(&child)?;
                self.out.push(ObjectMeta {
                    key,
                    size: meta.len(),
                    modified: modified_secs(&meta),
                });
            }
        }
        Ok(())
    }
}

fn not_found_as(key: &str, e: io::Error) -> StoreError {
    if e.kind() == io::ErrorKind::NotFound {
        StoreError::NotFound(key.to_owned())
    } else {
        StoreError::io(key, e)
    }
}

fn rename_into_place(tmp: &Path, dest: &Path) -> io::Result<bool> {
    fs::rename(tmp, dest).map(|()| true)
}

/// File work moving up to this many bytes runs on the calling thread: a small read or write
/// (a random read, a small file) or a metadata lookup costs less than handing it to a thread.
const INLINE_BYTES: u64 = 128 << 10;

/// Runs blocking file work off the async worker threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(format!("store worker failed: {e}")))?
}

/// Runs file work moving `bytes` on the calling thread when that is at most
/// [`INLINE_BYTES`], else through [`blocking`].
async fn sized<T: Send + 'static>(
    bytes: u64,
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    if bytes <= INLINE_BYTES {
        f()
    } else {
        blocking(f).await
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        let path = self.path_of(key)?;
        let key = key.to_owned();
        let bytes = range
            .as_ref()
            .map_or(u64::MAX, |r| r.end.saturating_sub(r.start));
        let direct = self.direct.clone();
        sized(bytes, move || {
            let mut file = File::open(&path).map_err(|e| not_found_as(&key, e))?;
            match range {
                Some(r) => {
                    let mut buf = Vec::new();
                    file.seek(SeekFrom::Start(r.start))
                        .map_err(|e| StoreError::io(&key, e))?;
                    file.take(r.end.saturating_sub(r.start))
                        .read_to_end(&mut buf)
                        .map_err(|e| StoreError::io(&key, e))?;
                    Ok(Bytes::from(buf))
                }
                None => {
                    let len = file.metadata().map_err(|e| StoreError::io(&key, e))?.len();
                    if len >= DIRECT_IO_MIN as u64 {
                        return direct
                            .read_file(&file, len as usize)
                            .map_err(|e| StoreError::io(&key, e));
                    }
                    let mut buf = buffers::take(len as usize);
                    file.read_to_end(&mut buf)
                        .map_err(|e| StoreError::io(&key, e))?;
                    Ok(buffers::into_bytes(buf))
                }
            }
        })
        .await
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        let this = self.clone_handle();
        let key = key.to_owned();
        sized(data.len() as u64, move || {
            let fill = |f: &mut File| {
                if data.len() >= DIRECT_IO_MIN {
                    this.direct.write_file(f, &data)
                } else {
                    f.write_all(&data)
                }
            };
            this.write_via_temp(&key, fill, false, rename_into_place)
                .map(|_| ())
        })
        .await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool> {
        let this = self.clone_handle();
        let key = key.to_owned();
        sized(data.len() as u64, move || {
            this.write_via_temp(
                &key,
                |f| f.write_all(&data),
                true,
                |tmp, dest| match fs::hard_link(tmp, dest) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e),
                },
            )
        })
        .await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        let path = self.path_of(key)?;
        let key = key.to_owned();
        sized(0, move || match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(ObjectMeta {
                key,
                size: meta.len(),
                modified: modified_secs(&meta),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(&key, e)),
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let path = self.path_of(key)?;
        let key = key.to_owned();
        sized(0, move || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(&key, e)),
        })
        .await
    }

    /// Writes the bytes: a local composite is a plain file (a real tar for exports).
    async fn put_composite(
        &self,
        key: &str,
        pieces: &[Piece],
        _helper_prefix: &str,
    ) -> StoreResult<()> {
        let this = self.clone_handle();
        let key = key.to_owned();
        let mut sources = Vec::with_capacity(pieces.len());
        for piece in pieces {
            if let Piece::Object { key, .. } = piece {
                sources.push(self.path_of(key)?);
            }
        }
        let pieces = pieces.to_vec();
        blocking(move || {
            let fill = |out: &mut File| -> io::Result<()> {
                let mut out = io::BufWriter::with_capacity(1 << 20, out);
                let mut sources = sources.iter();
                for piece in &pieces {
                    match piece {
                        Piece::Inline(bytes) => out.write_all(bytes)?,
                        Piece::Object { key, range, .. } => {
                            let path = sources
                                .next()
                                .ok_or_else(|| io::Error::other(format!("no source for {key}")))?;
                            let mut source = File::open(path)?;
                            source.seek(SeekFrom::Start(range.start))?;
                            let want = range.end - range.start;
                            let copied = io::copy(&mut source.take(want), &mut out)?;
                            if copied != want {
                                return Err(io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    format!("{key} is shorter than {}", range.end),
                                ));
                            }
                        }
                    }
                }
                out.flush()
            };
            this.write_via_temp(&key, fill, true, rename_into_place)
                .map(|_| ())
        })
        .await
    }

    async fn object_url(&self, key: &str, _signed_for: Option<Duration>) -> StoreResult<String> {
        let path = self.path_of(key)?;
        Ok(format!("file://{}", path.display()))
    }

    async fn sync(&self) -> StoreResult<()> {
        let root = self.root.clone();
        blocking(move || {
            let dir = File::open(&root).map_err(|e| StoreError::io("/", e))?;
            // SAFETY: syncfs on a valid descriptor we own for the duration of the call.
            if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
                return Err(StoreError::io("/", io::Error::last_os_error()));
            }
            Ok(())
        })
        .await
    }

    fn puts_are_durable(&self) -> bool {
        false
    }

    fn reads_are_local(&self) -> bool {
        true
    }

    async fn list(
        &self,
        prefix: &str,
        marker: Option<&str>,
        limit: usize,
    ) -> StoreResult<ListPage> {
        let this = self.clone_handle();
        let prefix = prefix.to_owned();
        let marker = marker.map(str::to_owned);
        blocking(move || this.list_sync(&prefix, marker.as_deref(), limit.max(1))).await
    }
}

impl LocalStore {
    /// A second handle on the same directory, for moving into blocking tasks.
    fn clone_handle(&self) -> LocalStore {
        LocalStore {
            root: self.root.clone(),
            tmp_counter: AtomicU64::new(self.tmp_counter.fetch_add(1 << 32, Ordering::Relaxed)),
            direct: self.direct.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn put_get_range_head_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path()).expect("open");
        rt().block_on(async {
            store
                .put("a/b/c", Bytes::from_static(b"hello world"))
                .await
                .expect("put");
            assert_eq!(
                &store.get("a/b/c", None).await.expect("get")[..],
                b"hello world"
            );
            assert_eq!(
                &store.get("a/b/c", Some(6..100)).await.expect("get")[..],
                b"world"
            );
            assert_eq!(
                store.head("a/b/c").await.expect("head").map(|m| m.size),
                Some(11)
            );
            assert!(matches!(
                store.get("nope", None).await,
                Err(StoreError::NotFound(_))
            ));
            store.delete("a/b/c").await.expect("delete");
            store.delete("a/b/c").await.expect("delete twice");
            assert!(store.head("a/b/c").await.expect("head").is_none());
        });
    }

    #[test]
    fn create_only_writes_exactly_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path()).expect("open");
        rt().block_on(async {
            assert!(
                store
                    .put_if_absent("k", Bytes::from_static(b"1"))
                    .await
                    .expect("put")
            );
            assert!(
                !store
                    .put_if_absent("k", Bytes::from_static(b"2"))
                    .await
                    .expect("put")
            );
            assert_eq!(&store.get("k", None).await.expect("get")[..], b"1");
        });
        let leftovers = fs::read_dir(dir.path().join(TMP_DIR)).expect("tmp").count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn listing_is_sorted_and_pages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path()).expect("open");
        let keys = ["a-b", "a/b", "a/c/d", "b", "a/c-e", "ab"];
        rt().block_on(async {
            for k in keys {
                store.put(k, Bytes::from_static(b"x")).await.expect("put");
            }
            let mut expected: Vec<&str> = keys.to_vec();
            expected.sort();
            let mut got = Vec::new();
            let mut marker = None;
            loop {
                let page = store.list("", marker.as_deref(), 2).await.expect("list");
                got.extend(page.objects.into_iter().map(|o| o.key));
                match page.next_marker {
                    Some(m) => marker = Some(m),
                    None => break,
                }
            }
            assert_eq!(got, expected);
            let under_a = store.list("a/", None, 100).await.expect("list");
            let keys: Vec<_> = under_a.objects.iter().map(|o| o.key.as_str()).collect();
            assert_eq!(keys, ["a/b", "a/c-e", "a/c/d"]);
        });
    }

    #[test]
    fn concurrent_writers_of_one_key_leave_a_whole_object() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(LocalStore::open(dir.path()).expect("open"));
        rt().block_on(async {
            let mut tasks = Vec::new();
            for i in 0..16u8 {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    store.put("same", Bytes::from(vec![i; 100_000])).await
                }));
            }
            for t in tasks {
                t.await.expect("join").expect("put");
            }
            let data = store.get("same", None).await.expect("get");
            assert_eq!(data.len(), 100_000);
            assert!(data.iter().all(|b| *b == data[0]));
        });
    }
}
