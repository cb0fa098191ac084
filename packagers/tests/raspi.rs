//! The Raspberry Pi image, built from Debian's real firmware, kernel and device trees, is read
//! back by third-party tools: `sfdisk` sees one bootable FAT32 LBA partition at 2048,
//! `fsck.fat` passes it, mtools lists and copies the files, and two runs are identical.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod support;
use support::run;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use ctpf_packagers::{
    disk,
    iso9660::Source,
    media::{self, MediaConfig, RaspiFiles},
};

/// Byte offset of the partition, for mtools' `-i IMAGE@@OFFSET`.
const PART_OFFSET: u64 = disk::ALIGN_SECTORS * 512;

/// The unpacked Debian packages `.ci/run` puts in the target dir's test cache:
/// `raspi-firmware` (non-free-firmware) and the arm64 `linux-image-*` (its kernel and device
/// trees only). `CTPF_RASPI_FIRMWARE` and `CTPF_RASPI_LINUX` override them.
fn debian_trees() -> Option<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().unwrap();
    // .../target/debug/deps/raspi-HASH
    let cache = exe.ancestors().nth(3).unwrap().join("ctpf-test-cache");
    let dir = |var: &str, default: &str| {
        std::env::var_os(var).map_or_else(|| cache.join(default), PathBuf::from)
    };
    let firmware = dir("CTPF_RASPI_FIRMWARE", "raspi-firmware");
    let linux = dir("CTPF_RASPI_LINUX", "linux-arm64");
    if firmware.join(media::RASPI_FIRMWARE_DIR).is_dir() && linux.join("usr/lib").is_dir() {
        return Some((firmware, linux));
    }
    let reason = format!(
        "no unpacked raspi-firmware at {} or arm64 linux-image at {}; .ci/run prepares them",
        firmware.display(),
        linux.display()
    );
    // CI must have them: a skipped test there would hide a broken set-up step.
    assert!(std::env::var_os("CI").is_none(), "{reason}");
    eprintln!("skipped: {reason}");
    None
}

fn config() -> MediaConfig {
    MediaConfig {
        label: "CTPF".into(),
        kernel_words: vec!["ctpf.url=http://10.0.2.2:8080/".into(), "ctpf.token=mk_Pi-4".into()],
        timestamp: 1_700_000_000,
        serial: 0xC7F0_0006,
    }
}

/// A stand-in initramfs: the image's layout does not depend on what is inside (the discovery
/// initramfs is built for amd64 only so far).
fn initrd() -> Source {
    Source::Bytes(b"070701 stand-in initramfs".repeat(1000))
}

fn write_image(files: &RaspiFiles, out: &Path) -> u64 {
    let partition = media::raspi_partition(files, &config()).unwrap();
    disk::write_mbr_fat(out, &partition, config().serial).unwrap()
}

fn sha256(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path)).split_whitespace().next().unwrap().to_owned()
}

fn mcopy(image: &Path, from: &str, to: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(to);
    let source = format!("{}@@{PART_OFFSET}", image.display());
    run(Command::new("mcopy").args(["-i", &source, &format!("::/{from}")]).arg(to));
    std::fs::read(to).unwrap()
}

