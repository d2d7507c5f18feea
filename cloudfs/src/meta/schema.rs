//! Versioned schema migrations, tracked in SQLite's `user_version`.

use rusqlite::Connection;

use super::{MetaError, MetaResult};

/// Each entry moves the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE inodes (
    ino        INTEGER PRIMARY KEY AUTOINCREMENT,
    mode       INTEGER NOT NULL,
    uid        INTEGER NOT NULL,
    gid        INTEGER NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0,
    nlink      INTEGER NOT NULL,
    rdev       INTEGER NOT NULL DEFAULT 0,
    atime_ns   INTEGER NOT NULL,
    mtime_ns   INTEGER NOT NULL,
    ctime_ns   INTEGER NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX inodes_unlinked ON inodes(nlink) WHERE nlink = 0;
CREATE TABLE dentries (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name   BLOB NOT NULL,
    ino    INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX dentries_ino ON dentries(ino);
CREATE TABLE blocks (
    ino  INTEGER NOT NULL,
    idx  INTEGER NOT NULL,
    hash BLOB NOT NULL,
    len  INTEGER NOT NULL,
    PRIMARY KEY (ino, idx)
) WITHOUT ROWID;
CREATE INDEX blocks_hash ON blocks(hash);
CREATE TABLE symlinks (
    ino    INTEGER PRIMARY KEY,
    target BLOB NOT NULL
);
CREATE TABLE xattrs (
    ino   INTEGER NOT NULL,
    name  BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name)
) WITHOUT ROWID;
CREATE TABLE volume (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    r#"
CREATE TABLE sealed (
    ino INTEGER PRIMARY KEY
);
"#,
    // The bytes of all regular files, kept by triggers so that `statfs` and the quota check
    // read one row instead of summing the table.
    r#"
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO counters VALUES ('file_bytes',
    (SELECT coalesce(sum(size), 0) FROM inodes WHERE (mode & 61440) = 32768));
CREATE TRIGGER file_bytes_insert AFTER INSERT ON inodes WHEN (NEW.mode & 61440) = 32768
BEGIN
    UPDATE counters SET value = value + NEW.size WHERE name = 'file_bytes';
END;
CREATE TRIGGER file_bytes_update AFTER UPDATE OF size ON inodes
    WHEN (NEW.mode & 61440) = 32768 AND NEW.size != OLD.size
BEGIN
    UPDATE counters SET value = value + NEW.size - OLD.size WHERE name = 'file_bytes';
END;
CREATE TRIGGER file_bytes_delete AFTER DELETE ON inodes WHEN (OLD.mode & 61440) = 32768
BEGIN
    UPDATE counters SET value = value - OLD.size WHERE name = 'file_bytes';
END;
"#,
];

pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

fn version(conn: &Connection) -> MetaResult<i64> {
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

pub(super) fn check_version(conn: &Connection) -> MetaResult<()> {
    let found = version(conn)?;
    if found > SCHEMA_VERSION {
        return Err(MetaError::TooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

pub(super) fn migrate(conn: &Connection) -> MetaResult<()> {
    check_version(conn)?;
    let from = version(conn)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::file_bytes;

    #[test]
    fn the_file_bytes_counter_starts_from_existing_files_and_follows_every_change() {
        let conn = Connection::open_in_memory().expect("open");
        for sql in &MIGRATIONS[..2] {
            conn.execute_batch(sql).expect("an older schema");
        }
        conn.pragma_update(None, "user_version", 2)
            .expect("version");
        let insert = |mode: u32, size: i64| {
            conn.execute(
                "INSERT INTO inodes (mode, uid, gid, size, nlink, atime_ns, mtime_ns, ctime_ns)
                 VALUES (?1, 0, 0, ?2, 1, 0, 0, 0)",
                rusqlite::params![mode, size],
            )
            .expect("insert");
            conn.last_insert_rowid()
        };
        let file = insert(libc::S_IFREG | 0o644, 1000);
        insert(libc::S_IFDIR | 0o755, 4096);
        insert(libc::S_IFLNK | 0o777, 12);
        migrate(&conn).expect("migrate");
        assert_eq!(file_bytes(&conn).ok(), Some(1000), "files only");

        conn.execute("UPDATE inodes SET size = 1500 WHERE ino = ?1", [file])
            .expect("grow");
        let other = insert(libc::S_IFREG | 0o600, 10);
        assert_eq!(file_bytes(&conn).ok(), Some(1510));
        conn.execute("DELETE FROM inodes WHERE ino = ?1", [file])
            .expect("delete");
        conn.execute("UPDATE inodes SET size = 0 WHERE ino = ?1", [other])
            .expect("truncate");
        assert_eq!(file_bytes(&conn).ok(), Some(0));
    }
}
