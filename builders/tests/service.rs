//! The builder service over a real filesystem artifact store: the iPXE make frontend on the
//! fixture project, GRUB and SYSLINUX from Debian's packages; cache hits that start no
//! process, one build for concurrent identical requests, failures with their log tail.
//!
//! The process counter is global to this test binary, so every test holds one lock while it
//! builds: a count then only sees the processes of its own test.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ctpf_builders::service::{BuildError, BuildLog, Builder, BuilderConfig};
use ctpf_builders::tools::processes_started;
use ctpf_common::{BuildLogLine, BuildRequest, LogStream};
use ctpf_store::artifacts::{ArtifactStore, FsArtifactStore};
use tokio::io::AsyncReadExt as _;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Held by every test, so process counts see only their own test's builds.
static COUNTING: Mutex<()> = Mutex::const_new(());

fn fixture() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ipxe-like").display().to_string()
}

fn ipxe(embed: &str) -> BuildRequest {
    BuildRequest::Ipxe {
        source: fixture(),
        targets: vec!["bin/undionly.kpxe".into(), "bin-x86_64-efi/ipxe.efi".into()],
        embed: Some(embed.to_owned()),
        trust: Vec::new(),
        certs: Vec::new(),
        options: BTreeMap::from([("DOWNLOAD_PROTO_HTTPS".to_owned(), true)]),
        no_werror: false,
    }
}

struct Site {
    _dir: tempfile::TempDir,
    store: Arc<FsArtifactStore>,
    builder: Builder,
    work: PathBuf,
}

async fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FsArtifactStore::open(dir.path().join("artifacts")).await.unwrap());
    let work = dir.path().join("work");
    let mut config = BuilderConfig::new(&work);
    config.source_date_epoch = 1_700_000_000;
    let builder = Builder::new(config, store.clone()).unwrap();
    Site { _dir: dir, store, builder, work }
}

async fn build(
    builder: &Builder,
    request: &BuildRequest,
) -> (Result<ctpf_common::BuildManifest, BuildError>, Vec<BuildLogLine>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let result = builder.build(request, CancellationToken::new(), BuildLog::new(tx)).await;
    let mut lines = Vec::new();
    while let Ok(line) = rx.try_recv() {
        lines.push(line);
    }
    (result, lines)
}

async fn blob(store: &dyn ArtifactStore, digest: &ctpf_common::Sha256Digest) -> Vec<u8> {
    let mut bytes = Vec::new();
    store.get(digest).await.unwrap().reader.read_to_end(&mut bytes).await.unwrap();
    bytes
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[tokio::test]
async fn a_second_identical_request_is_a_cache_hit_that_starts_no_process() {
    let _counting = COUNTING.lock().await;
    let site = site().await;
    let request = ipxe("#!ipxe\nchain http://10.0.0.1/boot.ipxe\n");

    let (first, lines) = build(&site.builder, &request).await;
    let first = first.unwrap();
    assert!(!first.cached);
    let files: Vec<&str> = first.outputs.iter().map(|o| o.file.as_str()).collect();
    assert_eq!(files, ["undionly.kpxe", "ipxe.efi"]);
    assert!(lines.iter().any(|l| l.stream == LogStream::Stdout && l.text.contains("[BUILD]")));
    let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, (1..=lines.len() as u64).collect::<Vec<_>>(), "numbered 1, 2, ...");
    // The script really is in the output, which really is in the store.
    let kpxe = blob(site.store.as_ref(), &first.outputs[0].digest).await;
    assert!(String::from_utf8_lossy(&kpxe).contains("chain http://10.0.0.1/boot.ipxe"));
    assert!(first.tools.contains_key("make"), "{:?}", first.tools);
    assert_eq!(first.inputs["targets"], "bin/undionly.kpxe,bin-x86_64-efi/ipxe.efi");
    assert!(is_empty_dir(&site.work), "the build directory is removed");

    let before = processes_started();
    let (second, lines) = build(&site.builder, &request).await;
    let second = second.unwrap();
    assert_eq!(processes_started(), before, "a cache hit starts no process");
    assert!(second.cached);
    assert_eq!((second.key, &second.outputs), (first.key, &first.outputs));
    assert!(lines.iter().any(|l| l.text.contains("cache hit")), "{lines:?}");

    // An output deleted from the store is rebuilt, not served from a stale manifest.
    site.store.delete(&first.outputs[1].digest).await.unwrap();
    let (third, _) = build(&site.builder, &request).await;
    let third = third.unwrap();
    assert!(!third.cached);
    assert!(processes_started() > before);
    assert_eq!(
        site.store.stat(&first.outputs[1].digest).await.unwrap(),
        Some(first.outputs[1].size)
    );
}

