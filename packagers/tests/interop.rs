//! Third-party readers accept what the packagers write: xorriso reads the El Torito catalog
//! and the Rock Ridge tree, Linux mounts the ISO, `fsck.fat` passes the ESP, `sfdisk` reads
//! the hybrid MBR.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod support;
use support::run;

use std::{collections::BTreeMap, path::Path, process::Command};

use ctpf_packagers::{
    disk,
    fat::{self, FatKind, FatPlan, FatSpec},
    iso9660::{BiosBoot, IsoPlan, IsoSpec, Source},
};

const ISOLINUX_BIN: &str = "/usr/lib/ISOLINUX/isolinux.bin";
const ISOHDPFX: &str = "/usr/lib/ISOLINUX/isohdpfx.bin";
const LDLINUX: &str = "/usr/lib/syslinux/modules/bios/ldlinux.c32";

fn esp() -> Vec<u8> {
    let files: BTreeMap<String, Source> = [
        ("EFI/BOOT/BOOTX64.EFI", b"MZ pretend x64 loader".to_vec()),
        ("EFI/BOOT/BOOTAA64.EFI", b"MZ pretend arm64 loader".to_vec()),
    ]
    .into_iter()
    .map(|(p, b)| (p.to_owned(), Source::Bytes(b)))
    .collect();
    fat::build(&FatSpec {
        label: "CTPF_EFI".into(),
        volume_id: 0xC7F0_0001,
        timestamp: 1_700_000_000,
        kind: FatKind::Auto,
        size: None,
        hidden_sectors: 0,
        files,
    })
    .unwrap()
}

