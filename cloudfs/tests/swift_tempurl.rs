//! A read-only mount that holds nothing but the storage URL and the pool container's TempURL
//! key, beside a read-write mount with account credentials, on the real local Swift that
//! `tests/swift/swift.sh` runs (the test fails, loudly, when it is not running).

mod mount_harness;

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use mount_harness::*;

/// Sets the pool container's TempURL key with the account credentials of the environment;
/// returns the account's storage URL.
fn set_container_key(container: &str, key: &str) -> String {
    let swift = SwiftAccount::open().expect("the test Swift's account");
    let client = &swift.client;
    swift.block_on(async {
        client
            .set_container_temp_url_key(container, key)
            .await
            .expect("set the container's TempURL key");
        client.storage_url().await.expect("storage URL")
    })
}

fn credentials_file(dir: &Path, storage_url: &str, key: &str) -> PathBuf {
    let path = dir.join(format!("tempurl-{}.env", key.len()));
    fs::write(
        &path,
        format!("OS_STORAGE_URL={storage_url}\nOS_TEMP_URL_KEY={key}\n"),
    )
    .expect("write the credentials file");
    path
}

/// Mounts the volume as `name` with only the credentials in `credentials`.
fn signed_mount<'a>(
    h: &'a Harness,
    name: &str,
    credentials: &Path,
    extra: &[&str],
) -> Result<ExtraMount<'a>, std::process::Output> {
    let mut args = vec!["--credentials", utf8(credentials)];
    args.extend_from_slice(extra);
    h.try_mount_extra(VOLUME, name, &args)
}

#[test]
fn a_temp_url_key_alone_mounts_read_only_and_follows_the_writer() {
    assert!(
        std::env::var("ST_AUTH").is_ok(),
        "set ST_AUTH/ST_USER/ST_KEY: run `eval \"$(tests/swift/swift.sh env)\"` after starting it"
    );
    // SAFETY: the environment is set before any thread of this test starts.
    unsafe { std::env::set_var("CLOUDFS_TEST_STORE", "swift") };
    let mut h = Harness::new();
    h.mount(&[]);
    let data = pattern(7, 300 * KIB as usize);
    fs::create_dir(h.at("dir")).expect("mkdir");
    fs::write(h.at("dir/file"), &data).expect("write");
    File::open(h.mnt())
        .and_then(|d| d.sync_all())
        .expect("fsync the root");

    let key = format!("pool-key-{:016x}", rand::random::<u64>());
    let storage_url = set_container_key(h.swift_container().expect("a Swift store"), &key);
    let good = credentials_file(h.root(), &storage_url, &key);

    let Err(refused) = signed_mount(&h, "rw", &good, &[]) else {
        panic!("a read-write mount with a TempURL key");
    };
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("--read-only"), "{message}");

    let reader = signed_mount(&h, "ro", &good, &["--read-only", "--sync-interval", "1"])
        .unwrap_or_else(|out| panic!("TempURL read-only mount: {out:?}"));
    assert_content(&reader.mnt.join("dir/file"), &data);

    fs::write(h.at("dir/late"), b"published later").expect("write");
    File::open(h.at("dir"))
        .and_then(|d| d.sync_all())
        .expect("fsync the dir");
    let late = reader.mnt.join("dir/late");
    let seen = wait_for("the TempURL reader to see the new generation", || {
        fs::read(&late).ok()
    });
    assert_eq!(seen, b"published later");

    let wrong = credentials_file(h.root(), &storage_url, &format!("{key}-but-wrong"));
    let Err(out) = signed_mount(&h, "wrong", &wrong, &["--read-only"]) else {
        panic!("a mount with a wrong TempURL key");
    };
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("refused"), "{message}");

    drop(reader);
    h.umount();
}
