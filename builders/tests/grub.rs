//! GRUB images made with Debian's real grub-mkimage (grub-efi-amd64-bin, grub-pc-bin; `.ci/run`
//! installs them): structure, the embedded config, and byte-identical rebuilds.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use ctpf_builders::grub::{GrubImageRequest, GrubTarget, build_image, pe_machine};
use tokio_util::sync::CancellationToken;

const CONFIG: &str = "echo 'ctpf: DHCP'\nnet_bootp\nnormal '(http,10.0.2.2:7480)/boot/grub?arch=x86_64&platform=efi&mac='\"${net_default_mac}\"\n";

async fn build(target: GrubTarget) -> (tempfile::TempDir, ctpf_builders::grub::GrubImage) {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    let image = build_image(
        &GrubImageRequest::new(target, CONFIG),
        dir.path(),
        CancellationToken::new(),
        |line| lines.push(line),
    )
    .await
    .unwrap();
    (dir, image)
}

#[tokio::test]
async fn efi_images_are_pe_for_x86_64_with_the_config_and_reproducible() {
    let (_a, first) = build(GrubTarget::X86_64Efi).await;
    let (_b, second) = build(GrubTarget::X86_64Efi).await;
    assert_eq!(first.digest, second.digest, "two builds of the same inputs differ");
    let bytes = std::fs::read(&first.path).unwrap();
    assert_eq!(pe_machine(&bytes), Ok(0x8664));
    assert!(first.path.ends_with("grubx64.efi"));
}

#[tokio::test]
async fn the_pxe_image_is_built_for_bios_roms() {
    let (_dir, image) = build(GrubTarget::I386PcPxe).await;
    assert!(image.path.ends_with("core.0"));
    assert!(image.size > 20_000 && image.size < 600 * 1024, "{} bytes", image.size);
}

#[tokio::test]
async fn a_failing_grub_mkimage_reports_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let lib = tempfile::tempdir().unwrap();
    // A module directory that passes validation but holds no modules.
    std::fs::create_dir(lib.path().join("x86_64-efi")).unwrap();
    std::fs::write(lib.path().join("x86_64-efi/moddep.lst"), "").unwrap();
    let mut request = GrubImageRequest::new(GrubTarget::X86_64Efi, CONFIG);
    request.grub_lib = lib.path().to_owned();
    let err =
        build_image(&request, dir.path(), CancellationToken::new(), |_| {}).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("grub-mkimage failed") && text.contains("[stderr]"), "{text}");
}

/// arm64 GRUB modules come from Debian's arm64 package, unpacked by `.ci/run` into the target
/// dir's test cache (`CTPF_GRUB_ARM64_LIB` overrides): an amd64 grub-mkimage builds arm64
/// images from them.
fn arm64_grub_lib() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("CTPF_GRUB_ARM64_LIB") {
        return dir.into();
    }
    let exe = std::env::current_exe().unwrap();
    // .../target/debug/deps/grub-HASH
    exe.ancestors().nth(3).unwrap().join("ctpf-test-cache/grub-arm64/usr/lib/grub")
}

#[tokio::test]
async fn the_arm64_image_is_pe_for_aarch64_with_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut request = GrubImageRequest::new(GrubTarget::Arm64Efi, CONFIG);
    request.grub_lib = arm64_grub_lib();
    let image = build_image(&request, dir.path(), CancellationToken::new(), |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e} (.ci/run unpacks grub-efi-arm64-bin:arm64)"));
    let bytes = std::fs::read(&image.path).unwrap();
    assert_eq!(pe_machine(&bytes), Ok(0xaa64));
    assert!(image.path.ends_with("grubaa64.efi"));
    // build_image already checked that the config is embedded verbatim; check it here too.
    assert!(bytes.windows(CONFIG.len()).any(|w| w == CONFIG.as_bytes()));
}
