//! Where a source tree (iPXE's) comes from: a directory on the builder, a tarball in the
//! artifact store (`sha256:HEX`), or a git repository (`https://...`, `file:///...`, with an
//! optional `#REV`) where the network allows. Tarballs and checkouts are staged into a
//! temporary directory under the work dir; the build key is then taken over the tree, so the
//! same tree gives the same key whichever way it came.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ctpf_common::Sha256Digest;
use ctpf_store::artifacts::{ArtifactError, ArtifactStore};
use tokio_util::sync::CancellationToken;

use crate::process::{self, BuildCommand, BuildEnd, LogLine};

/// Most bytes a source tarball may unpack to.
const MAX_UNPACKED_BYTES: u64 = 4 << 30;
const GIT_TIMEOUT: Duration = Duration::from_secs(600);
const GIT_SCHEMES: &[&str] = &["https://", "http://", "git://", "ssh://", "file://"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    Path(PathBuf),
    /// A tar (optionally gzip-compressed) in the artifact store.
    Tarball(Sha256Digest),
    Git {
        url: String,
        /// A branch, tag or commit; `None` is the remote's HEAD.
        rev: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "source {0:?} is not usable: give an absolute path on the builder, sha256:HEX (a tarball in the artifact store), or a git URL (https://, http://, git://, ssh://, file://) with an optional #REV"
    )]
    Unrecognised(String),
    #[error(
        "git revision {0:?} is not valid: use letters, digits, '.', '_', '/' and '-', not starting with '-'"
    )]
    BadRevision(String),
    #[error("source tarball {digest}: {reason}")]
    BadTarball { digest: Sha256Digest, reason: String },
    #[error("source tarball {0} is not in the artifact store")]
    MissingTarball(Sha256Digest),
    #[error("git {step} failed ({end}); last lines:\n{tail}")]
    Git { step: &'static str, end: BuildEnd, tail: String },
    #[error(transparent)]
    Process(#[from] process::ProcessError),
    #[error("artifact store: {0}")]
    Store(#[from] ArtifactError),
    #[error("staging the source in {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
}

impl SourceSpec {
    pub fn parse(text: &str) -> Result<Self, SourceError> {
        if let Some(hex) = text.strip_prefix("sha256:") {
            let digest = hex.parse().map_err(|_| SourceError::Unrecognised(text.to_owned()))?;
            return Ok(SourceSpec::Tarball(digest));
        }
        if GIT_SCHEMES.iter().any(|scheme| text.starts_with(scheme)) {
            let (url, rev) = match text.split_once('#') {
                Some((url, rev)) => (url, Some(rev)),
                None => (text, None),
            };
            if let Some(rev) = rev {
                let valid = !rev.is_empty()
                    && !rev.starts_with('-')
                    && !rev.contains("..")
                    && rev.chars().all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
                if !valid {
                    return Err(SourceError::BadRevision(rev.to_owned()));
                }
            }
            if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(SourceError::Unrecognised(text.to_owned()));
            }
            return Ok(SourceSpec::Git { url: url.to_owned(), rev: rev.map(str::to_owned) });
        }
        if text.starts_with('/') {
            return Ok(SourceSpec::Path(PathBuf::from(text)));
        }
        Err(SourceError::Unrecognised(text.to_owned()))
    }
}

/// A source ready to build from; a staged copy is removed on drop.
#[derive(Debug)]
pub struct StagedSource {
    pub dir: PathBuf,
    _staging: Option<tempfile::TempDir>,
}

/// Makes `spec` available as a directory: paths as they are, tarballs unpacked and git
/// repositories checked out (git's output goes to `log`) under `work_dir`.
pub async fn stage(
    spec: &SourceSpec,
    artifacts: &dyn ArtifactStore,
    work_dir: &Path,
    cancel: CancellationToken,
    log: impl FnMut(LogLine),
) -> Result<StagedSource, SourceError> {
    if let SourceSpec::Path(path) = spec {
        return Ok(StagedSource { dir: path.clone(), _staging: None });
    }
    let staging = tempfile::Builder::new()
        .prefix("source-")
        .tempdir_in(work_dir)
        .map_err(|source| SourceError::Io { dir: work_dir.to_owned(), source })?;
    let mut tree = staging.path().join("tree");
    match spec {
        SourceSpec::Path(_) => unreachable!("returned above"),
        SourceSpec::Tarball(digest) => {
            unpack_tarball(artifacts, digest, staging.path(), &tree).await?;
            // Release tarballs hold one top directory (ipxe-1.21.1/): build from inside it.
            tree = sole_directory(&tree).unwrap_or(tree);
        }
        SourceSpec::Git { url, rev } => {
            checkout(url, rev.as_deref(), staging.path(), cancel, log).await?
        }
    }
    Ok(StagedSource { dir: tree, _staging: Some(staging) })
}

/// The only entry of `dir`, when that is a directory (not a symlink).
fn sole_directory(dir: &Path) -> Option<PathBuf> {
    let mut entries = std::fs::read_dir(dir).ok()?;
    let only = entries.next()?.ok()?;
    if entries.next().is_some() || !only.file_type().ok()?.is_dir() {
        return None;
    }
    Some(only.path())
}

async fn unpack_tarball(
    artifacts: &dyn ArtifactStore,
    digest: &Sha256Digest,
    staging: &Path,
    tree: &Path,
) -> Result<(), SourceError> {
    let mut blob = match artifacts.get(digest).await {
        Ok(blob) => blob,
        Err(ArtifactError::NotFound(_)) => return Err(SourceError::MissingTarball(*digest)),
        Err(e) => return Err(e.into()),
    };
    let io = |source| SourceError::Io { dir: staging.to_owned(), source };
    let archive_path = staging.join("source.tar");
    let mut file = tokio::fs::File::create(&archive_path).await.map_err(io)?;
    tokio::io::copy(&mut blob.reader, &mut file).await.map_err(io)?;
    drop(file);
    let (digest, tree) = (*digest, tree.to_owned());
    tokio::task::spawn_blocking(move || unpack(&archive_path, &tree, digest)).await.map_err(
        |e| SourceError::Io { dir: staging.to_owned(), source: std::io::Error::other(e) },
    )?
}

/// Unpacks a tar or tar.gz: regular files, directories and symlinks only, every path inside
/// `tree` (tar's `unpack_in` refuses `..` and absolute paths), at most
/// [`MAX_UNPACKED_BYTES`].
fn unpack(archive_path: &Path, tree: &Path, digest: Sha256Digest) -> Result<(), SourceError> {
    let bad = |reason: String| SourceError::BadTarball { digest, reason };
    let file = std::fs::File::open(archive_path).map_err(|e| bad(e.to_string()))?;
    let mut file = std::io::BufReader::new(file);
    let gzip = file.fill_buf().map_err(|e| bad(e.to_string()))?.starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn std::io::Read> =
        if gzip { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    std::fs::create_dir(tree).map_err(|e| bad(e.to_string()))?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_mtime(false);
    let mut total = 0u64;
    let entries = archive.entries().map_err(|e| bad(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("reading an entry: {e}")))?;
        let kind = entry.header().entry_type();
        let path = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            if kind.is_pax_global_extensions()
                || kind.is_pax_local_extensions()
                || kind.is_gnu_longname()
            {
                continue;
            }
            return Err(bad(format!(
                "entry {path:?} is a {kind:?}; only files, directories and symlinks are allowed"
            )));
        }
        total = total.saturating_add(entry.size());
        if total > MAX_UNPACKED_BYTES {
            return Err(bad(format!("unpacks to more than {MAX_UNPACKED_BYTES} bytes")));
        }
        let inside = entry.unpack_in(tree).map_err(|e| bad(format!("unpacking {path:?}: {e}")))?;
        if !inside {
            return Err(bad(format!("entry {path:?} points outside the tree")));
        }
    }
    Ok(())
}

