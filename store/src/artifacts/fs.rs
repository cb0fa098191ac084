//! The embedded artifact store: one file per blob under `ROOT/sha256/ab/abcdef...`.
//!
//! An upload streams into a temporary file under `ROOT/tmp` through a three-stage pipeline:
//! the async task reads the body into 1 MiB buffers, a hashing thread hashes each buffer and
//! passes it on, a writing thread writes it and hands the emptied buffer back to the reader.
//! The stages overlap on separate cores, hashing (the costliest step) never stalls the async
//! runtime, and the same few buffers circulate: no allocation per chunk (a fresh 1 MiB buffer
//! per chunk costs page faults, and freeing it on another thread costs TLB shootdowns), and
//! memory stays at `BUFFERS` MiB whatever the size. The file is fsynced and renamed into
//! place only when the digest is known (and matches), then the directory is fsynced: after
//! `put` returns, the blob survives a power cut.

use std::{
    io::{SeekFrom, Write as _},
    path::{Path, PathBuf},
};

use async_trait::async_trait;
use ctpf_common::Sha256Digest;
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncReadExt as _, AsyncSeekExt as _},
    sync::mpsc,
};

use super::{ArtifactError, ArtifactStore, Blob, BlobInfo, BlobReader, check_digest, check_range};

/// Upload chunk size: large enough that per-chunk overhead vanishes, small enough that the
/// buffers in circulation stay far below the 64 MiB memory budget.
const CHUNK: usize = 1 << 20;
/// Buffers circulating through the upload pipeline (read -> hash -> write -> read).
const BUFFERS: usize = 6;

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

    /// The file holding `digest` (it may not exist). Blobs never change once stored, so a
    /// reader may open it directly, e.g. to serve ranges of it.
    pub fn blob_path(&self, digest: &Sha256Digest) -> PathBuf {
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

/// Hashing stage: hashes each buffer, then passes it to the writer. Stops early when the
/// writer has gone (it failed; its error is what the caller reports).
fn hash_stage(
    mut filled: mpsc::Receiver<Vec<u8>>,
    to_writer: mpsc::Sender<Vec<u8>>,
) -> Sha256Digest {
    let mut hasher = Sha256::new();
    while let Some(buf) = filled.blocking_recv() {
        hasher.update(&buf);
        if to_writer.blocking_send(buf).is_err() {
            break;
        }
    }
    Sha256Digest::from_bytes(hasher.finalize().into())
}

/// Writing stage: writes each buffer, returns it empty to the reader, and fsyncs the file at
/// the end.
fn write_stage(
    mut file: std::fs::File,
    mut hashed: mpsc::Receiver<Vec<u8>>,
    empty: mpsc::Sender<Vec<u8>>,
) -> std::io::Result<std::fs::File> {
    while let Some(mut buf) = hashed.blocking_recv() {
        file.write_all(&buf)?;
        buf.clear();
        // The reader may have finished already; then the buffer is simply dropped.
        let _ = empty.try_send(buf);
    }
    file.sync_all()?;
    Ok(file)
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
        let (empty_tx, mut empty_rx) = mpsc::channel::<Vec<u8>>(BUFFERS);
        let (filled_tx, filled_rx) = mpsc::channel::<Vec<u8>>(BUFFERS);
        let (hashed_tx, hashed_rx) = mpsc::channel::<Vec<u8>>(BUFFERS);
        for _ in 0..BUFFERS {
            let _ = empty_tx.try_send(Vec::with_capacity(CHUNK));
        }
        let hasher = tokio::task::spawn_blocking(move || hash_stage(filled_rx, hashed_tx));
        let writer =
            tokio::task::spawn_blocking(move || write_stage(temp_file, hashed_rx, empty_tx));

        let mut size = 0u64;
        let mut read_error = None;
        // `None`: a later stage stopped (the writer failed); its error is reported below.
        while let Some(mut buf) = empty_rx.recv().await {
            // Fill the buffer fully (readers often return small pieces) before handing it on.
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
            if filled_tx.send(buf).await.is_err() {
                break;
            }
        }
        drop((filled_tx, empty_rx));
        let digest = hasher.await.map_err(std::io::Error::other)?;
        let written = writer.await.map_err(std::io::Error::other)?;
        if let Some(e) = read_error {
            return Err(ArtifactError::Upload(e)); // temp_path's drop removes the file
        }
        drop(written?);

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

    async fn set_ref(&self, name: &str, digest: &Sha256Digest) -> Result<(), ArtifactError> {
        super::check_ref_name(name)?;
        let path = self.root.join("refs").join(name);
        let tmp_dir = self.root.join("tmp");
        let content = format!("{}\n", digest.hex());
        // Written aside, fsynced and renamed: a reader sees the old or the new digest.
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let dir = path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            let mut temp = tempfile::NamedTempFile::new_in(tmp_dir)?;
            std::io::Write::write_all(&mut temp, content.as_bytes())?;
            temp.as_file().sync_all()?;
            temp.persist(&path).map_err(|e| e.error)?;
            sync_dir(dir)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(())
    }

    async fn get_ref(&self, name: &str) -> Result<Option<Sha256Digest>, ArtifactError> {
        super::check_ref_name(name)?;
        match tokio::fs::read_to_string(self.root.join("refs").join(name)).await {
            Ok(content) => super::parse_ref(name, &content).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
