//! The network-boot flags of `ctpf up` (`--boot-interface`, `--dhcp*`, `--tftp-root`) and
//! how they become a [`BootServiceConfig`]. Every error names the flag at fault.

use std::{
    net::Ipv4Addr,
    ops::RangeInclusive,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use ctpf_common::MacAddr;
use ctpf_distributors::{
    boot_service::{BootServiceConfig, DhcpSetting},
    dhcp::{BootConfig, NetworkConfig},
};

/// Where Debian's `ipxe` package puts undionly.kpxe and ipxe.efi.
const DEBIAN_IPXE_DIR: &str = "/usr/lib/ipxe";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DhcpMode {
    /// Add boot information to the offers of the network's own DHCP server.
    Proxy,
    /// Hand out addresses from --dhcp-range (a network without another DHCP server).
    Authoritative,
    /// No DHCP; only TFTP (another DHCP server points machines here).
    Off,
}

/// What PXE clients load first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PxeLoader {
    /// iPXE (`undionly.kpxe`, `ipxe.efi` from --tftp-root), which chains ctpf's iPXE scripts.
    #[default]
    Ipxe,
    /// GRUB images ctpf builds with its URL embedded (`core.0`, `grubx64.efi`; Debian's
    /// grub-pc-bin and grub-efi-amd64-bin), which load ctpf's GRUB configs.
    Grub,
}

#[derive(Debug, Args)]
pub struct BootArgs {
    /// Serve network boot (DHCP, TFTP) on this interface. Without --listen, the API then
    /// listens on all addresses so booting machines can reach it.
    #[arg(long, env = "CTPF_BOOT_INTERFACE", value_name = "IFACE")]
    pub boot_interface: Option<String>,
    /// DHCP role on the boot interface [default: proxy].
    #[arg(long, env = "CTPF_DHCP", value_enum)]
    pub dhcp: Option<DhcpMode>,
    /// Addresses handed out in authoritative mode, e.g. 192.168.77.100-192.168.77.199.
    #[arg(long, env = "CTPF_DHCP_RANGE", value_name = "FIRST-LAST")]
    pub dhcp_range: Option<String>,
    /// A fixed address for one machine (authoritative mode), repeatable.
    #[arg(long = "dhcp-reserve", value_name = "MAC=IP")]
    pub dhcp_reservations: Vec<String>,
    /// Default gateway handed out in authoritative mode (none by default: an isolated
    /// provisioning network needs none, and a wrong guess breaks the machines' networking).
    #[arg(long, env = "CTPF_DHCP_ROUTER", value_name = "IP")]
    pub dhcp_router: Option<Ipv4Addr>,
    /// DNS servers handed out in authoritative mode, repeatable.
    #[arg(long = "dhcp-dns", env = "CTPF_DHCP_DNS", value_delimiter = ',', value_name = "IP")]
    pub dhcp_dns: Vec<Ipv4Addr>,
    /// Directory served over TFTP [default: /usr/lib/ipxe if it exists, else DATA_DIR/tftp].
    #[arg(long, env = "CTPF_TFTP_ROOT", value_name = "DIR")]
    pub tftp_root: Option<PathBuf>,
    /// Send IPv6 router advertisements (as no router: lifetime 0, no prefixes) on the boot
    /// interface, so iPXE does not wait ~13 s for one on every boot.
    #[arg(long, env = "CTPF_IPV6_RA")]
    pub ipv6_ra: bool,
    /// The boot loader PXE clients get.
    #[arg(long, env = "CTPF_PXE_LOADER", value_enum, default_value_t)]
    pub pxe_loader: PxeLoader,
}

