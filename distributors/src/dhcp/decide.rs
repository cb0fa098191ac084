//! The decision: given a decoded request, the port it arrived on, the mode and (in
//! authoritative mode) what the lease table said, build the reply or stay silent. Pure: no
//! sockets, no clock, no randomness.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};

use super::classify::{ClientArch, ClientInfo, classify};
use super::leases::{LeaseAnswer, LeaseQuery};

/// PXE option 43 with one sub-option, PXE_DISCOVERY_CONTROL (6) = 8: "the boot file in this
/// reply is the one to load, skip boot server discovery". The bytes pixiecore sends (sub-option
/// 6, length 1, value 8, then the END sub-option). Sent to BIOS PXE only by default: pixiecore
/// and dnsmasq both leave it out for UEFI (arch >= 6) because some UEFI firmware ignores
/// proxy offers that carry it, and all of them then ask on port 4011, which we answer.
pub const PXE_SKIP_DISCOVERY: [u8; 4] = [6, 1, 8, 255];

/// Where a request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestPort {
    /// 67: DHCP and proxyDHCP offers.
    Dhcp,
    /// 4011: the PXE boot server port, where PXE firmware and iPXE send their ProxyDHCP
    /// REQUEST after taking an address from the real DHCP server.
    PxeBootServer,
}

impl RequestPort {
    pub fn from_port(port: u16) -> Option<Self> {
        match port {
            67 => Some(Self::Dhcp),
            4011 => Some(Self::PxeBootServer),
            _ => None,
        }
    }
}

/// What to boot and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// Our address: option 54 in every reply.
    pub server_ip: Ipv4Addr,
    /// siaddr / next-server for TFTP.
    pub tftp_server: Ipv4Addr,
    pub bios_file: String,
    pub efi_x64_file: String,
    pub efi_arm64_file: String,
    /// 32-bit UEFI is rare; without a file those clients get no answer.
    pub efi_ia32_file: Option<String>,
    pub http_boot_url_x64: String,
    pub http_boot_url_arm64: String,
    /// What iPXE (any architecture) gets instead of a boot file, so it does not chainload
    /// itself forever. `None` when the boot files are not iPXE (GRUB): then an iPXE NIC ROM
    /// is just a PXE client and gets the boot file like any other.
    pub ipxe_script_url: Option<String>,
    /// Also send [`PXE_SKIP_DISCOVERY`] to UEFI PXE clients (off by default, see there).
    pub efi_skip_discovery: bool,
}

impl BootConfig {
    /// iPXE boot files, with iPXE itself sent to `{base_url}/boot.ipxe` and UEFI HTTP boot
    /// clients to `{base_url}/ipxe.efi` (arm64: `ipxe-arm64.efi`).
    pub fn ipxe_chain(server_ip: Ipv4Addr, base_url: &str) -> Self {
        let base = base_url.trim_end_matches('/');
        Self {
            http_boot_url_x64: format!("{base}/ipxe.efi"),
            http_boot_url_arm64: format!("{base}/ipxe-arm64.efi"),
            ipxe_script_url: Some(format!("{base}/boot.ipxe")),
            ..Self::standard(server_ip, 0)
        }
    }

    /// Boot files are GRUB images (ctpf-built, with the config embedded): `core.0` for BIOS,
    /// `grubx64.efi`/`grubaa64.efi` for UEFI, also over HTTP boot; iPXE ROMs get them too.
    pub fn with_grub(self, base_url: &str) -> Self {
        let base = base_url.trim_end_matches('/');
        Self {
            bios_file: "core.0".into(),
            efi_x64_file: "grubx64.efi".into(),
            efi_arm64_file: "grubaa64.efi".into(),
            http_boot_url_x64: format!("{base}/grubx64.efi"),
            http_boot_url_arm64: format!("{base}/grubaa64.efi"),
            ipxe_script_url: None,
            ..self
        }
    }

