//! Our archives read back by GNU cpio (Debian package `cpio`), and a real discovery image built
//! around Debian's `busybox-static`. Both tools are required: a missing one fails the test with
//! the package to install, rather than skipping silently.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ctpf_builders::{
    ArchivePath, DiscoveryInputs, HostEncoding, InitramfsEntry, InitramfsSpec, build,
    discovery_spec, initramfs::DISCOVERY_APPLETS,
};

const BUSYBOX: &str = "/bin/busybox";

fn require_cpio() {
    let found = Command::new("cpio")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        found,
        "GNU `cpio` is not installed; these interop tests need it: apt-get install -y cpio"
    );
}

fn require_busybox() -> PathBuf {
    assert!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} is missing; this test needs Debian's static busybox: \
         apt-get install -y busybox-static"
    );
    PathBuf::from(BUSYBOX)
}

fn path(text: &str) -> ArchivePath {
    ArchivePath::new(text).unwrap()
}

fn gunzip(image: &[u8]) -> Vec<u8> {
    let mut cpio = Vec::new();
    flate2::read::GzDecoder::new(image).read_to_end(&mut cpio).unwrap();
    cpio
}

/// Runs `cpio ARGS` in `dir` with `archive` on stdin; returns stdout, panics with stderr.
fn run_cpio(dir: &Path, args: &[&str], archive: &[u8]) -> String {
    let mut child = Command::new("cpio")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(archive).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "cpio {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn extract(image: &[u8]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    run_cpio(root.path(), &["-idm", "--no-absolute-filenames", "--quiet"], &gunzip(image));
    root
}

fn mode_of(file: &Path) -> u32 {
    std::fs::symlink_metadata(file).unwrap().permissions().mode() & 0o7777
}

#[test]
fn gnu_cpio_extracts_contents_modes_and_symlinks() {
    require_cpio();
    let host = tempfile::tempdir().unwrap();
    let host_file = host.path().join("payload");
    // Not a multiple of 4, so data padding is exercised.
    let payload: Vec<u8> = (0..10_007u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&host_file, &payload).unwrap();

    let spec = InitramfsSpec {
        entries: vec![
            InitramfsEntry::HostFile {
                path: path("opt/tool/payload"),
                source: host_file,
                encoding: HostEncoding::Plain,
                mode: 0o750,
            },
            InitramfsEntry::Bytes {
                path: path("etc/hostname"),
                contents: b"discovery\n".to_vec(),
                mode: 0o640,
            },
            InitramfsEntry::Bytes { path: path("empty"), contents: Vec::new(), mode: 0o600 },
            InitramfsEntry::Symlink {
                path: path("bin/payload"),
                target: "../opt/tool/payload".to_owned(),
            },
            InitramfsEntry::Dir { path: path("var/lib/x"), mode: 0o711 },
        ],
    };
    let mut image = Vec::new();
    build(&spec, 1_234_567_890, &mut image).unwrap();
    let root = extract(&image);
    let root = root.path();

    assert_eq!(std::fs::read(root.join("opt/tool/payload")).unwrap(), payload);
    assert_eq!(mode_of(&root.join("opt/tool/payload")), 0o750);
    assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), b"discovery\n");
    assert_eq!(mode_of(&root.join("etc/hostname")), 0o640);
    assert_eq!(std::fs::read(root.join("empty")).unwrap(), b"");
    assert_eq!(mode_of(&root.join("empty")), 0o600);
    assert_eq!(
        std::fs::read_link(root.join("bin/payload")).unwrap(),
        Path::new("../opt/tool/payload")
    );
    assert_eq!(std::fs::read(root.join("bin/payload")).unwrap(), payload);
    assert_eq!(mode_of(&root.join("var/lib/x")), 0o711);
    assert!(root.join("var/lib").is_dir(), "implicit parent missing");
    let mtime = std::fs::metadata(root.join("etc/hostname"))
        .unwrap()
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(mtime, 1_234_567_890, "cpio -m restores the fixed mtime");
}