impl BootArgs {
    /// The boot service to run, or `None` without `--boot-interface`. Its `boot` URLs are
    /// placeholders until the API is bound (see `server::run_control_plane`).
    pub fn service_config(&self, data_dir: &Path) -> Result<Option<BootServiceConfig>> {
        let Some(interface) = &self.boot_interface else {
            let stray = [
                ("--dhcp", self.dhcp.is_some()),
                ("--dhcp-range", self.dhcp_range.is_some()),
                ("--dhcp-reserve", !self.dhcp_reservations.is_empty()),
                ("--dhcp-router", self.dhcp_router.is_some()),
                ("--dhcp-dns", !self.dhcp_dns.is_empty()),
                ("--tftp-root", self.tftp_root.is_some()),
                ("--ipv6-ra", self.ipv6_ra),
                ("--pxe-loader", self.pxe_loader != PxeLoader::Ipxe),
            ];
            if let Some((flag, _)) = stray.iter().find(|(_, given)| *given) {
                bail!("{flag} needs --boot-interface IFACE");
            }
            return Ok(None);
        };
        let (address, netmask) = interface_ipv4(interface)?;
        let mode = self.dhcp.unwrap_or(DhcpMode::Proxy);
        if mode != DhcpMode::Authoritative {
            if self.dhcp_range.is_some() {
                bail!("--dhcp-range is only used with --dhcp authoritative");
            }
            if !self.dhcp_reservations.is_empty() {
                bail!("--dhcp-reserve is only used with --dhcp authoritative");
            }
            if self.dhcp_router.is_some() || !self.dhcp_dns.is_empty() {
                bail!("--dhcp-router and --dhcp-dns are only used with --dhcp authoritative");
            }
        }
        let dhcp = match mode {
            DhcpMode::Off => DhcpSetting::Off,
            DhcpMode::Proxy => DhcpSetting::Proxy,
            DhcpMode::Authoritative => {
                let range = self
                    .dhcp_range
                    .as_deref()
                    .context("--dhcp authoritative needs --dhcp-range FIRST-LAST")?;
                let range = parse_range(range, address, netmask)?;
                let reservations = self
                    .dhcp_reservations
                    .iter()
                    .map(|text| parse_reservation(text, address, netmask))
                    .collect::<Result<_>>()?;
                DhcpSetting::Authoritative {
                    range,
                    reservations,
                    // Router and DNS only when given: guessing them wrong would break the
                    // machines' networking.
                    network: NetworkConfig {
                        subnet_mask: netmask,
                        routers: router_in_subnet(self.dhcp_router, address, netmask)?
                            .into_iter()
                            .collect(),
                        dns_servers: self.dhcp_dns.clone(),
                        domain_name: None,
                    },
                    journal: data_dir.join("dhcp-leases.journal"),
                }
            }
        };
        Ok(Some(BootServiceConfig {
            interface: interface.clone(),
            address,
            dhcp,
            tftp_root: self.tftp_root(data_dir)?,
            boot: BootConfig::standard(address, 0),
            ipv6_router_adverts: self.ipv6_ra,
            // Filled in once the artifact store is open (see `server::run_control_plane`).
            tftp_artifacts: None,
            // Likewise once the bus is open.
            events: ctpf_distributors::boot_events::BootEvents::off(),
        }))
    }

    fn tftp_root(&self, data_dir: &Path) -> Result<PathBuf> {
        if let Some(root) = &self.tftp_root {
            if !root.is_dir() {
                bail!("--tftp-root {}: not a directory", root.display());
            }
            return Ok(root.clone());
        }
        if Path::new(DEBIAN_IPXE_DIR).is_dir() {
            return Ok(PathBuf::from(DEBIAN_IPXE_DIR));
        }
        let root = data_dir.join("tftp");
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating the TFTP root {}", root.display()))?;
        tracing::warn!(
            root = %root.display(),
            "{DEBIAN_IPXE_DIR} does not exist (apt-get install ipxe); serving TFTP from DATA_DIR/tftp"
        );
        Ok(root)
    }
}

/// The boot URLs once the API's public URL is known: iPXE gets `{public_url}/boot.ipxe`.
pub fn boot_config(address: Ipv4Addr, public_url: &str) -> BootConfig {
    BootConfig::ipxe_chain(address, public_url)
}

/// The first IPv4 address of `interface` and its netmask.
pub fn interface_ipv4(interface: &str) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing network interfaces")?;
    let mut exists = false;
    for ifaddr in addrs.filter(|a| a.interface_name == interface) {
        exists = true;
        let ipv4 = |a: Option<nix::sys::socket::SockaddrStorage>| {
            a.and_then(|a| a.as_sockaddr_in().map(|sin| sin.ip()))
        };
        if let Some(address) = ipv4(ifaddr.address) {
            let netmask = ipv4(ifaddr.netmask).unwrap_or(Ipv4Addr::new(255, 255, 255, 255));
            return Ok((address, netmask));
        }
    }
    if exists {
        bail!("--boot-interface {interface}: the interface has no IPv4 address");
    }
    bail!("--boot-interface {interface}: no such network interface");
}

/// A gateway must be on the boot subnet, or clients cannot reach it.
fn router_in_subnet(
    router: Option<Ipv4Addr>,
    address: Ipv4Addr,
    netmask: Ipv4Addr,
) -> Result<Option<Ipv4Addr>> {
    match router {
        Some(ip) if !in_subnet(ip, address, netmask) => {
            bail!("--dhcp-router {ip} is outside {address}/{netmask}")
        }
        other => Ok(other),
    }
}

fn in_subnet(ip: Ipv4Addr, address: Ipv4Addr, netmask: Ipv4Addr) -> bool {
    ip.to_bits() & netmask.to_bits() == address.to_bits() & netmask.to_bits()
}

