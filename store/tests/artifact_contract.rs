//! One contract for every artifact store: the filesystem store and S3 against a real
//! S3-compatible server must behave the same.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{pin::Pin, task::Poll};

use ctpf_common::Sha256Digest;
use ctpf_e2e::S3Server;
use ctpf_store::artifacts::{
    ArtifactError, ArtifactStore, BlobReader, FsArtifactStore, S3ArtifactStore, S3Config,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, ReadBuf};

fn reader(data: Vec<u8>) -> BlobReader {
    Box::pin(std::io::Cursor::new(data))
}

/// Deterministic pseudo-random bytes, so large blobs are not trivially compressible.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn read_all(store: &dyn ArtifactStore, digest: &Sha256Digest) -> Vec<u8> {
    let mut blob = store.get(digest).await.unwrap();
    let mut out = Vec::new();
    blob.reader.read_to_end(&mut out).await.unwrap();
    assert_eq!(out.len() as u64, blob.size);
    out
}

/// A reader that yields `good` bytes and then fails, like a client that disconnects.
struct Broken {
    good: std::io::Cursor<Vec<u8>>,
}

impl AsyncRead for Broken {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let inner = Pin::new(&mut self.good);
        match inner.poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before => {
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "gone")))
            }
            other => other,
        }
    }
}

