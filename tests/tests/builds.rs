//! Builds through `ctpf up` as a user runs them: `ctpf build` submits a job to the in-process
//! builder and streams its log, `ctpf builds list|show|logs` read them back, a second
//! identical request is answered from the cache, bad input is refused before anything runs.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::{Path, PathBuf};

use ctpf_e2e::{CtpfProcess, ctpf_cli};
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../builders/tests/fixtures/ipxe-like")
}

struct Up {
    _dir: tempfile::TempDir,
    data: PathBuf,
    process: CtpfProcess,
}

fn start_up() -> Up {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let process = CtpfProcess::start(
        &["up", "--data-dir", data.to_str().unwrap(), "--api", "http://127.0.0.1:0"],
        &[("SOURCE_DATE_EPOCH", "1700000000")],
        dir.path().join("up.log"),
        "listening on",
    )
    .unwrap();
    Up { _dir: dir, data, process }
}

impl Up {
    fn run(&self, args: &[&str]) -> std::process::Output {
        let token = std::fs::read_to_string(self.data.join("admin.token")).unwrap();
        ctpf_cli(args, &[("CTPF_API", self.process.api()), ("CTPF_TOKEN", token.trim())]).unwrap()
    }

    /// stdout of a command that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ctpf {args:?} failed: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.process.log_text()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// stdout and stderr of a command that must fail.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "ctpf {args:?} succeeded");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }
}

#[test]
fn ipxe_builds_stream_their_log_and_a_repeat_is_a_cache_hit() {
    let up = start_up();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("chain.ipxe");
    std::fs::write(&script, "#!ipxe\ndhcp\nchain http://192.0.2.1/boot.ipxe\n").unwrap();
    let source = fixture();
    let args = [
        "build",
        "ipxe",
        "--source",
        source.to_str().unwrap(),
        "--target",
        "bin/undionly.kpxe",
        "--target",
        "bin-x86_64-efi/ipxe.efi",
        "--embed",
        script.to_str().unwrap(),
        "--option",
        "DOWNLOAD_PROTO_HTTPS",
        "--name",
        "lab-ipxe",
    ];
    let first = up.ok(&args);
    // make's own output came through the bus, then the summary with the outputs.
    assert!(first.contains("[BUILD] bin/undionly.kpxe"), "{first}");
    assert!(first.contains("succeeded") && first.contains("undionly.kpxe"), "{first}");
    assert!(first.contains("(built,"), "{first}");

    let second = up.ok(&args);
    assert!(second.contains("cache hit"), "{second}");
    assert!(!second.contains("[BUILD]"), "a cache hit runs no make:\n{second}");

    // The same tree uploaded as a tarball: same key, so the cache answers.
    let tarball = dir.path().join("ipxe-src.tar.gz");
    let tar = std::process::Command::new("tar")
        .args(["czf", tarball.to_str().unwrap(), "-C", source.to_str().unwrap(), "src"])
        .status()
        .unwrap();
    assert!(tar.success());
    up.ok(&[
        "artifacts",
        "push",
        tarball.to_str().unwrap(),
        "--name",
        "ipxe-src",
        "--kind",
        "source",
    ]);
    let mut from_artifact = args.to_vec();
    from_artifact[3] = "artifact:ipxe-src";
    let third = up.ok(&from_artifact);
    assert!(third.contains("cache hit"), "{third}");

    let list: Value = serde_json::from_str(&up.ok(&["builds", "list", "--json"])).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3, "{list:?}");
    assert_eq!(list[0]["spec"]["request"]["source"].as_str().unwrap().len(), 71, "sha256:HEX");
    let list = &list[1..];
    // Newest first: the cache hit, with the same outputs as the build.
    assert_eq!(list[0]["manifest"]["cached"], true);
    assert_eq!(list[1]["manifest"]["cached"], false);
    assert_eq!(list[0]["manifest"]["outputs"], list[1]["manifest"]["outputs"]);
    assert_eq!(list[1]["manifest"]["recipe"], "ipxe");
    assert!(list[1]["manifest"]["tools"]["make"].as_str().unwrap().contains("Make"));

    // The log of the first build, read back after the fact.
    let id = list[1]["id"].as_str().unwrap();
    let log = up.ok(&["builds", "logs", id]);
    assert!(log.contains("[BUILD] bin-x86_64-efi/ipxe.efi"), "{log}");
    let shown = up.ok(&["builds", "show", id]);
    assert!(shown.contains("ipxe.efi") && shown.contains("tool make"), "{shown}");

    // Named outputs are artifacts; the download has the script embedded.
    let out = dir.path().join("undionly.kpxe");
    up.ok(&["artifacts", "pull", "lab-ipxe-undionly.kpxe", "-o", out.to_str().unwrap()]);
    let bytes = std::fs::read_to_string(&out).unwrap();
    assert!(bytes.contains("chain http://192.0.2.1/boot.ipxe"), "{bytes}");
}

