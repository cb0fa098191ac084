//! Where a site worker fetches the files its snapshots name: the artifact store itself (S3,
//! with credentials that can read every object), or the manager, which checks the worker's
//! own credential and serves only files of that worker's datacenter's current snapshot
//! (`GET /v1/worker-files/DIGEST`). Either way the cache checks each file's SHA-256.

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use ctpf_common::{Sha256Digest, WorkerToken};
use ctpf_store::artifacts::{ArtifactStore, BlobReader};
use futures::TryStreamExt as _;

#[async_trait]
pub trait FileOrigin: Send + Sync + fmt::Debug {
    /// The content of `digest`, or why it cannot be had.
    async fn fetch(&self, digest: &Sha256Digest) -> Result<BlobReader, String>;
}

/// Straight from the artifact store.
#[derive(Debug, Clone)]
pub struct StoreOrigin(pub Arc<dyn ArtifactStore>);

#[async_trait]
impl FileOrigin for StoreOrigin {
    async fn fetch(&self, digest: &Sha256Digest) -> Result<BlobReader, String> {
        self.0.get(digest).await.map(|blob| blob.reader).map_err(|e| e.to_string())
    }
}

/// Through the manager's API, with the worker's credential.
#[derive(Clone)]
pub struct ManagerOrigin {
    client: reqwest::Client,
    base_url: String,
    token: WorkerToken,
}

impl fmt::Debug for ManagerOrigin {
    // The token is a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagerOrigin").field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

/// A manager that accepts no connection, or stops sending, must not stall the follower (it
/// keeps serving the last snapshot and tries again with the next generation).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

impl ManagerOrigin {
    pub fn new(base_url: &str, token: WorkerToken) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()?;
        Ok(Self { client, base_url: base_url.trim_end_matches('/').to_owned(), token })
    }
}

#[async_trait]
impl FileOrigin for ManagerOrigin {
    async fn fetch(&self, digest: &Sha256Digest) -> Result<BlobReader, String> {
        let url = format!("{}/v1/worker-files/{digest}", self.base_url);
        let response = self
            .client
            .get(&url)
            .bearer_auth(self.token.to_string())
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(format!("GET {url}: {status}: {}", body.trim()));
        }
        let stream = response.bytes_stream().map_err(std::io::Error::other);
        Ok(Box::pin(tokio_util::io::StreamReader::new(stream)))
    }
}
