//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one acts. Taking or renewing the lease is a replace that carries the
//! resourceVersion read, so two replicas racing for it cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};

/// One replica's claim on the lease.
#[derive(Debug, Clone)]
pub struct Leadership {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

impl Leadership {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Leadership {
        Leadership {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) -> Result<(), kube::Error> {
        let mut announced = false;
        loop {
            if self.try_take().await? {
                return Ok(());
            }
            if !announced {
                tracing::info!(lease = %self.name, "another replica leads; waiting for the lease");
                announced = true;
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews the lease until it is lost (another replica took it, or it could not be renewed
    /// before it expired); then returns.
    pub async fn keep(&self) {
        let mut renewed = std::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_take().await {
                Ok(true) => renewed = std::time::Instant::now(),
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the leader lease");
                    if renewed.elapsed() >= self.duration {
                        return;
                    }
                }
            }
        }
    }

    /// Takes or renews the lease if it is free, expired or ours; whether this replica holds
    /// it now.
    async fn try_take(&self) -> Result<bool, kube::Error> {
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let held_for = i64::from(spec.lease_duration_seconds.unwrap_or(seconds));
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|renewed| now().0.as_second() - renewed.0.as_second() > held_for);
        if !ours && !expired {
            return Ok(false);
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            tracing::info!(lease = %self.name, identity = %self.identity, "took the leader lease");
        }
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now());
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
