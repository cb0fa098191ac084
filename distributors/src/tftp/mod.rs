//! Read-only TFTP for boot files (RFC 1350 with options: RFC 2347 blksize/tsize/timeout,
//! RFC 2348, RFC 2349, RFC 7440 windowsize).
//!
//! Layout: [`packet`] parses and encodes datagrams, [`session`] makes every protocol
//! decision without I/O, and [`server`] is the socket loop around them. Files come from a
//! [`FileSource`]; [`DirSource`] serves a directory.
//!
//! Choices worth knowing:
//! - only octet mode is served; netascii/mail requests get ERROR 4 "only octet mode is
//!   supported" (boot ROMs always use octet, and sending unconverted bytes to a client that
//!   asked for netascii would silently corrupt its file);
//! - block numbers roll over from 65535 to 0, as tftp-hpa and most clients expect;
//! - each transfer has its own socket bound to the main socket's IP and an ephemeral port
//!   (the RFC 1350 transfer ID), connected to the client, so packets from other ports never
//!   reach the transfer.

pub mod packet;
pub mod server;
pub mod session;

use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;
use tokio::io::AsyncRead;

pub use server::{run, run_with_events};

/// Server limits. Memory per transfer is bounded by `max_blksize * max_windowsize`, and the
/// number of concurrent transfers by `max_transfers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpConfig {
    /// Largest blksize granted (clamped to 8..=65464). 1468 fills a 1500-byte Ethernet frame.
    pub max_blksize: u16,
    /// Largest windowsize granted (at least 1).
    pub max_windowsize: u16,
    /// Retransmission timeout unless the client negotiates one.
    pub timeout: Duration,
    /// Retransmissions without progress before a transfer is abandoned.
    pub retries: u32,
    /// Concurrent transfers; further requests are answered "server busy".
    pub max_transfers: usize,
}

impl Default for TftpConfig {
    fn default() -> Self {
        Self {
            max_blksize: 1468,
            max_windowsize: 64,
            timeout: Duration::from_secs(2),
            retries: 5,
            max_transfers: 256,
        }
    }
}

/// A file opened for a transfer.
pub struct OpenFile {
    /// Announced as tsize; the transfer never sends more than this.
    pub size: u64,
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
}

impl fmt::Debug for OpenFile {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("OpenFile").field("size", &self.size).finish_non_exhaustive()
    }
}

