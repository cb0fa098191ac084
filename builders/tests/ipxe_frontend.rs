//! The iPXE make frontend on the fixture project in `tests/fixtures/ipxe-like` (a make project
//! that mimics iPXE's targets and variables and really embeds the script), and on a real
//! iPXE tree when `CTPF_IPXE_SRC` points at one.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ctpf_builders::ipxe::{
    self, IpxeBuildOutput, IpxeBuildRequest, IpxeError, IpxePlan, IpxeTarget,
};
use ctpf_builders::process::LogLine;
use tokio_util::sync::CancellationToken;

const SCRIPT: &str = "#!ipxe\ndhcp\nchain http://10.0.0.1:8080/boot.ipxe\n";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ipxe-like")
}

fn request(targets: Vec<IpxeTarget>) -> IpxeBuildRequest {
    let mut request = IpxeBuildRequest::new(fixture(), targets);
    request.embed_script = Some(SCRIPT.to_owned());
    request.source_date_epoch = 1_700_000_000;
    request.jobs = 2;
    request.timeout = Duration::from_secs(60);
    request
}

async fn build_in(
    dir: &Path,
    request: IpxeBuildRequest,
) -> (Result<IpxeBuildOutput, IpxeError>, Vec<LogLine>) {
    let mut lines = Vec::new();
    let result = ipxe::build(request, dir, CancellationToken::new(), |line| lines.push(line)).await;
    (result, lines)
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[tokio::test]
async fn the_fixture_builds_with_the_script_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let mut request = request(vec![IpxeTarget::X86_64Efi, IpxeTarget::UndionlyKpxe]);
    request.options.insert("DOWNLOAD_PROTO_HTTPS".into(), true);
    request.options.insert("NET_PROTO_IPV6".into(), false);
    let (result, lines) = build_in(dir.path(), request).await;
    let output = result.unwrap();

    let targets: Vec<IpxeTarget> = output.files.iter().map(|f| f.target).collect();
    assert_eq!(targets, [IpxeTarget::UndionlyKpxe, IpxeTarget::X86_64Efi]);
    for file in &output.files {
        assert!(
            file.path.starts_with(dir.path().canonicalize().unwrap()),
            "{}",
            file.path.display()
        );
        let bytes = std::fs::read(&file.path).unwrap();
        assert_eq!(file.size, bytes.len() as u64);
        assert_eq!(file.digest, ctpf_common::Sha256Digest::of(&bytes));
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains(SCRIPT), "script embedded in {}:\n{text}", file.target);
        assert!(text.contains("SOURCE_DATE_EPOCH=1700000000"), "{text}");
        assert!(text.contains("#define DOWNLOAD_PROTO_HTTPS\n"), "{text}");
        assert!(text.contains("#undef NET_PROTO_IPV6\n"), "{text}");
    }
    assert!(lines.iter().any(|l| l.text.contains("[BUILD] bin/undionly.kpxe")), "{lines:?}");
    assert!(!fixture().join("src/bin").exists(), "the fixture tree itself is never built in");
    assert!(!fixture().join("src/config/local/general.h").exists());
}

#[tokio::test]
async fn two_cold_builds_give_identical_bytes() {
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let targets = vec![IpxeTarget::UndionlyKpxe, IpxeTarget::IpxeLkrn, IpxeTarget::X86_64Efi];
    let a = build_in(first.path(), request(targets.clone())).await.0.unwrap();
    // The tree's `src` dir itself is as good as its parent.
    let mut from_src = request(targets);
    from_src.source = fixture().join("src");
    let b = build_in(second.path(), from_src).await.0.unwrap();
    assert_eq!(a.key, b.key);
    assert_eq!(a.files.len(), 3);
    for (x, y) in a.files.iter().zip(&b.files) {
        assert_eq!(x.digest, y.digest, "{}", x.target);
        assert_eq!(std::fs::read(&x.path).unwrap(), std::fs::read(&y.path).unwrap());
    }
}

#[tokio::test]
async fn the_key_and_output_follow_the_script() {
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = build_in(first.path(), request(vec![IpxeTarget::UndionlyKpxe])).await.0.unwrap();
    let mut other = request(vec![IpxeTarget::UndionlyKpxe]);
    other.embed_script = Some("#!ipxe\nshell\n".to_owned());
    let b = build_in(second.path(), other).await.0.unwrap();
    assert_ne!(a.key, b.key);
    assert_ne!(a.files[0].digest, b.files[0].digest);
}

