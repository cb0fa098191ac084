//! What a booting machine tells scripts-svc about itself.

use std::fmt;

use ctpf_common::{Arch, MacAddr, Name, ParseError, Uuid};
use serde::Deserialize;

/// The firmware flavour an iPXE binary runs on, from its `${buildarch}` and `${platform}`
/// settings. It decides how a machine boots its local disk and which kernel it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScriptArch {
    /// Legacy BIOS (`undionly.kpxe`, `ipxe.pxe`). Its iPXE is usually an i386 build even on
    /// 64-bit CPUs, so `buildarch` is `i386` or `x86_64`; ctpf only boots x86_64 kernels.
    X86_64Bios,
    /// x86_64 UEFI (`ipxe.efi`, `snponly.efi`).
    X86_64Efi,
    /// arm64 UEFI.
    Arm64Efi,
}

impl ScriptArch {
    pub const ALL: [Self; 3] = [Self::X86_64Bios, Self::X86_64Efi, Self::Arm64Efi];

    /// Maps iPXE's `${buildarch}` and `${platform}`; errors name `arch` or `platform`.
    pub fn from_ipxe(buildarch: &str, platform: &str) -> Result<Self, ParseError> {
        match (platform, buildarch) {
            ("pcbios", "i386" | "x86_64") => Ok(Self::X86_64Bios),
            ("efi", "x86_64") => Ok(Self::X86_64Efi),
            ("efi", "arm64") => Ok(Self::Arm64Efi),
            ("pcbios" | "efi", _) => Err(ParseError::new(
                "arch",
                buildarch,
                format!(
                    "is not supported on platform {platform:?} (want i386/x86_64 on pcbios, x86_64/arm64 on efi)"
                ),
            )),
            _ => Err(ParseError::new("platform", platform, "must be \"pcbios\" or \"efi\"")),
        }
    }

    /// The CPU architecture of the kernel this machine needs.
    pub fn cpu(self) -> Arch {
        match self {
            Self::X86_64Bios | Self::X86_64Efi => Arch::X86_64,
            Self::Arm64Efi => Arch::Arm64,
        }
    }

    /// The CPU architecture as it appears in ctpf's URLs (`x86_64`, `arm64`), matching
    /// `Arch`'s serde names.
    pub fn cpu_name(self) -> &'static str {
        match self.cpu() {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }

    pub fn is_efi(self) -> bool {
        !matches!(self, Self::X86_64Bios)
    }

    /// A stable name: `x86_64-bios`, `x86_64-efi`, `arm64-efi`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X86_64Bios => "x86_64-bios",
            Self::X86_64Efi => "x86_64-efi",
            Self::Arm64Efi => "arm64-efi",
        }
    }
}

impl fmt::Display for ScriptArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated request for a machine's script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootRequest {
    /// The MAC of the NIC that is booting (the entry script sends the one that got a lease).
    pub mac: MacAddr,
    /// SMBIOS UUID; `None` when the firmware has none (or a placeholder, see [`BootQuery`]).
    pub uuid: Option<Uuid>,
    pub arch: ScriptArch,
    pub datacenter: Option<Name>,
}

/// The raw query string the entry script sends:
/// `?mac=${netX/mac:hexhyp}&uuid=${uuid}&arch=${buildarch}&platform=${platform}`
/// (plus `datacenter` where a DHCP relay or a per-site entry URL adds it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct BootQuery {
    pub mac: String,
    #[serde(default)]
    pub uuid: Option<String>,
    pub arch: String,
    pub platform: String,
    #[serde(default)]
    pub datacenter: Option<String>,
}

impl BootQuery {
    /// Validates every field; errors name the query parameter.
    pub fn into_request(self) -> Result<BootRequest, ParseError> {
        let mac = MacAddr::parse("mac", &self.mac)?;
        let uuid = match self.uuid.as_deref() {
            None | Some("") => None,
            Some(text) => {
                let uuid = Uuid::parse_str(text)
                    .map_err(|_| ParseError::new("uuid", text, "is not a UUID"))?;
                // Boards without a real SMBIOS UUID report all zeros or all ones; they are not
                // identities, and matching on them would merge unrelated machines.
                let placeholder = uuid.is_nil() || uuid.as_bytes().iter().all(|&b| b == 0xff);
                (!placeholder).then_some(uuid)
            }
        };
        let arch = ScriptArch::from_ipxe(&self.arch, &self.platform)?;
        let datacenter = match self.datacenter.as_deref() {
            None | Some("") => None,
            Some(text) => Some(Name::parse("datacenter", text)?),
        };
        Ok(BootRequest { mac, uuid, arch, datacenter })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(mac: &str, uuid: &str, arch: &str, platform: &str) -> BootQuery {
        BootQuery {
            mac: mac.into(),
            uuid: Some(uuid.into()),
            arch: arch.into(),
            platform: platform.into(),
            datacenter: None,
        }
    }

    #[test]
    fn maps_ipxe_arch_and_platform() {
        assert_eq!(ScriptArch::from_ipxe("i386", "pcbios").unwrap(), ScriptArch::X86_64Bios);
        assert_eq!(ScriptArch::from_ipxe("x86_64", "pcbios").unwrap(), ScriptArch::X86_64Bios);
        assert_eq!(ScriptArch::from_ipxe("x86_64", "efi").unwrap(), ScriptArch::X86_64Efi);
        assert_eq!(ScriptArch::from_ipxe("arm64", "efi").unwrap(), ScriptArch::Arm64Efi);
        assert_eq!(ScriptArch::from_ipxe("i386", "efi").unwrap_err().field, "arch");
        assert_eq!(ScriptArch::from_ipxe("x86_64", "linux").unwrap_err().field, "platform");
    }

    #[test]
    fn parses_the_entry_scripts_query() {
        let request =
            query("52-54-00-12-34-56", "8a7c3e0e-5e2f-4f3a-9d51-0b6c6d1f2a11", "x86_64", "efi")
                .into_request()
                .unwrap();
        assert_eq!(request.mac.to_string(), "52:54:00:12:34:56");
        assert!(request.uuid.is_some());
        assert_eq!(request.arch, ScriptArch::X86_64Efi);
    }

    #[test]
    fn placeholder_and_empty_uuids_are_none() {
        for uuid in
            ["", "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"]
        {
            let request = query("525400123456", uuid, "i386", "pcbios").into_request().unwrap();
            assert_eq!(request.uuid, None, "{uuid}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let err = query("nope", "", "x86_64", "efi").into_request().unwrap_err();
        assert_eq!(err.field, "mac");
        let err = query("525400123456", "x", "x86_64", "efi").into_request().unwrap_err();
        assert_eq!(err.field, "uuid");
        let mut with_dc = query("525400123456", "", "x86_64", "efi");
        with_dc.datacenter = Some("Bad DC".into());
        assert_eq!(with_dc.into_request().unwrap_err().field, "datacenter");
    }
}
