//! `SwiftStore`: a pool in one Swift container, through `cloudfs-swift`.

use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use std::time::Duration;

use cloudfs_swift::{
    Credentials, ListEntry, RetryPolicy, SloLimits, SloSegment, SwiftClient, SwiftError,
};

use super::{ListPage, ObjectMeta, ObjectStore, Piece, StoreError, StoreResult, validate_key};
use crate::buffers;

#[derive(Debug)]
pub struct SwiftStore {
    client: SwiftClient,
    container: String,
}

fn store_error(e: SwiftError) -> StoreError {
    match e {
        SwiftError::NotFound(what) => StoreError::NotFound(what),
        SwiftError::Unauthorized(what) => StoreError::Unauthorized(what),
        SwiftError::Config(what) => StoreError::Config(what),
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

/// Bytes of a segment's entry in a manifest's JSON, roughly: object segments name their path
/// and size; inline data is base64.
fn manifest_bytes(segment: &SloSegment) -> u64 {
    match segment {
        SloSegment::Object { object, .. } => object.len() as u64 + 128,
        SloSegment::Data(bytes) => bytes.len() as u64 * 4 / 3 + 16,
    }
}

fn segment_len(segment: &SloSegment) -> u64 {
    match segment {
        SloSegment::Object {
            size, range: None, ..
        } => *size,
        SloSegment::Object {
            range: Some(range), ..
        } => range.end - range.start,
        SloSegment::Data(bytes) => bytes.len() as u64,
    }
}

/// Splits `segments` into runs that each fit one manifest, in order.
fn manifest_groups(segments: Vec<SloSegment>, limits: SloLimits) -> Vec<Vec<SloSegment>> {
    // Half the byte limit leaves room for Swift's own additions to each entry.
    let byte_budget = limits.max_manifest_bytes / 2;
    let mut groups = vec![Vec::new()];
    let (mut objects, mut bytes) = (0, 0);
    for segment in segments {
        let is_object = matches!(segment, SloSegment::Object { .. });
        let cost = manifest_bytes(&segment);
        let full = (is_object && objects >= limits.max_segments) || bytes + cost > byte_budget;
        if full && groups.last().is_some_and(|g| !g.is_empty()) {
            groups.push(Vec::new());
            (objects, bytes) = (0, 0);
        }
        objects += u64::from(is_object);
        bytes += cost;
        if let Some(group) = groups.last_mut() {
            group.push(segment);
        }
    }
    groups
}

impl SwiftStore {
    /// Writes one manifest; one with no object segment (Swift refuses those) is written as
    /// the plain object its inline bytes make.
    async fn put_manifest(&self, key: &str, segments: &[SloSegment]) -> StoreResult<()> {
        if segments
            .iter()
            .all(|segment| matches!(segment, SloSegment::Data(_)))
        {
            let mut bytes = Vec::new();
            for segment in segments {
                if let SloSegment::Data(data) = segment {
                    bytes.extend_from_slice(data);
                }
            }
            return self.put(key, Bytes::from(bytes)).await;
        }
        self.client
            .put_slo_manifest(&self.container, key, segments)
            .await
            .map_err(store_error)
    }
}

#[async_trait]
impl ObjectStore for SwiftStore {
    /// A static large object: blocks are referenced, never copied. Past the cluster's
    /// per-manifest limits, runs of segments go into nested manifests
    /// `<helper_prefix><n>` that the top manifest references.
    async fn put_composite(
        &self,
        key: &str,
        pieces: &[Piece],
        helper_prefix: &str,
    ) -> StoreResult<()> {
        validate_key(key)?;
        let mut level: Vec<SloSegment> = Vec::with_capacity(pieces.len());
        for piece in pieces.iter().filter(|p| !p.is_empty()) {
            match (piece, level.last_mut()) {
                (Piece::Inline(more), Some(SloSegment::Data(data))) => {
                    let mut joined = Vec::with_capacity(data.len() + more.len());
                    joined.extend_from_slice(data);
                    joined.extend_from_slice(more);
                    *data = Bytes::from(joined);
                }
                (Piece::Inline(bytes), _) => level.push(SloSegment::Data(bytes.clone())),
                (Piece::Object { key, size, range }, _) => level.push(SloSegment::Object {
                    container: self.container.clone(),
                    object: key.clone(),
                    size: *size,
                    range: (range.start != 0 || range.end != *size).then(|| range.clone()),
                }),
            }
        }
        let limits = self.client.slo_limits().await;
        let mut nested = 0u64;
        loop {
            let mut groups = manifest_groups(level, limits);
            if groups.len() == 1 {
                return self.put_manifest(key, &groups.remove(0)).await;
            }
            level = Vec::with_capacity(groups.len());
            for group in groups {
                let part = format!("{helper_prefix}{nested:08}");
                nested += 1;
                self.put_manifest(&part, &group).await?;
                level.push(SloSegment::Object {
                    container: self.container.clone(),
                    object: part,
                    size: group.iter().map(segment_len).sum(),
                    range: None,
                });
            }
        }
    }

    async fn object_url(&self, key: &str, signed_for: Option<Duration>) -> StoreResult<String> {
        validate_key(key)?;
        match signed_for {
            Some(validity) => self.client.temp_url(&self.container, key, validity).await,
            None => self.client.object_url(&self.container, key).await,
        }
        .map_err(store_error)
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        validate_key(key)?;
        self.client
            .get_object_into(&self.container, key, range, buffers::take)
            .await
            .map(buffers::into_bytes)
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
        let rows = match self
            .client
            .list_objects(&self.container, prefix, marker, limit, None)
            .await
        {
            Ok(rows) => rows,
            // A pool whose container was never created holds nothing yet.
            Err(SwiftError::NotFound(_)) => return Ok(ListPage::default()),
            Err(e) => return Err(store_error(e)),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn object(n: usize) -> SloSegment {
        SloSegment::Object {
            container: "c".into(),
            object: format!("blocks/{n}"),
            size: 10,
            range: None,
        }
    }

    #[test]
    fn manifests_split_at_the_segment_and_byte_limits_in_order() {
        let limits = SloLimits {
            max_segments: 1000,
            max_manifest_bytes: 8 << 20,
        };
        let segments: Vec<SloSegment> = (0..2500)
            .flat_map(|n| [SloSegment::Data(Bytes::from(vec![0u8; 512])), object(n)])
            .collect();
        let groups = manifest_groups(segments.clone(), limits);
        assert_eq!(groups.len(), 3);
        for group in &groups {
            let objects = group
                .iter()
                .filter(|s| matches!(s, SloSegment::Object { .. }))
                .count();
            assert!(objects <= 1000);
            assert!(group.iter().map(manifest_bytes).sum::<u64>() <= 4 << 20);
        }
        assert_eq!(groups.concat(), segments, "nothing lost or reordered");

        // Inline data alone can fill a manifest's bytes.
        let data: Vec<SloSegment> = (0..100)
            .map(|_| SloSegment::Data(Bytes::from(vec![1u8; 150_000])))
            .collect();
        let groups = manifest_groups(data, limits);
        assert!(groups.len() >= 4, "{}", groups.len());
        assert_eq!(
            manifest_groups(Vec::new(), limits),
            vec![Vec::<SloSegment>::new()]
        );
    }
}
