//! Artifacts in S3 (MinIO in production, any S3-compatible server in tests).
//!
//! Objects live at `sha256/<hex>` in one bucket. Small uploads (one part) are buffered,
//! hashed and written with one PutObject straight to their final key. Larger ones go up as a
//! multipart upload, hashed part by part, so memory stays at about one part whatever the size:
//! - with a known expected digest, straight to the final key, aborted on mismatch (the object
//!   never becomes visible);
//! - otherwise to `tmp/<uuid>`, then copied server-side to the final key once the digest is
//!   known.

use async_trait::async_trait;
use aws_sdk_s3::{
    Client,
    config::{
        BehaviorVersion, Credentials, Region, RequestChecksumCalculation,
        ResponseChecksumValidation,
    },
    error::{DisplayErrorContext, ProvideErrorMetadata},
    primitives::ByteStream,
    types::{CompletedMultipartUpload, CompletedPart},
};
use bytes::BytesMut;
use ctpf_common::Sha256Digest;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;

use super::{ArtifactError, ArtifactStore, Blob, BlobInfo, BlobReader, check_digest, check_range};

/// Multipart part size. S3 needs at least 5 MiB per part; 8 MiB keeps memory low and
/// request overhead small.
const PART: usize = 8 << 20;
/// Largest object a single CopyObject may copy.
const MAX_SINGLE_COPY: u64 = 5 << 30;
/// Range copied per UploadPartCopy when an object is larger than that.
const COPY_PART: u64 = 1 << 30;

/// Where and how to reach the bucket.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// e.g. `http://127.0.0.1:9000` for MinIO.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
}

#[derive(Debug, Clone)]
pub struct S3ArtifactStore {
    client: Client,
    bucket: String,
}