fn parse_range(
    text: &str,
    address: Ipv4Addr,
    netmask: Ipv4Addr,
) -> Result<RangeInclusive<Ipv4Addr>> {
    let bad = |why: &str| anyhow::anyhow!("--dhcp-range {text:?}: {why}");
    let (first, last) = text.split_once('-').ok_or_else(|| bad("expected FIRST-LAST"))?;
    let first: Ipv4Addr = first.trim().parse().map_err(|_| bad("FIRST is not an IPv4 address"))?;
    let last: Ipv4Addr = last.trim().parse().map_err(|_| bad("LAST is not an IPv4 address"))?;
    if first > last {
        return Err(bad("FIRST comes after LAST"));
    }
    if !in_subnet(first, address, netmask) || !in_subnet(last, address, netmask) {
        return Err(bad(&format!("not inside the boot interface's subnet {address}/{netmask}")));
    }
    if (first..=last).contains(&address) {
        return Err(bad(&format!("contains the boot interface's own address {address}")));
    }
    Ok(first..=last)
}

fn parse_reservation(
    text: &str,
    address: Ipv4Addr,
    netmask: Ipv4Addr,
) -> Result<(MacAddr, Ipv4Addr)> {
    let bad = |why: &str| anyhow::anyhow!("--dhcp-reserve {text:?}: {why}");
    let (mac, ip) = text.split_once('=').ok_or_else(|| bad("expected MAC=IP"))?;
    let mac = MacAddr::parse("--dhcp-reserve", mac.trim()).map_err(|e| bad(&e.to_string()))?;
    let ip: Ipv4Addr = ip.trim().parse().map_err(|_| bad("IP is not an IPv4 address"))?;
    if !in_subnet(ip, address, netmask) || ip == address {
        return Err(bad(&format!("IP must be another address in {address}/{netmask}")));
    }
    Ok((mac, ip))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);

    #[test]
    fn parses_a_range_inside_the_subnet() {
        let range = parse_range("10.77.0.100-10.77.0.150", ADDR, MASK).unwrap();
        assert_eq!(range, Ipv4Addr::new(10, 77, 0, 100)..=Ipv4Addr::new(10, 77, 0, 150));
    }

    #[test]
    fn bad_ranges_name_the_flag() {
        for bad in [
            "10.77.0.100",
            "10.77.0.150-10.77.0.100",
            "10.77.1.100-10.77.1.150",
            "10.77.0.1-10.77.0.10",
            "x-10.77.0.5",
        ] {
            let error = parse_range(bad, ADDR, MASK).unwrap_err().to_string();
            assert!(error.starts_with("--dhcp-range"), "{bad}: {error}");
        }
    }

    #[test]
    fn routers_must_be_on_the_subnet() {
        let (addr, mask) = (Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(255, 255, 255, 0));
        let ok = router_in_subnet(Some(Ipv4Addr::new(10, 77, 0, 254)), addr, mask).unwrap();
        assert_eq!(ok, Some(Ipv4Addr::new(10, 77, 0, 254)));
        assert_eq!(router_in_subnet(None, addr, mask).unwrap(), None);
        let err = router_in_subnet(Some(Ipv4Addr::new(192, 168, 1, 1)), addr, mask).unwrap_err();
        assert!(err.to_string().contains("--dhcp-router"), "{err}");
    }

    #[test]
    fn parses_reservations() {
        let (mac, ip) = parse_reservation("52:54:00:12:34:56=10.77.0.20", ADDR, MASK).unwrap();
        assert_eq!(mac.to_string(), "52:54:00:12:34:56");
        assert_eq!(ip, Ipv4Addr::new(10, 77, 0, 20));
        for bad in ["52:54:00:12:34:56", "nope=10.77.0.20", "52:54:00:12:34:56=10.78.0.2"] {
            let error = parse_reservation(bad, ADDR, MASK).unwrap_err().to_string();
            assert!(error.starts_with("--dhcp-reserve"), "{bad}: {error}");
        }
    }

    #[test]
    fn unknown_interface_names_the_flag() {
        let error = interface_ipv4("ctpf-no-such-if0").unwrap_err().to_string();
        assert!(error.contains("--boot-interface"), "{error}");
    }

    #[test]
    fn boot_urls_follow_the_public_url() {
        let boot = boot_config(ADDR, "http://10.77.0.1:7480/");
        assert_eq!(boot.ipxe_script_url.as_deref(), Some("http://10.77.0.1:7480/boot.ipxe"));
        assert_eq!(boot.tftp_server, ADDR);
        assert_eq!(boot.bios_file, "undionly.kpxe");
    }
}
