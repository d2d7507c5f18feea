//! The object-store seam: everything the engine persists goes through [`ObjectStore`].
//!
//! Keys are `/`-separated UTF-8 paths (`blocks/ab/cd/<hash>`, `volumes/<vol>/…`). Objects are
//! immutable once written by convention of the callers: the engine never overwrites a key with
//! different content, which keeps it safe on eventually consistent stores.

mod local;
mod mem;
mod swift;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use local::LocalStore;
pub use mem::{Fault, MemStore};
pub use swift::SwiftStore;

/// Errors of the object-store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {0} not found")]
    NotFound(String),
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    #[error("store I/O error on {key}: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("invalid store URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("object store refused the credentials: {0}")]
    Unauthorized(String),
    /// Credentials or settings that cannot work (missing keys, a bad URL in them).
    #[error("invalid store configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Swift(cloudfs_swift::SwiftError),
}

impl StoreError {
    /// A short, stable name of the kind of error (for metrics labels).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::NotFound(_) => "not_found",
            StoreError::InvalidKey(_) => "invalid_key",
            StoreError::Io { .. } => "io",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::InvalidUrl { .. } => "invalid_url",
            StoreError::Unauthorized(_) => "unauthorized",
            StoreError::Config(_) => "config",
            StoreError::Unsupported(_) => "unsupported",
            StoreError::Swift(e) => e.kind(),
        }
    }

    pub(crate) fn io(key: &str, source: std::io::Error) -> Self {
        StoreError::Io {
            key: key.to_owned(),
            source,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What `head` and `list` say of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// Seconds since the Unix epoch of the last write.
    pub modified: i64,
}

/// One page of a listing, in lexicographic key order.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    /// Pass as `marker` to get the next page; `None` when the listing is complete.
    pub next_marker: Option<String>,
}

impl ListPage {
    /// A page of `objects`; when `more` follow, the next page starts after the last of them.
    pub fn new(objects: Vec<ObjectMeta>, more: bool) -> ListPage {
        let next_marker = if more {
            objects.last().map(|o| o.key.clone())
        } else {
            None
        };
        ListPage {
            objects,
            next_marker,
        }
    }
}

/// One piece of a composite object ([`ObjectStore::put_composite`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Bytes carried by the composite itself.
    Inline(Bytes),
    /// Bytes `range` of the existing object `key`, which is `size` bytes long.
    Object {
        key: String,
        size: u64,
        range: Range<u64>,
    },
}

impl Piece {
    pub fn len(&self) -> u64 {
        match self {
            Piece::Inline(bytes) => bytes.len() as u64,
            Piece::Object { range, .. } => range.end - range.start,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An object store: a flat namespace of immutable byte objects.
#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Read an object, or the byte `range` of it (clamped to the object's end).
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes>;
    /// Write an object. Once this returns, readers see it and it survives a crash of this
    /// process; it survives a crash of the machine once [`ObjectStore::sync`] has returned
    /// (at once where [`ObjectStore::puts_are_durable`]).
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()>;
    /// Write an object durably, only if no object has that key; `Ok(false)` when one exists.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool>;
    /// Size and age of an object, `None` when it does not exist.
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>>;
    /// Delete an object; deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> StoreResult<()>;
    /// Keys starting with `prefix` and greater than `marker`, at most `limit` of them.
    async fn list(&self, prefix: &str, marker: Option<&str>, limit: usize)
    -> StoreResult<ListPage>;
    /// Deletes `keys` (a missing one is not an error), in as few requests as the store
    /// allows.
    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        for key in keys {
            self.delete(key).await?;
        }
        Ok(())
    }
    /// Writes `key` as the concatenation of `pieces`. Swift stores a static large object
    /// whose segments are the objects named (no byte of them is copied), with any nested
    /// manifests it needs written under `helper_prefix`; other stores write the bytes. A later
    /// `get` returns the concatenation. Deleting `key` never deletes the objects it names.
    async fn put_composite(
        &self,
        key: &str,
        pieces: &[Piece],
        helper_prefix: &str,
    ) -> StoreResult<()> {
        let _ = helper_prefix;
        let mut whole = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Inline(bytes) => whole.extend_from_slice(bytes),
                Piece::Object { key, range, .. } => {
                    whole.extend_from_slice(&self.get(key, Some(range.clone())).await?)
                }
            }
        }
        self.put(key, Bytes::from(whole)).await
    }
    /// A URL that reads object `key`: with `signed_for`, one that needs no credentials for
    /// that long (a Swift TempURL).
    async fn object_url(&self, key: &str, signed_for: Option<Duration>) -> StoreResult<String> {
        let _ = signed_for;
        Err(StoreError::Unsupported(format!(
            "this store has no URL for object {key}"
        )))
    }
    /// Creates the pool if it does not exist yet (a Swift container); a no-op where there is
    /// nothing to create.
    async fn prepare(&self) -> StoreResult<()> {
        Ok(())
    }
    /// Makes every `put` that has returned durable against a crash of the machine.
    async fn sync(&self) -> StoreResult<()> {
        Ok(())
    }
    /// Whether each `put` is durable when it returns. Where it is not, an object found after
    /// a machine crash may hold bytes that never became durable, so content found by name
    /// must be checked before it is trusted.
    fn puts_are_durable(&self) -> bool {
        true
    }
    /// Whether a read costs no more than one from the local block cache (the store is a
    /// directory on this machine): then fetched blocks are not copied into the cache.
    fn reads_are_local(&self) -> bool {
        false
    }
    /// Whether `list` (and `prepare`) work with these credentials. A store that cannot list
    /// (Swift with only a TempURL key) still reads and writes objects by name.
    fn can_list(&self) -> bool {
        true
    }
}

