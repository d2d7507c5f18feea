//! `FsError`: every way a file-system operation fails, mapped once to an errno.

use crate::cas::CasError;
use crate::meta::MetaError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("file name too long")]
    NameTooLong,
    #[error("read-only file system")]
    ReadOnly,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("no such attribute")]
    NoAttribute,
    #[error("buffer too small")]
    Range,
    #[error("attribute value too large")]
    TooBig,
    #[error("bad file handle")]
    BadHandle,
    #[error("file too large")]
    FileTooLarge,
    #[error("the volume's quota is used up")]
    NoSpace,
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Blocks(#[from] CasError),
    #[error("staging area I/O error: {0}")]
    Staging(#[from] std::io::Error),
    #[error("metadata replication failed: {0}")]
    Replication(Box<crate::volume::VolumeError>),
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    /// The errno a caller of the file system sees.
    pub fn errno(&self) -> i32 {
        self.errno_and_name().0
    }

    /// The errno's symbolic name (`ENOENT`), for metrics labels.
    pub fn errno_name(&self) -> &'static str {
        self.errno_and_name().1
    }

    fn errno_and_name(&self) -> (i32, &'static str) {
        match self {
            FsError::NotFound => (libc::ENOENT, "ENOENT"),
            FsError::Exists => (libc::EEXIST, "EEXIST"),
            FsError::NotDir => (libc::ENOTDIR, "ENOTDIR"),
            FsError::IsDir => (libc::EISDIR, "EISDIR"),
            FsError::NotEmpty => (libc::ENOTEMPTY, "ENOTEMPTY"),
            FsError::Invalid(_) => (libc::EINVAL, "EINVAL"),
            FsError::NameTooLong => (libc::ENAMETOOLONG, "ENAMETOOLONG"),
            FsError::ReadOnly => (libc::EROFS, "EROFS"),
            FsError::NotPermitted => (libc::EPERM, "EPERM"),
            FsError::NoAttribute => (libc::ENODATA, "ENODATA"),
            FsError::Range => (libc::ERANGE, "ERANGE"),
            FsError::TooBig => (libc::E2BIG, "E2BIG"),
            FsError::BadHandle => (libc::EBADF, "EBADF"),
            FsError::FileTooLarge => (libc::EFBIG, "EFBIG"),
            FsError::NoSpace => (libc::ENOSPC, "ENOSPC"),
            FsError::Meta(_)
            | FsError::Blocks(_)
            | FsError::Staging(_)
            | FsError::Replication(_) => (libc::EIO, "EIO"),
        }
    }

    /// Errors that mean something broke (as opposed to a caller asking for the impossible);
    /// these are logged where they become an errno.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            FsError::Meta(_) | FsError::Blocks(_) | FsError::Staging(_) | FsError::Replication(_)
        )
    }
}
