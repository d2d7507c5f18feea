//! The control socket of a read-write mount. Snapshots and rollbacks of a mounted volume go
//! through the mount that owns it, which freezes the file system (waits for the changes in
//! flight, holds off new ones, flushes staged writes) and then either writes a generation of
//! exactly that instant and pins it, or swaps its inode table for a snapshot's.
//!
//! One JSON request line and one JSON reply line per connection, on
//! `<run dir>/ctl-<digest of store and volume>.sock` (mode 0600).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fs::{Fs, FsError};
use crate::inspect;
use crate::meta::MetaError;
use crate::snapshot::{self, RollbackReport, SnapshotInfo};
use crate::store::StoreUrl;
use crate::volume::{self, VolumeError, VolumeSync};

/// Errors of an operation on a mounted volume.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("control socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the mount answered {0:?}")]
    BadReply(String),
    #[error("the mount refused: {0}")]
    Refused(String),
    #[error("the mount of volume {volume} did not answer within {secs}s")]
    NoAnswer { volume: String, secs: u64 },
}

impl From<crate::store::StoreError> for ControlError {
    fn from(e: crate::store::StoreError) -> ControlError {
        ControlError::Volume(VolumeError::from(e))
    }
}

impl From<io::Error> for ControlError {
    fn from(e: io::Error) -> ControlError {
        ControlError::Volume(VolumeError::from(e))
    }
}

/// Where the mount of `volume` in `store` listens.
pub fn socket_path(run_dir: &Path, store: &StoreUrl, volume: &str) -> PathBuf {
    // One pool has one name, however its URL was spelt (`file:///a/` is `file:///a`).
    let pool = match store {
        StoreUrl::Local(path) => {
            StoreUrl::Local(path.components().collect::<PathBuf>()).to_string()
        }
        StoreUrl::Swift(_) => store.to_string(),
    };
    let digest = blake3::hash(format!("{pool}\n{volume}").as_bytes());
    run_dir.join(format!("ctl-{}.sock", &digest.to_hex()[..16]))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Snapshot {
        name: String,
    },
    Rollback {
        snapshot: String,
        /// The name to pin the replaced state under [default: `pre-rollback-<unix time>`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_state: Option<String>,
    },
    /// Apply a quota just written to the volume's config (`None`: none).
    SetQuota {
        bytes: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Snapshot(SnapshotInfo),
    Rollback(RollbackReport),
    Quota(Option<u64>),
    Error(String),
}

/// The mounted volume the socket (and the store's mailbox) acts on.
pub struct LiveVolume {
    pub fs: Arc<Fs>,
    pub sync: Arc<VolumeSync>,
    pub volume: String,
    /// Where a snapshot's database is rebuilt for a rollback.
    pub work_dir: PathBuf,
    /// One request at a time, from whichever channel.
    serial: std::sync::Mutex<()>,
}

impl LiveVolume {
    pub fn new(fs: Arc<Fs>, sync: Arc<VolumeSync>, volume: String, work_dir: PathBuf) -> Self {
        LiveVolume {
            fs,
            sync,
            volume,
            work_dir,
            serial: std::sync::Mutex::new(()),
        }
    }

    /// Pins the volume as it is at one instant: every write that returned before is in it,
    /// none that started after.
    pub fn snapshot(&self, name: &str) -> Result<SnapshotInfo, ControlError> {
        volume::validate_name(name)?;
        let (generation, manifest, measured) = {
            let _frozen = self.fs.freeze()?;
            let measured = inspect::measure(&self.fs.meta())?;
            let (generation, manifest) = self.sync.rt.block_on(self.sync.checkpoint())?;
            (generation, manifest, measured)
        };
        let pinned = snapshot::pin(
            self.sync.store.as_ref(),
            &self.volume,
            name,
            generation,
            manifest,
            &measured,
        );
        Ok(self.sync.rt.block_on(pinned)?)
    }

    /// Switches the mount to snapshot `name`, after pinning its current state as the
    /// snapshot `previous_state` (by default `pre-rollback-<unix time>`).
    pub fn rollback(
        &self,
        name: &str,
        previous_state: Option<&str>,
    ) -> Result<RollbackReport, ControlError> {
        let store = self.sync.store.as_ref();
        let rt = &self.sync.rt;
        let target = rt.block_on(snapshot::pinned_manifest(store, &self.volume, name))?;
        // The slow part, before the freeze: rebuild the snapshot's database.
        let db = self.work_dir.join("rollback.db");
        let label = format!("snapshot {name}");
        rt.block_on(volume::rebuild_database(
            &self.sync.blocks,
            &self.volume,
            &target,
            &label,
            &db,
        ))?;
        let result = (|| {
            let frozen = self.fs.freeze()?;
            let measured = inspect::measure(&self.fs.meta())?;
            let (generation, current) = rt.block_on(self.sync.checkpoint())?;
            let previous_state = snapshot::previous_state_name(previous_state);
            rt.block_on(snapshot::pin(
                store,
                &self.volume,
                &previous_state,
                generation,
                current,
                &measured,
            ))?;
            self.fs.restore(&frozen, &db)?;
            // The rolled-back state is the volume's newest generation at once.
            rt.block_on(self.sync.checkpoint())?;
            tracing::info!(volume = %self.volume, snapshot = name, %previous_state, "rolled back");
            Ok(RollbackReport {
                volume: self.volume.clone(),
                snapshot: name.to_owned(),
                previous_state,
            })
        })();
        let _ = std::fs::remove_file(&db);
        result
    }

    pub(crate) fn handle(&self, request: Request) -> Reply {
        let _serial = crate::fs::lock(&self.serial);
        let result = match &request {
            Request::Snapshot { name } => self.snapshot(name).map(Reply::Snapshot),
            Request::Rollback {
                snapshot,
                previous_state,
            } => self
                .rollback(snapshot, previous_state.as_deref())
                .map(Reply::Rollback),
            Request::SetQuota { bytes } => {
                self.fs.set_quota(*bytes);
                Ok(Reply::Quota(*bytes))
            }
        };
        result.unwrap_or_else(|e| {
            tracing::warn!(?request, error = %e, "control request failed");
            Reply::Error(e.to_string())
        })
    }
}

/// A listening control socket; dropping it removes the socket file.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves `live` on `path` from a thread of its own, one request at a time.
pub fn serve(path: PathBuf, live: Arc<LiveVolume>) -> io::Result<ControlSocket> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a mount that died; the volume's lease, held by this mount now,
    // rules out a live one.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("cloudfs-control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = answer(&live, stream) {
                            tracing::warn!(error = %e, "control connection failed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
                }
            }
        })?;
    Ok(ControlSocket { path })
}

