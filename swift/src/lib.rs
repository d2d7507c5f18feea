//! OpenStack Swift client for cloudfs.
//!
//! This crate will own everything that speaks Swift's HTTP API (auth, objects, containers,
//! Static Large Objects, TempURL signing) and nothing of file systems. It is empty until the
//! Swift store lands; the engine talks to storage only through `cloudfs::store::ObjectStore`.