fn s3_error<E>(operation: &'static str) -> impl FnOnce(E) -> ArtifactError
where
    E: std::error::Error,
{
    move |e| ArtifactError::S3 { operation, message: DisplayErrorContext(e).to_string() }
}

fn object_key(digest: &Sha256Digest) -> String {
    format!("sha256/{}", digest.hex())
}

/// Reads until `buf` holds `PART` bytes or the body ends. Returns `true` at end of body.
async fn fill_part(body: &mut BlobReader, buf: &mut BytesMut) -> Result<bool, ArtifactError> {
    while buf.len() < PART {
        if body.read_buf(buf).await.map_err(ArtifactError::Upload)? == 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

impl S3ArtifactStore {
    /// Connects and makes sure the bucket exists (creating it if needed).
    pub async fn connect(config: S3Config) -> Result<Self, ArtifactError> {
        let credentials =
            Credentials::new(&config.access_key, &config.secret_key, None, None, "ctpf-config");
        let sdk_config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .endpoint_url(&config.endpoint)
            .credentials_provider(credentials)
            // MinIO and friends serve buckets as paths, not virtual hosts.
            .force_path_style(true)
            // Checksums the SDK would add by default are not understood by every S3 server.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        let store = Self { client: Client::from_conf(sdk_config), bucket: config.bucket };
        store.ensure_bucket().await?;
        Ok(store)
    }

    async fn ensure_bucket(&self) -> Result<(), ArtifactError> {
        if self.client.head_bucket().bucket(&self.bucket).send().await.is_ok() {
            return Ok(());
        }
        match self.client.create_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou") | Some("BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(s3_error("CreateBucket")(e)),
        }
    }

    async fn exists(&self, key: &str) -> Result<Option<u64>, ArtifactError> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(s3_error("HeadObject")(e)),
        }
    }

    /// Uploads the rest of `body` as a multipart upload to `key`; `first` is the first part,
    /// already read and hashed. Returns the digest and size, and leaves the upload
    /// uncompleted when `expected` does not match (the caller sees the mismatch error).
    async fn multipart(
        &self,
        key: &str,
        first: BytesMut,
        mut hasher: Sha256,
        mut body: BlobReader,
        expected: Option<Sha256Digest>,
    ) -> Result<BlobInfo, ArtifactError> {
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(s3_error("CreateMultipartUpload"))?;
        let upload_id = upload.upload_id().unwrap_or_default().to_owned();
        let result = self.upload_parts(key, &upload_id, first, &mut hasher, &mut body).await;
        let (parts, size) = match result {
            Ok(done) => done,
            Err(e) => {
                self.abort(key, &upload_id).await;
                return Err(e);
            }
        };
        let digest = Sha256Digest::from_bytes(hasher.finalize().into());
        if let Err(mismatch) = check_digest(expected, digest) {
            self.abort(key, &upload_id).await;
            return Err(mismatch);
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(s3_error("CompleteMultipartUpload"))?;
        Ok(BlobInfo { digest, size })
    }

    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        first: BytesMut,
        hasher: &mut Sha256,
        body: &mut BlobReader,
    ) -> Result<(Vec<CompletedPart>, u64), ArtifactError> {
        let mut parts = Vec::new();
        let mut size = first.len() as u64;
        let mut part = first;
        let mut number = 1;
        loop {
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(part.freeze()))
                .send()
                .await
                .map_err(s3_error("UploadPart"))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .build(),
            );
            let mut next = BytesMut::with_capacity(PART);
            let at_end = fill_part(body, &mut next).await?;
            if next.is_empty() {
                return Ok((parts, size));
            }
            hasher.update(&next);
            size += next.len() as u64;
            part = next;
            number += 1;
            if at_end {
                // Upload this last part on the next turn, then stop on the empty read.
                continue;
            }
        }
    }

    async fn abort(&self, key: &str, upload_id: &str) {
        let aborted = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(e) = aborted {
            tracing::warn!(key, error = %DisplayErrorContext(e), "could not abort a multipart upload");
        }
    }

    /// Server-side copy of `from` to `to` (single CopyObject up to 5 GiB, multipart beyond).
    async fn copy(&self, from: &str, to: &str, size: u64) -> Result<(), ArtifactError> {
        let source = format!("{}/{}", self.bucket, from);
        if size <= MAX_SINGLE_COPY {
            self.client
                .copy_object()
                .bucket(&self.bucket)
                .key(to)
                .copy_source(source)
                .send()
                .await
                .map_err(s3_error("CopyObject"))?;
            return Ok(());
        }
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(to)
            .send()
            .await
            .map_err(s3_error("CreateMultipartUpload"))?;
        let upload_id = upload.upload_id().unwrap_or_default().to_owned();
        let mut parts = Vec::new();
        let mut start = 0;
        let mut number = 1;
        while start < size {
            let end = (start + COPY_PART).min(size);
            let copied = self
                .client
                .upload_part_copy()
                .bucket(&self.bucket)
                .key(to)
                .upload_id(&upload_id)
                .part_number(number)
                .copy_source(&source)
                .copy_source_range(format!("bytes={}-{}", start, end - 1))
                .send()
                .await;
            let out = match copied {
                Ok(out) => out,
                Err(e) => {
                    self.abort(to, &upload_id).await;
                    return Err(s3_error("UploadPartCopy")(e));
                }
            };
            let e_tag = out.copy_part_result().and_then(|r| r.e_tag()).map(str::to_owned);
            parts.push(CompletedPart::builder().part_number(number).set_e_tag(e_tag).build());
            start = end;
            number += 1;
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(to)
            .upload_id(&upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(s3_error("CompleteMultipartUpload"))?;
        Ok(())
    }

    async fn delete_key(&self, key: &str) -> Result<(), ArtifactError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(s3_error("DeleteObject"))?;
        Ok(())
    }
}

