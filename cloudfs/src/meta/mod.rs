//! The SQLite inode table of one volume: schema and migrations, the connection pool (one writer,
//! several WAL readers) and the typed queries the file-system layer composes into transactions.
//!
//! All writes go through the single writer connection behind a mutex, so SQLite never sees two
//! writers and "database is locked" cannot happen between this process's own threads. A read
//! runs on the writer connection when it is idle: its page cache stays warm, where a reader
//! connection must drop its whole cache after every commit it did not make. When the writer is
//! busy with everything committed, reads use their own connections and never wait for it (WAL).
//!
//! Writes are grouped: each runs in a savepoint of one transaction that stays open for up to
//! [`GROUP_COMMIT_WINDOW`], because a commit (locks, WAL frames) costs more than a small
//! operation itself. Until that transaction commits, reads wait for the writer connection, the
//! only one that sees it. Nothing durable hangs on the deferred commit: the file is a working
//! copy that is rebuilt from the store on every mount, and everything that copies it out
//! (replication, restores) commits first.

mod queries;
mod schema;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

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

/// How long a write transaction stays open for more operations before it commits.
pub const GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(10);

/// The writer connection and its open transaction, if any.
#[derive(Debug)]
struct Writer {
    conn: Connection,
    /// When the open transaction began; `None` when everything is committed.
    open_since: Option<Instant>,
}

impl Writer {
    fn commit(&mut self) -> MetaResult<()> {
        if self.open_since.is_none() {
            return Ok(());
        }
        let result = self.conn.prepare_cached("COMMIT")?.execute([]);
        // A commit SQLite could not finish may have rolled the transaction back itself.
        if result.is_ok() || self.conn.is_autocommit() {
            self.open_since = None;
        }
        result.map(|_| ()).map_err(MetaError::from)
    }

    fn commit_if_due(&mut self) -> MetaResult<()> {
        match self.open_since {
            Some(since) if since.elapsed() >= GROUP_COMMIT_WINDOW => self.commit(),
            _ => Ok(()),
        }
    }
}

/// One write inside the open transaction, as a savepoint: dropped without
/// [`release`](Operation::release), it rolls back only its own changes. Its statements are
/// prepared once (rusqlite's `Savepoint` parses them anew on every write).
struct Operation<'c> {
    conn: &'c Connection,
    released: bool,
}

impl<'c> Operation<'c> {
    fn begin(conn: &'c Connection) -> MetaResult<Operation<'c>> {
        conn.prepare_cached("SAVEPOINT operation")?.execute([])?;
        Ok(Operation {
            conn,
            released: false,
        })
    }

    fn release(mut self) -> MetaResult<()> {
        self.conn.prepare_cached("RELEASE operation")?.execute([])?;
        self.released = true;
        Ok(())
    }
}

impl Drop for Operation<'_> {
    fn drop(&mut self) {
        if !self.released {
            for undo in ["ROLLBACK TO operation", "RELEASE operation"] {
                if let Err(e) = self
                    .conn
                    .prepare_cached(undo)
                    .and_then(|mut statement| statement.execute([]))
                {
                    tracing::warn!(error = %e, "could not undo a failed metadata write");
                }
            }
        }
    }
}

