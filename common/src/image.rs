//! Image definitions: boot media described as data (`images/*.toml`), so a stick or ISO is
//! rebuilt from a reviewed file instead of a command line. `ctpf image build FILE` reads one,
//! runs the builds it needs and then one packaging job per format. Unknown fields are errors
//! (a typo must not silently drop a setting).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Arch, ArtifactName, MediaFormat, Name, ParseError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageDefinition {
    /// The image's name; each medium is stored as the artifact `NAME.EXT` (`demo.iso`).
    pub name: Name,
    #[serde(default)]
    pub description: String,
    /// The machines it boots: `x86_64`, `arm64` or both. Media for both carry both
    /// discovery kernels and GRUB for each; Raspberry Pi media are arm64 only.
    pub architectures: Vec<Arch>,
    pub formats: Vec<MediaFormat>,
    /// Volume label (`A-Z`, `0-9`, `_`); the name in upper case by default.
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub boot: BootSection,
    #[serde(default)]
    pub artifacts: ArtifactsSection,
    /// Where the builder finds the Raspberry Pi boot files (`raspi` media only).
    #[serde(default)]
    pub raspi: Option<RaspiSection>,
}

/// Paths on the builder, as the `raspi_firmware` build recipe takes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RaspiSection {
    /// The unpacked raspi-firmware package (`dpkg -x`), or `/` where it is installed.
    pub firmware: String,
    /// The unpacked arm64 linux-image package, for the device trees.
    pub linux: String,
}

/// How the medium's discovery environment finds the manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootSection {
    /// The media key (`ctpf media-keys create`) machines enroll with; it decides their
    /// datacenter. Its secret goes on the kernel command line. Required for every format
    /// but `pxe_bundle` (PXE-booted machines get one-time tokens from their boot script).
    #[serde(default)]
    pub media_key: Option<Name>,
    /// The manager's URL as the booted machine reaches it; by default the URL `ctpf` itself
    /// talks to.
    #[serde(default)]
    pub manager_url: Option<String>,
    /// More kernel command line words (e.g. `console=ttyS0,115200`).
    #[serde(default)]
    pub kernel_cmdline: Vec<String>,
    /// BIOS boot (isolinux) on ISOs; x86_64 only. On by default.
    #[serde(default = "yes")]
    pub bios: bool,
}

fn yes() -> bool {
    true
}

impl Default for BootSection {
    fn default() -> Self {
        Self { media_key: None, manager_url: None, kernel_cmdline: Vec::new(), bios: true }
    }
}

/// Stored artifacts to use instead of the defaults (the discovery image ctpf builds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArtifactsSection {
    #[serde(default)]
    pub kernel: Option<ArtifactName>,
    #[serde(default)]
    pub initrd: Option<ArtifactName>,
}

impl ImageDefinition {
    /// Parses and checks a definition; errors name the field (and the line, for TOML
    /// errors).
    pub fn from_toml(text: &str) -> Result<Self, ParseError> {
        let definition: ImageDefinition = toml::from_str(text)
            .map_err(|e| ParseError::new("image definition", "", e.to_string()))?;
        definition.check()?;
        Ok(definition)
    }

