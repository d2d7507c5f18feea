//! `SwiftStore`: a pool in one Swift container, through `cloudfs-swift`.

use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use cloudfs_swift::{Credentials, ListEntry, RetryPolicy, SwiftClient, SwiftError};

use super::{ListPage, ObjectMeta, ObjectStore, StoreError, StoreResult, validate_key};

#[derive(Debug)]
pub struct SwiftStore {
    client: SwiftClient,
    container: String,
}

fn store_error(e: SwiftError) -> StoreError {
    match e {
        SwiftError::NotFound(what) => StoreError::NotFound(what),
        SwiftError::Unauthorized(what) => StoreError::Unauthorized(what),
        other => StoreError::Swift(other),
    }
}

impl SwiftStore {
    pub fn open(
        container: &str,
        credentials: impl Fn(&str) -> Option<String>,
    ) -> StoreResult<SwiftStore> {
        let credentials = Credentials::from_keys(credentials).map_err(store_error)?;
        // Ride out a proxy restart (tens of seconds of backoff); the engine's store timeout
        // still bounds every operation.
        let retry = RetryPolicy {
            attempts: 12,
            ..RetryPolicy::default()
        };
        let client = SwiftClient::new(credentials, retry).map_err(store_error)?;
        Ok(SwiftStore {
            client,
            container: container.to_owned(),
        })
    }
}

#[async_trait]
impl ObjectStore for SwiftStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        validate_key(key)?;
        self.client
            .get_object(&self.container, key, range)
            .await
            .map_err(|e| match e {
                SwiftError::NotFound(_) => StoreError::NotFound(key.to_owned()),
                other => store_error(other),
            })
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        validate_key(key)?;
        self.client
            .put_object(&self.container, key, data)
            .await
            .map_err(store_error)
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool> {
        validate_key(key)?;
        self.client
            .put_object_if_absent(&self.container, key, data)
            .await
            .map_err(store_error)
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        validate_key(key)?;
        let info = self
            .client
            .head_object(&self.container, key)
            .await
            .map_err(store_error)?;
        Ok(info.map(|i| ObjectMeta {
            key: key.to_owned(),
            size: i.size,
            modified: i.last_modified,
        }))
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        validate_key(key)?;
        self.client
            .delete_object(&self.container, key)
            .await
            .map_err(store_error)
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        for key in keys {
            validate_key(key)?;
        }
        let report = self
            .client
            .bulk_delete(&self.container, keys)
            .await
            .map_err(store_error)?;
        match report.errors.first() {
            None => Ok(()),
            Some((path, status)) => Err(StoreError::Unavailable(format!(
                "bulk delete: {path}: {status} ({} objects not deleted)",
                report.errors.len()
            ))),
        }
    }

    async fn list(
        &self,
        prefix: &str,
        marker: Option<&str>,
        limit: usize,
    ) -> StoreResult<ListPage> {
        let limit = limit.clamp(1, 10_000);
        let rows = self
            .client
            .list_objects(&self.container, prefix, marker, limit, None)
            .await
            .map_err(store_error)?;
        let full = rows.len() == limit;
        let objects: Vec<ObjectMeta> = rows
            .into_iter()
            .filter_map(|row| match row {
                ListEntry::Object {
                    name,
                    bytes,
                    last_modified,
                    ..
                } => Some(ObjectMeta {
                    key: name,
                    size: bytes,
                    modified: humantime::parse_rfc3339_weak(&last_modified)
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs() as i64),
                }),
                ListEntry::Subdir { .. } => None,
            })
            .collect();
        Ok(ListPage::new(objects, full))
    }

    async fn prepare(&self) -> StoreResult<()> {
        if self
            .client
            .head_container(&self.container)
            .await
            .map_err(store_error)?
            .is_none()
        {
            self.client
                .create_container(&self.container)
                .await
                .map_err(store_error)?;
        }
        Ok(())
    }

    fn can_list(&self) -> bool {
        !self.client.signs_temp_urls()
    }
}