    /// The usual layout: everything served by `server_ip`, HTTP on `http_port`.
    pub fn standard(server_ip: Ipv4Addr, http_port: u16) -> Self {
        Self {
            server_ip,
            tftp_server: server_ip,
            bios_file: "undionly.kpxe".into(),
            efi_x64_file: "ipxe.efi".into(),
            efi_arm64_file: "ipxe-arm64.efi".into(),
            efi_ia32_file: None,
            http_boot_url_x64: format!("http://{server_ip}:{http_port}/ipxe.efi"),
            http_boot_url_arm64: format!("http://{server_ip}:{http_port}/ipxe-arm64.efi"),
            ipxe_script_url: Some(format!("http://{server_ip}:{http_port}/boot.ipxe")),
            efi_skip_discovery: false,
        }
    }
}

/// Network parameters handed out in authoritative mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub subnet_mask: Ipv4Addr,
    pub routers: Vec<Ipv4Addr>,
    pub dns_servers: Vec<Ipv4Addr>,
    pub domain_name: Option<String>,
}

/// proxyDHCP (the default) leaves addresses to the site's DHCP server and only adds boot
/// information; authoritative hands out addresses itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Proxy,
    Authoritative(NetworkConfig),
}

/// The boot instructions chosen for one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootTarget {
    /// TFTP file name or URL.
    pub file: String,
    /// Option 60 echoed back: "PXEClient" or "HTTPClient".
    pub vendor_class: &'static str,
    /// Whether to send [`PXE_SKIP_DISCOVERY`] as option 43.
    pub pxe_options: bool,
    /// siaddr; unset for HTTP boot.
    pub next_server: Option<Ipv4Addr>,
}

/// Picks the boot file for a client, or None (logged) when there is nothing sensible to give.
pub fn boot_target(info: &ClientInfo, boot: &BootConfig) -> Option<BootTarget> {
    if !info.is_boot_client() {
        return None;
    }
    let skip_discovery = info.pxe
        && match info.arch {
            Some(ClientArch::BiosX86) => true,
            Some(_) => boot.efi_skip_discovery,
            None => false,
        };
    let pxe = |file: &str| BootTarget {
        file: file.to_owned(),
        vendor_class: "PXEClient",
        pxe_options: skip_discovery,
        next_server: Some(boot.tftp_server),
    };
    if let (true, Some(url)) = (info.ipxe, &boot.ipxe_script_url) {
        return Some(pxe(url));
    }
    let Some(arch) = info.arch else {
        tracing::debug!(mac = ?info.mac, "boot client sent no architecture; not answering");
        return None;
    };
    if info.http {
        let url = match arch {
            ClientArch::EfiX64Http | ClientArch::EfiX64 => &boot.http_boot_url_x64,
            ClientArch::EfiArm64Http | ClientArch::EfiArm64 => &boot.http_boot_url_arm64,
            other => {
                tracing::info!(mac = ?info.mac, arch = ?other, "no HTTP boot URL for this architecture");
                return None;
            }
        };
        return Some(BootTarget {
            file: url.clone(),
            vendor_class: "HTTPClient",
            pxe_options: false,
            next_server: None,
        });
    }
    match arch {
        ClientArch::BiosX86 => Some(pxe(&boot.bios_file)),
        ClientArch::EfiX64 => Some(pxe(&boot.efi_x64_file)),
        ClientArch::EfiArm64 => Some(pxe(&boot.efi_arm64_file)),
        ClientArch::EfiIa32 if boot.efi_ia32_file.is_some() => {
            boot.efi_ia32_file.as_deref().map(pxe)
        }
        other => {
            tracing::info!(mac = ?info.mac, arch = ?other, "no boot file for this architecture");
            None
        }
    }
}

