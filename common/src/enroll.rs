use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{Arch, MacAddr, ParseError};

/// What a booted machine (the discovery agent, or an installed OS calling home) reports about
/// itself when it enrolls with its one-time token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostReport {
    pub macs: Vec<MacAddr>,
    #[serde(default)]
    pub smbios_uuid: Option<Uuid>,
    pub arch: Arch,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub inventory: Inventory,
}

/// Hardware facts, as the machine reports them (free text from firmware, bounded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub vendor: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub cpu_model: Option<String>,
    #[serde(default)]
    pub cpu_cores: Option<u32>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    #[serde(default)]
    pub disks: Vec<Disk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Kernel name, e.g. `sda`, `nvme0n1`.
    pub name: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub model: Option<String>,
}

/// Firmware strings end up in tables, logs and scripts: keep them printable and short.
fn check_text(field: &str, value: &str, max: usize) -> Result<(), ParseError> {
    if value.len() > max {
        return Err(ParseError::new(field, value, format!("longer than {max} bytes")));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(ParseError::new(field, value, "contains control characters"));
    }
    Ok(())
}

impl HostReport {
    /// Checks what serde cannot: at least one MAC, no duplicates, bounded printable text.
    pub fn validate(&self) -> Result<(), ParseError> {
        if self.macs.is_empty() {
            return Err(ParseError::new("macs", "[]", "at least one MAC is required"));
        }
        if self.macs.len() > 32 {
            return Err(ParseError::new("macs", self.macs.len().to_string(), "at most 32 MACs"));
        }
        for (i, mac) in self.macs.iter().enumerate() {
            if self.macs[..i].contains(mac) {
                return Err(ParseError::new(format!("macs[{i}]"), mac.to_string(), "listed twice"));
            }
        }
        if self.addresses.len() > 64 {
            return Err(ParseError::new(
                "addresses",
                self.addresses.len().to_string(),
                "at most 64",
            ));
        }
        let inv = &self.inventory;
        let texts = [
            ("inventory.serial", &inv.serial),
            ("inventory.vendor", &inv.vendor),
            ("inventory.model", &inv.model),
            ("inventory.cpu_model", &inv.cpu_model),
        ];
        for (field, value) in texts {
            if let Some(value) = value {
                check_text(field, value, 128)?;
            }
        }
        if inv.disks.len() > 64 {
            return Err(ParseError::new(
                "inventory.disks",
                inv.disks.len().to_string(),
                "at most 64",
            ));
        }
        for (i, disk) in inv.disks.iter().enumerate() {
            check_text(&format!("inventory.disks[{i}].name"), &disk.name, 64)?;
            if let Some(model) = &disk.model {
                check_text(&format!("inventory.disks[{i}].model"), model, 128)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(json: &str) -> Result<HostReport, String> {
        let r: HostReport = serde_json::from_str(json).map_err(|e| e.to_string())?;
        r.validate().map_err(|e| e.to_string())?;
        Ok(r)
    }

    #[test]
    fn reports_are_validated() {
        let ok = r#"{"macs":["52:54:00:00:00:01"],"arch":"x86_64",
            "inventory":{"serial":"PF0ABCDE","cpu_cores":4,"disks":[{"name":"sda","size_bytes":1}]}}"#;
        assert_eq!(report(ok).unwrap().inventory.cpu_cores, Some(4));
        let bad = [
            r#"{"macs":[],"arch":"x86_64"}"#,
            r#"{"macs":["52:54:00:00:00:01"],"arch":"mips"}"#,
            r#"{"macs":["52:54:00:00:00:01"],"arch":"x86_64","inventory":{"serial":"a\nb"}}"#,
            r#"{"macs":["52:54:00:00:00:01","52:54:00:00:00:01"],"arch":"x86_64"}"#,
            r#"{"macs":["52:54:00:00:00:01"],"arch":"x86_64","extra":1}"#,
        ];
        for json in bad {
            assert!(report(json).is_err(), "{json}");
        }
    }
}
