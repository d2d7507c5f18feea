//! Subcommands of the `cloudfs` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use cloudfs::cas::{BlockCache, BlockStore};
use cloudfs::control::{self, Reply, Request};
use cloudfs::gc;
use cloudfs::inspect;
use cloudfs::mailbox;
use cloudfs::mount::{self, EngineConfig, MountConfig};
use cloudfs::snapshot::{self, SnapshotInfo};
use cloudfs::store::{ObjectStore, StoreUrl};
use cloudfs::tar::{self, ExportInfo};
use cloudfs::volume;

/// cloudfs: an unlimited POSIX drive whose files live in an object store as deduplicated
/// blocks and whose inode table is SQLite.
///
/// <STORE> is a URL: file:///abs/path for the embedded local-directory store (the directory
/// must exist), or swift://<container> for an OpenStack Swift container (created by `format`
/// if missing; credentials from --credentials or the OpenStack environment variables). A store is a pool that can hold many volumes; identical blocks are stored once
/// across all of them.
#[derive(Debug, Parser)]
#[command(name = "cloudfs", version, max_term_width = 100)]
pub struct Cli {
    /// Directory for the pid files of running mounts.
    #[arg(long, global = true, env = "CLOUDFS_RUN_DIR", value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Swift credentials file: KEY=value lines with the keys the OpenStack tools use
    /// (ST_AUTH/ST_USER/ST_KEY; OS_AUTH_URL, OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME,
    /// OS_USER_DOMAIN_NAME, OS_PROJECT_DOMAIN_NAME; OS_APPLICATION_CREDENTIAL_ID/_SECRET;
    /// OS_STORAGE_URL + OS_AUTH_TOKEN; OS_STORAGE_URL + OS_TEMP_URL_KEY, which signs object
    /// requests with the container's or account's TempURL key and allows --read-only mounts
    /// only). Without it those environment variables are used.
    #[arg(long, global = true, env = "CLOUDFS_CREDENTIALS", value_name = "FILE")]
    credentials: Option<PathBuf>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Create a new, empty volume in a store.
    Format {
        store: String,
        volume: String,
        /// Size of the blocks files are cut into (power of two, 4KiB..64MiB). Fixed for the
        /// life of the volume.
        #[arg(long, default_value = "8MiB", value_parser = parse_size)]
        block_size: u64,
        /// The most bytes its files may hold (e.g. 10GiB): writes past it fail with ENOSPC
        /// and df reports it as the size [default: unlimited].
        #[arg(long, value_parser = parse_size)]
        quota: Option<u64>,
    },
    /// Mount a volume. Returns once the mount is usable, unless --foreground; the mount
    /// process flushes everything to the store and unmounts on SIGTERM/SIGINT or `cloudfs
    /// umount`.
    Mount(MountArgs),
    /// Flush everything a mount holds to the store, then unmount it.
    Umount {
        mountpoint: PathBuf,
        /// Longest wait for the flush, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Show a volume's usage: files, directories, logical and stored bytes, dedup ratio.
    Stat {
        store: String,
        volume: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Seal a directory of a mounted cloudfs: every change in or under it (write, create,
    /// rename, unlink, chmod, xattrs…) fails with EPERM until it is unsealed. Needs root.
    Seal { dir: PathBuf },
    /// Unseal a directory sealed with `cloudfs seal`. Needs root.
    Unseal { dir: PathBuf },
    /// The volumes of a store: list, delete.
    Volume {
        #[command(subcommand)]
        action: VolumeCommand,
    },
    /// Named snapshots of a volume: instant, metadata only, never pruned.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotCommand,
    },
    /// Roll a volume back to one of its snapshots. A volume mounted read-write switches in
    /// place, through its mount (on this machine over the control socket, on another
    /// through requests left in the store, which the mount answers within seconds); an
    /// unmounted one is rolled back in the store. The state it replaces is kept as the
    /// snapshot pre-rollback-<unix time> until deleted.
    Rollback {
        store: String,
        volume: String,
        snapshot: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Create a new volume from VOLUME's newest replicated state, or from its snapshot with
    /// VOLUME@SNAPSHOT. Instant: both share every block and diverge independently.
    Clone {
        store: String,
        #[arg(value_name = "VOLUME[@SNAPSHOT]")]
        source: String,
        new_volume: String,
    },
    /// Check a volume: inode table consistency and every referenced block present. Exits 0
    /// only when the volume is clean. Orphaned blocks (uploaded but unreferenced, e.g. after
    /// a crash) are listed but harmless; `cloudfs gc` frees them.
    Fsck {
        store: String,
        volume: String,
        /// Also re-read every block and check it against its hash: damaged ones are reported
        /// by file and moved to `damaged/<hash>`, so new writes upload that content afresh.
        #[arg(long)]
        verify: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Server-side TAR exports: a directory of a volume as one tar object in the pool whose
    /// data are the blocks already stored (Swift: a static large object, nothing copied; the
    /// local store: a real tar file). A plain GET of the object streams the tar.
    Export {
        #[command(subcommand)]
        action: ExportCommand,
    },
    /// Garbage-collect a pool: delete the blocks that no volume, clone, snapshot or export
    /// references and that were written before the grace period. Safe while volumes are mounted and
    /// written when the grace is at least 30m. An interrupted run resumes where it stopped.
    Gc {
        store: String,
        /// Keep unreferenced blocks written this recently (e.g. 1h, 45m, 0s).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        grace: Duration,
        /// Report what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Where the mark set and progress are kept [default: a directory per pool under the
        /// cache directory].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Also keep the outcome (the report, or the error) in the pool as
        /// gc-reports/NAME.json, for whoever started the run without seeing its output.
        #[arg(long, value_name = "NAME")]
        report_as: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// List the volumes in a store.
    List {
        store: String,
        /// Print one JSON array of names.
        #[arg(long)]
        json: bool,
    },
    /// Set the most bytes a volume's files may hold (e.g. 20GiB), or `none`. A mount on
    /// this machine applies it at once, one elsewhere within 30 seconds; lowering it below
    /// what the files hold refuses only writes that grow them.
    SetQuota {
        store: String,
        volume: String,
        #[arg(value_parser = parse_quota)]
        quota: QuotaArg,
    },
    /// Delete a volume's metadata and snapshots (fails while it is mounted read-write). Its
    /// blocks are freed by garbage collection once nothing else references them.
    Delete {
        store: String,
        volume: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ExportCommand {
    /// Export DIR (default: the root) of VOLUME's newest replicated state, or of its
    /// snapshot with VOLUME@SNAPSHOT, as the tar object exports/OBJECT, and print its URL.
    /// The export keeps the blocks it uses from garbage collection until it is deleted.
    Tar {
        store: String,
        #[arg(value_name = "VOLUME[@SNAPSHOT][:DIR]")]
        source: String,
        object: String,
        /// Print a TempURL that GETs the tar without credentials (Swift: signed with the
        /// container's or the account's Temp-URL-Key).
        #[arg(long)]
        temp_url: bool,
        /// How long the TempURL stays valid.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        valid_for: Duration,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List the exports of a pool.
    List {
        store: String,
        /// Print one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Delete an export: its object, then the record that kept its blocks alive.
    Delete {
        store: String,
        object: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Pin the volume's state under NAME. A volume mounted read-write is snapshotted by its
    /// mount at one instant (changes in flight finish first, new ones wait meanwhile),
    /// reached over the control socket on this machine or through the store from any other;
    /// an unmounted volume's newest replicated state is pinned.
    Create {
        store: String,
        volume: String,
        name: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List the volume's snapshots, oldest first, with their unique bytes: those neither the
    /// volume's newest state nor another of its snapshots references (what deleting it
    /// frees, unless a clone or an export holds them too).
    List {
        store: String,
        volume: String,
        /// Print one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot.
    Show {
        store: String,
        volume: String,
        name: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (its blocks are freed by garbage collection when nothing else uses
    /// them).
    Delete {
        store: String,
        volume: String,
        name: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Copy directory SRC_DIR of a mounted cloudfs to DST_DIR (a new path in the same
    /// volume): metadata only and instant however many files it holds; the copies share
    /// blocks with the originals and diverge copy-on-write. Needs root.
    Tree { src_dir: PathBuf, dst_dir: PathBuf },
}

#[derive(Debug, Args)]
struct MountArgs {
    store: String,
    volume: String,
    mountpoint: PathBuf,
    /// Stay in the foreground (logs go to stderr) instead of returning once mounted.
    #[arg(long)]
    foreground: bool,
    /// Mount read-only, from the newest replicated metadata.
    #[arg(long)]
    read_only: bool,
    /// Mount this snapshot of the volume instead of its newest state (read-only; it may run
    /// beside the read-write mount).
    #[arg(long, value_name = "NAME")]
    snapshot: Option<String>,
    /// Local directory for the metadata working copy, the block cache and write-back staging
    /// [default: /var/cache/cloudfs/<volume>-<store> for root, ~/.cache/cloudfs/… otherwise].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Disk the cache directory may use: half read cache, a quarter write-back staging.
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    cache_size: u64,
    /// Seconds between metadata replications when nothing calls fsync (the most metadata a
    /// crash of an un-fsynced volume can lose).
    #[arg(long, default_value_t = 5)]
    sync_interval: u64,
    /// Seconds before an object-store request is abandoned and the operation fails with EIO.
    #[arg(long, default_value_t = 120)]
    store_timeout: u64,
    /// Seconds a read-write mount's lease outlives its last renewal: after a crash, another
    /// mount can take the volume over once this has passed (a clean unmount frees it at once).
    #[arg(long, default_value_t = 30)]
    lease_ttl: u64,
    /// Threads serving FUSE requests.
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// After answering a request, the thread reading requests polls for the next one this
    /// long before it sleeps, so that a program making one call after another does not wait
    /// each time for a sleeping thread to wake (costly where idle CPUs halt, as on many VMs).
    /// Costs up to this much CPU time per request; 0 turns polling off.
    #[arg(long, default_value = "200us", value_parser = humantime::parse_duration, value_name = "DURATION")]
    poll_window: Duration,
    /// Serve Prometheus metrics at /metrics on this address: HOST:PORT, :PORT, or
    /// unix:/path/to/socket (how the CSI node plugin collects them).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<cloudfs_metrics::Endpoint>,
}

/// A quota on the command line: a size, or `none`.
#[derive(Debug, Clone, Copy)]
struct QuotaArg(Option<u64>);

fn parse_quota(s: &str) -> Result<QuotaArg, String> {
    if s == "none" {
        Ok(QuotaArg(None))
    } else {
        parse_size(s).map(|bytes| QuotaArg(Some(bytes)))
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::parse_size(s).map_err(|e| format!("{e} (examples: 8MiB, 1GiB, 65536)"))
}

/// Opens a store URL with credentials from `file` (when given) or the environment.
fn open_store(url: &str, file: Option<&Path>) -> Result<(StoreUrl, Arc<dyn ObjectStore>)> {
    let parsed = StoreUrl::parse(url)?;
    let from_file = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading credentials file {}", path.display()))?;
            Some(cloudfs_swift::parse_credentials_file(&text)?)
        }
        None => None,
    };
    let store = parsed.open(|key| match &from_file {
        Some(map) => map.get(key).cloned(),
        None => std::env::var(key).ok(),
    })?;
    Ok((parsed, store))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the I/O runtime")
}

/// A store opened for an offline command, with a scratch directory (block cache, rebuilt
/// databases) that lives as long as this, and a runtime to run the command on.
struct Offline {
    store: Arc<dyn ObjectStore>,
    blocks: BlockStore,
    scratch: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

impl Offline {
    fn open(url: &str, credentials: Option<&Path>) -> Result<Offline> {
        let (_, store) = open_store(url, credentials)?;
        let scratch = tempfile::tempdir()?;
        let cache = BlockCache::open(&scratch.path().join("blocks"), 256 << 20)?;
        let blocks = BlockStore::new(store.clone(), cache, Duration::from_secs(120));
        Ok(Offline {
            store,
            blocks,
            scratch,
            rt: runtime()?,
        })
    }
}

fn default_cache_dir(store: &StoreUrl, volume: &str) -> PathBuf {
    cache_base().join(format!("{volume}-{}", store_digest(store)))
}

/// Where `cloudfs gc` keeps its state for a pool unless told.
fn default_gc_state_dir(store: &StoreUrl) -> PathBuf {
    cache_base().join(format!("gc-{}", store_digest(store)))
}

fn store_digest(store: &StoreUrl) -> String {
    blake3::hash(store.to_string().as_bytes()).to_hex()[..8].to_owned()
}

fn cache_base() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/cache/cloudfs")
    } else if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(dir).join("cloudfs")
    } else if let Some(home) = std::env::var_os("HOME") {
        PathBuf::from(home).join(".cache/cloudfs")
    } else {
        std::env::temp_dir().join("cloudfs-cache")
    }
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let run_dir = cli.run_dir.unwrap_or_else(mount::default_run_dir);
    let credentials = cli.credentials.as_deref();
    match cli.command {
        Commands::Format {
            store,
            volume,
            block_size,
            quota,
        } => {
            let off = Offline::open(&store, credentials)?;
            // SAFETY: getuid/getgid have no preconditions.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            let config = off.rt.block_on(volume::format(
                &off.store,
                &off.blocks,
                &volume,
                block_size,
                uid,
                gid,
            ))?;
            if quota.is_some() {
                off.rt
                    .block_on(volume::set_quota(off.store.as_ref(), &volume, quota))?;
            }
            println!(
                "formatted volume {} (block size {} bytes{})",
                config.name,
                config.block_size,
                quota.map_or(String::new(), |q| format!(", quota {q} bytes"))
            );
            Ok(ExitCode::SUCCESS)
        }
        Commands::Mount(args) => mount_command(args, run_dir, credentials),
        Commands::Umount {
            mountpoint,
            timeout,
        } => {
            mount::unmount(&mountpoint, &run_dir, Duration::from_secs(timeout))?;
            println!("unmounted {}", mountpoint.display());
            Ok(ExitCode::SUCCESS)
        }
        Commands::Stat {
            store,
            volume,
            json,
        } => {
            let off = Offline::open(&store, credentials)?;
            let stats = off.rt.block_on(inspect::stats(
                off.store.as_ref(),
                &off.blocks,
                &volume,
                off.scratch.path(),
            ))?;
            print_report(json, &stats, |stats| {
                println!("volume:        {}", stats.volume);
                println!("block size:    {}", stats.block_size);
                match stats.quota_bytes {
                    Some(quota) => println!("quota bytes:   {quota}"),
                    None => println!("quota bytes:   none"),
                }
                println!("files:         {}", stats.files);
                println!("directories:   {}", stats.directories);
                println!("logical bytes: {}", stats.logical_bytes);
                println!("stored bytes:  {}", stats.stored_bytes);
                println!("blocks:        {}", stats.blocks);
                println!("dedup ratio:   {:.2}", stats.dedup_ratio);
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Snapshot { action } => snapshot_command(action, &run_dir, credentials),
        Commands::Export { action } => export_command(action, credentials),
        Commands::Seal { dir } => {
            set_sealed(&dir, true)?;
            println!("sealed {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Commands::Unseal { dir } => {
            set_sealed(&dir, false)?;
            println!("unsealed {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Commands::Volume {
            action: VolumeCommand::List { store, json },
        } => {
            let (_, store) = open_store(&store, credentials)?;
            let names = runtime()?.block_on(volume::list_volumes(store.as_ref()))?;
            print_report(json, &names, |names| {
                names.iter().for_each(|name| println!("{name}"));
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Volume {
            action:
                VolumeCommand::SetQuota {
                    store,
                    volume,
                    quota: QuotaArg(quota),
                },
        } => {
            let (_, opened) = open_store(&store, credentials)?;
            runtime()?.block_on(volume::set_quota(opened.as_ref(), &volume, quota))?;
            let request = Request::SetQuota { bytes: quota };
            match ask_mount(&run_dir, &store, &volume, &request)? {
                None | Some(Reply::Quota(_)) => {}
                Some(other) => return unexpected_reply(other),
            }
            match quota {
                Some(bytes) => println!("volume {volume}: quota {bytes} bytes"),
                None => println!("volume {volume}: no quota"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Commands::Volume {
            action:
                VolumeCommand::Delete {
                    store,
                    volume,
                    json,
                },
        } => {
            let (_, store) = open_store(&store, credentials)?;
            let objects = runtime()?.block_on(volume::delete_volume(store.as_ref(), &volume))?;
            let report = serde_json::json!({ "volume": volume, "metadata_objects": objects });
            print_report(json, &report, |_| {
                println!("deleted volume {volume} ({objects} metadata objects)");
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Rollback {
            store,
            volume,
            snapshot: name,
            json,
        } => {
            let request = Request::Rollback {
                snapshot: name.clone(),
                previous_state: None,
            };
            let report = match ask_mount(&run_dir, &store, &volume, &request)? {
                Some(Reply::Rollback(report)) => report,
                Some(other) => return unexpected_reply(other),
                None => {
                    // A mount on another machine is asked through the store.
                    let off = Offline::open(&store, credentials)?;
                    off.rt.block_on(mailbox::rollback(
                        off.store.as_ref(),
                        &off.blocks,
                        &volume,
                        &name,
                        None,
                        off.scratch.path(),
                        mailbox::ANSWER_TIMEOUT,
                    ))?
                }
            };
            print_report(json, &report, |report| {
                println!(
                    "rolled volume {} back to snapshot {}; the previous state is snapshot {}",
                    report.volume, report.snapshot, report.previous_state
                );
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Clone {
            store,
            source,
            new_volume,
        } => {
            let (_, store) = open_store(&store, credentials)?;
            let (volume, name) = match source.split_once('@') {
                Some((volume, name)) => (volume, Some(name)),
                None => (source.as_str(), None),
            };
            let config = runtime()?.block_on(snapshot::clone_volume(
                store.as_ref(),
                volume,
                name,
                &new_volume,
            ))?;
            println!("created volume {} from {source}", config.name);
            Ok(ExitCode::SUCCESS)
        }
        Commands::Gc {
            store,
            grace,
            dry_run,
            state_dir,
            report_as,
            json,
        } => {
            if grace < gc::SAFE_GRACE {
                eprintln!(
                    "warning: a grace under {} is safe only while no volume of this pool is \
                     being written",
                    humantime::format_duration(gc::SAFE_GRACE)
                );
            }
            let state_dir = match state_dir {
                Some(dir) => dir,
                None => default_gc_state_dir(&StoreUrl::parse(&store)?),
            };
            let off = Offline::open(&store, credentials)?;
            let options = gc::GcOptions {
                grace,
                dry_run,
                state_dir,
            };
            let collected = off
                .rt
                .block_on(gc::collect(off.store.as_ref(), &off.blocks, &options));
            if let Some(name) = &report_as {
                let outcome = collected.as_ref().map_err(ToString::to_string);
                off.rt
                    .block_on(gc::store_outcome(off.store.as_ref(), name, outcome))?;
            }
            let report = collected?;
            print_report(json, &report, |r| {
                let verb = if r.dry_run { "would delete" } else { "deleted" };
                println!(
                    "{} volumes, {} generations, {} snapshots, {} exports: {} blocks referenced{}",
                    r.volumes,
                    r.generations,
                    r.snapshots,
                    r.exports,
                    r.marked,
                    if r.resumed { " (resumed run)" } else { "" }
                );
                println!(
                    "scanned {} blocks: {} referenced, {} within the grace period, {verb} {} \
                     ({} bytes) in {:.1}s",
                    r.scanned, r.referenced, r.recent, r.candidates, r.candidate_bytes, r.seconds
                );
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Fsck {
            store,
            volume,
            verify,
            json,
        } => {
            let off = Offline::open(&store, credentials)?;
            let report = off.rt.block_on(inspect::fsck(
                off.store.as_ref(),
                &off.blocks,
                &volume,
                off.scratch.path(),
                verify,
            ))?;
            print_report(json, &report, |report| {
                println!(
                    "checked {} files, {} blocks of volume {}",
                    report.files_checked, report.blocks_checked, report.volume
                );
                if verify {
                    println!(
                        "re-read {} blocks and checked their hashes",
                        report.verified_blocks
                    );
                }
                for problem in &report.problems {
                    println!("PROBLEM: {problem}");
                }
                for orphan in &report.orphans {
                    println!("orphan (unreferenced; cloudfs gc frees it): {orphan}");
                }
                println!(
                    "{}: {} problems, {} orphaned blocks",
                    if report.is_clean() {
                        "clean"
                    } else {
                        "DAMAGED"
                    },
                    report.problems.len(),
                    report.orphans.len()
                );
            })?;
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn mount_command(
    args: MountArgs,
    run_dir: PathBuf,
    credentials: Option<&Path>,
) -> Result<ExitCode> {
    let (store, opened) = open_store(&args.store, credentials)?;
    let mountpoint = std::path::absolute(&args.mountpoint)?;
    if !mountpoint.is_dir() {
        bail!(
            "mountpoint {} does not exist or is not a directory",
            mountpoint.display()
        );
    }
    if mount::mounted_at(&mountpoint).is_some() {
        bail!("{} is already a mountpoint", mountpoint.display());
    }
    let cache_dir = match &args.cache_dir {
        Some(dir) => std::path::absolute(dir)?,
        None => match &args.snapshot {
            Some(name) => default_cache_dir(&store, &format!("{}@{name}", args.volume)),
            None => default_cache_dir(&store, &args.volume),
        },
    };
    if args.foreground {
        let config = MountConfig {
            store,
            volume: args.volume,
            mountpoint,
            engine: EngineConfig {
                cache_dir,
                cache_size: args.cache_size,
                store_timeout: Duration::from_secs(args.store_timeout.max(1)),
                read_only: args.read_only || args.snapshot.is_some(),
                lease_ttl: Duration::from_secs(args.lease_ttl.max(1)),
                snapshot: args.snapshot.clone(),
            },
            sync_interval: Duration::from_secs(args.sync_interval.max(1)),
            fuse_threads: args.threads,
            poll_window: args.poll_window,
            run_dir,
            metrics: args.metrics.clone(),
        };
        mount::run(config, opened, || {})?;
        return Ok(ExitCode::SUCCESS);
    }
    let credentials = credentials.map(std::path::absolute).transpose()?;
    daemonize(
        &mountpoint,
        &cache_dir,
        &run_dir,
        credentials.as_deref(),
        &args,
    )
}

/// Starts the mount process in the background and waits until the mount is usable.
fn daemonize(
    mountpoint: &Path,
    cache_dir: &Path,
    run_dir: &Path,
    credentials: Option<&Path>,
    args: &MountArgs,
) -> Result<ExitCode> {
    let (store, volume) = (&args.store, &args.volume);
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating cache directory {}", cache_dir.display()))?;
    let log_path = cache_dir.join("mount.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("--run-dir")
        .arg(run_dir)
        .args(["mount", store.as_str(), volume.as_str()])
        .arg(mountpoint)
        .arg("--foreground")
        .arg("--cache-dir")
        .arg(cache_dir)
        .args(["--cache-size", &args.cache_size.to_string()])
        .args(["--sync-interval", &args.sync_interval.to_string()])
        .args(["--store-timeout", &args.store_timeout.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .arg("--poll-window")
        .arg(humantime::format_duration(args.poll_window).to_string())
        .args(["--lease-ttl", &args.lease_ttl.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if args.read_only {
        command.arg("--read-only");
    }
    if let Some(name) = &args.snapshot {
        command.args(["--snapshot", name]);
    }
    if let Some(endpoint) = &args.metrics {
        command.args(["--metrics", &endpoint.to_string()]);
    }
    if let Some(file) = credentials {
        command.arg("--credentials").arg(file);
    }
    // SAFETY: setsid is async-signal-safe; it detaches the mount from our session.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn().context("starting the mount process")?;
    let start = Instant::now();
    loop {
        if mount::mounted_at(mountpoint).is_some_and(|m| m.is_cloudfs()) {
            println!(
                "mounted {volume} at {} (pid {}, log {})",
                mountpoint.display(),
                child.id(),
                log_path.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let reason = log
                .lines()
                .rev()
                .find(|l| l.starts_with("cloudfs: "))
                .map_or_else(
                    || format!("mount process exited with {status}"),
                    str::to_owned,
                );
            bail!("{}", reason.trim_start_matches("cloudfs: "));
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            bail!(
                "the mount did not become ready within 300s (see {})",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn print_snapshot_row(columns: [&str; 6]) {
    let [name, created, files, logical, stored, unique] = columns;
    println!("{name:<24} {created:>12} {files:>10} {logical:>16} {stored:>16} {unique:>16}");
}

fn print_snapshot_header() {
    print_snapshot_row([
        "NAME",
        "CREATED(s)",
        "FILES",
        "LOGICAL_BYTES",
        "STORED_BYTES",
        "UNIQUE_BYTES",
    ]);
}

fn print_snapshot(info: &SnapshotInfo) {
    let unique = info.unique_bytes.map(|b| b.to_string());
    print_snapshot_row([
        &info.name,
        &info.created_at.to_string(),
        &info.files.to_string(),
        &info.logical_bytes.to_string(),
        &info.stored_bytes.to_string(),
        unique.as_deref().unwrap_or("-"),
    ]);
}

/// `cloudfs export tar --json`: the export and where to GET it.
#[derive(serde::Serialize)]
struct ExportOutput {
    #[serde(flatten)]
    info: ExportInfo,
    url: Option<String>,
}

fn export_command(action: ExportCommand, credentials: Option<&Path>) -> Result<ExitCode> {
    match action {
        ExportCommand::Tar {
            store,
            source,
            object,
            temp_url,
            valid_for,
            json,
        } => {
            let parsed = tar::parse_source(&source)?;
            let off = Offline::open(&store, credentials)?;
            let info = off.rt.block_on(tar::export_tar(
                off.store.as_ref(),
                &off.blocks,
                &parsed,
                &object,
                off.scratch.path(),
            ))?;
            let signed_for = temp_url.then_some(valid_for);
            let url = match off
                .rt
                .block_on(off.store.object_url(&info.object, signed_for))
            {
                Ok(url) => Some(url),
                Err(e) if temp_url => return Err(e.into()),
                Err(_) => None,
            };
            print_report(json, &ExportOutput { info, url }, |out| {
                let info = &out.info;
                println!(
                    "exported {source} as {}: {} entries, {} bytes of tar, of which {} bytes \
                     are ranges of {} stored blocks",
                    info.object, info.entries, info.tar_bytes, info.referenced_bytes, info.blocks
                );
                if info.skipped > 0 {
                    println!("left out {} sockets (tar cannot hold them)", info.skipped);
                }
                if let Some(url) = &out.url {
                    println!("{url}");
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        ExportCommand::List { store, json } => {
            let (_, store) = open_store(&store, credentials)?;
            let exports = runtime()?.block_on(tar::list(store.as_ref()))?;
            print_report(json, &exports, |exports| {
                for e in exports {
                    let snapshot = e.snapshot.as_deref().map(|s| format!("@{s}"));
                    println!(
                        "{}\t{}{}:{}\t{} bytes\t{} entries\t{}",
                        e.name,
                        e.volume,
                        snapshot.unwrap_or_default(),
                        e.dir,
                        e.tar_bytes,
                        e.entries,
                        e.object
                    );
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        ExportCommand::Delete {
            store,
            object,
            json,
        } => {
            let (_, store) = open_store(&store, credentials)?;
            runtime()?.block_on(tar::delete(store.as_ref(), &object))?;
            let report = serde_json::json!({ "deleted_export": object });
            print_report(json, &report, |_| {
                println!("deleted export {object}; cloudfs gc frees the blocks only it used");
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Sends `request` to the read-write mount of `volume` on this machine, if there is one.
fn ask_mount(
    run_dir: &Path,
    store: &str,
    volume: &str,
    request: &Request,
) -> Result<Option<Reply>> {
    let socket = control::socket_path(run_dir, &StoreUrl::parse(store)?, volume);
    Ok(control::call(&socket, request)?)
}

/// A mount's control reply that is an error or not the one asked for.
fn unexpected_reply(reply: Reply) -> Result<ExitCode> {
    match reply {
        Reply::Error(message) => bail!("{message}"),
        other => bail!("the mount answered {other:?}"),
    }
}

fn snapshot_command(
    action: SnapshotCommand,
    run_dir: &Path,
    credentials: Option<&Path>,
) -> Result<ExitCode> {
    match action {
        SnapshotCommand::Create {
            store,
            volume,
            name,
            json,
        } => {
            let request = Request::Snapshot { name: name.clone() };
            let info = match ask_mount(run_dir, &store, &volume, &request)? {
                Some(Reply::Snapshot(info)) => info,
                Some(other) => return unexpected_reply(other),
                None => {
                    // A mount on another machine is asked through the store.
                    let off = Offline::open(&store, credentials)?;
                    let create = mailbox::snapshot(
                        off.store.as_ref(),
                        &off.blocks,
                        &volume,
                        &name,
                        off.scratch.path(),
                        mailbox::ANSWER_TIMEOUT,
                    );
                    off.rt.block_on(create)?
                }
            };
            print_report(json, &info, |info| {
                println!("created snapshot {} of volume {}", info.name, info.volume);
            })?;
        }
        SnapshotCommand::List {
            store,
            volume,
            json,
        } => {
            let off = Offline::open(&store, credentials)?;
            let snapshots = off.rt.block_on(snapshot::list_with_unique_bytes(
                off.store.as_ref(),
                &off.blocks,
                &volume,
                off.scratch.path(),
            ))?;
            print_report(json, &snapshots, |snapshots| {
                print_snapshot_header();
                snapshots.iter().for_each(print_snapshot);
            })?;
        }
        SnapshotCommand::Show {
            store,
            volume,
            name,
            json,
        } => {
            let (_, store) = open_store(&store, credentials)?;
            let info = runtime()?.block_on(snapshot::show(store.as_ref(), &volume, &name))?;
            print_report(json, &info, |info| {
                print_snapshot_header();
                print_snapshot(info);
                println!("generation: {}", info.generation);
            })?;
        }
        SnapshotCommand::Tree { src_dir, dst_dir } => {
            snapshot_tree(&src_dir, &dst_dir)?;
            println!("copied {} to {}", src_dir.display(), dst_dir.display());
        }
        SnapshotCommand::Delete {
            store,
            volume,
            name,
            json,
        } => {
            let (_, store) = open_store(&store, credentials)?;
            runtime()?.block_on(snapshot::delete(store.as_ref(), &volume, &name))?;
            let report = serde_json::json!({ "volume": volume, "deleted_snapshot": name });
            print_report(json, &report, |_| {
                println!("deleted snapshot {name} of volume {volume}");
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The directory `dir` resolves to, which must be inside a cloudfs mount.
fn cloudfs_dir(dir: &Path) -> Result<PathBuf> {
    let dir = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    let in_cloudfs = dir
        .ancestors()
        .find_map(mount::mounted_at)
        .is_some_and(|m| m.is_cloudfs());
    if !in_cloudfs {
        bail!("{} is not in a cloudfs mount", dir.display());
    }
    Ok(dir)
}

/// Asks the mount serving `dir` for a control operation through one of its `trusted.cloudfs.*`
/// attributes: sets it to `value`, or removes it when `value` is `None`.
fn control(dir: &Path, name: &[u8], value: Option<&[u8]>, action: &str) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("bad path {}", dir.display()))?;
    let name = std::ffi::CString::new(name).context("a control attribute name")?;
    // SAFETY: both strings are NUL-terminated and outlive the calls; `value` is a valid
    // buffer of its length.
    let rc = unsafe {
        match value {
            Some(value) => libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            ),
            None => libc::removexattr(path.as_ptr(), name.as_ptr()),
        }
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EPERM) => bail!(
            "{action} {}: needs root (CAP_SYS_ADMIN) ({err})",
            dir.display()
        ),
        Some(libc::ENOTDIR) => bail!("{action} {}: not a directory", dir.display()),
        Some(libc::ENODATA) => bail!("{action} {}: it is not sealed", dir.display()),
        Some(libc::EEXIST) => bail!("{action} {}: the destination exists", dir.display()),
        _ => Err(err).with_context(|| format!("{action} {}", dir.display())),
    }
}

fn snapshot_tree(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let src = cloudfs_dir(src)?;
    let name = dst
        .file_name()
        .with_context(|| format!("{} names no directory to create", dst.display()))?;
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = cloudfs_dir(parent)?;
    let (src_meta, parent_meta) = (std::fs::metadata(&src)?, std::fs::metadata(&parent)?);
    if src_meta.dev() != parent_meta.dev() {
        bail!(
            "{} and {} are not in the same cloudfs mount",
            src.display(),
            parent.display()
        );
    }
    let mut target = format!("{}:", parent_meta.ino()).into_bytes();
    target.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(name));
    control(
        &src,
        cloudfs::fs::SNAPSHOT_TREE_XATTR,
        Some(&target),
        "copying",
    )
}

/// Seals or unseals a directory of a mounted cloudfs.
fn set_sealed(dir: &Path, sealed: bool) -> Result<()> {
    let dir = cloudfs_dir(dir)?;
    if sealed {
        control(&dir, cloudfs::fs::SEAL_XATTR, Some(b"1"), "sealing")
    } else {
        control(&dir, cloudfs::fs::SEAL_XATTR, None, "unsealing")
    }
}

/// Prints `value` as one line of JSON with `--json`, else as `text` words it.
fn print_report<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce(&T)) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        text(value);
    }
    Ok(())
}
