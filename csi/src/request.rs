//! What the CSI services do to every request before acting on it: check the required fields,
//! and let one call at a time work on a volume or snapshot.

use std::collections::HashSet;
use std::sync::Mutex;

use tonic::Status;

use crate::proto::VolumeCapability;
use crate::proto::volume_capability::AccessType;
use crate::proto::volume_capability::access_mode::Mode;

/// `value`, or `InvalidArgument` naming the missing `field`.
pub(crate) fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

/// The ids with a call in flight.
#[derive(Debug, Default)]
pub(crate) struct InFlight(Mutex<HashSet<String>>);

/// Holds an id busy for the life of one call.
pub(crate) struct Claim<'a> {
    set: &'a InFlight,
    id: String,
}

impl InFlight {
    /// Marks `id` busy, or refuses with `Aborted` when a call on it is in progress.
    pub(crate) fn claim(&self, id: &str) -> Result<Claim<'_>, Status> {
        if !self.lock().insert(id.to_owned()) {
            return Err(Status::aborted(format!(
                "an operation on {id} is in progress"
            )));
        }
        Ok(Claim {
            set: self,
            id: id.to_owned(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.id);
    }
}

/// Whether cloudfs can give what `capability` asks for: `Ok(true)` when it wants no writer at
/// all (a read-only mount), `Err` saying why not.
pub(crate) fn reader_only(capability: &VolumeCapability) -> Result<bool, String> {
    match capability.access_type {
        Some(AccessType::Mount(_)) => {}
        Some(AccessType::Block(_)) => {
            return Err("cloudfs volumes are file systems: block access is not offered".into());
        }
        None => return Err("a volume capability needs an access type (mount)".into()),
    }
    let mode = capability
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => Ok(true),
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {
            Ok(false)
        }
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => Err(
            "cloudfs volumes have one writer node (the SQLite inode table has one writer); \
             use a single-node or a reader-only access mode"
                .into(),
        ),
        Mode::Unknown => Err("a volume capability needs an access mode".into()),
    }
}