#[test]
fn gnu_cpio_lists_device_nodes_and_implicit_directories_in_order() {
    require_cpio();
    let spec = InitramfsSpec {
        entries: vec![
            InitramfsEntry::CharDevice {
                path: path("dev/console"),
                mode: 0o600,
                major: 5,
                minor: 1,
            },
            InitramfsEntry::Bytes { path: path("a/b/c"), contents: b"c".to_vec(), mode: 0o644 },
        ],
    };
    let mut image = Vec::new();
    build(&spec, 0, &mut image).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let names = run_cpio(scratch.path(), &["-t", "--quiet"], &gunzip(&image));
    assert_eq!(names, "a\na/b\na/b/c\ndev\ndev/console\n");
    // Listing only: creating a device node would need root.
    let verbose = run_cpio(scratch.path(), &["-tv", "--quiet"], &gunzip(&image));
    let console = verbose.lines().find(|line| line.ends_with("dev/console")).unwrap();
    assert!(console.starts_with("crw-------"), "{console}");
    assert!(console.contains("5,"), "{console}");
}

#[test]
fn discovery_image_unpacks_modules_in_load_order() {
    require_cpio();
    let host = tempfile::tempdir().unwrap();
    // Stand-in modules: the builder only unpacks and places them.
    let module = |name: &str| format!("\x7fELF fake module {name}").into_bytes();
    let plain = host.path().join("failover.ko");
    std::fs::write(&plain, module("failover")).unwrap();
    let xz = host.path().join("virtio_net.ko.xz");
    let mut xz_bytes = Vec::new();
    lzma_rs::xz_compress(&mut &module("virtio_net")[..], &mut xz_bytes).unwrap();
    std::fs::write(&xz, xz_bytes).unwrap();
    let gz = host.path().join("e1000.ko.gz");
    let mut gz_writer = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz_writer.write_all(&module("e1000")).unwrap();
    std::fs::write(&gz, gz_writer.finish().unwrap()).unwrap();
    let fake_busybox = host.path().join("busybox");
    std::fs::write(&fake_busybox, b"not really busybox").unwrap();

    let inputs = DiscoveryInputs {
        busybox: fake_busybox,
        kernel_modules: vec![plain, xz, gz],
        init_script: b"#!/bin/sh\nexec sh\n".to_vec(),
        agent: None,
        extra_files: Vec::new(),
    };
    let mut image = Vec::new();
    build(&discovery_spec(&inputs).unwrap(), 0, &mut image).unwrap();
    let root = extract(&image);
    let root = root.path();

    for name in ["failover", "virtio_net", "e1000"] {
        assert_eq!(
            std::fs::read(root.join(format!("lib/modules/{name}.ko"))).unwrap(),
            module(name),
            "{name}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(root.join("lib/modules/load-order")).unwrap(),
        "failover.ko\nvirtio_net.ko\ne1000.ko\n"
    );
    assert_eq!(std::fs::read(root.join("init")).unwrap(), inputs.init_script);
    assert_eq!(mode_of(&root.join("init")), 0o755);
    assert_eq!(mode_of(&root.join("tmp")), 0o1777);
}

#[test]
fn discovery_image_with_real_busybox_lists_applets_and_runs() {
    require_cpio();
    let busybox = require_busybox();
    let inputs = DiscoveryInputs {
        busybox: busybox.clone(),
        kernel_modules: Vec::new(),
        init_script: b"#!/bin/sh\necho discovery\n".to_vec(),
        agent: None,
        extra_files: Vec::new(),
    };
    let spec = discovery_spec(&inputs).unwrap();
    let mut first = Vec::new();
    let mut second = Vec::new();
    let built = build(&spec, 0, &mut first).unwrap();
    build(&spec, 0, &mut second).unwrap();
    assert!(first == second, "two builds of the same spec differ");
    assert!(built.cpio_size > std::fs::metadata(&busybox).unwrap().len());

    let scratch = tempfile::tempdir().unwrap();
    let listing = run_cpio(scratch.path(), &["-t", "--quiet"], &gunzip(&first));
    let names: Vec<&str> = listing.lines().collect();
    for expected in ["bin/busybox", "init", "dev/console", "lib/modules/load-order"] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }
    for applet in DISCOVERY_APPLETS {
        let link = format!("bin/{applet}");
        assert!(names.contains(&link.as_str()), "{link} not in {names:?}");
    }

    // The applet symlinks must actually dispatch: busybox picks the applet from argv[0].
    let root = extract(&first);
    let echoed = Command::new(root.path().join("bin/echo")).arg("applet works").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&echoed.stdout), "applet works\n");
    let shell =
        Command::new(root.path().join("bin/sh")).arg(root.path().join("init")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&shell.stdout), "discovery\n");
}