/// `git init`, a shallow fetch of the revision, and a checkout of what was fetched; the
/// `.git` directory is removed so the tree digest covers only the sources.
async fn checkout(
    url: &str,
    rev: Option<&str>,
    staging: &Path,
    cancel: CancellationToken,
    mut log: impl FnMut(LogLine),
) -> Result<(), SourceError> {
    let rev = rev.unwrap_or("HEAD");
    let steps: [(&'static str, Vec<&str>); 3] = [
        ("init", vec!["init", "--quiet", "tree"]),
        ("fetch", vec!["-C", "tree", "fetch", "--depth", "1", "--", url, rev]),
        ("checkout", vec!["-C", "tree", "checkout", "--quiet", "FETCH_HEAD"]),
    ];
    for (step, args) in steps {
        let mut command = BuildCommand::new("git", args, staging, GIT_TIMEOUT);
        command.env.insert("GIT_TERMINAL_PROMPT".into(), "0".into());
        let outcome = process::run_build(command, cancel.clone(), &mut log).await?;
        if !outcome.succeeded() {
            return Err(SourceError::Git { step, end: outcome.end, tail: outcome.tail_text() });
        }
    }
    let git_dir = staging.join("tree/.git");
    tokio::fs::remove_dir_all(&git_dir)
        .await
        .map_err(|source| SourceError::Io { dir: git_dir, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_into_their_kinds_and_hostile_ones_are_refused() {
        assert_eq!(SourceSpec::parse("/src/ipxe").unwrap(), SourceSpec::Path("/src/ipxe".into()));
        let digest = Sha256Digest::of(b"tarball");
        assert_eq!(
            SourceSpec::parse(&format!("sha256:{}", digest.hex())).unwrap(),
            SourceSpec::Tarball(digest)
        );
        assert_eq!(
            SourceSpec::parse("https://github.com/ipxe/ipxe.git#v1.21.1").unwrap(),
            SourceSpec::Git {
                url: "https://github.com/ipxe/ipxe.git".into(),
                rev: Some("v1.21.1".into())
            }
        );
        for hostile in [
            "relative/dir",
            "sha256:nothex",
            "https://host/repo#--upload-pack=touch /tmp/x",
            "https://host/repo#-x",
            "https://host/repo#a..b",
            "https://host/re po",
            "ftp://host/ipxe.tar",
        ] {
            assert!(SourceSpec::parse(hostile).is_err(), "{hostile:?} accepted");
        }
        let message = SourceSpec::parse("ipxe").unwrap_err().to_string();
        assert!(message.contains("sha256:HEX") && message.contains("git URL"), "{message}");
    }
}