    fn check(&self) -> Result<(), ParseError> {
        let arches = &self.architectures;
        if arches.is_empty() || arches.len() > 2 || (arches.len() == 2 && arches[0] == arches[1]) {
            return Err(ParseError::new(
                "architectures",
                format!("{arches:?}"),
                "name x86_64, arm64, or both",
            ));
        }
        if arches.len() == 2 && (self.artifacts.kernel.is_some() || self.artifacts.initrd.is_some())
        {
            return Err(ParseError::new(
                "artifacts",
                "",
                "artifacts.kernel/initrd name one kernel: use them with one architecture",
            ));
        }
        if self.formats.is_empty() {
            return Err(ParseError::new(
                "formats",
                "[]",
                "name at least one of iso, usb, raspi, pxe_bundle",
            ));
        }
        for (i, format) in self.formats.iter().enumerate() {
            if self.formats[..i].contains(format) {
                return Err(ParseError::new("formats", format.label(), "listed twice"));
            }
        }
        if self.boot.media_key.is_none()
            && let Some(format) = self.formats.iter().find(|f| **f != MediaFormat::PxeBundle)
        {
            return Err(ParseError::new(
                "boot.media_key",
                "",
                format!(
                    "{format} media need a media key (ctpf media-keys create NAME --datacenter DC)"
                ),
            ));
        }
        if self.formats.contains(&MediaFormat::Raspi) {
            if arches.as_slice() != [Arch::Arm64] {
                return Err(ParseError::new("formats", "raspi", "Raspberry Pi media are arm64"));
            }
            if self.raspi.is_none() {
                return Err(ParseError::new(
                    "raspi",
                    "",
                    "raspi media need a [raspi] section with firmware and linux paths",
                ));
            }
        }
        let label = self.label();
        if label.is_empty()
            || label.len() > 16
            || !label.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(ParseError::new("label", &label, "1 to 16 of A-Z, 0-9 and '_'"));
        }
        Ok(())
    }

    /// The architectures, x86_64 first (on media for both it is the main kernel, which
    /// BIOS and x86_64 UEFI boot).
    pub fn arches(&self) -> Vec<Arch> {
        let mut arches = self.architectures.clone();
        arches.sort_by_key(|a| *a != Arch::X86_64);
        arches
    }

    /// The volume label: as given, or the name in upper case with '-' as '_'.
    pub fn label(&self) -> String {
        match &self.label {
            Some(label) => label.clone(),
            None => {
                self.name.as_str().to_ascii_uppercase().replace('-', "_").chars().take(16).collect()
            }
        }
    }

    /// The artifact name of the medium in `format`.
    pub fn artifact_name(&self, format: MediaFormat) -> ArtifactName {
        ArtifactName::parse("name", &format!("{}.{}", self.name, format.extension()))
            .expect("a DNS label plus an extension is a valid artifact name")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = r#"
name = "demo"
architectures = ["x86_64"]
formats = ["iso", "usb"]

[boot]
media_key = "home-sticks"
kernel_cmdline = ["console=ttyS0,115200"]
"#;

    #[test]
    fn a_definition_parses_with_defaults() {
        let d = ImageDefinition::from_toml(DEMO).unwrap();
        assert_eq!(d.label(), "DEMO");
        assert!(d.boot.bios);
        assert_eq!(d.artifact_name(MediaFormat::Iso).as_str(), "demo.iso");
        assert_eq!(d.artifact_name(MediaFormat::Usb).as_str(), "demo.img");
    }

    #[test]
    fn the_definitions_in_images_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../images");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                ImageDefinition::from_toml(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
                seen += 1;
            }
        }
        assert!(seen >= 2, "images/*.toml");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let typo = DEMO.replace("kernel_cmdline", "kernel_cmdlnie");
        let err = ImageDefinition::from_toml(&typo).unwrap_err().to_string();
        assert!(err.contains("kernel_cmdlnie") && err.contains("line"), "{err}");
        let top = format!("{DEMO}\n[extra]\nx = 1\n");
        assert!(ImageDefinition::from_toml(&top).unwrap_err().to_string().contains("extra"));
        let floppy = DEMO.replace(r#"["iso", "usb"]"#, r#"["floppy"]"#);
        assert!(ImageDefinition::from_toml(&floppy).unwrap_err().to_string().contains("floppy"));
        let no_key = DEMO.replace(r#"media_key = "home-sticks""#, "");
        assert!(ImageDefinition::from_toml(&no_key).unwrap_err().to_string().contains("media_key"));
        let twice = DEMO.replace(r#"["iso", "usb"]"#, r#"["iso", "iso"]"#);
        assert!(ImageDefinition::from_toml(&twice).unwrap_err().to_string().contains("twice"));
        let raspi = DEMO.replace(r#"["iso", "usb"]"#, r#"["raspi"]"#);
        assert!(ImageDefinition::from_toml(&raspi).unwrap_err().to_string().contains("arm64"));
        // arm64 media default to the arm64 discovery image, like x86_64 ones.
        let arm = DEMO.replace(r#"["x86_64"]"#, r#"["arm64"]"#);
        assert_eq!(ImageDefinition::from_toml(&arm).unwrap().arches(), [Arch::Arm64]);
        let both = DEMO.replace(r#"["x86_64"]"#, r#"["arm64", "x86_64"]"#);
        assert_eq!(
            ImageDefinition::from_toml(&both).unwrap().arches(),
            [Arch::X86_64, Arch::Arm64]
        );
        let twice = DEMO.replace(r#"["x86_64"]"#, r#"["arm64", "arm64"]"#);
        assert!(ImageDefinition::from_toml(&twice).is_err());
        let both_kernel = format!("{both}\n[artifacts]\nkernel = \"k\"\n");
        assert!(
            ImageDefinition::from_toml(&both_kernel)
                .unwrap_err()
                .to_string()
                .contains("one architecture")
        );
        let label = format!("label = \"bad label\"\n{DEMO}");
        assert!(ImageDefinition::from_toml(&label).unwrap_err().to_string().contains("label"));
    }
}