fn spec(dir: &Path) -> IsoSpec {
    let big = dir.join("big.bin");
    std::fs::write(&big, (0..3_000_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>()).unwrap();
    let mut files = BTreeMap::new();
    files.insert("isolinux/isolinux.bin".to_owned(), Source::file(ISOLINUX_BIN).unwrap());
    files.insert("isolinux/ldlinux.c32".to_owned(), Source::file(LDLINUX).unwrap());
    files.insert("isolinux/isolinux.cfg".to_owned(), Source::Bytes(b"DEFAULT x\n".to_vec()));
    files.insert("boot/efi.img".to_owned(), Source::Bytes(esp()));
    files.insert("boot/initrd.img".to_owned(), Source::file(&big).unwrap());
    files.insert("ctpf/Mixed Case Name.config".to_owned(), Source::Bytes(b"hello\n".to_vec()));
    files.insert("ctpf/empty".to_owned(), Source::Bytes(Vec::new()));
    IsoSpec {
        volume_id: "CTPF_TEST".into(),
        timestamp: 1_700_000_000,
        files,
        bios_boot: Some(BiosBoot {
            image: "isolinux/isolinux.bin".into(),
            boot_info_table: true,
            load_sectors: 4,
        }),
        efi_boot: Some("boot/efi.img".into()),
        hybrid_mbr: Some(std::fs::read(ISOHDPFX).unwrap()),
        disk_signature: 0xC7F0_0002,
    }
}

fn write_iso(dir: &Path) -> std::path::PathBuf {
    let plan = IsoPlan::new(spec(dir)).unwrap();
    let path = dir.join("test.iso");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let written = plan.write(&mut out).unwrap();
    drop(out);
    assert_eq!(written, std::fs::metadata(&path).unwrap().len());
    assert_eq!(written % (1024 * 1024), 0, "hybrid images are whole MiB");
    path
}

#[test]
fn xorriso_reads_the_boot_catalog_and_rock_ridge_tree() {
    let dir = tempfile::tempdir().unwrap();
    let iso = write_iso(dir.path());
    let report = run(Command::new("xorriso").args([
        "-indev",
        iso.to_str().unwrap(),
        "-report_el_torito",
        "plain",
    ]));
    assert!(report.contains("El Torito boot img :   1  BIOS  y   none"), "{report}");
    assert!(report.contains("El Torito boot img :   2  UEFI  y   none"), "{report}");
    assert!(report.contains("/isolinux/isolinux.bin"), "{report}");
    assert!(report.contains("/boot/efi.img"), "{report}");
    let listing = run(Command::new("xorriso").args([
        "-indev",
        iso.to_str().unwrap(),
        "-find",
        "/",
        "-exec",
        "lsdl",
    ]));
    assert!(listing.contains("'/ctpf/Mixed Case Name.config'"), "{listing}");
    assert!(listing.contains("-r--r--r--"), "{listing}");
    // xorriso's own consistency check of the whole image.
    let check =
        run(Command::new("xorriso").args(["-indev", iso.to_str().unwrap(), "-check_media", "--"]));
    assert!(!check.contains("FAILURE"), "{check}");
}

#[test]
fn xorriso_extracts_the_tree_with_rock_ridge_names() {
    let dir = tempfile::tempdir().unwrap();
    let iso = write_iso(dir.path());
    let tree = dir.path().join("tree");
    run(Command::new("xorriso").args([
        "-osirrox",
        "on",
        "-indev",
        iso.to_str().unwrap(),
        "-extract",
        "/",
        tree.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(tree.join("ctpf/Mixed Case Name.config")).unwrap(), b"hello\n");
    assert_eq!(std::fs::read(tree.join("ctpf/empty")).unwrap(), b"");
    let big = std::fs::read(tree.join("boot/initrd.img")).unwrap();
    assert_eq!(big, std::fs::read(dir.path().join("big.bin")).unwrap());
    // The boot image is stored patched (boot info table), the rest of it unchanged.
    let stored = std::fs::read(tree.join("isolinux/isolinux.bin")).unwrap();
    let original = std::fs::read(ISOLINUX_BIN).unwrap();
    assert_eq!(stored[64..], original[64..]);
    assert_eq!(u32::from_le_bytes(stored[8..12].try_into().unwrap()), 16);
}

#[test]
fn fat_images_pass_fsck_and_mtools_reads_long_names() {
    let dir = tempfile::tempdir().unwrap();
    let long = "bcm2711-rpi-4-b.dtb";
    let files: BTreeMap<String, Source> = [
        (long.to_owned(), vec![7u8; 50_000]),
        ("overlays/vc4-kms-v3d-pi4.dtbo".to_owned(), vec![8u8; 3000]),
        ("config.txt".to_owned(), b"arm_64bit=1\n".to_vec()),
        ("KERNEL8.IMG".to_owned(), vec![9u8; 1_000_000]),
    ]
    .into_iter()
    .map(|(p, b)| (p, Source::Bytes(b)))
    .collect();
    for kind in [FatKind::Auto, FatKind::Fat32] {
        let image = fat::build(&FatSpec {
            label: "RASPIFIRM".into(),
            volume_id: 0x1234_ABCD,
            timestamp: 1_700_000_000,
            kind,
            size: None,
            hidden_sectors: 2048,
            files: files.clone(),
        })
        .unwrap();
        let path = dir.path().join(format!("{kind:?}.img"));
        std::fs::write(&path, &image).unwrap();
        let fsck = run(Command::new("fsck.fat").args(["-n", "-v", path.to_str().unwrap()]));
        let bits = if kind == FatKind::Fat32 { "32 bit entries" } else { "12 bit entries" };
        assert!(fsck.contains(bits) && fsck.contains("2048 hidden sectors"), "{fsck}");
        assert!(fsck.contains("6 files"), "4 files and 2 directory entries:\n{fsck}");
        let listing = run(Command::new("mdir").args(["-i", path.to_str().unwrap(), "-/", "::/"]));
        assert!(listing.contains(long) && listing.contains("vc4-kms-v3d-pi4.dtbo"), "{listing}");
        assert!(listing.contains("RASPIFIRM"), "{listing}");
        let out = dir.path().join("copied.dtb");
        let _ = std::fs::remove_file(&out);
        run(Command::new("mcopy").args([
            "-i",
            path.to_str().unwrap(),
            &format!("::/{long}"),
            out.to_str().unwrap(),
        ]));
        assert_eq!(std::fs::read(&out).unwrap(), vec![7u8; 50_000]);
    }
}

#[test]
fn the_esp_passes_fsck_and_the_hybrid_mbr_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let esp_path = dir.path().join("esp.img");
    std::fs::write(&esp_path, esp()).unwrap();
    let fsck = run(Command::new("fsck.fat").args(["-n", esp_path.to_str().unwrap()]));
    assert!(fsck.contains("2 files") || fsck.contains("files"), "{fsck}");

    let iso = write_iso(dir.path());
    let table = run(Command::new("sfdisk").args(["-d", iso.to_str().unwrap()]));
    assert!(table.contains("label: dos"), "{table}");
    assert!(table.contains("label-id: 0xc7f00002"), "{table}");
    assert!(table.contains("start=           0") && table.contains("bootable"), "{table}");
    assert!(table.contains("type=ef"), "{table}");
    // Partition 2 is the ESP file inside the ISO, byte for byte.
    let plan = IsoPlan::new(spec(dir.path())).unwrap();
    let (lba, len) = plan.extent("boot/efi.img").unwrap();
    let bytes = std::fs::read(&iso).unwrap();
    let start = u64::from(lba) * 2048;
    assert!(table.contains(&format!("start={:>12}", start / 512)), "{table}");
    assert_eq!(&bytes[start as usize..(start + len) as usize], esp().as_slice());
    // isohdpfx finds isolinux.bin through bytes 432..440.
    let (boot_lba, _) = plan.extent("isolinux/isolinux.bin").unwrap();
    assert_eq!(u64::from_le_bytes(bytes[432..440].try_into().unwrap()), u64::from(boot_lba) * 4);
}

#[test]
fn two_runs_give_identical_bytes() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (first, second) = (write_iso(a.path()), write_iso(b.path()));
    assert_eq!(std::fs::read(first).unwrap(), std::fs::read(second).unwrap());
}

#[test]
fn the_gpt_stick_image_passes_sgdisk_and_fsck_and_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let files: BTreeMap<String, Source> = [
        ("EFI/BOOT/BOOTX64.EFI", vec![1u8; 600_000]),
        ("boot/vmlinuz", vec![2u8; 3_000_000]),
        ("ctpf/grub.cfg", b"linux /boot/vmlinuz\n".to_vec()),
    ]
    .into_iter()
    .map(|(p, b)| (p.to_owned(), Source::Bytes(b)))
    .collect();
    let esp = FatPlan::new(&FatSpec {
        label: "CTPF_BOOT".into(),
        volume_id: 7,
        timestamp: 1_700_000_000,
        kind: FatKind::Fat32,
        size: None,
        hidden_sectors: disk::ALIGN_SECTORS as u32,
        files,
    })
    .unwrap();
    let (first, second) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let size = disk::write_gpt_esp(&first, &esp, 0xC7F0_0003).unwrap();
    disk::write_gpt_esp(&second, &esp, 0xC7F0_0003).unwrap();
    let bytes = std::fs::read(&first).unwrap();
    assert_eq!(bytes.len() as u64, size);
    assert_eq!(bytes, std::fs::read(&second).unwrap(), "same inputs, same bytes");

    let verify = run(Command::new("sgdisk").args(["-v", first.to_str().unwrap()]));
    assert!(verify.contains("No problems found"), "{verify}");
    let info = run(Command::new("sgdisk").args(["-i", "1", first.to_str().unwrap()]));
    assert!(info.contains("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"), "EFI System type:\n{info}");
    assert!(info.contains("First sector: 2048"), "{info}");
    let table = run(Command::new("sfdisk").args(["-d", first.to_str().unwrap()]));
    assert!(table.contains("label: gpt") && table.contains("name=\"ctpf-efi\""), "{table}");

    let start = (disk::ALIGN_SECTORS * 512) as usize;
    let part = dir.path().join("esp.img");
    std::fs::write(&part, &bytes[start..start + esp.size() as usize]).unwrap();
    run(Command::new("fsck.fat").args(["-n", part.to_str().unwrap()]));
    let out = dir.path().join("grub.cfg");
    run(Command::new("mcopy").args([
        "-i",
        part.to_str().unwrap(),
        "::/ctpf/grub.cfg",
        out.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(out).unwrap(), b"linux /boot/vmlinuz\n");
    // GRUB's own FAT driver, which finds the medium by this file (its 8.3 name, lower case by
    // the NT case flags).
    let grub = run(Command::new("grub-fstest").arg(&part).args(["cat", "/ctpf/grub.cfg"]));
    assert_eq!(grub, "linux /boot/vmlinuz\n");
}