#[derive(Debug, Error)]
pub enum SourceError {
    /// The path must not be served (traversal, escaping symlink, ...): TFTP error 2.
    #[error("access denied to {path:?}: {reason}")]
    AccessDenied { path: String, reason: &'static str },
    #[error("I/O error opening {path:?}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Where the server's files come from.
#[async_trait]
pub trait FileSource: Send + Sync + fmt::Debug {
    /// Opens `path` as the client sent it. `Ok(None)` means "no such file" (TFTP error 1).
    async fn open(&self, path: &str) -> Result<Option<OpenFile>, SourceError>;
}

/// Serves regular files below a root directory.
#[derive(Debug, Clone)]
pub struct DirSource {
    canonical_root: PathBuf,
}

impl DirSource {
    /// Fails if `root` does not exist; the root is canonicalized once so later prefix checks
    /// compare like with like.
    pub fn new(root: impl AsRef<Path>) -> io::Result<Self> {
        Ok(Self { canonical_root: std::fs::canonicalize(root)? })
    }

    pub fn root(&self) -> &Path {
        &self.canonical_root
    }
}

/// Turns a client's path into a relative path that cannot leave the root lexically.
/// Leading slashes are stripped because PXE ROMs send both `pxelinux.0` and `/ipxe.efi`.
pub fn sanitize_path(path: &str) -> Result<PathBuf, &'static str> {
    if path.contains('\0') {
        return Err("NUL in path");
    }
    if path.contains('\\') {
        return Err("backslash in path");
    }
    let relative = path.trim_start_matches('/');
    let mut clean = PathBuf::new();
    for component in Path::new(relative).components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("'..' in path"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    if clean.as_os_str().is_empty() {
        return Err("empty path");
    }
    Ok(clean)
}

#[async_trait]
impl FileSource for DirSource {
    async fn open(&self, path: &str) -> Result<Option<OpenFile>, SourceError> {
        let denied = |reason| SourceError::AccessDenied { path: path.to_owned(), reason };
        let io_error = |source| SourceError::Io { path: path.to_owned(), source };
        let relative = sanitize_path(path).map_err(denied)?;
        // Resolving symlinks and checking the prefix catches links that point outside the
        // root; the canonical path is then opened, so no link is followed after the check.
        let canonical = match tokio::fs::canonicalize(self.canonical_root.join(relative)).await {
            Ok(canonical) => canonical,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
                return Err(denied("permission denied"));
            }
            Err(error) => return Err(io_error(error)),
        };
        if !canonical.starts_with(&self.canonical_root) {
            return Err(denied("resolves outside the root"));
        }
        // Checked before opening: opening a FIFO would block until someone writes to it.
        let is_file = tokio::fs::metadata(&canonical).await.map_err(io_error)?.is_file();
        if !is_file {
            return Err(denied("not a regular file"));
        }
        let file = match tokio::fs::File::open(&canonical).await {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
                return Err(denied("permission denied"));
            }
            Err(error) => return Err(io_error(error)),
        };
        let metadata = file.metadata().await.map_err(io_error)?;
        if !metadata.is_file() {
            return Err(denied("not a regular file"));
        }
        Ok(Some(OpenFile { size: metadata.len(), reader: Box::new(file) }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sanitize_accepts_pxe_style_paths() {
        assert_eq!(sanitize_path("pxelinux.0"), Ok(PathBuf::from("pxelinux.0")));
        assert_eq!(sanitize_path("/ipxe.efi"), Ok(PathBuf::from("ipxe.efi")));
        assert_eq!(sanitize_path("bios/undionly.kpxe"), Ok(PathBuf::from("bios/undionly.kpxe")));
        assert_eq!(sanitize_path("//a/./b//c"), Ok(PathBuf::from("a/b/c")));
    }

    #[test]
    fn sanitize_refuses_escapes() {
        for bad in
            ["../etc/passwd", "/../x", "a/../../x", "a/..", "..", "a\\..\\b", "a\0b", "", "/", "."]
        {
            assert!(sanitize_path(bad).is_err(), "{bad:?}");
        }
    }

    async fn read_all(file: OpenFile) -> Vec<u8> {
        use tokio::io::AsyncReadExt as _;
        let mut bytes = Vec::new();
        let mut reader = file.reader;
        reader.read_to_end(&mut bytes).await.unwrap();
        bytes
    }

    #[tokio::test]
    async fn artifact_source_serves_stored_files_by_name_then_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("ipxe.efi"), b"changed on disk later").unwrap();
        std::fs::write(root.join("other.bin"), b"from the directory").unwrap();
        let store =
            ctpf_store::artifacts::FsArtifactStore::open(dir.path().join("store")).await.unwrap();
        let body: ctpf_store::artifacts::BlobReader = Box::pin(&b"stored ipxe"[..]);
        let info = ctpf_store::artifacts::ArtifactStore::put(&store, body, None).await.unwrap();
        let files = [("ipxe.efi".to_owned(), info.digest)].into_iter().collect();
        let fallback = std::sync::Arc::new(DirSource::new(&root).unwrap());
        let source = ArtifactSource::new(files, std::sync::Arc::new(store), fallback);

        let file = source.open("/ipxe.efi").await.unwrap().unwrap();
        assert_eq!(file.size, 11);
        assert_eq!(read_all(file).await, b"stored ipxe");
        let file = source.open("other.bin").await.unwrap().unwrap();
        assert_eq!(read_all(file).await, b"from the directory");
        assert!(source.open("missing").await.unwrap().is_none());
        assert!(matches!(source.open("../ipxe.efi").await, Err(SourceError::AccessDenied { .. })));
    }

    #[tokio::test]
    async fn dir_source_serves_files_and_refuses_escapes() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("bios")).unwrap();
        std::fs::write(root.path().join("bios/undionly.kpxe"), b"kpxe").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("leak"))
            .unwrap();
        std::os::unix::fs::symlink("bios/undionly.kpxe", root.path().join("inside")).unwrap();
        let mkfifo = std::process::Command::new("mkfifo").arg(root.path().join("fifo")).status();
        assert!(mkfifo.unwrap().success());
        let source = DirSource::new(root.path()).unwrap();

        let file = source.open("/bios/undionly.kpxe").await.unwrap().unwrap();
        assert_eq!(file.size, 4);
        assert_eq!(source.open("inside").await.unwrap().unwrap().size, 4);
        assert!(source.open("missing").await.unwrap().is_none());
        for denied in ["leak", "../secret", "bios", "fifo", "a\\b"] {
            assert!(
                matches!(source.open(denied).await, Err(SourceError::AccessDenied { .. })),
                "{denied}"
            );
        }
    }
}

/// Named files from the artifact store (the boot loaders `ctpf up` stores from its boot root),
/// then a directory for every other name. Content-addressed: a file is the digest it was
/// named with when the service started, whatever the directory holds later.
#[derive(Debug)]
pub struct ArtifactSource {
    files: std::collections::BTreeMap<String, ctpf_common::Sha256Digest>,
    store: std::sync::Arc<dyn ctpf_store::artifacts::ArtifactStore>,
    fallback: std::sync::Arc<dyn FileSource>,
}

impl ArtifactSource {
    pub fn new(
        files: std::collections::BTreeMap<String, ctpf_common::Sha256Digest>,
        store: std::sync::Arc<dyn ctpf_store::artifacts::ArtifactStore>,
        fallback: std::sync::Arc<dyn FileSource>,
    ) -> Self {
        Self { files, store, fallback }
    }
}

#[async_trait]
impl FileSource for ArtifactSource {
    async fn open(&self, path: &str) -> Result<Option<OpenFile>, SourceError> {
        let relative = sanitize_path(path)
            .map_err(|reason| SourceError::AccessDenied { path: path.to_owned(), reason })?;
        let Some(digest) = relative.to_str().and_then(|name| self.files.get(name)) else {
            return self.fallback.open(path).await;
        };
        let blob = self
            .store
            .get(digest)
            .await
            .map_err(|e| SourceError::Io { path: path.to_owned(), source: io::Error::other(e) })?;
        Ok(Some(OpenFile { size: blob.size, reader: Box::new(blob.reader) }))
    }
}
