//! The packager service against a real artifact store on disk: media come out in the store
//! with manifests, the same request is a cache hit, `no_cache` writes the same bytes again,
//! and a corrupt or missing input stops the job with an error naming it.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod support;
use support::run;

use std::{collections::BTreeMap, path::Path, process::Command, sync::Arc};

use ctpf_common::{BootMode, InputArtifact, MediaFormat, PackageRequest, Sha256Digest};
use ctpf_packagers::service::{
    self, EFI_X86_64, INITRD, ISOHDPFX_BIN, ISOLINUX_BIN, KERNEL, LDLINUX_C32, PackageError,
    PackageLog, Packager, PackagerConfig,
};
use ctpf_store::artifacts::{ArtifactStore, FsArtifactStore};
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<FsArtifactStore>,
    packager: Packager,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FsArtifactStore::open(dir.path().join("artifacts")).await.unwrap());
    let config = PackagerConfig { work_dir: dir.path().join("work") };
    let packager = Packager::new(config, store.clone()).unwrap();
    Fixture { dir, store, packager }
}

async fn put(store: &FsArtifactStore, bytes: Vec<u8>) -> InputArtifact {
    let info = store.put(Box::pin(std::io::Cursor::new(bytes)), None).await.unwrap();
    InputArtifact { digest: info.digest, size: info.size }
}

/// Real SYSLINUX files, stand-ins for the kernel, initrd and GRUB (these tests read media
/// structurally; the QEMU tests boot real ones).
async fn iso_request(store: &FsArtifactStore) -> PackageRequest {
    let mut inputs = BTreeMap::new();
    inputs.insert(KERNEL.to_owned(), put(store, vec![0x4b; 3_000_000]).await);
    inputs
        .insert(INITRD.to_owned(), put(store, (0..5_000_000u32).map(|i| i as u8).collect()).await);
    inputs.insert(EFI_X86_64.to_owned(), put(store, b"MZ pretend GRUB".to_vec()).await);
    for (role, path) in [
        (ISOLINUX_BIN, "/usr/lib/ISOLINUX/isolinux.bin"),
        (LDLINUX_C32, "/usr/lib/syslinux/modules/bios/ldlinux.c32"),
        (ISOHDPFX_BIN, "/usr/lib/ISOLINUX/isohdpfx.bin"),
    ] {
        inputs.insert(role.to_owned(), put(store, std::fs::read(path).unwrap()).await);
    }
    PackageRequest {
        format: MediaFormat::Iso,
        label: "CTPF_TEST".into(),
        inputs,
        kernel_words: vec!["console=ttyS0".into(), "ctpf.token=ctpf_mk_0123".into()],
        source_date_epoch: 1_700_000_000,
    }
}

async fn fetch(store: &FsArtifactStore, digest: &Sha256Digest, to: &Path) {
    let mut bytes = Vec::new();
    store.get(digest).await.unwrap().reader.read_to_end(&mut bytes).await.unwrap();
    std::fs::write(to, bytes).unwrap();
}

async fn package(
    f: &Fixture,
    request: &PackageRequest,
    no_cache: bool,
) -> Result<ctpf_common::PackageManifest, PackageError> {
    f.packager.package(request, no_cache, CancellationToken::new(), PackageLog::discard()).await
}

#[tokio::test]
async fn an_iso_is_stored_with_its_manifest_then_answered_from_the_cache() {
    let f = fixture().await;
    let request = iso_request(&f.store).await;
    let manifest = package(&f, &request, false).await.unwrap();
    assert!(!manifest.cached);
    assert_eq!(manifest.file, "ctpf_test.iso");
    assert_eq!(manifest.key, service::package_key(&request));
    assert_eq!(
        manifest.boot_modes,
        [
            BootMode::BiosCdrom,
            BootMode::BiosUsb,
            BootMode::UefiX86_64Cdrom,
            BootMode::UefiX86_64Usb
        ]
    );
    let paths: Vec<&str> = manifest.contents.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "boot/efi.img",
            "boot/initrd.img",
            "boot/vmlinuz",
            "ctpf/grub.cfg",
            "isolinux/isolinux.bin",
            "isolinux/isolinux.cfg",
            "isolinux/ldlinux.c32"
        ]
    );
    let kernel = manifest.contents.iter().find(|e| e.path == "boot/vmlinuz").unwrap();
    assert_eq!(kernel.digest, request.inputs[KERNEL].digest);
    assert_eq!(f.store.stat(&manifest.digest).await.unwrap(), Some(manifest.size));

    // A third-party reader finds both El Torito entries and the kernel words.
    let iso = f.dir.path().join("out.iso");
    fetch(&f.store, &manifest.digest, &iso).await;
    let report = run(Command::new("xorriso")
        .args(["-indev"])
        .arg(&iso)
        .args(["-report_el_torito", "plain"]));
    assert!(report.contains("BIOS") && report.contains("UEFI"), "{report}");
    let cfg = f.dir.path().join("isolinux.cfg");
    run(Command::new("osirrox")
        .arg("-indev")
        .arg(&iso)
        .args(["-extract", "/isolinux/isolinux.cfg"])
        .arg(&cfg));
    let cfg = std::fs::read_to_string(&cfg).unwrap();
    assert!(cfg.contains("APPEND console=ttyS0 ctpf.token=ctpf_mk_0123"), "{cfg}");

    let again = package(&f, &request, false).await.unwrap();
    assert!(again.cached);
    assert_eq!((again.digest, again.key), (manifest.digest, manifest.key));

    // --no-cache writes it again: the same bytes.
    let rewritten = package(&f, &request, true).await.unwrap();
    assert!(!rewritten.cached);
    assert_eq!(rewritten.digest, manifest.digest);

    // Another media key is another medium.
    let mut other = request.clone();
    other.kernel_words[1] = "ctpf.token=ctpf_mk_4567".into();
    let other = package(&f, &other, false).await.unwrap();
    assert!(!other.cached);
    assert_ne!(other.digest, manifest.digest);
}