#[tokio::test]
async fn trusted_certificates_are_passed_to_make() {
    let dir = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    // A comma in a file name must not split make's TRUST= list.
    let ca = certs.path().join("my,ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nfixture-ca\n-----END CERTIFICATE-----\n")
        .unwrap();
    let mut request = request(vec![IpxeTarget::UndionlyKpxe]);
    request.trust_certs = Some(vec![ca]);
    let output = build_in(dir.path(), request).await.0.unwrap();
    let text = std::fs::read_to_string(&output.files[0].path).unwrap();
    assert!(
        text.contains("--- trusted certificates\n-----BEGIN CERTIFICATE-----\nfixture-ca\n"),
        "{text}"
    );
}

#[tokio::test]
async fn a_make_failure_reports_its_log_tail() {
    // The fixture treats the FIXTURE_WARNING option like a compiler warning under -Werror:
    // valid input for the frontend, a failure of make.
    let dir = tempfile::tempdir().unwrap();
    let mut failing = request(vec![IpxeTarget::UndionlyKpxe]);
    failing.options.insert("FIXTURE_WARNING".into(), true);
    let (result, lines) = build_in(dir.path(), failing.clone()).await;
    let err = result.unwrap_err();
    let IpxeError::Make { end, tail } = &err else { panic!("expected a make failure, got {err}") };
    assert_eq!(end.to_string(), "failed with exit code 2");
    assert!(tail.contains("all warnings being treated as errors"), "{tail}");
    assert!(tail.contains("make: *** [Makefile:"), "make's own message: {tail}");
    assert!(err.to_string().contains("set NO_WERROR=1 to continue"), "{err}");
    assert!(!lines.is_empty());

    let dir = tempfile::tempdir().unwrap();
    failing.no_werror = true;
    let output = build_in(dir.path(), failing).await.0.unwrap();
    let text = std::fs::read_to_string(&output.files[0].path).unwrap();
    assert!(text.contains("NO_WERROR=1"), "{text}");
}

#[tokio::test]
async fn the_fixture_makefile_refuses_a_bad_embed_itself() {
    // The frontend never passes a non-iPXE script, so check the fixture's own guard directly.
    use ctpf_builders::process::{BuildCommand, BuildEnd, run_build};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.txt"), "echo hello\n").unwrap();
    for embed in ["bad.txt", "missing.ipxe"] {
        let src = fixture().join("src");
        let args = [
            "-C".to_owned(),
            src.display().to_string(),
            "check-embed".to_owned(),
            format!("EMBED={}", dir.path().join(embed).display()),
        ];
        let spec = BuildCommand::new("make", args, dir.path(), Duration::from_secs(30));
        let mut lines = Vec::new();
        let outcome =
            run_build(spec, CancellationToken::new(), |l| lines.push(l.text)).await.unwrap();
        assert_eq!(outcome.end, BuildEnd::Failed { code: 2 }, "{lines:?}");
        let expected = if embed == "bad.txt" { "is not an iPXE script" } else { "not found" };
        assert!(lines.iter().any(|l| l.contains(expected)), "{embed}: {lines:?}");
    }
}

#[tokio::test]
async fn bad_requests_are_rejected_before_running() {
    let dir = tempfile::tempdir().unwrap();

    let err = "bin/ipxe.usb".parse::<IpxeTarget>().unwrap_err().to_string();
    assert!(err.contains("bin/ipxe.usb"), "{err}");
    for valid in
        ["bin/undionly.kpxe", "bin/ipxe.lkrn", "bin-x86_64-efi/ipxe.efi", "bin-arm64-efi/ipxe.efi"]
    {
        assert!(err.contains(valid), "{err}");
    }

    let mut not_ipxe = request(vec![IpxeTarget::UndionlyKpxe]);
    not_ipxe.embed_script = Some("#!/bin/sh\necho hi\n".to_owned());
    let err = build_in(dir.path(), not_ipxe).await.0.unwrap_err().to_string();
    assert!(err.contains("must start with #!ipxe") && err.contains("#!/bin/sh"), "{err}");

    let missing = dir.path().join("no-such-tree");
    let mut no_source = request(vec![IpxeTarget::UndionlyKpxe]);
    no_source.source = missing.clone();
    let err = build_in(dir.path(), no_source).await.0.unwrap_err().to_string();
    assert!(err.contains(missing.to_str().unwrap()) && err.contains("Makefile"), "{err}");

    let err = build_in(dir.path(), request(vec![])).await.0.unwrap_err().to_string();
    assert!(err.contains("no targets") && err.contains("bin/undionly.kpxe"), "{err}");

    let mut bad_option = request(vec![IpxeTarget::UndionlyKpxe]);
    bad_option.options.insert("download_proto_https".into(), true);
    let err = build_in(dir.path(), bad_option).await.0.unwrap_err().to_string();
    assert!(err.contains("download_proto_https") && err.contains("DOWNLOAD_PROTO_HTTPS"), "{err}");

    let mut bad_cert = request(vec![IpxeTarget::UndionlyKpxe]);
    bad_cert.trust_certs = Some(vec![dir.path().join("ca.pem")]);
    let err = build_in(dir.path(), bad_cert).await.0.unwrap_err().to_string();
    assert!(err.contains("ca.pem"), "{err}");

    assert!(is_empty_dir(dir.path()), "nothing was prepared or run");
}