/// Seconds since the Unix epoch: how stores date objects ([`ObjectMeta::modified`]).
pub fn unix_now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Every object under `prefix`, following pages.
pub async fn list_all(store: &dyn ObjectStore, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
    let mut all = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let page = store.list(prefix, marker.as_deref(), 1000).await?;
        all.extend(page.objects);
        match page.next_marker {
            Some(next) => marker = Some(next),
            None => return Ok(all),
        }
    }
}

/// Rejects keys that could escape a directory-backed store or confuse listings.
pub(crate) fn validate_key(key: &str) -> StoreResult<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.ends_with('/')
        || key.contains('\0')
        || key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        Err(StoreError::InvalidKey(key.to_owned()))
    } else {
        Ok(())
    }
}

/// Where a store lives, parsed from the `<STORE>` URL of the CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `file:///abs/path`: the embedded local-directory store.
    Local(PathBuf),
    /// `swift://<container>`: a Swift container, credentials from the environment.
    Swift(String),
}

impl StoreUrl {
    pub fn parse(url: &str) -> StoreResult<StoreUrl> {
        let invalid = |reason: &str| StoreError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(invalid(
                    "a file:// URL needs an absolute path (file:///abs/path)",
                ));
            }
            return Ok(StoreUrl::Local(PathBuf::from(path)));
        }
        if let Some(container) = url.strip_prefix("swift://") {
            let container = container.trim_end_matches('/');
            if container.is_empty() || container.contains('/') || container.len() > 256 {
                return Err(invalid("expected swift://<container>"));
            }
            return Ok(StoreUrl::Swift(container.to_owned()));
        }
        Err(invalid("expected file:///abs/path or swift://<container>"))
    }

    /// Opens the store; a local store's directory must already exist. Swift credentials come
    /// from `credentials` (the keys of `cloudfs_swift::Credentials::from_keys`).
    pub fn open(
        &self,
        credentials: impl Fn(&str) -> Option<String>,
    ) -> StoreResult<Arc<dyn ObjectStore>> {
        match self {
            StoreUrl::Local(path) => Ok(Arc::new(LocalStore::open(path)?)),
            StoreUrl::Swift(container) => Ok(Arc::new(SwiftStore::open(container, credentials)?)),
        }
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Local(path) => write!(f, "file://{}", path.display()),
            StoreUrl::Swift(container) => write!(f, "swift://{container}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("blocks/ab/cd/abcd").is_ok());
        for bad in ["", "/a", "a/", "a//b", "a/../b", "./a", "a\0b"] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn urls_parse() {
        assert_eq!(
            StoreUrl::parse("file:///tmp/x").ok(),
            Some(StoreUrl::Local("/tmp/x".into()))
        );
        assert!(StoreUrl::parse("file://rel").is_err());
        assert_eq!(
            StoreUrl::parse("swift://pool").ok(),
            Some(StoreUrl::Swift("pool".into()))
        );
        assert!(StoreUrl::parse("swift://").is_err());
        assert!(StoreUrl::parse("swift://a/b").is_err());
        assert!(StoreUrl::parse("s3://x").is_err());
    }
}
