//! cloudfs: a POSIX file system whose file contents live in an object store as
//! content-addressed, deduplicated blocks and whose inode table is SQLite.
//!
//! Layers, bottom up: [`store`] (the `ObjectStore` seam and its implementations), [`meta`]
//! (the SQLite inode table), [`cas`] (blocks: naming, dedup, cache) with [`buffers`] (reused block buffers) and [`direct_io`] (writes around the page cache), [`fs`] (POSIX operations),
//! [`fuse`] (the kernel adapter), [`volume`] (format, open, metadata replication), [`lease`] (one writer per volume), [`control`] and [`mailbox`] (operations on a mounted volume, from its machine or any other), [`mount`]
//! (a mount process's life), [`metrics`] (what a mount measures), [`inspect`] (`stat`, `fsck`), [`snapshot`], [`gc`] and [`tar`] (server-side
//! exports).

pub mod buffers;
pub mod cas;
pub mod closer;
pub mod control;
pub mod direct_io;
pub mod fs;
pub mod fuse;
pub mod gc;
pub mod inspect;
pub mod lease;
pub mod mailbox;
pub mod meta;
pub mod metrics;
pub mod mount;
pub mod snapshot;
pub mod store;
pub mod tar;
pub mod volume;
