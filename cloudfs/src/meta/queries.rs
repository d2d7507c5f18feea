//! Typed queries over the inode table. Each takes a `&Connection` so that the file-system layer
//! can compose several into one transaction (a `Transaction` derefs to a `Connection`).

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::MetaResult;

/// The root directory's inode number (fixed by FUSE).
pub const ROOT_INO: u64 = 1;

/// A block's content address: the BLAKE3-256 digest of its bytes.
pub type Hash = [u8; 32];

/// One row of the inode table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub ino: u64,
    /// `st_mode`: file type bits and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub rdev: u32,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub generation: u64,
}

impl Inode {
    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    pub fn is_dir(&self) -> bool {
        self.file_type() == libc::S_IFDIR
    }

    pub fn is_file(&self) -> bool {
        self.file_type() == libc::S_IFREG
    }
}

/// One directory entry, with the id that orders a listing and serves as its offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub id: i64,
    pub name: Vec<u8>,
    pub inode: Inode,
}

/// One stored block of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRef {
    pub idx: u64,
    pub hash: Hash,
    pub len: u64,
}

const INODE_COLUMNS: &str =
    "ino, mode, uid, gid, size, nlink, rdev, atime_ns, mtime_ns, ctime_ns, generation";

fn inode_from_row(row: &Row<'_>, first: usize) -> rusqlite::Result<Inode> {
    Ok(Inode {
        ino: row.get::<_, i64>(first)? as u64,
        mode: row.get(first + 1)?,
        uid: row.get(first + 2)?,
        gid: row.get(first + 3)?,
        size: row.get::<_, i64>(first + 4)? as u64,
        nlink: row.get(first + 5)?,
        rdev: row.get(first + 6)?,
        atime_ns: row.get(first + 7)?,
        mtime_ns: row.get(first + 8)?,
        ctime_ns: row.get(first + 9)?,
        generation: row.get::<_, i64>(first + 10)? as u64,
    })
}

pub(super) fn create_root(conn: &Connection, uid: u32, gid: u32, now_ns: i64) -> MetaResult<()> {
    conn.execute(
        "INSERT INTO inodes (ino, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns)
         VALUES (?1, ?2, ?3, ?4, 2, ?5, ?5, ?5)",
        params![ROOT_INO as i64, libc::S_IFDIR | 0o755, uid, gid, now_ns],
    )?;
    Ok(())
}

pub fn get_inode(conn: &Connection, ino: u64) -> MetaResult<Option<Inode>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {INODE_COLUMNS} FROM inodes WHERE ino = ?1"
    ))?;
    Ok(stmt
        .query_row([ino as i64], |r| inode_from_row(r, 0))
        .optional()?)
}

/// Inserts a new inode (its `ino` field is ignored) and returns its number.
pub fn insert_inode(conn: &Connection, inode: &Inode) -> MetaResult<u64> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO inodes (mode, uid, gid, size, nlink, rdev, atime_ns, mtime_ns, ctime_ns,
                             generation)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    stmt.execute(params![
        inode.mode,
        inode.uid,
        inode.gid,
        inode.size as i64,
        inode.nlink,
        inode.rdev,
        inode.atime_ns,
        inode.mtime_ns,
        inode.ctime_ns,
        inode.generation as i64
    ])?;
    Ok(conn.last_insert_rowid() as u64)
}

/// Writes every mutable attribute of `inode` back.
pub fn update_inode(conn: &Connection, inode: &Inode) -> MetaResult<()> {
    let mut stmt = conn.prepare_cached(
        "UPDATE inodes SET mode = ?2, uid = ?3, gid = ?4, size = ?5, nlink = ?6, rdev = ?7,
                atime_ns = ?8, mtime_ns = ?9, ctime_ns = ?10 WHERE ino = ?1",
    )?;
    stmt.execute(params![
        inode.ino as i64,
        inode.mode,
        inode.uid,
        inode.gid,
        inode.size as i64,
        inode.nlink,
        inode.rdev,
        inode.atime_ns,
        inode.mtime_ns,
        inode.ctime_ns
    ])?;
    Ok(())
}

