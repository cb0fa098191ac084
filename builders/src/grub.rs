//! GRUB images with an embedded config, made by `grub-mkimage` from Debian's GRUB module
//! directories (grub-efi-amd64-bin, grub-pc-bin, grub-efi-arm64-bin): a standalone EFI
//! application per architecture, and the i386-pc PXE image `core.0`. `grub-mkimage` output
//! depends only on its inputs (no timestamps), so the same config gives the same bytes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ctpf_common::Sha256Digest;
use tokio_util::sync::CancellationToken;

use crate::process::{self, BuildCommand, BuildOutcome, LogLine, ProcessError};

/// Where Debian installs GRUB's per-platform module directories.
pub const DEBIAN_GRUB_LIB: &str = "/usr/lib/grub";
/// Longest embedded config accepted; GRUB keeps it in memory in its core image.
pub const MAX_CONFIG_LEN: usize = 64 * 1024;
const MKIMAGE_TIMEOUT: Duration = Duration::from_secs(120);

/// Modules every network-booting image carries: the network stack and HTTP/TFTP, the Linux
/// loader, and what the ctpf configs call (`normal` gives the full script parser).
const NETBOOT_MODULES: &[&str] = &[
    "normal",
    "net",
    "http",
    "tftp",
    "linux",
    "echo",
    "test",
    "sleep",
    "reboot",
    "halt",
    "boot",
    "chain",
    "configfile",
    "smbios",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrubTarget {
    /// `grubx64.efi` for x86_64 UEFI (network via the firmware's SNP: `efinet`).
    X86_64Efi,
    /// `grubaa64.efi` for arm64 UEFI.
    Arm64Efi,
    /// `core.0`, the PXE image BIOS network boot ROMs load over TFTP (`pxe` driver).
    I386PcPxe,
    /// `eltorito.img`, the no-emulation El Torito boot image of BIOS-bootable CDs/ISOs.
    I386PcEltorito,
}

impl GrubTarget {
    pub const ALL: [Self; 4] =
        [Self::X86_64Efi, Self::Arm64Efi, Self::I386PcPxe, Self::I386PcEltorito];

    /// Parses the `grub-mkimage -O` name; an unknown one lists the valid ones.
    pub fn parse(name: &str) -> Result<Self, GrubError> {
        Self::ALL.into_iter().find(|t| t.format() == name).ok_or_else(|| GrubError::UnknownTarget {
            name: name.to_owned(),
            valid: Self::ALL.map(|t| t.format()).join(", "),
        })
    }

    /// `grub-mkimage -O` format.
    pub fn format(self) -> &'static str {
        match self {
            Self::X86_64Efi => "x86_64-efi",
            Self::Arm64Efi => "arm64-efi",
            Self::I386PcPxe => "i386-pc-pxe",
            Self::I386PcEltorito => "i386-pc-eltorito",
        }
    }

    /// The module directory under the GRUB lib dir, and the Debian package that has it.
    fn platform(self) -> (&'static str, &'static str) {
        match self {
            Self::X86_64Efi => ("x86_64-efi", "grub-efi-amd64-bin"),
            Self::Arm64Efi => ("arm64-efi", "grub-efi-arm64-bin"),
            Self::I386PcPxe | Self::I386PcEltorito => ("i386-pc", "grub-pc-bin"),
        }
    }

    /// The conventional file name of the image.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::X86_64Efi => "grubx64.efi",
            Self::Arm64Efi => "grubaa64.efi",
            Self::I386PcPxe => "core.0",
            Self::I386PcEltorito => "eltorito.img",
        }
    }

    /// The modules built into the image.
    pub fn modules(self) -> Vec<&'static str> {
        let mut modules = NETBOOT_MODULES.to_vec();
        match self {
            // The disk modules let the same image boot from ctpf media (ISO, USB stick).
            Self::X86_64Efi | Self::Arm64Efi => {
                modules.extend(["efinet", "part_msdos", "part_gpt", "iso9660", "fat", "search"])
            }
            // linux16 loads ipxe.lkrn when the image chainloads iPXE.
            Self::I386PcPxe => modules.extend(["pxe", "biosdisk", "part_msdos", "linux16"]),
            Self::I386PcEltorito => modules.extend([
                "biosdisk",
                "part_msdos",
                "part_gpt",
                "iso9660",
                "fat",
                "search",
                "linux16",
            ]),
        }
        modules
    }

    /// The PE/COFF machine type of EFI images (None for BIOS images).
    pub fn pe_machine(self) -> Option<u16> {
        match self {
            Self::X86_64Efi => Some(0x8664),
            Self::Arm64Efi => Some(0xaa64),
            Self::I386PcPxe | Self::I386PcEltorito => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GrubError {
    #[error("unknown GRUB target {name:?}; valid: {valid}")]
    UnknownTarget { name: String, valid: String },
    #[error("GRUB config: {0}")]
    BadConfig(String),
    #[error("no GRUB modules for {target} in {dir} (apt-get install {package})")]
    MissingModules { target: &'static str, dir: PathBuf, package: &'static str },
    #[error("writing the build inputs in {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("grub-mkimage {end}:\n{tail}")]
    Mkimage { end: process::BuildEnd, tail: String },
    #[error("the {target} image is malformed: {reason}")]
    Malformed { target: &'static str, reason: String },
}

/// One image to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrubImageRequest {
    pub target: GrubTarget,
    /// The config GRUB runs at start (with its rescue parser: plain commands).
    pub config: String,
    /// Parent of the per-platform module directories (default [`DEBIAN_GRUB_LIB`]).
    pub grub_lib: PathBuf,
}

impl GrubImageRequest {
    pub fn new(target: GrubTarget, config: impl Into<String>) -> Self {
        Self { target, config: config.into(), grub_lib: PathBuf::from(DEBIAN_GRUB_LIB) }
    }

    /// Checks the config and that the modules are installed, before anything runs.
    pub fn validate(&self) -> Result<PathBuf, GrubError> {
        check_config(&self.config)?;
        let (platform, package) = self.target.platform();
        let modules = self.grub_lib.join(platform);
        if !modules.join("moddep.lst").is_file() {
            return Err(GrubError::MissingModules {
                target: self.target.format(),
                dir: modules,
                package,
            });
        }
        Ok(modules)
    }

    /// The module list file of the target's platform (its digest is part of build keys).
    pub fn moddep(&self) -> PathBuf {
        self.grub_lib.join(self.target.platform().0).join("moddep.lst")
    }
}

/// Checks an embedded config without touching the disk.
pub fn check_config(config: &str) -> Result<(), GrubError> {
    if config.trim().is_empty() {
        return Err(GrubError::BadConfig("is empty".into()));
    }
    if config.len() > MAX_CONFIG_LEN {
        return Err(GrubError::BadConfig(format!("longer than {MAX_CONFIG_LEN} bytes")));
    }
    if config.starts_with("#!ipxe") {
        return Err(GrubError::BadConfig("is an iPXE script, not a GRUB config".into()));
    }
    if let Some(c) = config.chars().find(|c| c.is_control() && !matches!(c, '\n' | '\t')) {
        return Err(GrubError::BadConfig(format!("contains the control character {c:?}")));
    }
    Ok(())
}

/// A built image.
#[derive(Debug, Clone)]
pub struct GrubImage {
    pub path: PathBuf,
    pub digest: Sha256Digest,
    pub size: u64,
    pub outcome: BuildOutcome,
}

/// Makes the image in `dir` (which the caller owns), streaming grub-mkimage's output to
/// `log`, and checks its structure.
pub async fn build_image(
    request: &GrubImageRequest,
    dir: &Path,
    cancel: CancellationToken,
    log: impl FnMut(LogLine),
) -> Result<GrubImage, GrubError> {
    let modules = request.validate()?;
    let io = |source| GrubError::Io { dir: dir.to_owned(), source };
    let config = dir.join("embedded.cfg");
    tokio::fs::write(&config, &request.config).await.map_err(io)?;
    let output = dir.join(request.target.file_name());
    let mut args: Vec<String> = vec![
        "--format".into(),
        request.target.format().into(),
        "--directory".into(),
        modules.display().to_string(),
        // The prefix is where `normal` looks for its module lists; ctpf's configs need none.
        "--prefix".into(),
        "/boot/grub".into(),
        "--config".into(),
        config.display().to_string(),
        "--output".into(),
        output.display().to_string(),
    ];
    args.extend(request.target.modules().into_iter().map(str::to_owned));
    let command = BuildCommand::new("grub-mkimage", args, dir, MKIMAGE_TIMEOUT);
    let outcome = process::run_build(command, cancel, log).await?;
    if !outcome.succeeded() {
        return Err(GrubError::Mkimage { end: outcome.end, tail: outcome.tail_text() });
    }
    let bytes = tokio::fs::read(&output).await.map_err(io)?;
    check_image(request.target, &bytes, &request.config)?;
    Ok(GrubImage {
        path: output,
        digest: Sha256Digest::of(&bytes),
        size: bytes.len() as u64,
        outcome,
    })
}

/// Structural checks: EFI images are PE/COFF for the right machine and carry the config
/// verbatim (GRUB EFI images are not compressed); PXE images start with GRUB's pxeboot code
/// and are small enough for a PXE ROM (which loads the NBP below 640 KiB).
pub fn check_image(target: GrubTarget, bytes: &[u8], config: &str) -> Result<(), GrubError> {
    let malformed = |reason: String| GrubError::Malformed { target: target.format(), reason };
    match target.pe_machine() {
        Some(machine) => {
            let found = pe_machine(bytes).map_err(|reason| malformed(reason.into()))?;
            if found != machine {
                return Err(malformed(format!("PE machine {found:#06x}, want {machine:#06x}")));
            }
            let needle = config.as_bytes();
            if !bytes.windows(needle.len()).any(|w| w == needle) {
                return Err(malformed("the embedded config is not in the image".into()));
            }
        }
        None => {
            // A PXE ROM loads the NBP below 640 KiB; El Torito images have more room.
            let limit = if target == GrubTarget::I386PcPxe { 600 } else { 4096 } * 1024;
            if bytes.len() < 1024 || bytes.len() > limit {
                return Err(malformed(format!("{} bytes is no BIOS boot image", bytes.len())));
            }
        }
    }
    Ok(())
}

/// The machine field of a PE/COFF image: "MZ", the PE header offset at 0x3c, "PE\0\0", then
/// the 16-bit machine type.
pub fn pe_machine(bytes: &[u8]) -> Result<u16, &'static str> {
    if bytes.get(..2) != Some(b"MZ") {
        return Err("no MZ header");
    }
    let offset = bytes.get(0x3c..0x40).ok_or("truncated DOS header")?;
    let offset = u32::from_le_bytes([offset[0], offset[1], offset[2], offset[3]]) as usize;
    let header = bytes.get(offset..offset + 6).ok_or("PE header offset outside the file")?;
    if &header[..4] != b"PE\0\0" {
        return Err("no PE signature");
    }
    Ok(u16::from_le_bytes([header[4], header[5]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_list_the_valid_ones() {
        assert_eq!(GrubTarget::parse("x86_64-efi").unwrap(), GrubTarget::X86_64Efi);
        let err = GrubTarget::parse("mips-arc").unwrap_err().to_string();
        assert!(err.contains("x86_64-efi, arm64-efi, i386-pc-pxe, i386-pc-eltorito"), "{err}");
    }

    #[test]
    fn bad_configs_are_refused_before_running() {
        let dir = tempfile::tempdir().unwrap();
        let mut request = GrubImageRequest::new(GrubTarget::X86_64Efi, "#!ipxe\nchain x\n");
        request.grub_lib = dir.path().to_owned();
        assert!(request.validate().unwrap_err().to_string().contains("iPXE script"));
        request.config = "echo a\0b".into();
        assert!(request.validate().unwrap_err().to_string().contains("control character"));
        request.config = "echo ok\n".into();
        let err = request.validate().unwrap_err().to_string();
        assert!(err.contains("grub-efi-amd64-bin"), "{err}");
    }

    #[test]
    fn pe_headers_are_read_and_checked() {
        let mut image = vec![0u8; 0x100];
        image[..2].copy_from_slice(b"MZ");
        image[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        image[0x80..0x84].copy_from_slice(b"PE\0\0");
        image[0x84..0x86].copy_from_slice(&0xaa64u16.to_le_bytes());
        image.extend_from_slice(b"echo embedded");
        assert_eq!(pe_machine(&image), Ok(0xaa64));
        check_image(GrubTarget::Arm64Efi, &image, "echo embedded").unwrap();
        assert!(check_image(GrubTarget::X86_64Efi, &image, "echo embedded").is_err());
        assert!(check_image(GrubTarget::Arm64Efi, &image, "echo other").is_err());
        assert!(pe_machine(b"MZ").is_err() && pe_machine(b"").is_err());
    }
}
