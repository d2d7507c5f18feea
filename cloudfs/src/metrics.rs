//! What an engine measures for the `/metrics` of its mount process: file-system operations
//! as the kernel asks for them (count, errors by errno, latency), the bytes read and written
//! through them, block-cache hits and misses, and every object-store request (count, errors
//! by kind, latency, bytes up and down), counted by [`MeteredStore`] at the store seam.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use cloudfs_metrics::prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use crate::store::{ListPage, ObjectMeta, ObjectStore, Piece, StoreResult};

/// Latency buckets of file-system operations: from a cached `getattr` to a block fetched
/// from a slow store.
const FS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Latency buckets of object-store requests, up to the longest a request may take.
const STORE_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0,
];

/// Where a block read was served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheTier {
    /// The recently used blocks held in memory.
    Memory,
    /// The block cache on local disk.
    Disk,
}

/// The metrics of one engine. Cheap to clone (every field is a handle).
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    fs_operations: IntCounterVec,
    fs_errors: IntCounterVec,
    fs_seconds: HistogramVec,
    read_bytes: IntCounter,
    written_bytes: IntCounter,
    /// `cloudfs_cache_hits_total` of each tier, resolved once: block reads are a hot path.
    memory_hits: IntCounter,
    disk_hits: IntCounter,
    cache_hits: IntCounterVec,
    cache_misses: IntCounter,
    store_requests: IntCounterVec,
    store_errors: IntCounterVec,
    store_seconds: HistogramVec,
    uploaded_bytes: IntCounter,
    downloaded_bytes: IntCounter,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl EngineMetrics {
    /// Metrics not yet registered anywhere (an engine of a one-shot command keeps them so).
    pub fn new() -> EngineMetrics {
        // Names, help texts and labels are constants, checked by this module's tests: none
        // of these constructors can fail.
        let counter =
            |name: &str, help: &str| IntCounter::new(name, help).expect("valid counter options");
        let counters = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter options")
        };
        let histograms = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid histogram options")
        };
        let cache_hits = counters(
            "cloudfs_cache_hits_total",
            "Block reads served locally, by tier (memory or disk).",
            &["tier"],
        );
        EngineMetrics {
            memory_hits: cache_hits.with_label_values(&["memory"]),
            disk_hits: cache_hits.with_label_values(&["disk"]),
            cache_hits,
            fs_operations: counters(
                "cloudfs_fs_operations_total",
                "File-system operations served, by operation.",
                &["op"],
            ),
            fs_errors: counters(
                "cloudfs_fs_operation_errors_total",
                "File-system operations that returned an error, by operation and errno.",
                &["op", "errno"],
            ),
            fs_seconds: histograms(
                "cloudfs_fs_operation_duration_seconds",
                "Time to serve a file-system operation, by operation.",
                &["op"],
                FS_BUCKETS,
            ),
            read_bytes: counter(
                "cloudfs_fs_read_bytes_total",
                "Bytes returned by read operations.",
            ),
            written_bytes: counter(
                "cloudfs_fs_written_bytes_total",
                "Bytes accepted by write operations.",
            ),
            cache_misses: counter(
                "cloudfs_cache_misses_total",
                "Block reads that went to the object store.",
            ),
            store_requests: counters(
                "cloudfs_store_requests_total",
                "Object-store requests, by operation.",
                &["op"],
            ),
            store_errors: counters(
                "cloudfs_store_request_errors_total",
                "Object-store requests that failed (after the client's retries), by \
                 operation and kind; `abandoned` ones outlived the store timeout.",
                &["op", "kind"],
            ),
            store_seconds: histograms(
                "cloudfs_store_request_duration_seconds",
                "Time an object-store request took, retries included, by operation.",
                &["op"],
                STORE_BUCKETS,
            ),
            uploaded_bytes: counter(
                "cloudfs_store_uploaded_bytes_total",
                "Bytes written to the object store.",
            ),
            downloaded_bytes: counter(
                "cloudfs_store_downloaded_bytes_total",
                "Bytes read from the object store.",
            ),
        }
    }

    /// Adds every metric to `registry`.
    pub fn register(&self, registry: &Registry) -> cloudfs_metrics::prometheus::Result<()> {
        registry.register(Box::new(self.fs_operations.clone()))?;
        registry.register(Box::new(self.fs_errors.clone()))?;
        registry.register(Box::new(self.fs_seconds.clone()))?;
        registry.register(Box::new(self.read_bytes.clone()))?;
        registry.register(Box::new(self.written_bytes.clone()))?;
        registry.register(Box::new(self.cache_hits.clone()))?;
        registry.register(Box::new(self.cache_misses.clone()))?;
        registry.register(Box::new(self.store_requests.clone()))?;
        registry.register(Box::new(self.store_errors.clone()))?;
        registry.register(Box::new(self.store_seconds.clone()))?;
        registry.register(Box::new(self.uploaded_bytes.clone()))?;
        registry.register(Box::new(self.downloaded_bytes.clone()))?;
        Ok(())
    }

    /// Counts one file-system operation that took `elapsed` and failed with errno `error`,
    /// if it failed.
    pub fn fs_operation(&self, op: &str, elapsed: Duration, error: Option<&str>) {
        self.fs_operations.with_label_values(&[op]).inc();
        self.fs_seconds
            .with_label_values(&[op])
            .observe(elapsed.as_secs_f64());
        if let Some(errno) = error {
            self.fs_errors.with_label_values(&[op, errno]).inc();
        }
    }

    pub fn bytes_read(&self, n: usize) {
        self.read_bytes.inc_by(n as u64);
    }

    pub fn bytes_written(&self, n: usize) {
        self.written_bytes.inc_by(n as u64);
    }

    pub fn cache_hit(&self, tier: CacheTier) {
        match tier {
            CacheTier::Memory => self.memory_hits.inc(),
            CacheTier::Disk => self.disk_hits.inc(),
        }
    }

    pub fn cache_miss(&self) {
        self.cache_misses.inc();
    }
}

