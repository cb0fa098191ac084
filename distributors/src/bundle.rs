//! PXE bundles served from the local cache without unpacking: the tar (written by
//! `ctpf_packagers::pxe_bundle`) is indexed once, path → byte range, and each file is served
//! as a range of the cached blob. Paths must pass the packager's own check (plain parts, no
//! `..`), so a bundle from elsewhere cannot name a file outside its tree.

use std::collections::BTreeMap;
use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use ctpf_common::Sha256Digest;
use ctpf_store::artifacts::FsArtifactStore;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::tftp::{FileSource, OpenFile, SourceError, sanitize_path};

/// Files a bundle may hold; a tar with more is refused.
const MAX_FILES: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("PXE bundle {digest}: {reason}")]
    Invalid { digest: Sha256Digest, reason: String },
    #[error("reading PXE bundle {digest}: {source}")]
    Io {
        digest: Sha256Digest,
        #[source]
        source: io::Error,
    },
}

/// Where each file of one bundle lies in its tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleIndex {
    pub digest: Sha256Digest,
    blob: PathBuf,
    files: BTreeMap<String, FileRange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileRange {
    offset: u64,
    size: u64,
}

impl BundleIndex {
    /// Reads the tar headers of `blob` (blocking). Directories are skipped; links, devices
    /// and unsafe paths refuse the whole bundle.
    pub fn read(digest: Sha256Digest, blob: &Path) -> Result<Self, BundleError> {
        let io_error = |source| BundleError::Io { digest, source };
        let invalid = |reason: String| BundleError::Invalid { digest, reason };
        let file = std::fs::File::open(blob).map_err(io_error)?;
        let mut archive = tar::Archive::new(io::BufReader::new(file));
        let mut files = BTreeMap::new();
        for entry in archive.entries().map_err(io_error)? {
            let entry = entry.map_err(io_error)?;
            let path = entry.path().map_err(io_error)?;
            let path = path.to_str().ok_or_else(|| invalid("a path is not UTF-8".into()))?;
            match entry.header().entry_type() {
                tar::EntryType::Directory => continue,
                tar::EntryType::Regular => {}
                other => return Err(invalid(format!("{path:?} is a {other:?}, not a file"))),
            }
            ctpf_packagers::pxe_bundle::check_path(path).map_err(|e| invalid(e.to_string()))?;
            let range = FileRange { offset: entry.raw_file_position(), size: entry.size() };
            if files.insert(path.to_owned(), range).is_some() {
                return Err(invalid(format!("{path:?} twice")));
            }
            if files.len() > MAX_FILES {
                return Err(invalid(format!("more than {MAX_FILES} files")));
            }
        }
        Ok(Self { digest, blob: blob.to_owned(), files })
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Opens `path` (as a client sent it: a leading `/` is ignored), `None` if the bundle
    /// has no such file.
    pub async fn open(&self, path: &str) -> io::Result<Option<OpenFile>> {
        let Some(range) = self.files.get(path.trim_start_matches('/')).copied() else {
            return Ok(None);
        };
        let mut file = tokio::fs::File::open(&self.blob).await?;
        file.seek(SeekFrom::Start(range.offset)).await?;
        Ok(Some(OpenFile { size: range.size, reader: Box::new(file.take(range.size)) }))
    }
}

/// The index of the bundle currently served, built once per digest and shared by TFTP and
/// HTTP.
#[derive(Debug, Clone)]
pub struct BundleCache {
    store: Arc<FsArtifactStore>,
    current: Arc<Mutex<Option<Arc<BundleIndex>>>>,
}

impl BundleCache {
    pub fn new(store: Arc<FsArtifactStore>) -> Self {
        Self { store, current: Arc::default() }
    }

    /// The index of the bundle `digest` (which must be in the cache), reading it unless it
    /// is the one indexed last.
    pub async fn index(&self, digest: Sha256Digest) -> Result<Arc<BundleIndex>, BundleError> {
        let cached = self.current.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(index) = cached.filter(|i| i.digest == digest) {
            return Ok(index);
        }
        let blob = self.store.blob_path(&digest);
        let index = tokio::task::spawn_blocking(move || BundleIndex::read(digest, &blob))
            .await
            .map_err(|e| BundleError::Io { digest, source: io::Error::other(e) })??;
        let index = Arc::new(index);
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(index.clone());
        Ok(index)
    }
}

/// TFTP from a bundle first, then from `fallback`.
#[derive(Debug)]
pub struct BundleSource {
    pub index: Arc<BundleIndex>,
    pub fallback: Arc<dyn FileSource>,
}

#[async_trait]
impl FileSource for BundleSource {
    async fn open(&self, path: &str) -> Result<Option<OpenFile>, SourceError> {
        let relative = sanitize_path(path)
            .map_err(|reason| SourceError::AccessDenied { path: path.to_owned(), reason })?;
        let Some(name) = relative.to_str() else { return self.fallback.open(path).await };
        match self.index.open(name).await {
            Ok(Some(file)) => Ok(Some(file)),
            Ok(None) => self.fallback.open(path).await,
            Err(source) => Err(SourceError::Io { path: path.to_owned(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            // Written raw so hostile names reach the reader as they would from elsewhere.
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    async fn read_all(index: &BundleIndex, path: &str) -> Option<Vec<u8>> {
        let mut file = index.open(path).await.unwrap()?;
        let mut bytes = Vec::new();
        file.reader.read_to_end(&mut bytes).await.unwrap();
        assert_eq!(bytes.len() as u64, file.size);
        Some(bytes)
    }

    #[tokio::test]
    async fn files_are_served_as_ranges_of_the_tar() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("bundle.tar");
        std::fs::write(&blob, tar_of(&[("ipxe.efi", b"efi"), ("grub/core.0", &[9u8; 1000])]))
            .unwrap();
        let index = BundleIndex::read(Sha256Digest::of(b"x"), &blob).unwrap();
        assert_eq!(index.len(), 2);
        assert_eq!(read_all(&index, "/ipxe.efi").await.unwrap(), b"efi");
        assert_eq!(read_all(&index, "grub/core.0").await.unwrap(), vec![9u8; 1000]);
        assert!(read_all(&index, "missing").await.is_none());
    }

    #[test]
    fn unsafe_paths_refuse_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../etc/passwd", "a/../../b", ".hidden"] {
            let blob = dir.path().join("bad.tar");
            std::fs::write(&blob, tar_of(&[(bad, b"x")])).unwrap();
            let error = BundleIndex::read(Sha256Digest::of(b"x"), &blob).unwrap_err();
            assert!(error.to_string().contains(bad), "{bad}: {error}");
        }
        std::fs::write(dir.path().join("junk.tar"), [1u8; 700]).unwrap();
        assert!(BundleIndex::read(Sha256Digest::of(b"x"), &dir.path().join("junk.tar")).is_err());
    }
}
