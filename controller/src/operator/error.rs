//! `OperatorError`: every way a reconcile fails, with the reason conditions and metrics name
//! it by, and whether trying again can help.

use cloudfs::control::ControlError;
use cloudfs::store::StoreError;
use cloudfs::volume::VolumeError;
use cloudfs_csi::controller::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The PVC is missing, unbound or not a cloudfs volume (yet).
    #[error("PersistentVolumeClaim {namespace}/{name}: {reason}")]
    Claim {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("Secret {namespace}/{name}: {reason}")]
    Secret {
        namespace: String,
        name: String,
        reason: String,
    },
    /// Another resource this one needs is not ready yet.
    #[error("{0}")]
    Waiting(String),
    /// The resource asks for something that can never be done.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Store(BackendError),
    #[error(transparent)]
    Control(ControlError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("finalizer: {0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<OperatorError>>),
}

impl From<ControlError> for OperatorError {
    fn from(e: ControlError) -> OperatorError {
        match e {
            ControlError::Volume(e) => OperatorError::Volume(e),
            other => OperatorError::Control(other),
        }
    }
}

impl From<BackendError> for OperatorError {
    fn from(e: BackendError) -> OperatorError {
        OperatorError::Store(e)
    }
}

impl OperatorError {
    /// The error under a finalizer's wrapping.
    fn inner(&self) -> &OperatorError {
        use kube::runtime::finalizer::Error as F;
        match self {
            OperatorError::Finalizer(boxed) => match boxed.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.inner(),
                F::AddFinalizer(_)
                | F::RemoveFinalizer(_)
                | F::UnnamedObject
                | F::InvalidFinalizer => self,
            },
            other => other,
        }
    }

    /// A CamelCase reason for conditions, events and the errors metric.
    pub fn reason(&self) -> &'static str {
        match self.inner() {
            OperatorError::Kube(_) | OperatorError::Finalizer(_) => "KubernetesApiError",
            OperatorError::Claim { .. } => "ClaimNotReady",
            OperatorError::Secret { .. } => "SecretUnavailable",
            OperatorError::Waiting(_) => "Waiting",
            OperatorError::Invalid(_) => "InvalidSpec",
            OperatorError::Store(BackendError::Unauthenticated(_)) => "CredentialsRefused",
            OperatorError::Store(BackendError::InvalidArgument(_)) => "InvalidCredentials",
            OperatorError::Store(BackendError::NotFound(_)) => "NotFound",
            OperatorError::Store(_) => "StoreUnavailable",
            OperatorError::Control(ControlError::NoAnswer { .. }) => "MountNotAnswering",
            OperatorError::Control(_) => "MountRefused",
            OperatorError::Volume(
                VolumeError::NotFound(_) | VolumeError::SnapshotNotFound { .. },
            ) => "NotFound",
            OperatorError::Volume(VolumeError::LeaseHeld { .. }) => "VolumeBusy",
            OperatorError::Volume(VolumeError::Store(StoreError::Unauthorized(_))) => {
                "CredentialsRefused"
            }
            OperatorError::Volume(VolumeError::Store(StoreError::Config(_))) => {
                "InvalidCredentials"
            }
            OperatorError::Volume(VolumeError::Store(StoreError::NotFound(_))) => "NotFound",
            OperatorError::Volume(VolumeError::Store(_)) => "StoreUnavailable",
            OperatorError::Volume(_) => "EngineError",
        }
    }

    /// Whether the resource can never succeed as it is (a one-shot resource then fails for
    /// good instead of being retried).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self.inner(),
            OperatorError::Invalid(_)
                | OperatorError::Volume(
                    VolumeError::SnapshotNotFound { .. } | VolumeError::InvalidName(_)
                )
        )
    }
}

impl From<kube::runtime::finalizer::Error<OperatorError>> for OperatorError {
    fn from(e: kube::runtime::finalizer::Error<OperatorError>) -> OperatorError {
        OperatorError::Finalizer(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_failures_inside_the_engine_keep_their_reason() {
        let engine = |e: StoreError| OperatorError::Volume(VolumeError::Store(e));
        assert_eq!(
            engine(StoreError::Unauthorized("401".into())).reason(),
            "CredentialsRefused"
        );
        assert_eq!(
            engine(StoreError::Config("no ST_KEY".into())).reason(),
            "InvalidCredentials"
        );
        assert_eq!(
            engine(StoreError::Unavailable("503".into())).reason(),
            "StoreUnavailable"
        );
        assert_eq!(
            OperatorError::Store(BackendError::Unauthenticated("401".into())).reason(),
            "CredentialsRefused"
        );
    }
}