/// A store request being measured; one dropped before it finished (cancelled by the store
/// timeout) counts as abandoned.
struct StoreRequest<'a> {
    metrics: &'a EngineMetrics,
    op: &'static str,
    started: Instant,
    finished: bool,
}

impl StoreRequest<'_> {
    fn finish(mut self, error: Option<&str>) {
        self.finished = true;
        self.record(error);
    }

    fn record(&self, error: Option<&str>) {
        let m = self.metrics;
        m.store_requests.with_label_values(&[self.op]).inc();
        m.store_seconds
            .with_label_values(&[self.op])
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(kind) = error {
            m.store_errors.with_label_values(&[self.op, kind]).inc();
        }
    }
}

impl Drop for StoreRequest<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.record(Some("abandoned"));
        }
    }
}

/// An [`ObjectStore`] that measures every request of the store it wraps.
#[derive(Debug)]
pub struct MeteredStore {
    inner: Arc<dyn ObjectStore>,
    metrics: EngineMetrics,
}

impl MeteredStore {
    pub fn wrap(inner: Arc<dyn ObjectStore>, metrics: EngineMetrics) -> Arc<dyn ObjectStore> {
        Arc::new(MeteredStore { inner, metrics })
    }

    async fn measure<T>(
        &self,
        op: &'static str,
        request: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let measured = StoreRequest {
            metrics: &self.metrics,
            op,
            started: Instant::now(),
            finished: false,
        };
        let result = request.await;
        measured.finish(result.as_ref().err().map(|e| e.kind()));
        result
    }
}

