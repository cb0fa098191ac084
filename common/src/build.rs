//! Builds: what a client asks a builder to make, and the manifest describing what it made.
//! A build travels as a job (`JobSpec::Build`); the builder validates the request in full
//! (targets, scripts, paths on its machine) and answers with a [`BuildManifest`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::{Arch, ArtifactKind, ArtifactName, Sha256Digest};

/// One build. Paths name files on the builder's machine (under `ctpf up`, this machine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "recipe", rename_all = "snake_case", deny_unknown_fields)]
pub enum BuildRequest {
    /// A standalone GRUB image with an embedded config (`grub-mkimage`).
    Grub {
        /// `x86_64-efi`, `arm64-efi`, `i386-pc-pxe` (PXE `core.0`) or `i386-pc-eltorito`.
        target: String,
        /// The embedded config. Omitted: the manager fills in its own entry config (GRUB's
        /// network stack fetches the per-machine config from this ctpf).
        #[serde(default)]
        config: Option<String>,
        /// With no config: embed one that loads iPXE from the manager over HTTP (for sites
        /// that keep iPXE scripts) instead of GRUB's own per-machine config.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        chain_ipxe: bool,
    },
    /// The iPXE make frontend over a source tree.
    Ipxe {
        /// The iPXE tree (or its `src` directory) on the builder.
        source: String,
        /// `bin/undionly.kpxe`, `bin/ipxe.lkrn`, `bin-x86_64-efi/ipxe.efi`, `bin-arm64-efi/ipxe.efi`.
        targets: Vec<String>,
        /// Embedded with `EMBED=`; must start with `#!ipxe`.
        #[serde(default)]
        embed: Option<String>,
        /// CA certificate files for HTTPS (`TRUST=`).
        #[serde(default)]
        trust: Vec<String>,
        /// Client certificate files (`CERT=`).
        #[serde(default)]
        certs: Vec<String>,
        /// Build options, e.g. `DOWNLOAD_PROTO_HTTPS: true` (`#define`) or `false` (`#undef`).
        #[serde(default)]
        options: BTreeMap<String, bool>,
        #[serde(default)]
        no_werror: bool,
    },
    /// isolinux.bin, isohdpfx.bin, ldlinux.c32 and pxelinux.0 from Debian's packages.
    Syslinux {},
    /// The Raspberry Pi boot files: firmware (`bootcode.bin`, `start*.elf`, `fixup*.dat`)
    /// from Debian's raspi-firmware and the device trees of an arm64 kernel package. Each
    /// output's `file` is its path on the Pi's boot partition.
    RaspiFirmware {
        /// The unpacked raspi-firmware package (`dpkg -x`), or `/`.
        firmware: String,
        /// The unpacked arm64 linux-image package (its `usr/lib/linux-image-*/broadcom`).
        linux: String,
    },
    /// The discovery image: kernel and initramfs with the NIC drivers, busybox and agent.
    Discovery {
        /// An unpacked Debian linux-image package (`dpkg -x`), or `/`.
        linux: String,
        /// A static busybox.
        busybox: String,
        /// The static `ctpf-agent`.
        agent: String,
        /// The architecture the image must be for. The kernel package decides it; busybox,
        /// the agent and the modules must match the kernel, and a kernel of another
        /// architecture than this is refused. Omitted: whatever the kernel is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        arch: Option<Arch>,
    },
}

impl BuildRequest {
    pub fn recipe(&self) -> &'static str {
        match self {
            BuildRequest::Grub { .. } => "grub",
            BuildRequest::Ipxe { .. } => "ipxe",
            BuildRequest::Syslinux {} => "syslinux",
            BuildRequest::RaspiFirmware { .. } => "raspi_firmware",
            BuildRequest::Discovery { .. } => "discovery",
        }
    }
}

/// A build job as clients submit it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBuild {
    pub request: BuildRequest,
    /// When set, the outputs are also recorded as artifacts `NAME-FILE` once the build
    /// succeeds (e.g. `discovery-x86_64` gives `discovery-x86_64-vmlinuz`).
    #[serde(default)]
    pub name: Option<ArtifactName>,
    /// Extra tags a builder must carry (`role=builder` is implied).
    #[serde(default)]
    pub selector: crate::TagSelector,
}

/// One file a build made, stored in the artifact store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BuildOutput {
    /// The file's name (`grubx64.efi`, `undionly.kpxe`, `vmlinuz`, ...).
    pub file: String,
    pub kind: ArtifactKind,
    pub digest: Sha256Digest,
    pub size: u64,
}

/// What a build made and from what, stored beside its outputs; the same inputs give the
/// same key, and a key already in the store is answered from there without building.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BuildManifest {
    pub recipe: String,
    pub recipe_version: String,
    /// sha256 over the recipe version, inputs, variables and tool versions.
    pub key: Sha256Digest,
    /// Each input by name: a digest for files and trees, the value for settings.
    pub inputs: BTreeMap<String, String>,
    /// Tool name to its version line (or package version).
    pub tools: BTreeMap<String, String>,
    pub outputs: Vec<BuildOutput>,
    pub source_date_epoch: u64,
    /// How long the build itself took (not a cache lookup).
    pub duration_ms: u64,
    pub log_lines: u64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub built_at: OffsetDateTime,
    /// True when this answer came from the cache (no process ran).
    #[serde(default)]
    pub cached: bool,
}

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Lines the builder itself writes (what it is doing, cache hits).
    Builder,
}

/// One line of a build's log, numbered from 1 per build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BuildLogLine {
    pub seq: u64,
    pub stream: LogStream,
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_by_recipe_and_strict() {
        let json = r#"{"request":{"recipe":"grub","target":"x86_64-efi"},"name":"my-grub"}"#;
        let build: NewBuild = serde_json::from_str(json).unwrap();
        assert_eq!(build.request.recipe(), "grub");
        assert_eq!(build.name.unwrap().as_str(), "my-grub");
        let unknown = r#"{"request":{"recipe":"grub","target":"x86_64-efi","colour":"red"}}"#;
        assert!(serde_json::from_str::<NewBuild>(unknown).is_err());
        let bad_recipe = r#"{"request":{"recipe":"lilo"}}"#;
        assert!(serde_json::from_str::<NewBuild>(bad_recipe).is_err());
    }
}
