//! Control requests through the object store, for a volume mounted on another machine: the
//! CSI controller and the operator reach no node's control socket, but every mount reaches
//! the store. The asker writes `volumes/<vol>/control/<id>.request`; the read-write mount,
//! which looks for requests every few seconds while it holds the volume's lease, answers with
//! `<id>.reply`; the asker reads the reply and removes both. A volume nobody holds the lease
//! of is not mounted, and the asker acts on the store directly instead.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::cas::BlockStore;
use crate::control::{ControlError, LiveVolume, Reply, Request};
use crate::fs::now_ns;
use crate::lease::live_holder;
use crate::snapshot::{self, RollbackReport, SnapshotInfo};
use crate::store::{ObjectStore, StoreError, list_all, unix_now_secs};
use crate::volume::VolumeError;

/// How often a mount looks for requests.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How long the CLI waits for a mount's answer: a rollback rebuilds the snapshot's
/// metadata first.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);
/// How often an asker looks for the answer.
const ANSWER_POLL: Duration = Duration::from_millis(250);
/// Replies nobody collected (the asker gave up) are removed after this long.
const ORPHAN_AGE_SECS: i64 = 600;

const REQUEST: &str = ".request";
const REPLY: &str = ".reply";

fn prefix(volume: &str) -> String {
    format!("volumes/{volume}/control/")
}

fn not_found_is_none<T>(result: Result<T, StoreError>) -> Result<Option<T>, StoreError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sends `request` to the read-write mount of `volume`, wherever it runs, and waits up to
/// `timeout` for its reply. `None` when no mount holds the volume (or it went away before
/// answering): the caller acts on the store itself.
pub async fn ask(
    store: &dyn ObjectStore,
    volume: &str,
    request: &Request,
    timeout: Duration,
) -> Result<Option<Reply>, ControlError> {
    if live_holder(store, volume).await?.is_none() {
        return Ok(None);
    }
    let id = format!("{:020}-{}", now_ns(), std::process::id());
    let request_key = format!("{}{id}{REQUEST}", prefix(volume));
    let reply_key = format!("{}{id}{REPLY}", prefix(volume));
    let body = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    store.put(&request_key, Bytes::from(body)).await?;
    tracing::info!(
        volume,
        ?request,
        "asked the volume's mount through the store"
    );
    let read_reply = || async {
        match not_found_is_none(store.get(&reply_key, None).await)? {
            Some(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|_| ControlError::BadReply(String::from_utf8_lossy(&raw).into())),
            None => Ok(None),
        }
    };
    let started = Instant::now();
    let mut polls = 0u32;
    let outcome = loop {
        match read_reply().await {
            Ok(Some(reply)) => break Ok(Some(reply)),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        polls += 1;
        // Every few seconds: is there still a mount to answer? (Its reply may have landed
        // just before it went: looked for once more, so the work is never done twice.)
        if polls.is_multiple_of(8) {
            match live_holder(store, volume).await {
                Ok(Some(_)) => {}
                Ok(None) => break read_reply().await,
                Err(e) => break Err(e.into()),
            }
        }
        if started.elapsed() >= timeout {
            break Err(ControlError::NoAnswer {
                volume: volume.to_owned(),
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(ANSWER_POLL).await;
    };
    // Whatever happened, the request goes: a mount that has not taken it yet never will.
    for key in [&request_key, &reply_key] {
        if let Err(e) = store.delete(key).await {
            tracing::warn!(key, error = %e, "could not remove a control object");
        }
    }
    outcome
}

/// Answers the requests waiting for the mount `live` (called every [`POLL_INTERVAL`] by a
/// read-write mount, outside the runtime). Returns how many it answered.
pub fn answer_pending(live: &LiveVolume) -> Result<usize, ControlError> {
    let store = live.sync.store.as_ref();
    let rt = &live.sync.rt;
    let objects = rt.block_on(list_all(store, &prefix(&live.volume)))?;
    let mut answered = 0;
    for object in &objects {
        if let Some(base) = object.key.strip_suffix(REPLY) {
            let request_gone = !objects.iter().any(|o| o.key == format!("{base}{REQUEST}"));
            if request_gone && unix_now_secs() - object.modified > ORPHAN_AGE_SECS {
                rt.block_on(store.delete(&object.key))?;
            }
            continue;
        }
        let Some(base) = object.key.strip_suffix(REQUEST) else {
            continue;
        };
        let reply_key = format!("{base}{REPLY}");
        if objects.iter().any(|o| o.key == reply_key) {
            continue;
        }
        let Some(raw) =
            rt.block_on(async { not_found_is_none(store.get(&object.key, None).await) })?
        else {
            continue; // the asker gave up meanwhile
        };
        let reply = match serde_json::from_slice::<Request>(&raw) {
            Ok(request) => live.handle(request),
            Err(e) => Reply::Error(format!("bad request: {e}")),
        };
        let body = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
        rt.block_on(store.put_if_absent(&reply_key, Bytes::from(body)))?;
        answered += 1;
    }
    Ok(answered)
}

/// What the read-write mount of `volume` answers `request` with (`answer` picks the reply
/// the request calls for), or, with no mount to ask, what `offline` does in the store.
async fn through_the_mount<T>(
    store: &dyn ObjectStore,
    volume: &str,
    request: Request,
    timeout: Duration,
    answer: impl FnOnce(Reply) -> Result<T, ControlError>,
    offline: impl Future<Output = Result<T, VolumeError>>,
) -> Result<T, ControlError> {
    match ask(store, volume, &request, timeout).await? {
        Some(reply) => answer(reply),
        None => Ok(offline.await?),
    }
}

/// Snapshot `name` of `volume`: taken by its read-write mount wherever that runs (an instant
/// of the live file system), else from the newest replicated state in the store.
pub async fn snapshot(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    volume: &str,
    name: &str,
    scratch: &Path,
    timeout: Duration,
) -> Result<SnapshotInfo, ControlError> {
    let request = Request::Snapshot {
        name: name.to_owned(),
    };
    let answer = |reply| match reply {
        Reply::Snapshot(info) => Ok(info),
        other => Err(refused(other)),
    };
    let offline = snapshot::create(store, blocks, volume, name, scratch);
    through_the_mount(store, volume, request, timeout, answer, offline).await
}

/// Rolls `volume` back to snapshot `name`: through its read-write mount wherever that runs
/// (the mount switches to the snapshot's state), else in the store.
pub async fn rollback(
    store: &dyn ObjectStore,
    blocks: &BlockStore,
    volume: &str,
    name: &str,
    previous_state: Option<&str>,
    scratch: &Path,
    timeout: Duration,
) -> Result<RollbackReport, ControlError> {
    let request = Request::Rollback {
        snapshot: name.to_owned(),
        previous_state: previous_state.map(str::to_owned),
    };
    let answer = |reply| match reply {
        Reply::Rollback(report) => Ok(report),
        other => Err(refused(other)),
    };
    let offline = snapshot::rollback(store, blocks, volume, name, previous_state, scratch);
    through_the_mount(store, volume, request, timeout, answer, offline).await
}

fn refused(reply: Reply) -> ControlError {
    match reply {
        Reply::Error(message) => ControlError::Refused(message),
        other => ControlError::BadReply(format!("{other:?}")),
    }
}