#[async_trait]
impl ObjectStore for MeteredStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        let data = self.measure("get", self.inner.get(key, range)).await?;
        self.metrics.downloaded_bytes.inc_by(data.len() as u64);
        Ok(data)
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        let len = data.len() as u64;
        self.measure("put", self.inner.put(key, data)).await?;
        self.metrics.uploaded_bytes.inc_by(len);
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<bool> {
        let len = data.len() as u64;
        let written = self
            .measure("put_if_absent", self.inner.put_if_absent(key, data))
            .await?;
        if written {
            self.metrics.uploaded_bytes.inc_by(len);
        }
        Ok(written)
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        self.measure("head", self.inner.head(key)).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.measure("delete", self.inner.delete(key)).await
    }

    async fn list(
        &self,
        prefix: &str,
        marker: Option<&str>,
        limit: usize,
    ) -> StoreResult<ListPage> {
        self.measure("list", self.inner.list(prefix, marker, limit))
            .await
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        self.measure("delete_many", self.inner.delete_many(keys))
            .await
    }

    async fn put_composite(
        &self,
        key: &str,
        pieces: &[Piece],
        helper_prefix: &str,
    ) -> StoreResult<()> {
        let request = self.inner.put_composite(key, pieces, helper_prefix);
        self.measure("put_composite", request).await
    }

    async fn object_url(&self, key: &str, signed_for: Option<Duration>) -> StoreResult<String> {
        self.inner.object_url(key, signed_for).await
    }

    async fn prepare(&self) -> StoreResult<()> {
        self.measure("prepare", self.inner.prepare()).await
    }

    async fn sync(&self) -> StoreResult<()> {
        self.measure("sync", self.inner.sync()).await
    }

    fn puts_are_durable(&self) -> bool {
        self.inner.puts_are_durable()
    }

    fn can_list(&self) -> bool {
        self.inner.can_list()
    }

    fn reads_are_local(&self) -> bool {
        self.inner.reads_are_local()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Fault, MemStore, StoreError};

    fn sample(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
        use cloudfs_metrics::prometheus::proto::MetricType;
        let families = registry.gather();
        let Some(family) = families.iter().find(|family| family.name() == name) else {
            return 0.0;
        };
        family
            .get_metric()
            .iter()
            .find(|metric| {
                labels.iter().all(|(k, v)| {
                    metric
                        .get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map_or(0.0, |metric| match family.get_field_type() {
                MetricType::HISTOGRAM => metric.get_histogram().get_sample_count() as f64,
                _ => metric.get_counter().get_value(),
            })
    }

    #[tokio::test]
    async fn the_store_seam_counts_requests_bytes_and_errors() {
        let registry = Registry::new();
        let metrics = EngineMetrics::new();
        metrics.register(&registry).expect("register");
        let mem = Arc::new(MemStore::new());
        let store = MeteredStore::wrap(mem.clone(), metrics.clone());
        store
            .put("a/b", Bytes::from_static(b"hello"))
            .await
            .expect("put");
        assert_eq!(store.get("a/b", None).await.expect("get").len(), 5);
        assert!(matches!(
            store.get("a/missing", None).await,
            Err(StoreError::NotFound(_))
        ));
        mem.set_faults(vec![Fault::FailGets {
            prefix: "a/".into(),
        }]);
        let failed = store.get("a/b", None).await.expect_err("an injected fault");

        metrics.cache_hit(CacheTier::Disk);
        let count = |name, labels: &[(&str, &str)]| sample(&registry, name, labels);
        assert_eq!(count("cloudfs_cache_hits_total", &[("tier", "disk")]), 1.0);
        assert_eq!(
            count("cloudfs_cache_hits_total", &[("tier", "memory")]),
            0.0
        );
        assert_eq!(count("cloudfs_store_requests_total", &[("op", "get")]), 3.0);
        assert_eq!(count("cloudfs_store_requests_total", &[("op", "put")]), 1.0);
        assert_eq!(count("cloudfs_store_uploaded_bytes_total", &[]), 5.0);
        assert_eq!(count("cloudfs_store_downloaded_bytes_total", &[]), 5.0);
        let errors = "cloudfs_store_request_errors_total";
        assert_eq!(count(errors, &[("op", "get"), ("kind", "not_found")]), 1.0);
        assert_eq!(
            count(errors, &[("op", "get"), ("kind", failed.kind())]),
            1.0
        );
        assert_eq!(
            count("cloudfs_store_request_duration_seconds", &[("op", "get")]),
            3.0
        );
    }

    #[tokio::test]
    async fn a_request_cut_short_by_the_timeout_counts_as_abandoned() {
        let registry = Registry::new();
        let metrics = EngineMetrics::new();
        metrics.register(&registry).expect("register");
        let mem = Arc::new(MemStore::new());
        mem.set_faults(vec![Fault::SlowPuts {
            prefix: "slow/".into(),
            delay: Duration::from_secs(60),
        }]);
        let store = MeteredStore::wrap(mem, metrics);
        let cut = tokio::time::timeout(
            Duration::from_millis(10),
            store.put("slow/x", Bytes::from_static(b"x")),
        );
        assert!(cut.await.is_err(), "the put is cut short");
        assert_eq!(
            sample(
                &registry,
                "cloudfs_store_request_errors_total",
                &[("op", "put"), ("kind", "abandoned")]
            ),
            1.0
        );
    }
}