/// A volume's metadata database, open for this process.
#[derive(Debug)]
pub struct MetaStore {
    path: PathBuf,
    writer: Mutex<Writer>,
    /// Mirrors `Writer::open_since.is_some()` for readers deciding whether they may bypass it.
    uncommitted: AtomicBool,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    writes: AtomicU64,
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
    // Savepoints of the grouped transaction journal in memory, not in temporary files.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
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
            writer: Mutex::new(Writer {
                conn: writer,
                open_since: None,
            }),
            uncommitted: AtomicBool::new(false),
            readers,
            next_reader: AtomicUsize::new(0),
            writes: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` atomically: all its changes, visible to every later read, or none when it
    /// returns `Err`. The changes reach the file within [`GROUP_COMMIT_WINDOW`], or at the
    /// next [`commit`](Self::commit).
    pub fn write<T, E: From<MetaError>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut writer = lock(&self.writer);
        if writer.open_since.is_none() {
            writer
                .conn
                .prepare_cached("BEGIN IMMEDIATE")
                .and_then(|mut begin| begin.execute([]))
                .map_err(MetaError::from)?;
            writer.open_since = Some(Instant::now());
            self.uncommitted.store(true, Ordering::Release);
        }
        let operation = Operation::begin(&writer.conn)?;
        let value = f(&writer.conn)?;
        operation.release()?;
        self.writes.fetch_add(1, Ordering::Release);
        let committed = writer.commit_if_due();
        self.uncommitted
            .store(writer.open_since.is_some(), Ordering::Release);
        committed?;
        Ok(value)
    }

    /// Commits the writes still grouped in the open transaction.
    pub fn commit(&self) -> MetaResult<()> {
        let mut writer = lock(&self.writer);
        let committed = writer.commit();
        self.uncommitted
            .store(writer.open_since.is_some(), Ordering::Release);
        committed
    }

    /// Runs `f` on an idle connection (a consistent snapshot for each statement). `f` must not
    /// write: on the writer connection nothing would stop it.
    pub fn read<T, E: From<MetaError>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        if self.uncommitted.load(Ordering::Acquire) {
            let mut writer = lock(&self.writer);
            let committed = writer.commit_if_due();
            self.uncommitted
                .store(writer.open_since.is_some(), Ordering::Release);
            committed?;
            return f(&writer.conn);
        }
        if let Ok(writer) = self.writer.try_lock() {
            return f(&writer.conn);
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

    /// How many writes have completed since open (committed or still grouped).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    /// Replaces the whole database with a copy of the one at `source` (same schema family),
    /// in one step readers see atomically. Inode numbers stay unique over the life of the
    /// volume: the restored counter never goes below the one it replaces.
    pub fn restore_from(&self, source: &Path) -> MetaResult<()> {
        let mut writer = self.committed_writer()?;
        let conn = &mut writer.conn;
        let issued_before = issued_inodes(conn)?;
        {
            let from = Connection::open_with_flags(source, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            rusqlite::backup::Backup::new(&from, conn)?.run_to_completion(
                1024,
                Duration::ZERO,
                None,
            )?;
        }
        schema::migrate(conn)?;
        conn.execute(
            "UPDATE sqlite_sequence SET seq = MAX(seq, ?1) WHERE name = 'inodes'",
            [issued_before],
        )?;
        self.writes.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Saves the parent and name of every directory entry into a new database at `path`,
    /// without holding them in memory: what the kernel may have cached of this state, for
    /// it to be told to look each up again once the state is replaced.
    pub fn save_names(&self, path: &Path) -> MetaResult<ReplacedNames> {
        let _ = std::fs::remove_file(path);
        let file = path
            .to_str()
            .ok_or_else(|| rusqlite::Error::InvalidPath(path.to_owned()))?;
        let names = ReplacedNames {
            path: path.to_owned(),
        };
        let writer = self.committed_writer()?;
        writer.conn.execute("ATTACH DATABASE ?1 AS saved", [file])?;
        let copied = writer.conn.execute_batch(
            "PRAGMA saved.journal_mode = OFF; PRAGMA saved.synchronous = OFF;
             CREATE TABLE saved.names AS SELECT parent, name FROM main.dentries;",
        );
        let detached = writer.conn.execute("DETACH DATABASE saved", []);
        copied?;
        detached?;
        Ok(names)
    }

    /// The writer, locked, with nothing left uncommitted.
    fn committed_writer(&self) -> MetaResult<MutexGuard<'_, Writer>> {
        let mut writer = lock(&self.writer);
        writer.commit()?;
        self.uncommitted.store(false, Ordering::Release);
        Ok(writer)
    }

    /// Commits, checkpoints the WAL into the main file and calls `f` with the file's path while
    /// no write can happen, so `f` sees exactly the state after `writes()` writes.
    pub fn with_quiesced_file<T>(&self, f: impl FnOnce(&Path, u64) -> T) -> MetaResult<T> {
        let writer = self.committed_writer()?;
        let conn = &writer.conn;
        let (busy, _, _): (i64, i64, i64) =
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        if busy != 0 {
            // A reader still holds an old snapshot; a FULL checkpoint still copies every frame.
            conn.query_row("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(()))?;
        }
        Ok(f(&self.path, self.writes()))
    }
}

impl Drop for MetaStore {
    fn drop(&mut self) {
        if let Err(e) = self.commit() {
            tracing::error!(path = %self.path.display(), "metadata changes not committed: {e}");
        }
    }
}

/// The directory entries of a replaced state ([`MetaStore::save_names`]): a database file of
/// their own, deleted when dropped.
#[derive(Debug)]
pub struct ReplacedNames {
    path: PathBuf,
}

impl ReplacedNames {
    /// Up to `limit` entries saved after position `after` (0 for the first), each with its
    /// position, its parent and its name.
    pub fn page(&self, after: i64, limit: usize) -> MetaResult<Vec<(i64, u64, Vec<u8>)>> {
        let conn = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let mut stmt = conn.prepare(
            "SELECT rowid, parent, name FROM names WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
        )?;
        let rows = stmt.query_map(
            rusqlite::params![after, limit.min(i64::MAX as usize) as i64],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?)),
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl Drop for ReplacedNames {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: u64 = 1;

    fn store() -> (tempfile::TempDir, MetaStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MetaStore::create(&dir.path().join("meta.db"), 0, 0, 0).expect("create");
        (dir, store)
    }

    fn set(store: &MetaStore, name: &str) {
        store
            .write(|tx| set_xattr(tx, ROOT, name.as_bytes(), b"v"))
            .expect("write");
    }

    fn has(conn: &Connection, name: &str) -> bool {
        get_xattr(conn, ROOT, name.as_bytes())
            .expect("read")
            .is_some()
    }

    /// What another process opening the file would see: only committed changes.
    fn committed_has(store: &MetaStore, name: &str) -> bool {
        let conn = Connection::open_with_flags(store.path(), OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open");
        has(&conn, name)
    }

    #[test]
    fn grouped_writes_are_read_at_once_and_committed_on_demand() {
        let (_dir, store) = store();
        set(&store, "user.a");
        assert!(
            store
                .read(|c| Ok::<_, MetaError>(has(c, "user.a")))
                .expect("read")
        );
        assert!(
            !committed_has(&store, "user.a"),
            "grouped, not yet committed"
        );
        store.commit().expect("commit");
        assert!(committed_has(&store, "user.a"));
        assert_eq!(store.writes(), 2, "the root and one attribute");
    }

    #[test]
    fn the_names_of_a_replaced_state_are_saved_page_by_page_and_dropped_with_it() {
        let (dir, store) = store();
        let names: Vec<Vec<u8>> = (0..10).map(|i| format!("n{i}").into_bytes()).collect();
        store
            .write(|tx| -> MetaResult<()> {
                for name in &names {
                    // Entries naming the root: enough for a list of names.
                    insert_dentry(tx, ROOT, name, ROOT)?;
                }
                Ok(())
            })
            .expect("write");
        let path = dir.path().join("replaced-names");
        let replaced = store.save_names(&path).expect("save");
        let (mut after, mut seen) = (0, Vec::new());
        loop {
            let page = replaced.page(after, 4).expect("page");
            let Some(&(last, _, _)) = page.last() else {
                break;
            };
            assert!(page.len() <= 4);
            seen.extend(page.into_iter().map(|(_, parent, name)| (parent, name)));
            after = last;
        }
        seen.sort();
        let want: Vec<(u64, Vec<u8>)> = names.iter().map(|n| (ROOT, n.clone())).collect();
        assert_eq!(seen, want);
        drop(replaced);
        assert!(!path.exists(), "deleted with the names");
        // The writer goes on as before.
        set(&store, "user.after");
        store.commit().expect("commit");
        assert!(committed_has(&store, "user.after"));
    }

    #[test]
    fn a_group_commits_once_its_window_has_passed() {
        let (_dir, store) = store();
        set(&store, "user.a");
        std::thread::sleep(GROUP_COMMIT_WINDOW * 2);
        assert!(
            store
                .read(|c| Ok::<_, MetaError>(has(c, "user.a")))
                .expect("read")
        );
        assert!(committed_has(&store, "user.a"));
        set(&store, "user.b");
        std::thread::sleep(GROUP_COMMIT_WINDOW * 2);
        set(&store, "user.c");
        assert!(committed_has(&store, "user.b") && committed_has(&store, "user.c"));
    }

    #[test]
    fn a_failed_write_rolls_back_only_itself() {
        let (_dir, store) = store();
        set(&store, "user.kept");
        let failed = store.write(|tx| -> MetaResult<()> {
            set_xattr(tx, ROOT, b"user.dropped", b"v")?;
            Err(MetaError::Corrupt("fails on purpose".into()))
        });
        assert!(failed.is_err());
        set(&store, "user.after");
        store.commit().expect("commit");
        assert!(committed_has(&store, "user.kept") && committed_has(&store, "user.after"));
        assert!(!committed_has(&store, "user.dropped"));
    }

    #[test]
    fn the_quiesced_file_and_a_reopened_store_hold_every_grouped_write() {
        let (dir, store) = store();
        set(&store, "user.a");
        let copy = dir.path().join("copy.db");
        let writes = store
            .with_quiesced_file(|path, writes| std::fs::copy(path, &copy).map(|_| writes))
            .expect("quiesce")
            .expect("copy");
        assert_eq!(writes, store.writes());
        let copied = Connection::open(&copy).expect("open copy");
        assert!(has(&copied, "user.a"));
        set(&store, "user.b");
        let path = store.path().to_path_buf();
        drop(store);
        let reopened = MetaStore::open(&path).expect("reopen");
        assert!(
            reopened
                .read(|c| Ok::<_, MetaError>(has(c, "user.b")))
                .expect("read")
        );
    }
}
