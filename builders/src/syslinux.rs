//! The SYSLINUX recipe: nothing to compile, the binaries come from Debian's packages
//! (isolinux, pxelinux, syslinux-common). The recipe collects them into a build directory
//! with their digests and the package versions, which is what a packager and a build key
//! need: the same package versions give the same files.

use std::path::{Path, PathBuf};
use std::process::Command;

use ctpf_common::Sha256Digest;

/// One file of the recipe: its name in the output, where Debian installs it (relative to
/// the root), and the package that has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyslinuxFile {
    pub name: &'static str,
    pub installed_at: &'static str,
    pub package: &'static str,
}

/// What the packagers use: the El Torito loader and its core module, the MBR of hybrid
/// ISOs, and the PXE loader.
pub const SYSLINUX_FILES: &[SyslinuxFile] = &[
    SyslinuxFile {
        name: "isolinux.bin",
        installed_at: "usr/lib/ISOLINUX/isolinux.bin",
        package: "isolinux",
    },
    SyslinuxFile {
        name: "isohdpfx.bin",
        installed_at: "usr/lib/ISOLINUX/isohdpfx.bin",
        package: "isolinux",
    },
    SyslinuxFile {
        name: "ldlinux.c32",
        installed_at: "usr/lib/syslinux/modules/bios/ldlinux.c32",
        package: "syslinux-common",
    },
    SyslinuxFile {
        name: "pxelinux.0",
        installed_at: "usr/lib/PXELINUX/pxelinux.0",
        package: "pxelinux",
    },
];

#[derive(Debug, thiserror::Error)]
pub enum SyslinuxError {
    #[error("{name} is not at {path} (apt-get install {package})")]
    Missing { name: &'static str, path: PathBuf, package: &'static str },
    #[error("copying {name} into {dir}: {source}")]
    Io { name: &'static str, dir: PathBuf, source: std::io::Error },
}

/// A collected file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectedFile {
    pub name: &'static str,
    pub path: PathBuf,
    pub digest: Sha256Digest,
    pub size: u64,
    pub package: &'static str,
    /// `dpkg-query` version of the package, when dpkg knows it (None for an unpacked tree).
    pub package_version: Option<String>,
}

/// Copies every file of [`SYSLINUX_FILES`] from `root` (`/`, or an unpacked tree) into `out`.
/// All are checked before anything is copied, so a missing package is reported as a whole.
pub fn collect(root: &Path, out: &Path) -> Result<Vec<CollectedFile>, SyslinuxError> {
    for file in SYSLINUX_FILES {
        let path = root.join(file.installed_at);
        if !path.is_file() {
            return Err(SyslinuxError::Missing { name: file.name, path, package: file.package });
        }
    }
    let mut collected = Vec::new();
    for file in SYSLINUX_FILES {
        let io = |source| SyslinuxError::Io { name: file.name, dir: out.to_owned(), source };
        let bytes = std::fs::read(root.join(file.installed_at)).map_err(io)?;
        let path = out.join(file.name);
        std::fs::write(&path, &bytes).map_err(io)?;
        collected.push(CollectedFile {
            name: file.name,
            path,
            digest: Sha256Digest::of(&bytes),
            size: bytes.len() as u64,
            package: file.package,
            package_version: (root == Path::new("/"))
                .then(|| package_version(file.package))
                .flatten(),
        });
    }
    Ok(collected)
}

/// The installed version of a Debian package, for the build manifest and key.
pub fn package_version(package: &str) -> Option<String> {
    crate::tools::count_process();
    let output =
        Command::new("dpkg-query").args(["-W", "-f", "${Version}", package]).output().ok()?;
    let version = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !version.is_empty()).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_package_is_named_and_nothing_is_copied() {
        let root = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let first = &SYSLINUX_FILES[0];
        std::fs::create_dir_all(root.path().join(first.installed_at).parent().unwrap()).unwrap();
        std::fs::write(root.path().join(first.installed_at), b"isolinux").unwrap();
        let err = collect(root.path(), out.path()).unwrap_err().to_string();
        assert!(err.contains("isohdpfx.bin") && err.contains("apt-get install isolinux"), "{err}");
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }

    #[test]
    fn files_are_copied_with_their_digests() {
        let root = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        for file in SYSLINUX_FILES {
            let path = root.path().join(file.installed_at);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, file.name.as_bytes()).unwrap();
        }
        let collected = collect(root.path(), out.path()).unwrap();
        assert_eq!(collected.len(), SYSLINUX_FILES.len());
        for file in &collected {
            assert_eq!(std::fs::read(&file.path).unwrap(), file.name.as_bytes());
            assert_eq!(file.digest, Sha256Digest::of(file.name.as_bytes()));
            assert_eq!(file.package_version, None, "an unpacked tree has no dpkg versions");
        }
    }
}
