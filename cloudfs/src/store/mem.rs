//! `MemStore`: an in-process object store for tests, with fault injection.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    ListPage, ObjectMeta, ObjectStore, StoreError, StoreResult, unix_now_secs, validate_key,
};

/// A fault applied to every matching request until cleared.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Writes (`put`, `put_if_absent`) of keys with this prefix fail.
    FailPuts { prefix: String },
    /// Writes of keys with this prefix take `delay` before they happen.
    SlowPuts { prefix: String, delay: Duration },
    /// Reads (`get`) of keys with this prefix fail.
    FailGets { prefix: String },
    /// The store cannot list, as Swift with only a TempURL key.
    NoListings,
    /// Deletes of keys with this prefix fail.
    FailDeletes { prefix: String },
}

#[derive(Debug, Default)]
pub struct MemStore {
    objects: Mutex<BTreeMap<String, (Bytes, i64)>>,
    faults: Mutex<Vec<Fault>>,
    puts: AtomicU64,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    pub fn set_faults(&self, faults: Vec<Fault>) {
        *lock(&self.faults) = faults;
    }

    /// Successful writes so far (to check that dedup skips uploads).
    pub fn put_count(&self) -> u64 {
        self.puts.load(Ordering::Relaxed)
    }

    pub fn keys(&self) -> Vec<String> {
        lock(&self.objects).keys().cloned().collect()
    }

    /// Makes every object look `secs` seconds older (to test what depends on age).
    pub fn backdate(&self, secs: i64) {
        for (_, modified) in lock(&self.objects).values_mut() {
            *modified -= secs;
        }
    }

    /// Replaces an object's bytes behind the engine's back (to simulate corruption).
    pub fn tamper(&self, key: &str, data: Bytes) {
        if let Some(entry) = lock(&self.objects).get_mut(key) {
            entry.0 = data;
        }
    }

    /// Fails an `op` on `key` when a fault of that kind (`prefix_of` gives its prefix) covers it.
    fn fail_if(
        &self,
        key: &str,
        op: &str,
        prefix_of: impl Fn(&Fault) -> Option<&String>,
    ) -> StoreResult<()> {
        let failing = lock(&self.faults)
            .iter()
            .any(|f| prefix_of(f).is_some_and(|prefix| key.starts_with(prefix.as_str())));
        if failing {
            return Err(StoreError::Unavailable(format!(
                "injected {op} failure on {key}"
            )));
        }
        Ok(())
    }

    async fn before_put(&self, key: &str) -> StoreResult<()> {
        validate_key(key)?;
        let faults = lock(&self.faults).clone();
        for fault in faults {
            match fault {
                Fault::FailPuts { prefix } if key.starts_with(&prefix) => {
                    return Err(StoreError::Unavailable(format!(
                        "injected put failure on {key}"
                    )));
                }
                Fault::SlowPuts { prefix, delay } if key.starts_with(&prefix) => {
                    tokio::time::sleep(delay).await;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl ObjectStore for MemStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        validate_key(key)?;
        self.fail_if(key, "get", |f| match f {
            Fault::FailGets { prefix } => Some(prefix),
            _ => None,
        })?;
        let data = lock(&self.objects)
            .get(key)
            .map(|(d, _)| d.clone())
            .ok_or_else(|| StoreError::NotFound(key.to_owned()))?;
        Ok(match range {
            Some(r) => {
                let len = data.len() as u64;
                let start = r.start.min(len) as usize;
                let end = r.end.min(len) as usize;
                data.slice(start..end.max(start))
            }
            None => data,
        })
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        self.before_put(key).await?;
        lock(&self.objects).insert(key.to_owned(), (data, unix_now_secs()));
        self.puts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool> {
        self.before_put(key).await?;
        let mut objects = lock(&self.objects);
        if objects.contains_key(key) {
            return Ok(false);
        }
        objects.insert(key.to_owned(), (data, unix_now_secs()));
        self.puts.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        validate_key(key)?;
        Ok(lock(&self.objects).get(key).map(|(d, t)| ObjectMeta {
            key: key.to_owned(),
            size: d.len() as u64,
            modified: *t,
        }))
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        validate_key(key)?;
        self.fail_if(key, "delete", |f| match f {
            Fault::FailDeletes { prefix } => Some(prefix),
            _ => None,
        })?;
        lock(&self.objects).remove(key);
        Ok(())
    }

    async fn list(
        &self,
        prefix: &str,
        marker: Option<&str>,
        limit: usize,
    ) -> StoreResult<ListPage> {
        if !self.can_list() {
            return Err(StoreError::Unauthorized(format!(
                "injected: listing {prefix} is not allowed"
            )));
        }
        let objects = lock(&self.objects);
        let lower = match marker {
            Some(m) => std::ops::Bound::Excluded(m),
            None => std::ops::Bound::Included(prefix),
        };
        let mut page = ListPage::default();
        for (key, (data, t)) in objects.range::<str, _>((lower, std::ops::Bound::Unbounded)) {
            if !key.starts_with(prefix) {
                if key.as_str() > prefix {
                    break;
                }
                continue;
            }
            if page.objects.len() == limit.max(1) {
                page.next_marker = page.objects.last().map(|o: &ObjectMeta| o.key.clone());
                break;
            }
            page.objects.push(ObjectMeta {
                key: key.clone(),
                size: data.len() as u64,
                modified: *t,
            });
        }
        Ok(page)
    }

    fn can_list(&self) -> bool {
        !lock(&self.faults)
            .iter()
            .any(|f| matches!(f, Fault::NoListings))
    }
}
