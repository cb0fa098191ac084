//! Assembles the [`HostReport`] and makes sure it is one the server accepts: the server
//! rejects an invalid report outright, and a machine stuck in discovery over a too-long
//! serial number is worse than one enrolled with a shortened one.

use std::net::IpAddr;

use ctpf_common::{Arch, HostReport, MacAddr, ParseError};

use crate::cmdline::BootParams;
use crate::inventory::{self, Root};

/// The server's bound on the number of MACs.
pub const MAX_MACS: usize = 32;

/// Why no report can be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("this agent was built for {0}; ctpf knows only x86_64 and aarch64 machines")]
    UnsupportedArch(&'static str),
    #[error(
        "no network interface with a MAC address was found (is the NIC driver loaded?), \
         and no ctpf.mac= was given"
    )]
    NoMacs,
    #[error("the report would be rejected by the server: {0}")]
    Invalid(#[from] ParseError),
}

/// The architecture this binary runs on: the agent is built per architecture, so the
/// compile target is the machine's.
pub fn host_arch() -> Result<Arch, ReportError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(Arch::X86_64),
        "aarch64" => Ok(Arch::Arm64),
        other => Err(ReportError::UnsupportedArch(other)),
    }
}

/// Everything the agent knows about the machine, bounded and validated.
pub fn build_report(
    root: &Root,
    params: &BootParams,
    addresses: Vec<IpAddr>,
) -> Result<HostReport, ReportError> {
    let macs = order_macs(params.mac, inventory::collect_macs(root));
    if macs.is_empty() {
        return Err(ReportError::NoMacs);
    }
    let report = HostReport {
        macs,
        smbios_uuid: inventory::smbios_uuid(root)
            .or_else(|| params.uuid.and_then(inventory::usable_uuid)),
        arch: host_arch()?,
        addresses: crate::addresses::reportable(addresses),
        inventory: inventory::collect_inventory(root),
    };
    report.validate()?;
    Ok(report)
}

/// The MAC that PXE-booted comes first (it is how the server saw this machine boot), then
/// the others without duplicates, at most [`MAX_MACS`]. The boot MAC is kept even when its
/// NIC is not visible (driver missing): it is still the machine's identity.
fn order_macs(boot_mac: Option<MacAddr>, found: Vec<MacAddr>) -> Vec<MacAddr> {
    let mut macs: Vec<MacAddr> = boot_mac.into_iter().collect();
    for mac in found {
        if macs.len() == MAX_MACS {
            break;
        }
        if !macs.contains(&mac) {
            macs.push(mac);
        }
    }
    macs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::tests::{fixture, machine};

    fn params(extra: &str) -> BootParams {
        BootParams::parse(&format!("ctpf.url=http://h ctpf.token=t {extra}")).unwrap()
    }

    fn mac(i: u8) -> MacAddr {
        MacAddr::new([0x52, 0x54, 0, 0, 0, i])
    }

    #[test]
    fn a_full_report_is_valid() {
        let dir = machine();
        let addresses = vec!["10.0.0.5".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let report =
            build_report(&Root::new(dir.path()), &params("ctpf.mac=52:54:00:00:00:02"), addresses)
                .unwrap();
        assert_eq!(report.macs, [mac(2), mac(1)]);
        assert_eq!(report.addresses, ["10.0.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(report.inventory.disks.len(), 2);
        assert_eq!(report.arch, host_arch().unwrap());
        report.validate().unwrap();
    }

    #[test]
    fn the_boot_mac_counts_even_without_its_nic() {
        let dir = fixture(&[]);
        let report =
            build_report(&Root::new(dir.path()), &params("ctpf.mac=52:54:00:00:00:07"), vec![])
                .unwrap();
        assert_eq!(report.macs, [mac(7)]);
        assert_eq!(report.smbios_uuid, None);
    }

    #[test]
    fn no_mac_at_all_is_an_error() {
        let dir = fixture(&[]);
        assert_eq!(
            build_report(&Root::new(dir.path()), &params(""), vec![]),
            Err(ReportError::NoMacs)
        );
    }

    #[test]
    fn uuid_falls_back_to_the_command_line() {
        let dir = fixture(&[("sys/class/net/eth0/address", "52:54:00:00:00:01")]);
        std::fs::create_dir(dir.path().join("sys/class/net/eth0/device")).unwrap();
        let uuid = "4c4c4544-0035-3010-8052-b4c04f4b4d32";
        let report =
            build_report(&Root::new(dir.path()), &params(&format!("ctpf.uuid={uuid}")), vec![])
                .unwrap();
        assert_eq!(report.smbios_uuid.unwrap().to_string(), uuid);
        let nil = "ctpf.uuid=00000000-0000-0000-0000-000000000000";
        let report = build_report(&Root::new(dir.path()), &params(nil), vec![]).unwrap();
        assert_eq!(report.smbios_uuid, None);
    }

    #[test]
    fn hostile_firmware_still_yields_a_valid_report() {
        let long = "Ü".repeat(200);
        let mut files = vec![
            ("sys/class/dmi/id/product_serial", "SER\u{1b}[31mIAL\n"),
            ("sys/class/dmi/id/sys_vendor", long.as_str()),
            ("sys/class/dmi/id/product_name", "\n\n"),
            ("sys/block/sda/size", "8\n"),
            ("sys/block/sda/device/model", long.as_str()),
        ];
        let nics: Vec<(String, String)> = (0..40u8)
            .map(|i| (format!("sys/class/net/eth{i:02}/address"), mac(i).to_string()))
            .collect();
        files.extend(nics.iter().map(|(p, c)| (p.as_str(), c.as_str())));
        let dir = fixture(&files);
        for i in 0..40u8 {
            std::fs::create_dir(dir.path().join(format!("sys/class/net/eth{i:02}/device")))
                .unwrap();
        }
        let report = build_report(&Root::new(dir.path()), &params(""), vec![]).unwrap();
        assert_eq!(report.macs.len(), MAX_MACS);
        assert_eq!(report.inventory.serial.as_deref(), Some("SER[31mIAL"));
        assert_eq!(report.inventory.vendor.as_ref().unwrap().len(), 128);
        assert_eq!(report.inventory.model, None);
        assert!(report.inventory.disks[0].model.as_ref().unwrap().len() <= 128);
    }
}