#[tokio::test]
async fn a_corrupt_or_missing_input_stops_the_job_naming_it() {
    let f = fixture().await;
    let request = iso_request(&f.store).await;
    let initrd = request.inputs[INITRD];
    // Truncate the stored blob behind the store's back, as a failing disk would.
    let hex = initrd.digest.hex();
    let blob = f.dir.path().join("artifacts/sha256").join(&hex[..2]).join(&hex);
    let bytes = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &bytes[..bytes.len() / 2]).unwrap();
    let err = package(&f, &request, false).await.unwrap_err();
    assert!(matches!(err, PackageError::CorruptInput { ref role, .. } if role == INITRD), "{err}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains(&initrd.digest.to_string()), "{err}");

    let mut flipped = bytes.clone();
    flipped[1000] ^= 1;
    std::fs::write(&blob, &flipped).unwrap();
    let err = package(&f, &request, false).await.unwrap_err();
    assert!(err.to_string().contains("input initrd"), "{err}");

    std::fs::remove_file(&blob).unwrap();
    let err = package(&f, &request, false).await.unwrap_err();
    assert!(matches!(err, PackageError::Invalid(_)), "{err}");
    assert!(
        err.to_string().contains("input initrd") && err.to_string().contains("not in the store")
    );
}

#[tokio::test]
async fn a_usb_image_is_a_gpt_disk_that_sgdisk_and_fsck_accept() {
    let f = fixture().await;
    let mut request = iso_request(&f.store).await;
    request.format = MediaFormat::Usb;
    for role in [ISOLINUX_BIN, LDLINUX_C32, ISOHDPFX_BIN] {
        request.inputs.remove(role);
    }
    let manifest = package(&f, &request, false).await.unwrap();
    assert_eq!(manifest.file, "ctpf_test.img");
    assert_eq!(manifest.boot_modes, [BootMode::UefiX86_64Usb]);
    let paths: Vec<&str> = manifest.contents.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["EFI/BOOT/BOOTX64.EFI", "boot/initrd.img", "boot/vmlinuz", "ctpf/grub.cfg"]);
    let image = f.dir.path().join("stick.img");
    fetch(&f.store, &manifest.digest, &image).await;
    let verify = run(Command::new("sgdisk").arg("-v").arg(&image));
    assert!(verify.contains("No problems found"), "{verify}");
    let listing = run(Command::new("mdir")
        .arg("-i")
        .arg(format!("{}@@1M", image.display()))
        .args(["-/", "::"]));
    assert!(listing.contains("BOOTX64") && listing.contains("initrd"), "{listing}");
}

#[tokio::test]
async fn a_pxe_bundle_is_a_deterministic_tar_of_the_served_tree() {
    let f = fixture().await;
    let mut inputs = BTreeMap::new();
    inputs.insert("undionly.kpxe".to_owned(), put(&f.store, b"undionly".to_vec()).await);
    inputs.insert("ipxe.efi".to_owned(), put(&f.store, b"MZ ipxe".to_vec()).await);
    inputs.insert("discovery/x86_64/vmlinuz".to_owned(), put(&f.store, vec![1; 4096]).await);
    let request = PackageRequest {
        format: MediaFormat::PxeBundle,
        label: "PXE".into(),
        inputs,
        kernel_words: Vec::new(),
        source_date_epoch: 1_700_000_000,
    };
    let manifest = package(&f, &request, false).await.unwrap();
    assert_eq!(manifest.file, "pxe.tar");
    assert_eq!(manifest.boot_modes, [BootMode::PxeBios, BootMode::PxeUefiX86_64]);
    let tar = f.dir.path().join("bundle.tar");
    fetch(&f.store, &manifest.digest, &tar).await;
    let listing = run(Command::new("tar").arg("-tvf").arg(&tar));
    assert!(
        listing.contains("discovery/x86_64/vmlinuz") && listing.contains("ipxe.efi"),
        "{listing}"
    );
    let rewritten = package(&f, &request, true).await.unwrap();
    assert_eq!(rewritten.digest, manifest.digest);
}
