//! The writer lease: at most one read-write mount of a volume at a time, and fencing of a
//! writer that lost it.
//!
//! The lease lives in the object store, so it works on any store: `volumes/<vol>/lease/<epoch>`
//! objects are created with a create-only PUT (`If-None-Match: *`), one per epoch, and never
//! reused; the holder renews by rewriting `…/<epoch>.renewed` with the time. A newcomer may take
//! the lease only once the holder's last renewal is older than the TTL (or it released the
//! lease at unmount), by creating the next epoch. Every metadata generation is named with its
//! writer's epoch and recovery reads only the newest epoch, so a writer that was paused or
//! partitioned past its TTL writes nothing anyone will read; it notices the newer epoch at its
//! next renewal and stops replicating.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::fs::now_ns;
use crate::store::{ObjectStore, StoreError, list_all};
use crate::volume::{VolumeError, VolumeResult, latest_generation_epoch};

/// `volumes/<vol>/lease/<epoch>`: who took the lease at that epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseRecord {
    epoch: u64,
    holder: String,
    acquired_at_ns: i64,
    ttl_secs: u64,
}

/// `volumes/<vol>/lease/<epoch>.renewed`: the holder's last sign of life.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Renewal {
    renewed_at_ns: i64,
    released: bool,
}

fn lease_prefix(volume: &str) -> String {
    format!("volumes/{volume}/lease/")
}

fn record_key(volume: &str, epoch: u64) -> String {
    format!("{}{epoch:020}", lease_prefix(volume))
}

fn renewal_key(volume: &str, epoch: u64) -> String {
    format!("{}.renewed", record_key(volume, epoch))
}

async fn read_json<T: for<'de> Deserialize<'de>>(
    store: &dyn ObjectStore,
    key: &str,
) -> VolumeResult<Option<T>> {
    match store.get(key, None).await {
        Ok(raw) => Ok(serde_json::from_slice(&raw).ok()),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Who holds a volume's lease now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveHolder {
    pub holder: String,
    /// Seconds until the lease expires unless renewed.
    pub expires_in_secs: u64,
}

/// The newest epoch of `volume`'s lease, and its holder while it is held.
async fn newest_epoch(
    store: &dyn ObjectStore,
    volume: &str,
) -> VolumeResult<(Option<u64>, Option<LiveHolder>)> {
    let mut newest: Option<u64> = None;
    for object in list_all(store, &lease_prefix(volume)).await? {
        let name = &object.key[lease_prefix(volume).len()..];
        if let Ok(epoch) = name.parse::<u64>() {
            newest = newest.max(Some(epoch));
        }
    }
    let Some(epoch) = newest else {
        return Ok((None, None));
    };
    let record: Option<LeaseRecord> = read_json(store, &record_key(volume, epoch)).await?;
    let renewal: Option<Renewal> = read_json(store, &renewal_key(volume, epoch)).await?;
    let Some(record) = record else {
        return Ok((newest, None));
    };
    let released = renewal.as_ref().is_some_and(|r| r.released);
    let last = renewal.map_or(record.acquired_at_ns, |r| {
        r.renewed_at_ns.max(record.acquired_at_ns)
    });
    let expires = last + Duration::from_secs(record.ttl_secs).as_nanos() as i64;
    let now = now_ns();
    let live = (!released && now < expires).then(|| LiveHolder {
        holder: record.holder,
        expires_in_secs: ((expires - now) / 1_000_000_000).max(1) as u64,
    });
    Ok((newest, live))
}

/// Who holds the lease of `volume` now (a read-write mount, or an offline operation), if
/// anyone.
pub async fn live_holder(
    store: &dyn ObjectStore,
    volume: &str,
) -> VolumeResult<Option<LiveHolder>> {
    Ok(newest_epoch(store, volume).await?.1)
}

/// A lease this process holds.
#[derive(Debug)]
pub struct StoreLease {
    volume: String,
    epoch: u64,
    holder: String,
    ttl: Duration,
}

/// Who holds a volume's lease, for messages.
pub fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}:pid{}:{:x}", std::process::id(), now_ns())
}