/// What authoritative mode must ask the lease table before [`decide`] can answer `request`.
/// None for proxy mode, port 4011, INFORM and anything unusable.
pub fn lease_query(
    request: &Message,
    port: RequestPort,
    mode: &Mode,
    server_ip: Ipv4Addr,
) -> Option<LeaseQuery> {
    if port != RequestPort::Dhcp || !matches!(mode, Mode::Authoritative(_)) {
        return None;
    }
    let info = classify(request).ok()?;
    let mac = info.mac?;
    let requested = match request.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let server_id = server_identifier(request);
    // RENEWING/REBINDING clients name their address in ciaddr instead of option 50.
    let ciaddr = Some(request.ciaddr()).filter(|ip| !ip.is_unspecified());
    match info.message_type {
        MessageType::Discover => Some(LeaseQuery::Offer { mac }),
        MessageType::Request => {
            if server_id.is_some_and(|id| id != server_ip) {
                return Some(LeaseQuery::OtherServerChosen { mac });
            }
            requested.or(ciaddr).map(|ip| LeaseQuery::Request { mac, ip })
        }
        MessageType::Decline => requested.map(|ip| LeaseQuery::Decline { mac, ip }),
        MessageType::Release => ciaddr.map(|ip| LeaseQuery::Release { mac, ip }),
        _ => None,
    }
}

/// Builds the reply to `request`, or None to stay silent. Never panics on any decoded
/// message. In authoritative mode `lease` is the lease table's answer to [`lease_query`].
pub fn decide(
    request: &Message,
    port: RequestPort,
    mode: &Mode,
    boot: &BootConfig,
    lease: Option<&LeaseAnswer>,
) -> Option<Message> {
    let info = match classify(request) {
        Ok(info) => info,
        Err(reason) => {
            tracing::debug!(%reason, xid = request.xid(), "ignoring DHCP packet");
            return None;
        }
    };
    match (port, mode) {
        (RequestPort::PxeBootServer, _) => boot_server_reply(request, &info, boot),
        (RequestPort::Dhcp, Mode::Proxy) => proxy_reply(request, &info, boot),
        (RequestPort::Dhcp, Mode::Authoritative(net)) => {
            authoritative_reply(request, &info, boot, net, lease)
        }
    }
}

/// proxyDHCP on port 67: boot information only, never an address.
fn proxy_reply(request: &Message, info: &ClientInfo, boot: &BootConfig) -> Option<Message> {
    if !info.is_boot_client() {
        tracing::debug!(mac = ?info.mac, "not a network boot client; proxyDHCP stays silent");
        return None;
    }
    let reply_type = match info.message_type {
        MessageType::Discover => MessageType::Offer,
        // Some ROMs send their REQUEST to whichever server they picked; answer only if it
        // was us, or we would confirm the real DHCP server's lease on its behalf.
        MessageType::Request if server_identifier(request) == Some(boot.server_ip) => {
            MessageType::Ack
        }
        _ => return None,
    };
    let target = boot_target(info, boot)?;
    let mut reply = base_reply(request, reply_type, boot.server_ip)?;
    add_boot(&mut reply, request, &target);
    Some(reply)
}

/// Port 4011: PXE firmware and iPXE ask the boot server for their boot file.
fn boot_server_reply(request: &Message, info: &ClientInfo, boot: &BootConfig) -> Option<Message> {
    if !matches!(info.message_type, MessageType::Request | MessageType::Inform) {
        return None;
    }
    let target = boot_target(info, boot)?;
    let mut reply = base_reply(request, MessageType::Ack, boot.server_ip)?;
    reply.set_ciaddr(request.ciaddr());
    add_boot(&mut reply, request, &target);
    Some(reply)
}

