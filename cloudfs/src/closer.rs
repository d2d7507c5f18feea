//! Records what released handles wrote, off the FUSE threads. The kernel sends the release of
//! a handle without making anyone wait for it (cloudfs has it skip the flush of `close`: see
//! `FuseFs::open_flags`), so the upload of the file's staged writes need not hold a FUSE
//! thread: on a slow or unreachable store it would keep that thread from every other request,
//! and a program writing many small files could take all of them. A few workers flush the
//! released files instead, and every few seconds the flushes that failed are tried again,
//! until the store takes them. A program that writes files faster than the workers record
//! them is held at its next open for writing once [`MAX_BACKLOG`] files wait, so that it runs
//! at the store's pace instead of piling up staged files.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::MissedTickBehavior;

use crate::fs::{Fs, FsResult};

/// How many released files are flushed at once.
const WORKERS: usize = 4;
/// How often the flushes that failed are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(5);
/// How many released files may be queued or being flushed before opens for writing wait.
pub const MAX_BACKLOG: usize = 256;

/// Takes the files whose released handles left writes to record (see
/// [`Fs::release_handle`]). Its workers stop once it is dropped, after the files queued by
/// then.
#[derive(Debug)]
pub struct Closer {
    queue: mpsc::UnboundedSender<u64>,
    backlog: Arc<Backlog>,
}

/// The released files queued and not yet flushed.
#[derive(Debug, Default)]
struct Backlog {
    files: Mutex<usize>,
    shrunk: Condvar,
}

impl Backlog {
    fn count(&self) -> std::sync::MutexGuard<'_, usize> {
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn done(&self) {
        *self.count() -= 1;
        self.shrunk.notify_all();
    }
}

/// Counts a queued file as done when dropped, however its flush ended (a panic included).
struct Queued(Arc<Backlog>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.done();
    }
}

/// Lets the next retry pass start when dropped, however this one ended.
struct Retrying(Arc<AtomicBool>);

impl Drop for Retrying {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Closer {
    /// Starts the workers for `fs` on `rt`.
    pub fn start(fs: &Arc<Fs>, rt: &Handle) -> Closer {
        let (queue, released) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::default());
        rt.spawn(flush_released_files(fs.clone(), released, backlog.clone()));
        Closer { queue, backlog }
    }

    /// Has the writes a released handle left on file `ino` recorded soon.
    pub fn flush_later(&self, ino: u64) {
        *self.backlog.count() += 1;
        if self.queue.send(ino).is_err() {
            // The runtime is shutting down: the unmount's own flush records them.
            tracing::debug!(ino, "no worker left to flush a released file");
            self.backlog.done();
        }
    }

    /// Waits while [`MAX_BACKLOG`] released files or more are queued or being flushed. Called
    /// before an open for writing, holding no engine lock (the workers take [`Fs::change`]).
    pub fn wait_for_room(&self) {
        let count = self.backlog.count();
        drop(
            self.backlog
                .shrunk
                .wait_while(count, |files| *files >= MAX_BACKLOG)
                .unwrap_or_else(PoisonError::into_inner),
        );
    }
}

async fn flush_released_files(
    fs: Arc<Fs>,
    mut released: mpsc::UnboundedReceiver<u64>,
    backlog: Arc<Backlog>,
) {
    let workers = Arc::new(Semaphore::new(WORKERS));
    let retrying = Arc::new(AtomicBool::new(false));
    let mut retry = tokio::time::interval(RETRY_EVERY);
    retry.set_missed_tick_behavior(MissedTickBehavior::Delay);
    retry.tick().await; // the first tick comes at once
    loop {
        tokio::select! {
            next = released.recv() => {
                let Some(ino) = next else { break };
                let queued = Queued(backlog.clone());
                let Ok(worker) = workers.clone().acquire_owned().await else { break };
                let fs = fs.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = record_released(&fs, ino) {
                        tracing::warn!(ino, error = %e, "could not record what a closed file's \
                            handle wrote; will retry");
                    }
                    drop((queued, worker));
                });
            }
            _ = retry.tick() => {
                // One pass at a time: during an outage a pass lasts as long as the store
                // timeout per file.
                if retrying.swap(true, Ordering::AcqRel) {
                    continue;
                }
                let (fs, pass) = (fs.clone(), Retrying(retrying.clone()));
                tokio::task::spawn_blocking(move || {
                    retry_failed_flushes(&fs);
                    drop(pass);
                });
            }
        }
    }
}

/// [`Fs::flush_released`], as a change from outside a kernel request.
fn record_released(fs: &Fs, ino: u64) -> FsResult<()> {
    let _change = fs.change();
    fs.flush_released(ino)
}

/// Tries again the flushes that failed, one file at a time (a snapshot waiting to freeze the
/// file system waits for one file only), going on past a failure.
fn retry_failed_flushes(fs: &Fs) {
    let pending = fs.failed_flushes();
    let mut failed = 0;
    let mut first_failure = None;
    for &ino in &pending {
        if let Err(e) = record_released(fs, ino) {
            failed += 1;
            first_failure.get_or_insert(e);
        }
    }
    if let Some(e) = first_failure {
        tracing::warn!(
            failed,
            of = pending.len(),
            error = %e,
            "could not record what closed files' handles wrote; will retry"
        );
    }
}