fn answer(live: &LiveVolume, stream: UnixStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(request) => live.handle(request),
        Err(e) => Reply::Error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    out.push(b'\n');
    (&stream).write_all(&out)
}

/// Sends `request` to the mount listening on `path`; `None` when no mount listens there.
pub fn call(path: &Path, request: &Request) -> Result<Option<Reply>, ControlError> {
    let socket_error = |source| ControlError::Socket {
        path: path.to_owned(),
        source,
    };
    let stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(socket_error(e)),
    };
    let mut out = serde_json::to_vec(request).map_err(|e| socket_error(io::Error::other(e)))?;
    out.push(b'\n');
    (&stream).write_all(&out).map_err(socket_error)?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(socket_error)?;
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|_| ControlError::BadReply(line.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pool_spelt_two_ways_has_one_socket() {
        let run = Path::new("/run/cloudfs");
        let plain = StoreUrl::parse("file:///srv/pool").expect("url");
        let slashed = StoreUrl::parse("file:///srv//pool/").expect("url");
        assert_eq!(
            socket_path(run, &plain, "v"),
            socket_path(run, &slashed, "v")
        );
        assert_ne!(socket_path(run, &plain, "v"), socket_path(run, &plain, "w"));
    }

    #[test]
    fn requests_are_one_json_line_each_way() {
        let request = Request::Rollback {
            snapshot: "s".into(),
            previous_state: None,
        };
        let line = serde_json::to_string(&request).expect("encode");
        assert_eq!(line, r#"{"op":"rollback","snapshot":"s"}"#);
        assert_eq!(serde_json::from_str::<Request>(&line).ok(), Some(request));
        let reply = serde_json::to_string(&Reply::Error("no".into())).expect("encode");
        assert_eq!(reply, r#"{"error":"no"}"#);
    }

    #[test]
    fn no_listener_means_no_mount() {
        let dir = tempfile::tempdir().expect("tempdir");
        let request = Request::Snapshot { name: "x".into() };
        let answer = call(&dir.path().join("ctl-none.sock"), &request).expect("call");
        assert_eq!(answer, None);
    }
}