#[tokio::test]
async fn concurrent_identical_requests_run_one_build() {
    let _counting = COUNTING.lock().await;
    let site = site().await;
    let request = ipxe("#!ipxe\necho concurrent\n");
    // Warm the tool-version cache so only make runs are counted.
    let (warm, _) = build(&site.builder, &ipxe("#!ipxe\necho warm\n")).await;
    warm.unwrap();
    let before = processes_started();
    let builds = (0..4).map(|_| build(&site.builder, &request));
    let results = futures::future::join_all(builds).await;
    let manifests: Vec<_> = results.into_iter().map(|(r, _)| r.unwrap()).collect();
    assert!(manifests.iter().all(|m| m.outputs == manifests[0].outputs));
    // The fixture's two targets need one make run (no cross compiler): one build.
    assert_eq!(processes_started() - before, 1, "four requests, one make run");
}

#[tokio::test]
async fn two_cold_builds_in_separate_stores_give_identical_bytes() {
    let _serial = COUNTING.lock().await;
    let (a, b) = (site().await, site().await);
    let request = ipxe("#!ipxe\necho same\n");
    let first = build(&a.builder, &request).await.0.unwrap();
    let second = build(&b.builder, &request).await.0.unwrap();
    assert!(!first.cached && !second.cached);
    assert_eq!(first.key, second.key);
    assert_eq!(first.outputs, second.outputs, "same digests from two cold builds");
}

