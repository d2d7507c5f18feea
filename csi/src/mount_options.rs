//! The options of a volume's mounts: how its mount process runs (StorageClass parameters,
//! which CreateVolume hands on to every publish as the volume context), and the flags of
//! the bind mount each pod gets (the `mount_flags` of a mount capability: the
//! StorageClass's `mountOptions`).

use std::collections::HashMap;
use std::time::Duration;

/// The StorageClass parameter naming the pool (the controller's to read).
pub const POOL_PARAMETER: &str = "pool";
/// Prefixes of keys the Kubernetes sidecars and kubelet add (PVC and pod names, secrets,
/// csi-provisioner's `storage.kubernetes.io/csiProvisionerIdentity`, …).
const KUBERNETES_PREFIXES: [&str; 2] = ["csi.storage.k8s.io/", "storage.kubernetes.io/"];
const CACHE_SIZE: &str = "cacheSize";
const SYNC_INTERVAL: &str = "syncInterval";
const STORE_TIMEOUT: &str = "storeTimeout";
const LEASE_TTL: &str = "leaseTTL";
const FUSE_THREADS: &str = "fuseThreads";
const FUSE_POLL_WINDOW: &str = "fusePollWindow";
/// Longer polling would spend a core on a mount that merely stays busy.
const MAX_FUSE_POLL_WINDOW: Duration = Duration::from_millis(10);
const MAX_FUSE_THREADS: u32 = 256;

/// How a volume's mount process runs; `None` keeps the default of `cloudfs mount`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// Disk budget of the mount's cache directory.
    pub cache_size: Option<u64>,
    /// Time between metadata replications when nothing calls fsync.
    pub sync_interval: Option<Duration>,
    /// Time before an object-store request is abandoned.
    pub store_timeout: Option<Duration>,
    /// Time the volume's lease outlives a crashed writer.
    pub lease_ttl: Option<Duration>,
    /// Threads serving FUSE requests.
    pub fuse_threads: Option<u32>,
    /// How long the thread reading FUSE requests polls for the next one (zero: never).
    pub fuse_poll_window: Option<Duration>,
}

/// Whole seconds, at least one, from `30`, `30s`, `2m`, `1h 30m`…
fn seconds(value: &str) -> Result<Duration, String> {
    let parsed = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(value).map_err(|e| e.to_string())?,
    };
    if parsed < Duration::from_secs(1) {
        return Err("must be at least one second".into());
    }
    Ok(Duration::from_secs(parsed.as_secs()))
}

/// A poll window as `cloudfs mount --poll-window` and the volume context take it.
fn poll_window_text(window: Duration) -> String {
    humantime::format_duration(window).to_string()
}

impl MountOptions {
    /// The options among StorageClass `parameters` or a volume context. An unknown key or a
    /// bad value is an error naming it, so a typo in a StorageClass fails the first
    /// CreateVolume rather than being ignored.
    pub fn from_parameters(parameters: &HashMap<String, String>) -> Result<MountOptions, String> {
        let mut options = MountOptions::default();
        for (key, value) in parameters {
            let bad = |why: String| format!("parameter {key}={value:?}: {why}");
            match key.as_str() {
                CACHE_SIZE => {
                    let size = parse_size::parse_size(value)
                        .map_err(|e| bad(format!("{e} (examples: 512MiB, 4GiB)")))?;
                    options.cache_size = Some(size);
                }
                SYNC_INTERVAL => options.sync_interval = Some(seconds(value).map_err(bad)?),
                STORE_TIMEOUT => options.store_timeout = Some(seconds(value).map_err(bad)?),
                LEASE_TTL => options.lease_ttl = Some(seconds(value).map_err(bad)?),
                FUSE_THREADS => {
                    let threads = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_FUSE_THREADS).contains(n))
                        .ok_or_else(|| bad(format!("expected 1 to {MAX_FUSE_THREADS}")))?;
                    options.fuse_threads = Some(threads);
                }
                FUSE_POLL_WINDOW => {
                    let window = humantime::parse_duration(value)
                        .ok()
                        .filter(|window| *window <= MAX_FUSE_POLL_WINDOW)
                        .ok_or_else(|| bad("expected 0 to 10ms (examples: 0, 200us)".into()))?;
                    options.fuse_poll_window = Some(window);
                }
                POOL_PARAMETER => {}
                _ if KUBERNETES_PREFIXES.iter().any(|p| key.starts_with(p)) => {}
                _ => {
                    return Err(format!(
                        "unknown parameter {key:?}: cloudfs takes {POOL_PARAMETER}, \
                         {CACHE_SIZE}, {SYNC_INTERVAL}, {STORE_TIMEOUT}, {LEASE_TTL}, \
                         {FUSE_THREADS} and {FUSE_POLL_WINDOW}"
                    ));
                }
            }
        }
        Ok(options)
    }

    /// The volume context that carries these options to every publish of the volume.
    pub fn to_context(&self) -> HashMap<String, String> {
        let secs = |d: &Duration| format!("{}s", d.as_secs());
        [
            (CACHE_SIZE, self.cache_size.map(|b| b.to_string())),
            (SYNC_INTERVAL, self.sync_interval.as_ref().map(secs)),
            (STORE_TIMEOUT, self.store_timeout.as_ref().map(secs)),
            (LEASE_TTL, self.lease_ttl.as_ref().map(secs)),
            (FUSE_THREADS, self.fuse_threads.map(|n| n.to_string())),
            (
                FUSE_POLL_WINDOW,
                self.fuse_poll_window.map(poll_window_text),
            ),
        ]
        .into_iter()
        .filter_map(|(key, value)| Some((key.to_owned(), value?)))
        .collect()
    }

    /// The `cloudfs mount` arguments that apply these options.
    pub fn mount_args(&self) -> Vec<String> {
        let secs = |d: &Duration| d.as_secs().to_string();
        [
            ("--cache-size", self.cache_size.map(|b| b.to_string())),
            ("--sync-interval", self.sync_interval.as_ref().map(secs)),
            ("--store-timeout", self.store_timeout.as_ref().map(secs)),
            ("--lease-ttl", self.lease_ttl.as_ref().map(secs)),
            ("--threads", self.fuse_threads.map(|n| n.to_string())),
            ("--poll-window", self.fuse_poll_window.map(poll_window_text)),
        ]
        .into_iter()
        .filter_map(|(flag, value)| Some([flag.to_owned(), value?]))
        .flatten()
        .collect()
    }
}

