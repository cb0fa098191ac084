//! `ctpf flash` as a user runs it, on real files and real loop devices (needs root, util-linux,
//! fdisk and e2fsprogs; `.ci/run` installs them): a flash verifies and leaves exactly the
//! image; a device with a mounted partition, an image larger than the device, a missing image
//! and a missing confirmation are refused with a clear message and nothing written.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use ctpf_e2e::{CtpfProcess, LoopDevice, ctpf_cli, run_checked};

/// Deterministic bytes that do not compress or repeat at block boundaries (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn flash(args: &[&str]) -> Output {
    let mut all = vec!["flash"];
    all.extend_from_slice(args);
    ctpf_cli(&all, &[]).unwrap()
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

fn succeeded(output: &Output) -> String {
    assert!(output.status.success(), "ctpf flash failed:\n{}", text(output));
    text(output)
}

fn failed(output: &Output) -> String {
    assert!(!output.status.success(), "ctpf flash succeeded:\n{}", text(output));
    text(output)
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A file of `len` bytes of `fill`, returned with its path.
fn file(dir: &Path, name: &str, len: usize, fill: u8) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    let bytes = vec![fill; len];
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

#[test]
fn flashing_a_regular_file_verifies_and_leaves_exactly_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.img");
    let data = noise(5 << 20 | 123, 1);
    std::fs::write(&image, &data).unwrap();
    // A longer file: it ends up truncated to the image.
    let (target, _) = file(dir.path(), "target.img", 8 << 20, 0xee);
    let out = succeeded(&flash(&[s(&image), s(&target), "--yes"]));
    assert!(out.contains("verified in"), "{out}");
    assert!(out.contains("sha256:"), "{out}");
    assert!(std::fs::read(&target).unwrap() == data, "the file is not the image");
}

#[test]
fn flashing_a_loop_device_verifies_and_the_backing_file_holds_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.img");
    // Not a multiple of 512: the last sector is padded with zeros.
    let data = noise(9 << 20 | 777, 2);
    std::fs::write(&image, &data).unwrap();
    let (backing, before) = file(dir.path(), "disk.img", 16 << 20, 0xaa);
    let device = LoopDevice::attach(&backing, &[]).unwrap();
    let output = flash(&["--json", s(&image), s(device.path()), "--yes"]);
    succeeded(&output);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["bytes"], data.len());
    assert_eq!(report["device"], s(device.path()));
    let after = std::fs::read(&backing).unwrap();
    assert!(after[..data.len()] == data[..], "the device does not hold the image");
    let sector_end = data.len().next_multiple_of(512);
    assert!(after[data.len()..sector_end].iter().all(|b| *b == 0), "padding is zeros");
    assert!(after[sector_end..] == before[sector_end..], "bytes past the image changed");
}

/// A mounted filesystem, unmounted on drop (before the loop device under it is detached:
/// declare it after the [`LoopDevice`]).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if !Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success()) {
            eprintln!("could not unmount {}", self.0.display());
        }
    }
}

#[test]
fn a_device_with_a_mounted_partition_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.img");
    std::fs::write(&image, noise(1 << 20, 3)).unwrap();
    let (backing, _) = file(dir.path(), "disk.img", 32 << 20, 0);
    let device = LoopDevice::attach(&backing, &["--partscan"]).unwrap();
    let mut sfdisk = Command::new("sfdisk");
    sfdisk.arg("--quiet").arg(device.path()).stdin(std::process::Stdio::piped());
    let mut child = sfdisk.spawn().expect("sfdisk (apt-get install fdisk)");
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        b"label: dos\nstart=2048, type=83\n",
    )
    .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    let partition = device.partition(1).unwrap();
    // ext4, not FAT: the kernels this runs on may lack vfat, and the rule is the same for any
    // filesystem. Read-only, so the filesystem itself writes nothing the check below would see.
    run_checked(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&partition)).unwrap();
    let mount_point = dir.path().join("mounted stick");
    std::fs::create_dir(&mount_point).unwrap();
    run_checked(Command::new("mount").args(["-o", "ro"]).arg(&partition).arg(&mount_point))
        .unwrap();
    let _mounted = Mounted(mount_point.clone());
    let before = std::fs::read(&backing).unwrap();

    for target in [device.path(), partition.as_path()] {
        // --force lifts only the removable-disk rule, never this one.
        let out = failed(&flash(&[s(&image), s(target), "--yes", "--force"]));
        assert!(out.contains("mounted"), "{out}");
        assert!(out.contains(s(&mount_point)), "the message names the mount point: {out}");
        assert!(out.contains("nothing was written"), "{out}");
    }
    assert!(std::fs::read(&backing).unwrap() == before, "the device was written to");
}

#[test]
fn without_yes_and_without_a_terminal_it_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.img");
    std::fs::write(&image, noise(4096, 4)).unwrap();
    let (backing, before) = file(dir.path(), "disk.img", 1 << 20, 0x55);
    let device = LoopDevice::attach(&backing, &[]).unwrap();
    // ctpf_cli gives the child /dev/null as stdin.
    let out = failed(&flash(&[s(&image), s(device.path())]));
    assert!(out.contains("stdin is not a terminal"), "{out}");
    assert!(out.contains("--yes"), "{out}");
    assert!(std::fs::read(&backing).unwrap() == before, "the device was written to");
}

#[test]
fn an_image_larger_than_the_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.img");
    std::fs::write(&image, noise((2 << 20) + 1, 5)).unwrap();
    let (backing, before) = file(dir.path(), "disk.img", 2 << 20, 0x11);
    let device = LoopDevice::attach(&backing, &[]).unwrap();
    let out = failed(&flash(&[s(&image), s(device.path()), "--yes"]));
    assert!(out.contains(&format!("is larger than {}", s(device.path()))), "{out}");
    assert!(out.contains("nothing was written"), "{out}");
    assert!(std::fs::read(&backing).unwrap() == before, "the device was written to");
}

#[test]
fn a_missing_image_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("no-such.img");
    let target = dir.path().join("target.img");
    let out = failed(&flash(&[s(&image), s(&target), "--yes"]));
    assert!(out.contains(&format!("cannot read the image {}", s(&image))), "{out}");
    assert!(out.contains("No such file or directory"), "{out}");
    assert!(!target.exists(), "the target was created");
}

#[test]
fn an_image_from_the_manager_is_downloaded_and_flashed() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let up = CtpfProcess::start(
        &["up", "--data-dir", s(&data_dir), "--api", "http://127.0.0.1:0"],
        &[],
        dir.path().join("up.log"),
        "listening on",
    )
    .unwrap();
    let token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap();
    let env = [("CTPF_API", up.api()), ("CTPF_TOKEN", token.trim())];
    let image = dir.path().join("stick.img");
    let data = noise(3 << 20 | 5, 6);
    std::fs::write(&image, &data).unwrap();
    let pushed = ctpf_cli(&["artifacts", "push", s(&image), "--name", "stick.img"], &env).unwrap();
    succeeded(&pushed);
    let target = dir.path().join("out.img");
    let out = ctpf_cli(&["flash", "--image-name", "stick.img", s(&target), "--yes"], &env).unwrap();
    let out = succeeded(&out);
    assert!(out.contains("downloaded stick.img"), "{out}");
    assert!(std::fs::read(&target).unwrap() == data, "the file is not the artifact");
    let missing = ctpf_cli(&["flash", "--image-name", "nope.img", s(&target), "--yes"], &env);
    let out = failed(&missing.unwrap());
    assert!(out.contains("nope.img"), "{out}");
}
