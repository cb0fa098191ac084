//! The SYSLINUX recipe against Debian's installed packages (`.ci/run` installs isolinux,
//! pxelinux and syslinux-common).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::Path;

use ctpf_builders::syslinux::{SYSLINUX_FILES, collect};

#[test]
fn debians_syslinux_files_are_collected_with_digests_and_versions() {
    let out = tempfile::tempdir().unwrap();
    let files = collect(Path::new("/"), out.path()).unwrap();
    assert_eq!(files.len(), SYSLINUX_FILES.len());
    for file in &files {
        assert!(file.size > 0, "{}", file.name);
        let version = file.package_version.as_deref().unwrap_or_default();
        assert!(version.contains("6.04"), "{} from {}: {version:?}", file.name, file.package);
    }
    // isohdpfx.bin is a 432-byte MBR boot code block; pxelinux.0 a PXE NBP well under 64 KiB.
    let size = |name: &str| files.iter().find(|f| f.name == name).unwrap().size;
    assert_eq!(size("isohdpfx.bin"), 432);
    assert!(size("pxelinux.0") < 64 * 1024);
    // Collecting again gives the same digests.
    let again = collect(Path::new("/"), tempfile::tempdir().unwrap().path()).unwrap();
    let digests = |v: &[ctpf_builders::syslinux::CollectedFile]| {
        v.iter().map(|f| f.digest).collect::<Vec<_>>()
    };
    assert_eq!(digests(&files), digests(&again));
}