#[tokio::test]
async fn arm64_needs_the_cross_compiler() {
    let dir = tempfile::tempdir().unwrap();
    let result = IpxePlan::new(request(vec![IpxeTarget::Arm64Efi])).await;
    let native = std::env::consts::ARCH == "aarch64";
    let cross_installed = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join("aarch64-linux-gnu-gcc").is_file());
    if native || cross_installed {
        let output =
            result.unwrap().build(dir.path(), CancellationToken::new(), |_| {}).await.unwrap();
        let text = std::fs::read_to_string(&output.files[0].path).unwrap();
        let cross = if native { "CROSS= " } else { "CROSS=aarch64-linux-gnu- " };
        assert!(text.contains(cross), "{text}");
    } else {
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("aarch64-linux-gnu-gcc") && err.contains("gcc-aarch64-linux-gnu"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn cancel_stops_make_and_reports_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let plan = IpxePlan::new(request(vec![IpxeTarget::UndionlyKpxe])).await.unwrap();
    let cancel = CancellationToken::new();
    cancel.cancel();
    let err = plan.build(dir.path(), cancel, |_| {}).await.unwrap_err();
    assert!(matches!(err, IpxeError::Cancelled), "{err}");
}

#[tokio::test]
async fn a_build_dir_is_used_once() {
    let dir = tempfile::tempdir().unwrap();
    let plan = IpxePlan::new(request(vec![IpxeTarget::UndionlyKpxe])).await.unwrap();
    plan.build(dir.path(), CancellationToken::new(), |_| {}).await.unwrap();
    let err = plan.build(dir.path(), CancellationToken::new(), |_| {}).await.unwrap_err();
    assert!(matches!(err, IpxeError::BuildDirNotFresh { .. }), "{err}");
}

#[tokio::test]
async fn tool_versions_name_make_and_the_compilers() {
    let versions = ipxe::tool_versions(&[IpxeTarget::UndionlyKpxe]).await;
    let names: Vec<&str> = versions.0.keys().map(String::as_str).collect();
    // undionly.kpxe is x86 code: built natively on x86_64, cross-compiled elsewhere.
    let expected = match std::env::consts::ARCH {
        "x86_64" => ["gcc", "ld", "make"],
        _ => ["make", "x86_64-linux-gnu-gcc", "x86_64-linux-gnu-ld"],
    };
    assert_eq!(names, expected);
    assert!(versions.0["make"].starts_with("GNU Make"), "{versions:?}");
}

/// Runs only with `CTPF_IPXE_SRC=/path/to/ipxe` (a checkout or its `src`): the same frontend
/// on the real thing.
#[tokio::test]
async fn a_real_ipxe_tree_builds_undionly_with_an_embedded_script() {
    let Some(source) = std::env::var_os("CTPF_IPXE_SRC") else {
        println!("skipped: set CTPF_IPXE_SRC to an iPXE source tree to run this test");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut request = IpxeBuildRequest::new(PathBuf::from(source), vec![IpxeTarget::UndionlyKpxe]);
    request.embed_script = Some(SCRIPT.to_owned());
    request.options = BTreeMap::from([("DOWNLOAD_PROTO_HTTPS".to_owned(), true)]);
    request.no_werror = true;
    request.timeout = Duration::from_secs(60 * 60);
    let (result, lines) = build_in(dir.path(), request).await;
    let output = result.unwrap_or_else(|err| panic!("{err}\n({} log lines)", lines.len()));
    let file = &output.files[0];
    assert!(file.size > 0 && std::fs::metadata(&file.path).unwrap().len() == file.size);
    println!("built {} ({} bytes, {})", file.path.display(), file.size, file.digest);
}
