use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{MacAddr, Name, ParseError, Tags};

/// CPU architecture of a machine, as it decides which bootloader and image it gets.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
pub enum Arch {
    #[serde(rename = "x86_64", alias = "amd64")]
    X86_64,
    #[serde(rename = "arm64", alias = "aarch64")]
    Arm64,
}

impl Arch {
    /// Every architecture ctpf boots.
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Arm64];

    /// The name ctpf uses (`x86_64`, `arm64`): in artifact names and boot URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Debian's name for it (`amd64`, `arm64`), as in `busybox-static:arm64`.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The Rust target of static (musl) binaries for it, such as the discovery agent.
    pub fn musl_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Arm64 => "aarch64-unknown-linux-musl",
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = ParseError;

    /// `x86_64` or `arm64`, or the spellings serde also takes (`amd64`, `aarch64`).
    fn from_str(text: &str) -> Result<Self, ParseError> {
        match text {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "arm64" | "aarch64" => Ok(Arch::Arm64),
            _ => Err(ParseError::new("arch", text, "x86_64 or arm64")),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a machine is in its life: discovered by its own callback, given a profile, installing,
/// installed, joined to the overlay and cluster (ready), failed, or retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Discovered,
    Assigned,
    Installing,
    Installed,
    Ready,
    Failed,
    Retired,
}

/// What a client sends to register a machine by hand (booted machines register through the
/// enrollment callback instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewHost {
    pub datacenter: Name,
    #[serde(default)]
    pub hostname: Option<Name>,
    #[serde(default)]
    pub macs: Vec<MacAddr>,
    #[serde(default)]
    pub smbios_uuid: Option<Uuid>,
    #[serde(default)]
    pub arch: Option<Arch>,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub labels: Tags,
}

impl NewHost {
    /// Cross-field checks serde cannot express.
    pub fn validate(&self) -> Result<(), ParseError> {
        if self.macs.is_empty() && self.smbios_uuid.is_none() {
            return Err(ParseError::new(
                "macs",
                "[]",
                "a host needs at least one MAC or an SMBIOS UUID",
            ));
        }
        for (i, mac) in self.macs.iter().enumerate() {
            if self.macs[..i].contains(mac) {
                return Err(ParseError::new(format!("macs[{i}]"), mac.to_string(), "listed twice"));
            }
        }
        Ok(())
    }
}

/// A change to a host: only the fields given are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostPatch {
    #[serde(default)]
    pub state: Option<HostState>,
    #[serde(default)]
    pub hostname: Option<Name>,
    #[serde(default)]
    pub labels: Option<Tags>,
}

/// A machine known to ctpf. One identity per machine for its whole life: matched by SMBIOS
/// UUID first, then by any of its MACs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub id: Uuid,
    pub datacenter: Name,
    pub hostname: Option<Name>,
    pub macs: Vec<MacAddr>,
    pub smbios_uuid: Option<Uuid>,
    pub arch: Option<Arch>,
    pub state: HostState,
    #[schema(value_type = Vec<String>)]
    pub addresses: Vec<IpAddr>,
    pub labels: Tags,
    /// Hardware facts from the machine's own last report (empty until it enrolls).
    #[serde(default)]
    pub inventory: crate::Inventory,
    /// The media key it last enrolled with (its name), if it enrolled from boot media.
    #[serde(default)]
    pub media_key: Option<Name>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
}

impl Host {
    pub fn new(id: Uuid, new: NewHost, state: HostState, now: OffsetDateTime) -> Self {
        Self {
            id,
            datacenter: new.datacenter,
            hostname: new.hostname,
            macs: new.macs,
            smbios_uuid: new.smbios_uuid,
            arch: new.arch,
            state,
            addresses: new.addresses,
            labels: new.labels,
            inventory: crate::Inventory::default(),
            media_key: None,
            created_at: now,
            updated_at: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_json(macs: &str) -> String {
        format!(r#"{{"datacenter":"home","macs":{macs}}}"#)
    }

    #[test]
    fn new_host_names_the_bad_mac() {
        let err = serde_json::from_str::<NewHost>(&host_json(r#"["52:54:00:00:00:01","nope"]"#))
            .unwrap_err();
        assert!(err.to_string().contains("invalid mac \"nope\""), "{err}");
    }

    #[test]
    fn new_host_needs_an_identity_and_unique_macs() {
        let empty: NewHost = serde_json::from_str(&host_json("[]")).unwrap();
        assert_eq!(empty.validate().unwrap_err().field, "macs");
        let dup: NewHost =
            serde_json::from_str(&host_json(r#"["52:54:00:00:00:01","52-54-00-00-00-01"]"#))
                .unwrap();
        assert_eq!(dup.validate().unwrap_err().field, "macs[1]");
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<NewHost>(r#"{"datacenter":"home","mac":"x"}"#).is_err());
    }

    #[test]
    fn arch_accepts_distro_spellings() {
        assert_eq!(serde_json::from_str::<Arch>("\"aarch64\"").unwrap(), Arch::Arm64);
        assert_eq!(serde_json::from_str::<Arch>("\"amd64\"").unwrap(), Arch::X86_64);
        assert_eq!("aarch64".parse::<Arch>().unwrap(), Arch::Arm64);
        assert!("riscv64".parse::<Arch>().unwrap_err().to_string().contains("x86_64 or arm64"));
        assert_eq!(serde_json::to_string(&Arch::X86_64).unwrap(), "\"x86_64\"");
        for arch in Arch::ALL {
            let json = serde_json::to_string(&arch).unwrap();
            assert_eq!(json, format!("\"{arch}\""), "as_str matches serde");
            assert_eq!(arch.as_str().parse::<Arch>().unwrap(), arch);
        }
    }
}
