//! The kernel's mount table as the Node service needs it (`/proc/self/mountinfo`), and bind
//! mounts. Reading the table instead of remembering what was published is what lets a
//! restarted plugin manage the mounts an earlier one made.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted file system: bind mounts share it with their source.
    pub device: String,
    pub mount_point: PathBuf,
    pub read_only: bool,
    /// The per-mount options (`rw`, `nosuid`, `noexec`, …).
    pub options: Vec<String>,
    pub fs_type: String,
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    let separator = fields.iter().position(|f| *f == "-")?;
    let options: Vec<String> = fields.get(5)?.split(',').map(str::to_owned).collect();
    Some(MountEntry {
        device: (*fields.get(2)?).to_owned(),
        mount_point: PathBuf::from(unescape(fields.get(4)?)),
        read_only: options.iter().any(|o| o == "ro"),
        options,
        fs_type: (*fields.get(separator + 1)?).to_owned(),
    })
}

/// The mounts of this process's mount namespace.
pub fn mount_table() -> io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_line).collect())
}

/// The newest mount at `path`, if any.
pub fn mount_at<'a>(table: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    table.iter().rev().find(|entry| entry.mount_point == path)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

/// Bind-mounts `source` on `target` with the per-mount `flags` (`MS_RDONLY`, `MS_NOEXEC`,
/// …), which a bind mount only takes when remounted.
pub fn bind(source: &Path, target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let (source, target) = (c_path(source)?, c_path(target)?);
    // SAFETY: valid NUL-terminated paths; a bind mount takes no type and no data.
    let bound = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if bound != 0 {
        return Err(io::Error::last_os_error());
    }
    if flags != 0 {
        let flags = libc::MS_BIND | libc::MS_REMOUNT | flags;
        // SAFETY: as above; remounting the bind just made.
        let remounted = unsafe {
            libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        if remounted != 0 {
            let error = io::Error::last_os_error();
            let _ = unmount(target_path(&target));
            return Err(error);
        }
    }
    Ok(())
}

fn target_path(target: &CString) -> &Path {
    Path::new(std::ffi::OsStr::from_bytes(target.as_bytes()))
}

/// Unmounts `target`; a mount whose FUSE server died ("transport endpoint is not connected")
/// or that is still busy is detached instead.
pub fn unmount(target: &Path) -> io::Result<()> {
    let path = c_path(target)?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::ENOTCONN | libc::EBUSY | libc::EIO) => {
            // SAFETY: as above.
            if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        }
        _ => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let line = "36 35 0:52 / /var/lib/kubelet/pods/x/volumes/a\\040b rw,nosuid shared:1 - \
                    fuse.cloudfs cloudfs:vol rw,user_id=0";
        let entry = parse_line(line).expect("parse");
        assert_eq!(entry.device, "0:52");
        assert_eq!(
            entry.mount_point,
            PathBuf::from("/var/lib/kubelet/pods/x/volumes/a b")
        );
        assert!(!entry.read_only);
        assert_eq!(entry.fs_type, "fuse.cloudfs");
        let ro = parse_line("1 2 0:9 / /m ro,relatime - tmpfs t rw").expect("parse");
        assert!(ro.read_only);
        assert_eq!(parse_line("garbage"), None);
    }

    #[test]
    fn this_process_has_a_root_mount() {
        let table = mount_table().expect("mountinfo");
        assert!(mount_at(&table, Path::new("/")).is_some());
    }
}