impl StoreLease {
    /// Takes the lease of `volume` for `holder`, or fails with [`VolumeError::LeaseHeld`].
    pub async fn acquire(
        store: &dyn ObjectStore,
        volume: &str,
        holder: &str,
        ttl: Duration,
    ) -> VolumeResult<StoreLease> {
        let (newest, live) = newest_epoch(store, volume).await?;
        if let Some(live) = live {
            return Err(VolumeError::LeaseHeld {
                volume: volume.to_owned(),
                holder: live.holder,
                expires_in_secs: live.expires_in_secs,
            });
        }
        let floor = latest_generation_epoch(store, volume).await?.unwrap_or(0);
        let epoch = newest.unwrap_or(0).max(floor) + 1;
        let record = LeaseRecord {
            epoch,
            holder: holder.to_owned(),
            acquired_at_ns: now_ns(),
            ttl_secs: ttl.as_secs().max(1),
        };
        let json = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        if !store
            .put_if_absent(&record_key(volume, epoch), Bytes::from(json))
            .await?
        {
            return Err(VolumeError::LeaseHeld {
                volume: volume.to_owned(),
                holder: "another mount that took it at the same moment".into(),
                expires_in_secs: ttl.as_secs(),
            });
        }
        Ok(StoreLease {
            volume: volume.to_owned(),
            epoch,
            holder: holder.to_owned(),
            ttl,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Records a sign of life; fails with [`VolumeError::LeaseLost`] once a newer epoch exists.
    pub async fn renew(&self, store: &dyn ObjectStore) -> VolumeResult<()> {
        let next = record_key(&self.volume, self.epoch + 1);
        if store.head(&next).await?.is_some() {
            return Err(VolumeError::LeaseLost {
                volume: self.volume.clone(),
                epoch: self.epoch,
            });
        }
        self.write_renewal(store, false).await
    }

    /// Gives the lease up (at a clean unmount) so the next mount need not wait for the TTL.
    pub async fn release(&self, store: &dyn ObjectStore) -> VolumeResult<()> {
        self.write_renewal(store, true).await
    }

    async fn write_renewal(&self, store: &dyn ObjectStore, released: bool) -> VolumeResult<()> {
        let renewal = Renewal {
            renewed_at_ns: now_ns(),
            released,
        };
        let json = serde_json::to_vec(&renewal).map_err(std::io::Error::other)?;
        store
            .put(&renewal_key(&self.volume, self.epoch), Bytes::from(json))
            .await?;
        tracing::debug!(volume = %self.volume, epoch = self.epoch, holder = %self.holder, released, "lease renewed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[test]
    fn one_holder_at_a_time_and_takeover_after_expiry_or_release() {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        let store = MemStore::new();
        rt.block_on(async {
            let ttl = Duration::from_secs(1);
            let first = StoreLease::acquire(&store, "v", "a", ttl)
                .await
                .expect("first");
            assert_eq!(first.epoch(), 1);
            let refused = StoreLease::acquire(&store, "v", "b", ttl).await;
            assert!(
                matches!(refused, Err(VolumeError::LeaseHeld { ref holder, .. }) if holder == "a")
            );
            first.renew(&store).await.expect("renew");
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let second = StoreLease::acquire(&store, "v", "b", ttl)
                .await
                .expect("expired");
            assert_eq!(second.epoch(), 2);
            assert!(matches!(
                first.renew(&store).await,
                Err(VolumeError::LeaseLost { .. })
            ));
            second.release(&store).await.expect("release");
            let third = StoreLease::acquire(&store, "v", "c", ttl)
                .await
                .expect("released");
            assert_eq!(third.epoch(), 3);
        });
    }
}