#[test]
fn the_pi_image_from_debian_files_passes_sfdisk_fsck_and_mtools_and_is_reproducible() {
    let Some((firmware_root, linux_root)) = debian_trees() else { return };
    let files = RaspiFiles::from_debian(&firmware_root, &linux_root, initrd()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (image, again) = (dir.path().join("pi.img"), dir.path().join("again.img"));
    let size = write_image(&files, &image);
    assert_eq!(size, std::fs::metadata(&image).unwrap().len());
    assert_eq!(size % (1024 * 1024), 0, "whole MiB");
    write_image(&files, &again);
    assert_eq!(sha256(&image), sha256(&again), "same inputs, same bytes");

    let table = run(Command::new("sfdisk").arg("-d").arg(&image));
    assert!(table.contains("label: dos") && table.contains("label-id: 0xc7f00006"), "{table}");
    let partitions: Vec<&str> = table.lines().filter(|l| l.contains("start=")).collect();
    assert_eq!(partitions.len(), 1, "{table}");
    let sectors = size / 512 - disk::ALIGN_SECTORS;
    let expected = format!("start=        2048, size={sectors:>12}, type=c, bootable");
    assert!(partitions[0].ends_with(&expected), "{table}");

    // The partition on its own, as the firmware finds it.
    let part = dir.path().join("part.img");
    run(Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", part.display()))
        .args(["bs=512", "skip=2048", &format!("count={sectors}"), "status=none"]));
    let fsck = run(Command::new("fsck.fat").args(["-n", "-v"]).arg(&part));
    assert!(fsck.contains("32 bit entries") && fsck.contains("2048 hidden sectors"), "{fsck}");

    let source = format!("{}@@{PART_OFFSET}", image.display());
    let listing = run(Command::new("mdir").args(["-i", &source, "-/", "-b", "::/"]));
    let listed: Vec<&str> = listing.lines().filter_map(|l| l.strip_prefix("::/")).collect();
    let mut expected: Vec<&str> = files.firmware.keys().map(String::as_str).collect();
    expected.extend(["cmdline.txt", "config.txt", "initrd.img", "vmlinuz"]);
    expected.sort_unstable();
    assert_eq!(listed, expected);
    for name in [
        "bootcode.bin",
        "start.elf",
        "start4.elf",
        "fixup4.dat",
        "bcm2711-rpi-4-b.dtb",
        "bcm2711-rpi-cm4-io.dtb",
        "bcm2837-rpi-3-b.dtb",
    ] {
        assert!(listed.contains(&name), "{name} missing:\n{listing}");
    }
    // Debian ships no overlays: they belong to Raspberry Pi's downstream kernel.
    assert!(!listing.contains("overlays"), "{listing}");
    let volume = run(Command::new("mdir").args(["-i", &source, "::/"]));
    assert!(volume.contains("Volume in drive : is CTPF_RPI"), "{volume}");
    // The Pi 3's boot ROM and the Pi 4's EEPROM loader look files up by their 8.3 names.
    let bytes = std::fs::read(&image).unwrap();
    for short in [b"BOOTCODEBIN", b"START4  ELF", b"FIXUP4  DAT", b"CONFIG  TXT"] {
        assert!(bytes.windows(11).any(|w| w == short), "{}", String::from_utf8_lossy(short));
    }

    let out = dir.path().join("copied");
    assert_eq!(mcopy(&image, "config.txt", &out), media::raspi_config_txt().as_bytes());
    let cmdline = mcopy(&image, "cmdline.txt", &out);
    assert_eq!(cmdline, media::raspi_cmdline_txt(&config()).as_bytes());
    assert_eq!(
        String::from_utf8(cmdline).unwrap(),
        "console=ttyS1,115200 console=tty1 ctpf.url=http://10.0.2.2:8080/ ctpf.token=mk_Pi-4\n"
    );
    let firmware = firmware_root.join(media::RASPI_FIRMWARE_DIR);
    assert_eq!(
        mcopy(&image, "start4.elf", &out),
        std::fs::read(firmware.join("start4.elf")).unwrap()
    );
    let kernel = mcopy(&image, "vmlinuz", &out);
    assert_eq!(&kernel[0x38..0x3C], b"ARM\x64", "an arm64 Image, as the firmware loads it");
    assert_eq!(kernel.len() as u64, files.kernel.len());
}

#[test]
fn overlays_next_to_the_device_trees_go_to_overlays() {
    // A tree laid out like Raspberry Pi's own firmware (trees, overlays and firmware together),
    // with stand-in contents.
    let tree = tempfile::tempdir().unwrap();
    let boot = tree.path();
    std::fs::create_dir(boot.join("overlays")).unwrap();
    for name in [
        "bootcode.bin",
        "start.elf",
        "fixup.dat",
        "start4.elf",
        "fixup4.dat",
        "bcm2712-rpi-5-b.dtb",
    ] {
        std::fs::write(boot.join(name), name).unwrap();
    }
    for name in ["disable-bt.dtbo", "overlay_map.dtb", "README"] {
        std::fs::write(boot.join("overlays").join(name), name).unwrap();
    }
    let files = RaspiFiles {
        kernel: Source::Bytes(b"MZ stand-in kernel".to_vec()),
        initrd: initrd(),
        firmware: media::collect_raspi_firmware(boot, boot).unwrap(),
    };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("pi.img");
    write_image(&files, &image);
    let source = format!("{}@@{PART_OFFSET}", image.display());
    let listing = run(Command::new("mdir").args(["-i", &source, "-/", "::/overlays"]));
    assert!(
        listing.contains("disable-bt.dtbo") && listing.contains("overlay_map.dtb"),
        "{listing}"
    );
    assert!(!listing.contains("README"), "{listing}");
    let out = dir.path().join("copied");
    assert_eq!(mcopy(&image, "overlays/disable-bt.dtbo", &out), b"disable-bt.dtbo");
}
