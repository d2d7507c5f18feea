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