async fn contract(store: &dyn ArtifactStore) {
    // Round trip of a small blob; the digest is the SHA-256 of the content.
    let small = b"#!ipxe\nchain http://ctpf/boot\n".to_vec();
    let info = store.put(reader(small.clone()), None).await.unwrap();
    assert_eq!(info.digest, Sha256Digest::of(&small));
    assert_eq!(info.size, small.len() as u64);
    assert_eq!(read_all(store, &info.digest).await, small);
    assert_eq!(store.stat(&info.digest).await.unwrap(), Some(small.len() as u64));

    // Same content again: same digest, still one blob.
    let again = store.put(reader(small.clone()), Some(info.digest)).await.unwrap();
    assert_eq!(again, info);

    // Empty blob.
    let empty = store.put(reader(Vec::new()), None).await.unwrap();
    assert_eq!(empty.digest, Sha256Digest::of(b""));
    assert_eq!(read_all(store, &empty.digest).await, Vec::<u8>::new());

    // A blob larger than one S3 part and one filesystem chunk, with and without an expected
    // digest.
    let large = bytes(19 * 1024 * 1024 + 123, 7);
    let large_digest = Sha256Digest::of(&large);
    let info = store.put(reader(large.clone()), None).await.unwrap();
    assert_eq!(info.digest, large_digest);
    assert_eq!(info.size, large.len() as u64);
    assert!(read_all(store, &large_digest).await == large);
    let large2 = bytes(17 * 1024 * 1024, 8);
    let d2 = Sha256Digest::of(&large2);
    assert_eq!(store.put(reader(large2.clone()), Some(d2)).await.unwrap().digest, d2);

    // Ranges, including across part boundaries and the empty range.
    let mut blob =
        store.get_range(&large_digest, 8 * 1024 * 1024 - 5, 8 * 1024 * 1024 + 5).await.unwrap();
    assert_eq!(blob.size, large.len() as u64);
    let mut got = Vec::new();
    blob.reader.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, large[8 * 1024 * 1024 - 5..8 * 1024 * 1024 + 5]);
    let mut blob = store.get_range(&large_digest, 3, 3).await.unwrap();
    got.clear();
    blob.reader.read_to_end(&mut got).await.unwrap();
    assert!(got.is_empty());
    let size = large.len() as u64;
    assert!(matches!(
        store.get_range(&large_digest, 10, size + 1).await,
        Err(ArtifactError::InvalidRange { .. })
    ));

    // A digest mismatch is a typed error and stores nothing, small or large.
    let wrong = Sha256Digest::of(b"something else");
    for data in [b"tampered".to_vec(), bytes(9 * 1024 * 1024, 9)] {
        let actual = Sha256Digest::of(&data);
        match store.put(reader(data), Some(wrong)).await {
            Err(ArtifactError::DigestMismatch { expected, actual: a }) => {
                assert_eq!(expected, wrong);
                assert_eq!(a, actual);
            }
            other => panic!("expected a digest mismatch, got {other:?}"),
        }
        assert_eq!(store.stat(&actual).await.unwrap(), None);
        assert_eq!(store.stat(&wrong).await.unwrap(), None);
    }

    // An upload that breaks off stores nothing.
    let partial = bytes(10 * 1024 * 1024, 10);
    let broken = Broken { good: std::io::Cursor::new(partial.clone()) };
    assert!(matches!(store.put(Box::pin(broken), None).await, Err(ArtifactError::Upload(_))));
    assert_eq!(store.stat(&Sha256Digest::of(&partial)).await.unwrap(), None);

    // Unknown blobs.
    let missing = Sha256Digest::of(b"never stored");
    assert!(matches!(store.get(&missing).await, Err(ArtifactError::NotFound(d)) if d == missing));
    assert_eq!(store.stat(&missing).await.unwrap(), None);
    assert!(!store.delete(&missing).await.unwrap());

    // Listing shows exactly what is stored, in digest order; delete removes.
    let listed: Vec<_> = store.list().await.unwrap().into_iter().map(|b| b.digest).collect();
    let mut want = vec![Sha256Digest::of(&small), empty.digest, large_digest, d2];
    want.sort();
    assert_eq!(listed, want);
    assert!(store.delete(&large_digest).await.unwrap());
    assert_eq!(store.stat(&large_digest).await.unwrap(), None);
    assert_eq!(store.list().await.unwrap().len(), 3);

    // Refs: unset is None, set points, set again moves; refs are not blobs.
    let key = format!("builds/{}", Sha256Digest::of(b"key").hex());
    assert_eq!(store.get_ref(&key).await.unwrap(), None);
    store.set_ref(&key, &empty.digest).await.unwrap();
    assert_eq!(store.get_ref(&key).await.unwrap(), Some(empty.digest));
    store.set_ref(&key, &d2).await.unwrap();
    assert_eq!(store.get_ref(&key).await.unwrap(), Some(d2));
    assert_eq!(store.list().await.unwrap().len(), 3);
    // Names that could leave the refs namespace are refused before any I/O.
    for hostile in ["../escape", "builds/../../x", "/abs", "a//b", "UPPER", "", "builds/.hidden"] {
        assert!(
            matches!(store.set_ref(hostile, &d2).await, Err(ArtifactError::InvalidRef(_))),
            "{hostile:?} accepted"
        );
        assert!(matches!(store.get_ref(hostile).await, Err(ArtifactError::InvalidRef(_))));
    }
}

#[tokio::test]
async fn filesystem_store_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsArtifactStore::open(dir.path()).await.unwrap();
    contract(&store).await;
    // Nothing is left behind in the temporary area, even after failed uploads.
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
}

#[tokio::test]
async fn s3_store_meets_the_contract() {
    let server = S3Server::start().unwrap();
    let store = S3ArtifactStore::connect(S3Config {
        endpoint: server.endpoint(),
        bucket: "ctpf-contract".into(),
        region: "us-east-1".into(),
        access_key: S3Server::ACCESS_KEY.into(),
        secret_key: S3Server::SECRET_KEY.into(),
    })
    .await
    .unwrap();
    contract(&store).await;
}

#[tokio::test]
async fn s3_store_reports_a_dead_server_as_an_error() {
    let port = ctpf_e2e::free_port().unwrap();
    let result = S3ArtifactStore::connect(S3Config {
        endpoint: format!("http://127.0.0.1:{port}"),
        bucket: "b".into(),
        region: "us-east-1".into(),
        access_key: "a".into(),
        secret_key: "b".into(),
    })
    .await;
    assert!(matches!(result, Err(ArtifactError::S3 { .. })), "{result:?}");
}