/// The `MS_*` flags of a pod's bind mount, from a capability's `mount_flags` (each may hold
/// several, comma-separated, as in `/etc/fstab`).
pub fn bind_flags(mount_flags: &[String]) -> Result<libc::c_ulong, String> {
    let mut flags = 0;
    for flag in mount_flags.iter().flat_map(|f| f.split(',')) {
        flags |= match flag.trim() {
            "" | "rw" | "defaults" => 0,
            "ro" => libc::MS_RDONLY,
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            "noatime" => libc::MS_NOATIME,
            "nodiratime" => libc::MS_NODIRATIME,
            "relatime" => libc::MS_RELATIME,
            other => {
                return Err(format!(
                    "mount flag {other:?} is not supported; cloudfs takes ro, rw, nosuid, \
                     nodev, noexec, noatime, nodiratime and relatime"
                ));
            }
        };
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parameters_become_a_context_and_mount_arguments() {
        let options = MountOptions::from_parameters(&params(&[
            ("pool", "swift://p"),
            ("cacheSize", "64MiB"),
            ("syncInterval", "2m"),
            ("storeTimeout", "30"),
            ("leaseTTL", "45s"),
            ("fuseThreads", "8"),
            ("fusePollWindow", "500us"),
            ("csi.storage.k8s.io/pvc/name", "data"),
            (
                "storage.kubernetes.io/csiProvisionerIdentity",
                "1764120000000-1234-cloudfs.csi.k8s.io",
            ),
        ]))
        .expect("valid parameters");
        assert_eq!(options.cache_size, Some(64 << 20));
        assert_eq!(options.sync_interval, Some(Duration::from_secs(120)));
        let context = options.to_context();
        assert_eq!(
            context.get("cacheSize").map(String::as_str),
            Some("67108864")
        );
        assert_eq!(
            context.get("syncInterval").map(String::as_str),
            Some("120s")
        );
        assert!(!context.contains_key("pool"));
        assert_eq!(
            MountOptions::from_parameters(&context).expect("a context parses"),
            options
        );
        assert_eq!(
            options.mount_args().join(" "),
            "--cache-size 67108864 --sync-interval 120 --store-timeout 30 --lease-ttl 45 \
             --threads 8 --poll-window 500us"
        );
        assert!(MountOptions::default().mount_args().is_empty());
        let no_polling = MountOptions::from_parameters(&params(&[("fusePollWindow", "0")]))
            .expect("0 turns polling off");
        assert_eq!(no_polling.fuse_poll_window, Some(Duration::ZERO));
        assert_eq!(no_polling.mount_args().join(" "), "--poll-window 0s");
    }

    #[test]
    fn bad_parameters_are_named() {
        for (key, value) in [
            ("cacheSize", "lots"),
            ("syncInterval", "0s"),
            ("storeTimeout", "soon"),
            ("fuseThreads", "0"),
            ("fuseThreads", "1000"),
            ("fusePollWindow", "1s"),
            ("fusePollWindow", "fast"),
            ("cachesize", "1GiB"),
        ] {
            let error =
                MountOptions::from_parameters(&params(&[(key, value)])).expect_err("refused");
            assert!(error.contains(key), "{error}");
        }
    }

    #[test]
    fn mount_flags_map_to_bind_mount_flags() {
        let flags =
            |list: &[&str]| bind_flags(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(flags(&[]), Ok(0));
        assert_eq!(
            flags(&["noexec,nosuid", "ro"]),
            Ok(libc::MS_NOEXEC | libc::MS_NOSUID | libc::MS_RDONLY)
        );
        assert!(flags(&["rw", "defaults"]) == Ok(0));
        assert!(flags(&["sync"]).is_err_and(|e| e.contains("sync")));
    }
}
