//! A Swift outage in the middle of large writes, on the real local Swift that
//! `tests/swift/swift.sh` runs (the test fails, loudly, when it is not running).
//!
//! The mount reaches Swift through a TCP relay this test runs on 127.0.0.1; the outage is
//! the relay going silent: connections are still accepted by the kernel, but no byte moves
//! either way until it ends, which is what a client sees of a hung proxy or a network
//! partition. (Stopping the Swift proxy itself with SIGSTOP is no substitute: after SIGCONT
//! its eventlet worker may stop accepting connections until a client hangs up.)
//!
//! What a user gets (documented in the README): while the store does not answer, store
//! requests wait (and are retried with backoff when they fail); if it comes back within
//! `--store-timeout` the write completes, otherwise `fsync` fails with `EIO` once that time
//! has passed (`close` does not wait for the upload). Either way the volume stays
//! consistent: a remount on a fresh cache sees every file that was fsynced, intact, and
//! `fsck` is clean.

mod mount_harness;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mount_harness::*;

/// Whether bytes may flow through the relay.
#[derive(Default)]
struct Gate {
    closed: Mutex<bool>,
    changed: Condvar,
}

impl Gate {
    fn set_closed(&self, closed: bool) {
        *self.closed.lock().expect("gate") = closed;
        self.changed.notify_all();
    }

    fn wait_open(&self) {
        let mut closed = self.closed.lock().expect("gate");
        while *closed {
            closed = self.changed.wait(closed).expect("gate");
        }
    }
}

/// A TCP relay from a local port to the Swift proxy that can go silent.
struct Relay {
    port: u16,
    gate: Arc<Gate>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    /// Relays `listener`'s connections to `upstream`.
    fn serve(listener: TcpListener, upstream: SocketAddr) -> Relay {
        let port = listener.local_addr().expect("relay address").port();
        let gate = Arc::new(Gate::default());
        let streams = Arc::new(Mutex::new(Vec::new()));
        let (accept_gate, accept_streams) = (gate.clone(), streams.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                // A connection made during an outage waits, as if the proxy never read it.
                accept_gate.wait_open();
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let mut tracked = accept_streams.lock().expect("streams");
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    tracked.push(from.try_clone().expect("clone"));
                    let gate = accept_gate.clone();
                    std::thread::spawn(move || pipe(from, to, &gate));
                }
            }
        });
        Relay {
            port,
            gate,
            streams,
        }
    }

    /// The relay silent for `outage`, or until the returned guard is dropped.
    fn outage(&self, outage: Duration) -> Outage {
        self.gate.set_closed(true);
        let gate = self.gate.clone();
        let resumer = std::thread::spawn(move || {
            std::thread::sleep(outage);
            gate.set_closed(false);
        });
        Outage {
            gate: self.gate.clone(),
            resumer: Some(resumer),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.gate.set_closed(false);
        for stream in self.streams.lock().expect("streams").drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        // Wakes the accept loop, which then serves this last connection and waits on.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies bytes from one side to the other, holding them while the gate is closed.
fn pipe(mut from: TcpStream, mut to: TcpStream, gate: &Gate) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        gate.wait_open();
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// An outage of the relay; it ends after its time, or when this is dropped (also when the
/// test fails), whichever comes first.
struct Outage {
    gate: Arc<Gate>,
    resumer: Option<std::thread::JoinHandle<()>>,
}

impl Outage {
    /// Waits until the relay passes bytes again.
    fn end(mut self) {
        if let Some(resumer) = self.resumer.take() {
            resumer.join().expect("ending the outage");
        }
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if self.resumer.is_some() {
            self.gate.set_closed(false);
        }
    }
}

/// Writes `len` bytes of pattern `seed` to `path` and fsyncs; returns the result of the fsync.
fn write_and_fsync(path: &Path, seed: u64, len: usize) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(&pattern(seed, len))?;
    file.sync_all()
}

#[test]
fn writes_survive_a_swift_outage() {
    assert!(
        std::env::var("ST_AUTH").is_ok(),
        "set ST_AUTH/ST_USER/ST_KEY: run `eval \"$(tests/swift/swift.sh env)\"` after starting it"
    );
    // The mount authenticates through the relay, and tempauth then hands out a storage URL
    // on the relay too (it names the host the request was sent to).
    let auth_url = std::env::var("ST_AUTH").expect("ST_AUTH");
    let (proxy, auth_path) = auth_url
        .strip_prefix("http://")
        .and_then(|rest| rest.split_once('/'))
        .expect("ST_AUTH is http://HOST:PORT/PATH");
    let proxy: SocketAddr = proxy.parse().expect("ST_AUTH names an IP address and port");
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding the relay");
    let port = listener.local_addr().expect("relay address").port();
    // SAFETY: the environment is set before any thread of this test starts.
    unsafe {
        std::env::set_var("CLOUDFS_TEST_STORE", "swift");
        std::env::set_var("ST_AUTH", format!("http://127.0.0.1:{port}/{auth_path}"));
    }
    let relay = Relay::serve(listener, proxy);
    let mut h = Harness::with_block_size("1MiB");
    h.mount(&["--store-timeout", "60"]);
    write_and_fsync(&h.at("before"), 1, 3 << 20).expect("write before the outage");

    // A short outage in the middle of a 24 MiB write: the write completes when it is over.
    let writer = {
        let path = h.at("during");
        std::thread::spawn(move || write_and_fsync(&path, 2, 24 << 20))
    };
    std::thread::sleep(Duration::from_millis(300));
    let outage = relay.outage(Duration::from_secs(3));
    writer
        .join()
        .expect("writer thread")
        .expect("a write across a 3 s outage completes");
    outage.end();
    h.umount();

    // An outage longer than the store timeout: fsync fails with EIO, in bounded time.
    h.mount(&["--store-timeout", "4"]);
    let outage = relay.outage(Duration::from_secs(10));
    let started = Instant::now();
    let failed = write_and_fsync(&h.at("lost"), 3, 4 << 20);
    assert_eq!(failed.err().and_then(|e| e.raw_os_error()), Some(libc::EIO));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "EIO took {:?}",
        started.elapsed()
    );
    outage.end();
    h.umount();

    // A fresh cache sees everything that was fsynced, intact; the volume is consistent.
    h.mount(&[]);
    assert_content(&h.at("before"), &pattern(1, 3 << 20));
    assert_content(&h.at("during"), &pattern(2, 24 << 20));
    if let Ok(data) = fs::read(h.at("lost")) {
        // Written after all, by the flush at unmount: then it must be whole.
        assert_same(&data, &pattern(3, 4 << 20), "the file whose fsync failed");
    }
    h.umount();
    h.fsck_is_clean();
}