#[test]
fn bad_builds_are_refused_or_fail_with_their_log_tail() {
    let up = start_up();
    // Refused by the API before a job exists, listing what is valid.
    let refused = up.fails(&["build", "grub", "--target", "sparc64-ieee1275"]);
    assert!(refused.contains("x86_64-efi") && refused.contains("status 400"), "{refused}");
    let dir = tempfile::tempdir().unwrap();
    let not_ipxe = dir.path().join("menu.txt");
    std::fs::write(&not_ipxe, "menu\n").unwrap();
    let source = fixture();
    let source = source.to_str().unwrap();
    let refused = up.fails(&[
        "build",
        "ipxe",
        "--source",
        source,
        "--target",
        "bin/undionly.kpxe",
        "--embed",
        not_ipxe.to_str().unwrap(),
    ]);
    assert!(refused.contains("#!ipxe"), "{refused}");
    // A source that is not there is found out by the builder: a failed build, not a retry.
    let missing =
        up.fails(&["build", "ipxe", "--source", "/nonexistent", "--target", "bin/ipxe.lkrn"]);
    assert!(missing.contains("no iPXE source tree at /nonexistent"), "{missing}");
    // make fails: the error carries the log tail.
    let failed = up.fails(&[
        "build",
        "ipxe",
        "--source",
        source,
        "--target",
        "bin/ipxe.lkrn",
        "--option",
        "FIXTURE_WARNING",
    ]);
    assert!(failed.contains("all warnings being treated as errors"), "{failed}");
    let list: Value = serde_json::from_str(&up.ok(&["builds", "list", "--json"])).unwrap();
    let statuses: Vec<&str> =
        list.as_array().unwrap().iter().map(|b| b["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["failed", "failed"], "{list}");
}

#[test]
fn grub_gets_the_managers_entry_config_by_default() {
    let up = start_up();
    let out = up.ok(&["build", "grub", "--target", "x86_64-efi", "--name", "lab"]);
    assert!(out.contains("grubx64.efi") && out.contains("succeeded"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("grubx64.efi");
    up.ok(&["artifacts", "pull", "lab-grubx64.efi", "-o", image.to_str().unwrap()]);
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(&bytes[..2], b"MZ");
    // The embedded entry config points at this manager's boot route.
    let api = up.process.api().trim_start_matches("http://").to_owned();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains(&format!("(http,{api})/boot/grub")), "entry config for {api} missing");

    // Sites that keep iPXE get GRUB images that only load it from ctpf.
    let out =
        up.ok(&["build", "grub", "--target", "x86_64-efi", "--chain-ipxe", "--name", "chain"]);
    assert!(out.contains("succeeded"), "{out}");
    up.ok(&["artifacts", "pull", "chain-grubx64.efi", "-o", image.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&std::fs::read(&image).unwrap()).into_owned();
    assert!(text.contains(&format!("chainloader '(http,{api})/ipxe.efi'")), "no chainloader");
    let bios = up.ok(&["build", "grub", "--target", "i386-pc-pxe", "--chain-ipxe"]);
    assert!(bios.contains("core.0") && bios.contains("succeeded"), "{bios}");
    let both = up.fails(&[
        "build",
        "grub",
        "--target",
        "x86_64-efi",
        "--chain-ipxe",
        "--config",
        "/etc/hostname",
    ]);
    assert!(both.contains("cannot be used with"), "{both}");
}

#[test]
fn a_running_build_is_cancelled_with_its_process_group() {
    let up = start_up();
    let source = fixture();
    let token = std::fs::read_to_string(up.data.join("admin.token")).unwrap();
    // `ctpf build` follows the build's log until it ends, as a user's terminal would.
    let follower = std::process::Command::new(ctpf_e2e::ctpf_binary().unwrap())
        .args(["build", "ipxe", "--source", source.to_str().unwrap()])
        .args(["--target", "bin/ipxe.lkrn", "--option", "FIXTURE_SLOW"])
        .env("CTPF_API", up.process.api())
        .env("CTPF_TOKEN", token.trim())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    // Wait until make is really sleeping inside the build.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let id = loop {
        assert!(std::time::Instant::now() < deadline, "the build never started");
        let list: Value = serde_json::from_str(&up.ok(&["builds", "list", "--json"])).unwrap();
        if let Some(build) = list.as_array().unwrap().first() {
            let id = build["id"].as_str().unwrap().to_owned();
            if up.ok(&["builds", "logs", &id]).contains("slow build, sleeping") {
                break id;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(sleeping_fixtures() > 0, "the fixture's sleep is not running");

    let said = up.ok(&["builds", "cancel", &id]);
    assert!(said.contains("cancel requested"), "{said}");
    let out = follower.wait_with_output().unwrap();
    let shown =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a cancelled build exits non-zero:\n{shown}");
    assert!(shown.contains("cancelled"), "{shown}");
    let job: Value = serde_json::from_str(&up.ok(&["builds", "show", &id, "--json"])).unwrap();
    assert_eq!(job["status"], "cancelled", "{job}");
    // The whole process group went with it: no orphaned sleep keeps running.
    assert_eq!(sleeping_fixtures(), 0, "the fixture's sleep outlived the cancel");

    // A finished build cannot be cancelled again; a malformed id is refused by the CLI.
    let again = up.fails(&["builds", "cancel", &id]);
    assert!(again.contains("already cancelled") && again.contains("409"), "{again}");
    let bad = up.fails(&["builds", "cancel", "../../etc"]);
    assert!(bad.contains("not a job id"), "{bad}");
}

/// How many processes run the fixture's slow-build sleep.
fn sleeping_fixtures() -> usize {
    let out = std::process::Command::new("pgrep").args(["-fx", "sleep 3217"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}
