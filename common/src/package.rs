//! Packaging: what a client asks a packager to make from stored artifacts, and the manifest
//! describing the medium it made. A packaging job (`JobSpec::Package`) names every input by
//! digest, so the packager needs nothing but the artifact store, and the same inputs always
//! give the same key (and the same bytes).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::{ArtifactName, ParseError, Sha256Digest, TagSelector};

/// The kinds of media a packager writes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum MediaFormat {
    /// Hybrid ISO 9660: boots as a CD and as a USB disk, BIOS (isolinux) and UEFI (GRUB).
    Iso,
    /// Raw GPT disk image with one FAT32 ESP: UEFI USB sticks.
    Usb,
    /// Raw MBR disk image with one FAT32 partition: Raspberry Pi SD cards and USB drives.
    Raspi,
    /// The tree a distributor serves over TFTP/HTTP, as one tar file.
    PxeBundle,
}

impl MediaFormat {
    pub const ALL: [MediaFormat; 4] =
        [MediaFormat::Iso, MediaFormat::Usb, MediaFormat::Raspi, MediaFormat::PxeBundle];

    /// The name as it appears in JSON and TOML.
    pub fn label(self) -> &'static str {
        match self {
            MediaFormat::Iso => "iso",
            MediaFormat::Usb => "usb",
            MediaFormat::Raspi => "raspi",
            MediaFormat::PxeBundle => "pxe_bundle",
        }
    }

    /// The file extension of the medium.
    pub fn extension(self) -> &'static str {
        match self {
            MediaFormat::Iso => "iso",
            MediaFormat::Usb | MediaFormat::Raspi => "img",
            MediaFormat::PxeBundle => "tar",
        }
    }

    pub fn artifact_kind(self) -> crate::ArtifactKind {
        match self {
            MediaFormat::Iso => crate::ArtifactKind::Iso,
            MediaFormat::Usb | MediaFormat::Raspi => crate::ArtifactKind::DiskImage,
            MediaFormat::PxeBundle => crate::ArtifactKind::PxeBundle,
        }
    }
}

impl std::fmt::Display for MediaFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// One input of a packaging job: stored content, by digest and size. The packager checks
/// both while it reads, so a truncated or corrupt blob stops the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputArtifact {
    pub digest: Sha256Digest,
    pub size: u64,
}

/// One medium to write. Which `inputs` a format takes (by role name) is checked by the
/// packager's `validate`, which lists the valid roles when one is missing or unknown:
/// `kernel`, `initrd`, `efi_x86_64`, `efi_arm64`, `isolinux_bin`, `ldlinux_c32`,
/// `isohdpfx_bin`; `firmware/PATH` for the Raspberry Pi; the served path for a PXE bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PackageRequest {
    pub format: MediaFormat,
    /// Volume label / name stem: `A-Z`, `0-9` and `_`, at most 16 characters.
    pub label: String,
    pub inputs: BTreeMap<String, InputArtifact>,
    /// The discovery kernel's command line (manager URL, media key, console).
    #[serde(default)]
    pub kernel_words: Vec<String>,
    /// File times and the seed of volume serials: same inputs, same bytes.
    #[serde(default)]
    pub source_date_epoch: u64,
}

impl PackageRequest {
    /// Checks the label (the rest is the packager's `validate`).
    pub fn check_label(&self) -> Result<(), ParseError> {
        let label = &self.label;
        if label.is_empty() || label.len() > 16 {
            return Err(ParseError::new("label", label, "must be 1 to 16 characters"));
        }
        if !label.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') {
            return Err(ParseError::new("label", label, "may contain only A-Z, 0-9 and '_'"));
        }
        Ok(())
    }
}

/// A packaging job as clients submit it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPackage {
    pub request: PackageRequest,
    /// When set, the medium is also recorded as the artifact `NAME` once the job succeeds.
    #[serde(default)]
    pub name: Option<ArtifactName>,
    /// Write the medium again even when the same inputs were packaged before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_cache: bool,
    /// Extra tags a packager must carry (`role=packager` is implied).
    #[serde(default)]
    pub selector: TagSelector,
}

/// A way a medium can start a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BootMode {
    /// BIOS from a CD (El Torito, isolinux).
    BiosCdrom,
    /// BIOS from a USB disk (isohybrid MBR, isolinux).
    BiosUsb,
    UefiX86_64Cdrom,
    UefiX86_64Usb,
    UefiArm64Cdrom,
    UefiArm64Usb,
    /// The Raspberry Pi's own firmware from an SD card or USB drive.
    RaspberryPi,
    /// Served by a distributor: BIOS PXE (`undionly.kpxe` or GRUB `core.0`).
    PxeBios,
    PxeUefiX86_64,
    PxeUefiArm64,
}

/// One file inside a medium.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MediaEntry {
    pub path: String,
    pub digest: Sha256Digest,
    pub size: u64,
}

/// What a packaging job made and from what, stored beside the medium; the same request
/// gives the same key, and a key already in the store is answered from there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PackageManifest {
    pub format: MediaFormat,
    pub packager_version: String,
    /// sha256 over the packager version and the whole request.
    pub key: Sha256Digest,
    pub label: String,
    pub inputs: BTreeMap<String, InputArtifact>,
    /// The medium: its file name (`LABEL.iso`), digest and size.
    pub file: String,
    pub digest: Sha256Digest,
    pub size: u64,
    pub boot_modes: Vec<BootMode>,
    /// Every file on the medium (inside the ISO, the FAT partition or the tar), sorted.
    pub contents: Vec<MediaEntry>,
    pub source_date_epoch: u64,
    pub duration_ms: u64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub built_at: OffsetDateTime,
    /// True when this answer came from the cache (nothing was written).
    #[serde(default)]
    pub cached: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_strict_and_labels_checked() {
        let json = r#"{"request":{"format":"iso","label":"CTPF","inputs":{}},"name":"demo.iso"}"#;
        let new: NewPackage = serde_json::from_str(json).unwrap();
        assert_eq!(new.request.format, MediaFormat::Iso);
        new.request.check_label().unwrap();
        let unknown = r#"{"request":{"format":"iso","label":"CTPF","inputs":{},"colour":1}}"#;
        assert!(serde_json::from_str::<NewPackage>(unknown).is_err());
        assert!(serde_json::from_str::<MediaFormat>(r#""floppy""#).is_err());
        for bad in ["", "lower", "WAY_TOO_LONG_LABEL_X", "A-B"] {
            let request = PackageRequest { label: bad.into(), ..new.request.clone() };
            assert!(request.check_label().is_err(), "{bad:?}");
        }
        for format in MediaFormat::ALL {
            let json = serde_json::to_value(format).unwrap();
            assert_eq!(json, format.label());
        }
    }
}
