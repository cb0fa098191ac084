//! The embedded artifact store: one file per blob under `ROOT/sha256/ab/abcdef...`.
//!
//! An upload streams into a temporary file under `ROOT/tmp` while it is hashed. The async task
//! only reads the body; each chunk goes, through small bounded channels, to a hashing thread
//! and a writing thread (both blocking threads), so reading, hashing and writing overlap on
//! separate cores, hashing (the costliest step, ~0.5 ms per MiB even with SHA-NI) never
//! stalls the async runtime, and memory stays at a few MiB whatever the size. The file is
//! fsynced and renamed into place only when the digest is known (and matches), then the
//! directory is fsynced: after `put` returns, the blob survives a power cut.

use std::{
    io::{SeekFrom, Write as _},
    path::{Path, PathBuf},
};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use ctpf_common::Sha256Digest;
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncReadExt as _, AsyncSeekExt as _},
    sync::mpsc,
};

use super::{ArtifactError, ArtifactStore, Blob, BlobInfo, BlobReader, check_digest, check_range};

/// Upload chunk size: large enough that per-chunk overhead vanishes, small enough that the
/// in-flight chunks stay far below the 64 MiB memory budget.
const CHUNK: usize = 1 << 20;
/// Chunks queued between the reader and each of the hasher and the writer. A chunk is shared
/// by both queues, so at most a few more than this are alive at once.
const IN_FLIGHT: usize = 4;

#[derive(Debug, Clone)]
pub struct FsArtifactStore {
    root: PathBuf,
}

impl FsArtifactStore {
    /// Opens (creating if needed) a store rooted at `root`. Leftover temporary files from an
    /// interrupted upload are removed.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self, ArtifactError> {
        let root = root.into();
        tokio::fs::create_dir_all(root.join("sha256")).await?;
        let tmp = root.join("tmp");
        if tokio::fs::try_exists(&tmp).await? {
            tokio::fs::remove_dir_all(&tmp).await?;
        }
        tokio::fs::create_dir_all(&tmp).await?;
        Ok(Self { root })
    }

    fn blob_path(&self, digest: &Sha256Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join("sha256").join(&hex[..2]).join(hex)
    }

    async fn open_blob(&self, digest: &Sha256Digest) -> Result<tokio::fs::File, ArtifactError> {
        match tokio::fs::File::open(self.blob_path(digest)).await {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ArtifactError::NotFound(*digest))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Writes chunks to `file` as they arrive, then fsyncs it. Runs on a blocking thread.
fn write_chunks(
    mut file: std::fs::File,
    mut chunks: mpsc::Receiver<Bytes>,
) -> std::io::Result<std::fs::File> {
    while let Some(chunk) = chunks.blocking_recv() {
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    Ok(file)
}

/// Hashes chunks as they arrive. Runs on a blocking thread.
fn hash_chunks(mut chunks: mpsc::Receiver<Bytes>) -> Sha256Digest {
    let mut hasher = Sha256::new();
    while let Some(chunk) = chunks.blocking_recv() {
        hasher.update(&chunk);
    }
    Sha256Digest::from_bytes(hasher.finalize().into())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[async_trait]
impl ArtifactStore for FsArtifactStore {
    async fn put(
        &self,
        mut body: BlobReader,
        expected: Option<Sha256Digest>,
    ) -> Result<BlobInfo, ArtifactError> {
        let tmp_dir = self.root.join("tmp");
        let temp = tokio::task::spawn_blocking(move || tempfile::NamedTempFile::new_in(tmp_dir))
            .await
            .map_err(std::io::Error::other)??;
        let (temp_file, temp_path) = temp.into_parts();
        let (write_tx, write_rx) = mpsc::channel::<Bytes>(IN_FLIGHT);
        let (hash_tx, hash_rx) = mpsc::channel::<Bytes>(IN_FLIGHT);
        let writer = tokio::task::spawn_blocking(move || write_chunks(temp_file, write_rx));
        let hasher = tokio::task::spawn_blocking(move || hash_chunks(hash_rx));

        let mut size = 0u64;
        let mut read_error = None;
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK);
            // Fill the chunk fully (readers often return small pieces) before handing it over.
            while buf.len() < CHUNK {
                match body.read_buf(&mut buf).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        read_error = Some(e);
                        break;
                    }
                }
            }
            if buf.is_empty() || read_error.is_some() {
                break;
            }
            size += buf.len() as u64;
            let chunk = buf.freeze();
            if hash_tx.send(chunk.clone()).await.is_err() || write_tx.send(chunk).await.is_err() {
                break; // the writer failed (the hasher cannot); its error is reported below
            }
        }
        drop((hash_tx, write_tx));
        let written = writer.await.map_err(std::io::Error::other)?;
        let digest = hasher.await.map_err(std::io::Error::other)?;
        if let Some(e) = read_error {
            return Err(ArtifactError::Upload(e)); // temp_path's drop removes the file
        }
        let written = written?;
        drop(written);

        check_digest(expected, digest)?;
        let final_path = self.blob_path(&digest);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let dir = final_path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            // Same content twice: keep the existing file (rename over it would be equivalent,
            // but leaving it alone keeps concurrent readers' files untouched).
            if final_path.exists() {
                return Ok(());
            }
            temp_path.persist(&final_path).map_err(|e| e.error)?;
            sync_dir(dir)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(BlobInfo { digest, size })
    }

    async fn get(&self, digest: &Sha256Digest) -> Result<Blob, ArtifactError> {
        let file = self.open_blob(digest).await?;
        let size = file.metadata().await?.len();
        let reader = tokio::io::BufReader::with_capacity(CHUNK, file);
        Ok(Blob { size, reader: Box::pin(reader) })
    }

    async fn get_range(
        &self,
        digest: &Sha256Digest,
        start: u64,
        end: u64,
    ) -> Result<Blob, ArtifactError> {
        let mut file = self.open_blob(digest).await?;
        let size = file.metadata().await?.len();
        check_range(start, end, size)?;
        file.seek(SeekFrom::Start(start)).await?;
        let reader = tokio::io::BufReader::with_capacity(CHUNK, file).take(end - start);
        Ok(Blob { size, reader: Box::pin(reader) })
    }

    async fn stat(&self, digest: &Sha256Digest) -> Result<Option<u64>, ArtifactError> {
        match tokio::fs::metadata(self.blob_path(digest)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete(&self, digest: &Sha256Digest) -> Result<bool, ArtifactError> {
        match tokio::fs::remove_file(self.blob_path(digest)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(&self) -> Result<Vec<BlobInfo>, ArtifactError> {
        let root = self.root.join("sha256");
        tokio::task::spawn_blocking(move || -> Result<Vec<BlobInfo>, ArtifactError> {
            let mut blobs = Vec::new();
            for shard in std::fs::read_dir(&root)? {
                let shard = shard?;
                if !shard.file_type()?.is_dir() {
                    continue;
                }
                for entry in std::fs::read_dir(shard.path())? {
                    let entry = entry?;
                    let name = entry.file_name();
                    // Anything that is not a digest-named file is not ours to report.
                    let Some(digest) = name.to_str().and_then(|n| n.parse().ok()) else {
                        continue;
                    };
                    blobs.push(BlobInfo { digest, size: entry.metadata()?.len() });
                }
            }
            blobs.sort_by_key(|b| b.digest);
            Ok(blobs)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}