#[tokio::test]
async fn a_failing_build_reports_its_log_tail_and_caches_nothing() {
    let _serial = COUNTING.lock().await;
    let site = site().await;
    let mut request = ipxe("#!ipxe\necho warning\n");
    if let BuildRequest::Ipxe { options, .. } = &mut request {
        options.insert("FIXTURE_WARNING".into(), true);
    }
    let (result, lines) = build(&site.builder, &request).await;
    let err = result.unwrap_err();
    assert!(matches!(err, BuildError::Failed(_)), "{err:?}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("all warnings being treated as errors"), "{err}");
    assert!(
        lines.iter().any(|l| l.stream == LogStream::Stderr && l.text.contains("FIXTURE_WARNING"))
    );
    assert!(is_empty_dir(&site.work));
    // Failures are not cached: the same request runs again (and fails again).
    assert!(matches!(build(&site.builder, &request).await.0, Err(BuildError::Failed(_))));
}

#[tokio::test]
async fn bad_input_is_refused_before_running_with_what_is_valid() {
    let _serial = COUNTING.lock().await;
    let site = site().await;
    let missing = BuildRequest::Ipxe {
        source: "/nonexistent/ipxe".into(),
        targets: vec!["bin/undionly.kpxe".into()],
        embed: None,
        trust: Vec::new(),
        certs: Vec::new(),
        options: BTreeMap::new(),
        no_werror: false,
    };
    let err = build(&site.builder, &missing).await.0.unwrap_err();
    assert!(matches!(err, BuildError::Invalid(_)), "{err:?}");
    assert!(err.to_string().contains("no iPXE source tree at /nonexistent/ipxe"), "{err}");
    let bad_target = BuildRequest::Grub {
        target: "sparc64-ieee1275".into(),
        config: Some("echo\n".into()),
        chain_ipxe: false,
    };
    let err = build(&site.builder, &bad_target).await.0.unwrap_err().to_string();
    assert!(err.contains("valid") && err.contains("x86_64-efi"), "{err}");
    let not_grub = BuildRequest::Grub {
        target: "x86_64-efi".into(),
        config: Some("#!ipxe\n".into()),
        chain_ipxe: false,
    };
    assert!(
        build(&site.builder, &not_grub).await.0.unwrap_err().to_string().contains("iPXE script")
    );
    assert_eq!(site.store.list().await.unwrap(), Vec::new(), "nothing stored");
}

#[tokio::test]
async fn grub_images_build_into_the_store_and_hit_the_cache() {
    let _serial = COUNTING.lock().await;
    let site = site().await;
    for (target, file) in [
        ("x86_64-efi", "grubx64.efi"),
        ("i386-pc-pxe", "core.0"),
        ("i386-pc-eltorito", "eltorito.img"),
    ] {
        let request = BuildRequest::Grub {
            target: target.into(),
            config: Some(format!("echo {target}\n")),
            chain_ipxe: false,
        };
        let first = build(&site.builder, &request).await.0.unwrap();
        assert_eq!(first.outputs[0].file, file);
        assert!(first.tools["grub-mkimage"].contains("GRUB"), "{:?}", first.tools);
        assert_eq!(first.recipe, "grub");
        let second = build(&site.builder, &request).await.0.unwrap();
        assert!(second.cached && second.outputs == first.outputs);
    }
}

#[tokio::test]
async fn syslinux_files_are_collected_with_package_versions() {
    let _serial = COUNTING.lock().await;
    let site = site().await;
    let manifest = build(&site.builder, &BuildRequest::Syslinux {}).await.0.unwrap();
    let files: Vec<&str> = manifest.outputs.iter().map(|o| o.file.as_str()).collect();
    assert_eq!(files, ["isolinux.bin", "isohdpfx.bin", "ldlinux.c32", "pxelinux.0"]);
    assert!(manifest.tools.contains_key("isolinux"), "{:?}", manifest.tools);
    assert!(build(&site.builder, &BuildRequest::Syslinux {}).await.0.unwrap().cached);
}

/// The fixture tree as a tar.gz, the way a user would upload an iPXE release tarball.
fn fixture_tarball() -> Vec<u8> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(encoder);
    tar.append_dir_all("ipxe-1.0/src", Path::new(&fixture()).join("src")).unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

#[tokio::test]
async fn a_tarball_in_the_store_builds_like_the_same_tree_on_disk() {
    let _serial = COUNTING.lock().await;
    let site = site().await;
    let tarball = fixture_tarball();
    let info = site.store.put(Box::pin(std::io::Cursor::new(tarball)), None).await.unwrap();
    let from_disk = build(&site.builder, &ipxe("#!ipxe\necho tarball\n")).await.0.unwrap();
    let mut request = ipxe("#!ipxe\necho tarball\n");
    if let BuildRequest::Ipxe { source, .. } = &mut request {
        *source = format!("sha256:{}", info.digest.hex());
    }
    let (from_tarball, lines) = build(&site.builder, &request).await;
    let from_tarball = from_tarball.unwrap();
    // Same tree, same key: the tarball request is answered by the build from disk.
    assert_eq!(from_tarball.key, from_disk.key);
    assert!(from_tarball.cached, "{lines:?}");
    assert!(is_empty_dir(&site.work), "the staged tree is removed");

    // A tarball that is not in the store, and one that is not a tarball, are refused.
    if let BuildRequest::Ipxe { source, .. } = &mut request {
        *source = format!("sha256:{}", ctpf_common::Sha256Digest::of(b"absent").hex());
    }
    let err = build(&site.builder, &request).await.0.unwrap_err().to_string();
    assert!(err.contains("not in the artifact store"), "{err}");
}

#[tokio::test]
async fn a_tarball_entry_that_climbs_out_is_refused_and_writes_nothing() {
    let _serial = COUNTING.lock().await;
    let site = site().await;
    let mut header = tar::Header::new_old();
    let name = b"../escaped-by-tarball";
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_size(4);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut tar = tar::Builder::new(Vec::new());
    tar.append(&header, &b"evil"[..]).unwrap();
    let bytes = tar.into_inner().unwrap();
    let info = site.store.put(Box::pin(std::io::Cursor::new(bytes)), None).await.unwrap();
    let mut request = ipxe("#!ipxe\n");
    if let BuildRequest::Ipxe { source, .. } = &mut request {
        *source = format!("sha256:{}", info.digest.hex());
    }
    let err = build(&site.builder, &request).await.0.unwrap_err();
    assert!(matches!(err, BuildError::Invalid(_)), "{err:?}");
    assert!(err.to_string().contains("outside"), "{err}");
    assert!(!site.work.join("escaped-by-tarball").exists());
    assert!(is_empty_dir(&site.work));
}

fn git(dir: &Path, args: &[&str]) {
    let status = std::process::Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t.invalid",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

#[tokio::test]
async fn a_git_repository_is_checked_out_at_a_revision() {
    let _serial = COUNTING.lock().await;
    let site = site().await;
    let repo = tempfile::tempdir().unwrap();
    let copy = std::process::Command::new("cp")
        .args(["-r", &format!("{}/src", fixture()), repo.path().to_str().unwrap()])
        .status()
        .unwrap();
    assert!(copy.success());
    git(repo.path(), &["init", "-q"]);
    git(repo.path(), &["add", "."]);
    git(repo.path(), &["commit", "-qm", "fixture"]);
    git(repo.path(), &["tag", "v1"]);
    let url = format!("file://{}", repo.path().display());
    let mut request = ipxe("#!ipxe\necho git\n");
    if let BuildRequest::Ipxe { source, .. } = &mut request {
        *source = format!("{url}#v1");
    }
    let (result, lines) = build(&site.builder, &request).await;
    let from_git = result.unwrap_or_else(|e| panic!("{e}\n{lines:?}"));
    assert!(!from_git.cached);
    assert_eq!(from_git.inputs["source_location"], format!("{url}#v1"));
    // The same tree on disk has the same key: .git is not part of the source digest.
    let from_disk = build(&site.builder, &ipxe("#!ipxe\necho git\n")).await.0.unwrap();
    assert!(from_disk.cached && from_disk.key == from_git.key);
    // A revision that does not exist fails with git's own words.
    if let BuildRequest::Ipxe { source, .. } = &mut request {
        *source = format!("{url}#no-such-tag");
    }
    let err = build(&site.builder, &request).await.0.unwrap_err().to_string();
    assert!(err.contains("git fetch failed"), "{err}");
    assert!(is_empty_dir(&site.work));
}