#[async_trait]
impl ArtifactStore for S3ArtifactStore {
    async fn put(
        &self,
        mut body: BlobReader,
        expected: Option<Sha256Digest>,
    ) -> Result<BlobInfo, ArtifactError> {
        let mut first = BytesMut::with_capacity(PART);
        let at_end = fill_part(&mut body, &mut first).await?;
        let mut hasher = Sha256::new();
        hasher.update(&first);

        if at_end {
            let digest = Sha256Digest::from_bytes(hasher.finalize().into());
            check_digest(expected, digest)?;
            let size = first.len() as u64;
            let key = object_key(&digest);
            if self.exists(&key).await?.is_none() {
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .body(ByteStream::from(first.freeze()))
                    .send()
                    .await
                    .map_err(s3_error("PutObject"))?;
            }
            return Ok(BlobInfo { digest, size });
        }

        if let Some(expected) = expected {
            return self
                .multipart(&object_key(&expected), first, hasher, body, Some(expected))
                .await;
        }
        let temp_key = format!("tmp/{}", uuid::Uuid::new_v4());
        let info = self.multipart(&temp_key, first, hasher, body, None).await?;
        let final_key = object_key(&info.digest);
        let copied = match self.exists(&final_key).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => self.copy(&temp_key, &final_key, info.size).await,
            Err(e) => Err(e),
        };
        self.delete_key(&temp_key).await?;
        copied?;
        Ok(info)
    }

    async fn get(&self, digest: &Sha256Digest) -> Result<Blob, ArtifactError> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(object_key(digest))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                return Err(ArtifactError::NotFound(*digest));
            }
            Err(e) => return Err(s3_error("GetObject")(e)),
        };
        let size = out.content_length().unwrap_or(0).max(0) as u64;
        Ok(Blob { size, reader: Box::pin(out.body.into_async_read()) })
    }

    async fn get_range(
        &self,
        digest: &Sha256Digest,
        start: u64,
        end: u64,
    ) -> Result<Blob, ArtifactError> {
        let size = self.stat(digest).await?.ok_or(ArtifactError::NotFound(*digest))?;
        check_range(start, end, size)?;
        if start == end {
            return Ok(Blob { size, reader: Box::pin(tokio::io::empty()) });
        }
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(object_key(digest))
            .range(format!("bytes={}-{}", start, end - 1))
            .send()
            .await
            .map_err(s3_error("GetObject"))?;
        Ok(Blob { size, reader: Box::pin(out.body.into_async_read()) })
    }

    async fn stat(&self, digest: &Sha256Digest) -> Result<Option<u64>, ArtifactError> {
        self.exists(&object_key(digest)).await
    }

    async fn delete(&self, digest: &Sha256Digest) -> Result<bool, ArtifactError> {
        let key = object_key(digest);
        if self.exists(&key).await?.is_none() {
            return Ok(false);
        }
        self.delete_key(&key).await?;
        Ok(true)
    }

    async fn list(&self) -> Result<Vec<BlobInfo>, ArtifactError> {
        let mut blobs = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix("sha256/")
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(s3_error("ListObjectsV2"))?;
            for object in page.contents() {
                let Some(digest) = object
                    .key()
                    .and_then(|k| k.strip_prefix("sha256/"))
                    .and_then(|h| h.parse::<Sha256Digest>().ok())
                else {
                    continue;
                };
                blobs.push(BlobInfo { digest, size: object.size().unwrap_or(0).max(0) as u64 });
            }
        }
        blobs.sort_by_key(|b| b.digest);
        Ok(blobs)
    }

    async fn set_ref(&self, name: &str, digest: &Sha256Digest) -> Result<(), ArtifactError> {
        super::check_ref_name(name)?;
        // One PutObject replaces the object whole: readers see the old or the new digest.
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(format!("refs/{name}"))
            .body(ByteStream::from(format!("{}\n", digest.hex()).into_bytes()))
            .send()
            .await
            .map_err(s3_error("PutObject"))?;
        Ok(())
    }

    async fn get_ref(&self, name: &str) -> Result<Option<Sha256Digest>, ArtifactError> {
        super::check_ref_name(name)?;
        let request = self.client.get_object().bucket(&self.bucket).key(format!("refs/{name}"));
        let out = match request.send().await {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(s3_error("GetObject")(e)),
        };
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| ArtifactError::S3 { operation: "GetObject", message: e.to_string() })?;
        let content = String::from_utf8_lossy(&bytes.into_bytes()).into_owned();
        super::parse_ref(name, &content).map(Some)
    }
}