/// Removes an inode and everything hanging off it (blocks, symlink target, xattrs).
pub fn delete_inode(conn: &Connection, ino: u64) -> MetaResult<()> {
    for table in ["inodes", "blocks", "symlinks", "xattrs"] {
        conn.prepare_cached(&format!("DELETE FROM {table} WHERE ino = ?1"))?
            .execute([ino as i64])?;
    }
    Ok(())
}

/// Inodes no directory entry names any more (left by files unlinked while open).
pub fn unlinked_inodes(conn: &Connection) -> MetaResult<Vec<u64>> {
    let mut stmt = conn.prepare_cached("SELECT ino FROM inodes WHERE nlink = 0")?;
    let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
    Ok(rows
        .map(|r| r.map(|i| i as u64))
        .collect::<Result<_, _>>()?)
}

/// Inodes numbered above `after`, in order, at most `limit` of them.
pub fn inodes_after(conn: &Connection, after: u64, limit: usize) -> MetaResult<Vec<u64>> {
    let mut stmt =
        conn.prepare_cached("SELECT ino FROM inodes WHERE ino > ?1 ORDER BY ino LIMIT ?2")?;
    let rows = stmt.query_map(
        params![after as i64, limit.min(i64::MAX as usize) as i64],
        |r| r.get::<_, i64>(0),
    )?;
    Ok(rows
        .map(|r| r.map(|i| i as u64))
        .collect::<Result<_, _>>()?)
}

pub fn lookup(conn: &Connection, parent: u64, name: &[u8]) -> MetaResult<Option<u64>> {
    let mut stmt =
        conn.prepare_cached("SELECT ino FROM dentries WHERE parent = ?1 AND name = ?2")?;
    Ok(stmt
        .query_row(params![parent as i64, name], |r| r.get::<_, i64>(0))
        .optional()?
        .map(|i| i as u64))
}

pub fn insert_dentry(conn: &Connection, parent: u64, name: &[u8], ino: u64) -> MetaResult<()> {
    conn.prepare_cached("INSERT INTO dentries (parent, name, ino) VALUES (?1, ?2, ?3)")?
        .execute(params![parent as i64, name, ino as i64])?;
    Ok(())
}

pub fn delete_dentry(conn: &Connection, parent: u64, name: &[u8]) -> MetaResult<()> {
    conn.prepare_cached("DELETE FROM dentries WHERE parent = ?1 AND name = ?2")?
        .execute(params![parent as i64, name])?;
    Ok(())
}

/// Moves an entry, keeping its id (and so its place in the old listing order).
pub fn move_dentry(
    conn: &Connection,
    parent: u64,
    name: &[u8],
    new_parent: u64,
    new_name: &[u8],
) -> MetaResult<()> {
    conn.prepare_cached(
        "UPDATE dentries SET parent = ?3, name = ?4 WHERE parent = ?1 AND name = ?2",
    )?
    .execute(params![parent as i64, name, new_parent as i64, new_name])?;
    Ok(())
}

/// Points an existing entry at another inode.
pub fn retarget_dentry(conn: &Connection, parent: u64, name: &[u8], ino: u64) -> MetaResult<()> {
    conn.prepare_cached("UPDATE dentries SET ino = ?3 WHERE parent = ?1 AND name = ?2")?
        .execute(params![parent as i64, name, ino as i64])?;
    Ok(())
}

pub fn dir_is_empty(conn: &Connection, dir: u64) -> MetaResult<bool> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM dentries WHERE parent = ?1 LIMIT 1")?;
    Ok(stmt
        .query_row([dir as i64], |_| Ok(()))
        .optional()?
        .is_none())
}

/// The directory holding `ino`'s first entry (a directory has exactly one).
pub fn parent_of(conn: &Connection, ino: u64) -> MetaResult<Option<u64>> {
    let mut stmt = conn.prepare_cached("SELECT parent FROM dentries WHERE ino = ?1 LIMIT 1")?;
    Ok(stmt
        .query_row([ino as i64], |r| r.get::<_, i64>(0))
        .optional()?
        .map(|i| i as u64))
}

