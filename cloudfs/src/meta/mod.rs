//! The SQLite inode table of one volume: schema and migrations, the connection pool (one writer,
//! several WAL readers) and the typed queries the file-system layer composes into transactions.
//!
//! All writes go through the single writer connection behind a mutex, so SQLite never sees two
//! writers and "database is locked" cannot happen between this process's own threads. A read
//! runs on the writer connection when it is idle: its page cache stays warm, where a reader
//! connection must drop its whole cache after every commit it did not make. When the writer is
//! busy, reads use their own connections and never wait for it (WAL).

mod queries;
mod schema;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

pub use queries::*;
pub use schema::SCHEMA_VERSION;

/// Errors of the metadata layer.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("metadata database is corrupt: {0}")]
    Corrupt(String),
    #[error("metadata schema version {found} is newer than this cloudfs supports ({supported})")]
    TooNew { found: i64, supported: i64 },
}

pub type MetaResult<T> = Result<T, MetaError>;

const READERS: usize = 4;
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// A volume's metadata database, open for this process.
#[derive(Debug)]
pub struct MetaStore {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    commits: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The highest inode number ever issued (the `AUTOINCREMENT` counter).
fn issued_inodes(conn: &Connection) -> MetaResult<i64> {
    Ok(conn.query_row(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'inodes'), 0)",
        [],
        |r| r.get(0),
    )?)
}

fn configure(conn: &Connection) -> MetaResult<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // The store, not this file, is the durable copy: the file is rebuilt from the store on
    // every mount, so local fsyncs would buy nothing.
    conn.pragma_update(None, "synchronous", "OFF")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

impl MetaStore {
    /// Creates a fresh database with the root directory owned by `uid`:`gid`.
    pub fn create(path: &Path, uid: u32, gid: u32, now_ns: i64) -> MetaResult<MetaStore> {
        let store = MetaStore::open(path)?;
        store.write(|tx| queries::create_root(tx, uid, gid, now_ns))?;
        Ok(store)
    }

    /// Opens an existing database file and migrates it to the current schema. The file is
    /// always this process's own copy (a mount's working copy, or one rebuilt to be read), so
    /// migrating a read-only volume's copy changes nothing in the store.
    pub fn open(path: &Path) -> MetaResult<MetaStore> {
        let writer = Connection::open(path)?;
        let mode: String =
            writer.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(MetaError::Corrupt(format!(
                "cannot enable WAL (got {mode})"
            )));
        }
        configure(&writer)?;
        let ok: String = writer.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if ok != "ok" {
            return Err(MetaError::Corrupt(ok));
        }
        schema::migrate(&writer)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            configure(&conn)?;
            readers.push(Mutex::new(conn));
        }
        Ok(MetaStore {
            path: path.to_path_buf(),
            writer: Mutex::new(writer),
            readers,
            next_reader: AtomicUsize::new(0),
            commits: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one write transaction, committed when `f` returns `Ok`.
    pub fn write<T, E: From<MetaError>>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = lock(&self.writer);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(MetaError::from)?;
        let value = f(&tx)?;
        tx.commit().map_err(MetaError::from)?;
        self.commits.fetch_add(1, Ordering::Release);
        Ok(value)
    }

    /// Runs `f` on an idle connection (a consistent snapshot for each statement, or for the
    /// whole closure when `f` opens a transaction). `f` must not write: on the writer
    /// connection nothing would stop it.
    pub fn read<T, E: From<MetaError>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        if let Ok(conn) = self.writer.try_lock() {
            return f(&conn);
        }
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.readers.len() {
            if let Ok(conn) = self.readers[(start + i) % self.readers.len()].try_lock() {
                return f(&conn);
            }
        }
        let conn = lock(&self.readers[start % self.readers.len()]);
        f(&conn)
    }

    /// How many write transactions have committed since open.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Acquire)
    }

    /// Replaces the whole database with a copy of the one at `source` (same schema family),
    /// in one step readers see atomically. Inode numbers stay unique over the life of the
    /// volume: the restored counter never goes below the one it replaces.
    pub fn restore_from(&self, source: &Path) -> MetaResult<()> {
        let mut conn = lock(&self.writer);
        let issued_before = issued_inodes(&conn)?;
        {
            let from = Connection::open_with_flags(source, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            rusqlite::backup::Backup::new(&from, &mut conn)?.run_to_completion(
                1024,
                Duration::ZERO,
                None,
            )?;
        }
        schema::migrate(&conn)?;
        conn.execute(
            "UPDATE sqlite_sequence SET seq = MAX(seq, ?1) WHERE name = 'inodes'",
            [issued_before],
        )?;
        self.commits.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Checkpoints the WAL into the main file and calls `f` with the file's path while no write
    /// can happen, so `f` sees exactly the state after `commits()` transactions.
    pub fn with_quiesced_file<T>(&self, f: impl FnOnce(&Path, u64) -> T) -> MetaResult<T> {
        let conn = lock(&self.writer);
        let (busy, _, _): (i64, i64, i64) =
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        if busy != 0 {
            // A reader still holds an old snapshot; a FULL checkpoint still copies every frame.
            conn.query_row("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(()))?;
        }
        Ok(f(&self.path, self.commits()))
    }
}
