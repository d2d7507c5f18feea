//! A [`Mounter`] that serves each volume with a detached `cloudfs mount` process on this
//! machine, so mounts outlive the plugin process that started them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::metrics::MOUNT_METRICS_SOCKET;
use crate::mounts;
use crate::node::{MountFailure, MountRequest, Mounter};

/// Runs the `cloudfs` binary at `cloudfs`, keeping pid files in `run_dir`.
#[derive(Debug, Clone)]
pub struct ProcessMounter {
    cloudfs: PathBuf,
    run_dir: PathBuf,
}

impl ProcessMounter {
    pub fn new(cloudfs: PathBuf, run_dir: PathBuf) -> ProcessMounter {
        ProcessMounter { cloudfs, run_dir }
    }

    fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.cloudfs);
        command
            .arg("--run-dir")
            .arg(&self.run_dir)
            .stdin(std::process::Stdio::null());
        command
    }
}

/// The secrets as the lines of a `cloudfs` credentials file (`KEY=value`, sorted).
pub(crate) fn credentials_file(secrets: &std::collections::HashMap<String, String>) -> String {
    let mut keys: Vec<&String> = secrets.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|key| format!("{key}={}\n", secrets[key]))
        .collect()
}

/// Writes the secrets as a `cloudfs` credentials file only root can read.
fn write_credentials(
    path: &Path,
    secrets: &std::collections::HashMap<String, String>,
) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(credentials_file(secrets).as_bytes())?;
    file.sync_all()
}

/// Sorts what `cloudfs mount` said on failure into the gRPC code it calls for.
pub(crate) fn classify(stderr: &str) -> MountFailure {
    let message = stderr.trim().trim_start_matches("cloudfs: ").to_owned();
    if message.contains("refused the credentials") {
        MountFailure::Unauthenticated(message)
    } else if message.contains("does not exist") {
        MountFailure::NotFound(message)
    } else if message.contains("credentials") || message.contains("invalid store URL") {
        MountFailure::InvalidArgument(message)
    } else {
        MountFailure::Failed(message)
    }
}

#[tonic::async_trait]
impl Mounter for ProcessMounter {
    async fn mount(&self, request: MountRequest<'_>) -> Result<(), MountFailure> {
        let dir = request
            .mountpoint
            .parent()
            .ok_or_else(|| MountFailure::Failed("a mountpoint without a parent".into()))?;
        let mut command = self.command();
        if !request.secrets.is_empty() {
            let credentials = dir.join("credentials");
            write_credentials(&credentials, request.secrets)
                .map_err(|e| MountFailure::Failed(format!("writing the credentials file: {e}")))?;
            command.arg("--credentials").arg(&credentials);
        }
        command
            .arg("mount")
            .arg(&request.id.pool)
            .arg(&request.id.volume)
            .arg(request.mountpoint)
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .arg("--metrics")
            .arg(format!("unix:{}", dir.join(MOUNT_METRICS_SOCKET).display()));
        if request.read_only {
            command.arg("--read-only");
        }
        command.args(request.options.mount_args());
        let out = command.output().await.map_err(|e| {
            MountFailure::Failed(format!("running {}: {e}", self.cloudfs.display()))
        })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(classify(&String::from_utf8_lossy(&out.stderr)))
        }
    }

    async fn unmount(&self, mountpoint: &Path) -> Result<(), MountFailure> {
        let out = self
            .command()
            .arg("umount")
            .arg(mountpoint)
            .output()
            .await
            .map_err(|e| {
                MountFailure::Failed(format!("running {}: {e}", self.cloudfs.display()))
            })?;
        if out.status.success() {
            return Ok(());
        }
        // The mount process is gone (or stuck): detach what is left of it.
        tracing::warn!(
            mountpoint = %mountpoint.display(),
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "cloudfs umount failed; detaching the mount"
        );
        mounts::unmount(mountpoint)
            .map_err(|e| MountFailure::Failed(format!("detaching {}: {e}", mountpoint.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_to_the_codes_they_call_for() {
        assert!(matches!(
            classify("cloudfs: object store refused the credentials: 401"),
            MountFailure::Unauthenticated(_)
        ));
        assert!(matches!(
            classify("cloudfs: volume x does not exist"),
            MountFailure::NotFound(_)
        ));
        assert!(matches!(classify("cloudfs: boom"), MountFailure::Failed(m) if m == "boom"));
    }
}
