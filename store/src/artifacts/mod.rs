//! Content-addressed blob storage. A blob's name is the SHA-256 of its bytes; it is hashed
//! while it streams in and becomes visible only once the hash is known (and matches the
//! expected one when the caller gave it), so a reader never sees a partial or corrupt blob.

use std::{fmt::Debug, pin::Pin};

use async_trait::async_trait;
use ctpf_common::Sha256Digest;
use tokio::io::AsyncRead;

mod fs;
mod s3;

pub use fs::FsArtifactStore;
pub use s3::{S3ArtifactStore, S3Config};

/// A byte stream going into or coming out of the store.
pub type BlobReader = Pin<Box<dyn AsyncRead + Send>>;

/// A blob's identity and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: Sha256Digest,
    pub size: u64,
}

/// An open blob (or a range of one): its total size and a reader over the requested bytes.
pub struct Blob {
    pub size: u64,
    pub reader: BlobReader,
}

impl Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob").field("size", &self.size).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("blob {0} not found")]
    NotFound(Sha256Digest),
    #[error("content digest {actual} does not match the expected {expected}")]
    DigestMismatch { expected: Sha256Digest, actual: Sha256Digest },
    #[error("range {start}..{end} is outside a blob of {size} bytes")]
    InvalidRange { start: u64, end: u64, size: u64 },
    #[error("reading the upload: {0}")]
    Upload(#[source] std::io::Error),
    #[error("artifact store I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("S3 {operation}: {message}")]
    S3 { operation: &'static str, message: String },
    #[error(
        "invalid ref name {0:?}: use lowercase letters, digits, '.', '-' and '_' in '/'-separated parts"
    )]
    InvalidRef(String),
    #[error("ref {name} holds {content:?}, not a digest")]
    CorruptRef { name: String, content: String },
}

/// Checks a ref name (`builds/<hex>`): '/'-separated parts of `[a-z0-9._-]`, none empty or
/// starting with '.', so a name can never climb out of the refs directory or prefix.
pub fn check_ref_name(name: &str) -> Result<(), ArtifactError> {
    let part_ok = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
    };
    if name.len() > 200 || !name.split('/').all(part_ok) {
        return Err(ArtifactError::InvalidRef(name.to_owned()));
    }
    Ok(())
}

fn parse_ref(name: &str, content: &str) -> Result<Sha256Digest, ArtifactError> {
    content.trim().parse().map_err(|_| ArtifactError::CorruptRef {
        name: name.to_owned(),
        content: content.chars().take(80).collect(),
    })
}

#[async_trait]
pub trait ArtifactStore: Send + Sync + Debug {
    /// Streams `body` into the store and returns its digest and size. With `expected`, content
    /// that hashes differently is discarded and [`ArtifactError::DigestMismatch`] returned.
    /// Storing content that is already there is cheap and returns the same digest.
    async fn put(
        &self,
        body: BlobReader,
        expected: Option<Sha256Digest>,
    ) -> Result<BlobInfo, ArtifactError>;

    /// Opens a blob for streaming.
    async fn get(&self, digest: &Sha256Digest) -> Result<Blob, ArtifactError>;

    /// Opens bytes `start..end` of a blob (`end` exclusive, at most the blob's size).
    /// `Blob::size` is still the whole blob's size, for Content-Range.
    async fn get_range(
        &self,
        digest: &Sha256Digest,
        start: u64,
        end: u64,
    ) -> Result<Blob, ArtifactError>;

    /// The blob's size, or `None` when it is not stored.
    async fn stat(&self, digest: &Sha256Digest) -> Result<Option<u64>, ArtifactError>;

    /// Removes a blob; `false` when it was not there.
    async fn delete(&self, digest: &Sha256Digest) -> Result<bool, ArtifactError>;

    /// Every stored blob, in digest order.
    async fn list(&self) -> Result<Vec<BlobInfo>, ArtifactError>;

    /// Points the ref `name` at `digest` (replacing what it pointed at). Refs are how a
    /// cache key finds its stored answer, e.g. `builds/<key>` → the build's manifest.
    async fn set_ref(&self, name: &str, digest: &Sha256Digest) -> Result<(), ArtifactError>;

    /// What the ref `name` points at, or `None` when it was never set.
    async fn get_ref(&self, name: &str) -> Result<Option<Sha256Digest>, ArtifactError>;
}

/// The JSON document (a manifest) the ref `name` points at, read up to `max_bytes`. `None`
/// when the ref is unset, its blob is gone, or the blob does not parse as `T` (logged):
/// callers answering from a cache treat all three as a miss and make the thing again.
pub async fn read_json_ref<T: serde::de::DeserializeOwned>(
    store: &dyn ArtifactStore,
    name: &str,
    max_bytes: u64,
) -> Result<Option<T>, ArtifactError> {
    use tokio::io::AsyncReadExt as _;
    let Some(digest) = store.get_ref(name).await? else { return Ok(None) };
    let blob = match store.get(&digest).await {
        Ok(blob) => blob,
        Err(ArtifactError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    blob.reader.take(max_bytes).read_to_end(&mut bytes).await?;
    match serde_json::from_slice(&bytes) {
        Ok(document) => Ok(Some(document)),
        Err(error) => {
            tracing::warn!(%digest, reference = name, %error, "unreadable document behind a ref; ignoring it");
            Ok(None)
        }
    }
}

/// Fails with [`ArtifactError::DigestMismatch`] when an expected digest is given and differs.
fn check_digest(expected: Option<Sha256Digest>, actual: Sha256Digest) -> Result<(), ArtifactError> {
    match expected {
        Some(expected) if expected != actual => {
            Err(ArtifactError::DigestMismatch { expected, actual })
        }
        _ => Ok(()),
    }
}

fn check_range(start: u64, end: u64, size: u64) -> Result<(), ArtifactError> {
    if start > end || end > size {
        return Err(ArtifactError::InvalidRange { start, end, size });
    }
    Ok(())
}