fn authoritative_reply(
    request: &Message,
    info: &ClientInfo,
    boot: &BootConfig,
    net: &NetworkConfig,
    lease: Option<&LeaseAnswer>,
) -> Option<Message> {
    let target = boot_target(info, boot);
    let (reply_type, yiaddr, lease_secs) = match (info.message_type, lease) {
        (MessageType::Discover, Some(LeaseAnswer::Offer { ip, lease_secs })) => {
            (MessageType::Offer, *ip, Some(*lease_secs))
        }
        (MessageType::Discover, _) => {
            tracing::info!(mac = ?info.mac, "no address to offer (pool exhausted or no MAC)");
            return None;
        }
        (MessageType::Request, Some(LeaseAnswer::Ack { ip, lease_secs })) => {
            (MessageType::Ack, *ip, Some(*lease_secs))
        }
        (MessageType::Request, Some(LeaseAnswer::Nak)) => {
            let mut nak = base_reply(request, MessageType::Nak, boot.server_ip)?;
            // RFC 2131 4.3.2: NAKs reach the client by broadcast, whatever it asked for.
            nak.set_flags(request.flags().set_broadcast());
            return Some(nak);
        }
        (MessageType::Inform, _) => (MessageType::Ack, Ipv4Addr::UNSPECIFIED, None),
        // DECLINE and RELEASE are only reported to the table; unknown requests are ignored.
        _ => return None,
    };
    let mut reply = base_reply(request, reply_type, boot.server_ip)?;
    reply.set_yiaddr(yiaddr);
    if info.message_type == MessageType::Inform {
        reply.set_ciaddr(request.ciaddr());
    }
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::SubnetMask(net.subnet_mask));
    if !net.routers.is_empty() {
        opts.insert(DhcpOption::Router(net.routers.clone()));
    }
    if !net.dns_servers.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(net.dns_servers.clone()));
    }
    if let Some(domain) = &net.domain_name {
        opts.insert(DhcpOption::DomainName(domain.clone()));
    }
    if let Some(secs) = lease_secs {
        opts.insert(DhcpOption::AddressLeaseTime(secs));
        opts.insert(DhcpOption::Renewal(secs / 2));
        opts.insert(DhcpOption::Rebinding(secs / 8 * 7));
    }
    if let Some(target) = &target {
        add_boot(&mut reply, request, target);
    }
    Some(reply)
}

/// The fields every reply shares: same transaction, same client, relay and flags kept so
/// the relay agent (or the broadcast) gets it back to the client.
fn base_reply(request: &Message, kind: MessageType, server_ip: Ipv4Addr) -> Option<Message> {
    // classify() already refused hlen > 16; checked again because chaddr() would panic.
    if request.hlen() > 16 {
        return None;
    }
    let mut reply = Message::default();
    reply
        .set_opcode(Opcode::BootReply)
        .set_htype(request.htype())
        .set_chaddr(request.chaddr())
        .set_xid(request.xid())
        .set_flags(request.flags())
        .set_giaddr(request.giaddr());
    reply.opts_mut().insert(DhcpOption::MessageType(kind));
    reply.opts_mut().insert(DhcpOption::ServerIdentifier(server_ip));
    Some(reply)
}

fn add_boot(reply: &mut Message, request: &Message, target: &BootTarget) {
    if let Some(next) = target.next_server {
        reply.set_siaddr(next);
    }
    // The fixed field holds at most 128 bytes; longer URLs travel in option 67 only.
    if target.file.len() < 128 {
        reply.set_fname_str(&target.file);
    }
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::ClassIdentifier(target.vendor_class.as_bytes().to_vec()));
    opts.insert(DhcpOption::BootfileName(target.file.as_bytes().to_vec()));
    if target.pxe_options {
        opts.insert(DhcpOption::VendorExtensions(PXE_SKIP_DISCOVERY.to_vec()));
    }
    // PXE clients expect their GUID mirrored back (PXE spec 2.1, table 2-1).
    if let Some(guid @ DhcpOption::ClientMachineIdentifier(_)) =
        request.opts().get(OptionCode::ClientMachineIdentifier)
    {
        opts.insert(guid.clone());
    }
}

fn server_identifier(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}