/// Up to `limit` entries of `dir` with ids greater than `after`, in id order.
pub fn read_dir(
    conn: &Connection,
    dir: u64,
    after: i64,
    limit: usize,
) -> MetaResult<Vec<DirEntry>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT d.id, d.name, {} FROM dentries d JOIN inodes i ON i.ino = d.ino
         WHERE d.parent = ?1 AND d.id > ?2 ORDER BY d.id LIMIT ?3",
        INODE_COLUMNS
            .split(", ")
            .map(|c| format!("i.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))?;
    let rows = stmt.query_map(params![dir as i64, after, limit as i64], |r| {
        Ok(DirEntry {
            id: r.get(0)?,
            name: r.get(1)?,
            inode: inode_from_row(r, 2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn set_symlink(conn: &Connection, ino: u64, target: &[u8]) -> MetaResult<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO symlinks (ino, target) VALUES (?1, ?2)")?
        .execute(params![ino as i64, target])?;
    Ok(())
}

pub fn symlink_target(conn: &Connection, ino: u64) -> MetaResult<Option<Vec<u8>>> {
    let mut stmt = conn.prepare_cached("SELECT target FROM symlinks WHERE ino = ?1")?;
    Ok(stmt.query_row([ino as i64], |r| r.get(0)).optional()?)
}

pub fn get_xattr(conn: &Connection, ino: u64, name: &[u8]) -> MetaResult<Option<Vec<u8>>> {
    let mut stmt = conn.prepare_cached("SELECT value FROM xattrs WHERE ino = ?1 AND name = ?2")?;
    Ok(stmt
        .query_row(params![ino as i64, name], |r| r.get(0))
        .optional()?)
}

pub fn set_xattr(conn: &Connection, ino: u64, name: &[u8], value: &[u8]) -> MetaResult<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO xattrs (ino, name, value) VALUES (?1, ?2, ?3)")?
        .execute(params![ino as i64, name, value])?;
    Ok(())
}

/// Returns whether the attribute existed.
pub fn remove_xattr(conn: &Connection, ino: u64, name: &[u8]) -> MetaResult<bool> {
    let n = conn
        .prepare_cached("DELETE FROM xattrs WHERE ino = ?1 AND name = ?2")?
        .execute(params![ino as i64, name])?;
    Ok(n > 0)
}

/// Whether any inode has extended attribute `name`.
pub fn has_xattr_anywhere(conn: &Connection, name: &[u8]) -> MetaResult<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM xattrs WHERE name = ?1)",
        [name],
        |r| r.get(0),
    )?)
}

pub fn list_xattrs(conn: &Connection, ino: u64) -> MetaResult<Vec<Vec<u8>>> {
    let mut stmt = conn.prepare_cached("SELECT name FROM xattrs WHERE ino = ?1 ORDER BY name")?;
    let rows = stmt.query_map([ino as i64], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn hash_from_blob(blob: Vec<u8>) -> rusqlite::Result<Hash> {
    blob.try_into().map_err(|b: Vec<u8>| {
        rusqlite::Error::FromSqlConversionFailure(
            b.len(),
            rusqlite::types::Type::Blob,
            "block hash is not 32 bytes".into(),
        )
    })
}

/// The stored blocks of `ino` with index in `first..=last`, in index order.
pub fn blocks_in(conn: &Connection, ino: u64, first: u64, last: u64) -> MetaResult<Vec<BlockRef>> {
    let mut stmt = conn.prepare_cached(
        "SELECT idx, hash, len FROM blocks WHERE ino = ?1 AND idx BETWEEN ?2 AND ?3 ORDER BY idx",
    )?;
    let rows = stmt.query_map(params![ino as i64, first as i64, last as i64], |r| {
        Ok(BlockRef {
            idx: r.get::<_, i64>(0)? as u64,
            hash: hash_from_blob(r.get(1)?)?,
            len: r.get::<_, i64>(2)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn put_block(conn: &Connection, ino: u64, block: &BlockRef) -> MetaResult<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO blocks (ino, idx, hash, len) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        ino as i64,
        block.idx as i64,
        &block.hash[..],
        block.len as i64
    ])?;
    Ok(())
}

pub fn delete_block(conn: &Connection, ino: u64, idx: u64) -> MetaResult<()> {
    conn.prepare_cached("DELETE FROM blocks WHERE ino = ?1 AND idx = ?2")?
        .execute(params![ino as i64, idx as i64])?;
    Ok(())
}

/// Drops every block with index `>= first`.
pub fn delete_blocks_from(conn: &Connection, ino: u64, first: u64) -> MetaResult<()> {
    conn.prepare_cached("DELETE FROM blocks WHERE ino = ?1 AND idx >= ?2")?
        .execute(params![ino as i64, first as i64])?;
    Ok(())
}

/// Whether any file of the volume already references a block with this hash.
pub fn hash_referenced(conn: &Connection, hash: &Hash) -> MetaResult<bool> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM blocks WHERE hash = ?1 LIMIT 1")?;
    Ok(stmt
        .query_row([&hash[..]], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Every distinct referenced block with its length, in hash order.
pub fn distinct_blocks(conn: &Connection) -> MetaResult<Vec<(Hash, u64)>> {
    let mut stmt = conn.prepare("SELECT hash, max(len) FROM blocks GROUP BY hash ORDER BY hash")?;
    let rows = stmt.query_map([], |r| {
        Ok((hash_from_blob(r.get(0)?)?, r.get::<_, i64>(1)? as u64))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Counts of the volume's contents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub inodes: u64,
    pub files: u64,
    pub directories: u64,
    pub logical_bytes: u64,
}

pub fn usage(conn: &Connection) -> MetaResult<Usage> {
    Ok(conn.query_row(
        "SELECT count(*),
                coalesce(sum((mode & ?1) = ?2), 0),
                coalesce(sum((mode & ?1) = ?3), 0),
                coalesce(sum(CASE WHEN (mode & ?1) = ?2 THEN size ELSE 0 END), 0)
         FROM inodes WHERE nlink > 0",
        params![libc::S_IFMT, libc::S_IFREG, libc::S_IFDIR],
        |r| {
            Ok(Usage {
                inodes: r.get::<_, i64>(0)? as u64,
                files: r.get::<_, i64>(1)? as u64,
                directories: r.get::<_, i64>(2)? as u64,
                logical_bytes: r.get::<_, i64>(3)? as u64,
            })
        },
    )?)
}

pub fn inode_count(conn: &Connection) -> MetaResult<u64> {
    let count: i64 = conn
        .prepare_cached("SELECT count(*) FROM inodes")?
        .query_row([], |r| r.get(0))?;
    Ok(count as u64)
}

/// The bytes of all regular files, unlinked ones still open included (a trigger-kept counter).
pub fn file_bytes(conn: &Connection) -> MetaResult<u64> {
    let bytes: i64 = conn
        .prepare_cached("SELECT value FROM counters WHERE name = 'file_bytes'")?
        .query_row([], |r| r.get(0))?;
    Ok(bytes.max(0) as u64)
}

pub fn volume_value(conn: &Connection, key: &str) -> MetaResult<Option<String>> {
    Ok(conn
        .query_row("SELECT value FROM volume WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()?)
}

pub fn set_volume_value(conn: &Connection, key: &str, value: &str) -> MetaResult<()> {
    conn.execute(
        "INSERT OR REPLACE INTO volume (key, value) VALUES (?1, ?2)",
        [key, value],
    )?;
    Ok(())
}

/// Seals directory `ino`: nothing in or under it may change until it is unsealed.
pub fn seal(conn: &Connection, ino: u64) -> MetaResult<()> {
    conn.execute(
        "INSERT OR IGNORE INTO sealed (ino) VALUES (?1)",
        [ino as i64],
    )?;
    Ok(())
}

/// Unseals directory `ino`; returns whether it was sealed.
pub fn unseal(conn: &Connection, ino: u64) -> MetaResult<bool> {
    Ok(conn.execute("DELETE FROM sealed WHERE ino = ?1", [ino as i64])? > 0)
}

pub fn is_sealed_dir(conn: &Connection, ino: u64) -> MetaResult<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sealed WHERE ino = ?1)",
        [ino as i64],
        |r| r.get(0),
    )?)
}

/// Whether any directory is sealed (a read-only copy of an older schema has none).
pub fn has_seals(conn: &Connection) -> MetaResult<bool> {
    let table: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sealed')",
        [],
        |r| r.get(0),
    )?;
    Ok(table && conn.query_row("SELECT EXISTS (SELECT 1 FROM sealed)", [], |r| r.get(0))?)
}

/// Whether `ino` is a sealed directory or lies under one, through any of its names.
pub fn is_sealed(conn: &Connection, ino: u64) -> MetaResult<bool> {
    Ok(conn.query_row(
        "WITH RECURSIVE up(ino) AS (
             SELECT ?1
             UNION
             SELECT d.parent FROM dentries d JOIN up ON d.ino = up.ino WHERE up.ino != ?2
         )
         SELECT EXISTS (SELECT 1 FROM sealed WHERE ino IN (SELECT ino FROM up))",
        [ino as i64, ROOT_INO as i64],
        |r| r.get(0),
    )?)
}

/// Copies the tree under directory `src` (every inode reachable from it, with its blocks,
/// symlink target and xattrs; hard links inside the tree stay links) as a new directory
/// named `name` in `dst_parent`, in a few set-based statements: the copy shares every block
/// with the original, which makes it copy-on-write. Seals are not copied. Returns the new
/// directory's inode number and how many inodes were copied.
pub fn copy_tree(
    conn: &Connection,
    src: u64,
    dst_parent: u64,
    name: &[u8],
    now_ns: i64,
) -> MetaResult<(u64, u64)> {
    conn.execute_batch(
        "DROP TABLE IF EXISTS temp.tree_map;
         CREATE TEMP TABLE tree_map (old INTEGER PRIMARY KEY, new INTEGER NOT NULL UNIQUE);",
    )?;
    let base: i64 = conn.query_row(
        "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'inodes'),
                         (SELECT max(ino) FROM inodes))",
        [],
        |r| r.get(0),
    )?;
    let copied = conn.execute(
        "WITH RECURSIVE tree(ino) AS (
             SELECT ?1
             UNION
             SELECT d.ino FROM dentries d JOIN tree ON d.parent = tree.ino
         )
         INSERT INTO temp.tree_map (old, new)
         SELECT ino, ?2 + row_number() OVER (ORDER BY ino) FROM tree",
        params![src as i64, base],
    )? as u64;
    conn.execute(
        "INSERT INTO inodes (ino, mode, uid, gid, size, nlink, rdev, atime_ns, mtime_ns,
                             ctime_ns, generation)
         SELECT m.new, i.mode, i.uid, i.gid, i.size, 0, i.rdev, i.atime_ns, i.mtime_ns, ?1,
                i.generation
         FROM inodes i JOIN temp.tree_map m ON i.ino = m.old",
        [now_ns],
    )?;
    conn.execute(
        "INSERT INTO dentries (parent, name, ino)
         SELECT p.new, d.name, c.new
         FROM dentries d
         JOIN temp.tree_map p ON d.parent = p.old
         JOIN temp.tree_map c ON d.ino = c.old",
        [],
    )?;
    let root: i64 = conn.query_row(
        "SELECT new FROM temp.tree_map WHERE old = ?1",
        [src as i64],
        |r| r.get(0),
    )?;
    insert_dentry(conn, dst_parent, name, root as u64)?;
    conn.execute(
        "INSERT INTO blocks (ino, idx, hash, len)
         SELECT m.new, b.idx, b.hash, b.len FROM blocks b JOIN temp.tree_map m ON b.ino = m.old",
        [],
    )?;
    conn.execute(
        "INSERT INTO symlinks (ino, target)
         SELECT m.new, s.target FROM symlinks s JOIN temp.tree_map m ON s.ino = m.old",
        [],
    )?;
    conn.execute(
        "INSERT INTO xattrs (ino, name, value)
         SELECT m.new, x.name, x.value FROM xattrs x JOIN temp.tree_map m ON x.ino = m.old",
        [],
    )?;
    // Links: a directory has its name, its `.` and one `..` per subdirectory; anything else
    // the names it has inside the copy (links to outside the tree are not copied).
    conn.execute(
        "UPDATE inodes SET nlink =
             (SELECT count(*) FROM dentries d WHERE d.ino = inodes.ino)
             + CASE WHEN (inodes.mode & ?1) = ?2
                    THEN 1 + (SELECT count(*) FROM dentries d JOIN inodes c ON c.ino = d.ino
                              WHERE d.parent = inodes.ino AND (c.mode & ?1) = ?2)
                    ELSE 0 END
         WHERE ino IN (SELECT new FROM temp.tree_map)",
        params![libc::S_IFMT, libc::S_IFDIR],
    )?;
    conn.execute_batch("DROP TABLE temp.tree_map;")?;
    Ok((root as u64, copied))
}
