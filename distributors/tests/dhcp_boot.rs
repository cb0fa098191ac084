//! Byte-level fixtures for the DHCP core: realistic requests are built with dhcproto, encoded
//! to bytes, and everything after that goes through the same path as a datagram would
//! (`DhcpCore::handle`: parse, decide, encode), then the reply bytes are decoded again.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use ctpf_common::MacAddr;
use ctpf_distributors::dhcp::{
    self, BootConfig, Destination, DhcpCore, NetworkConfig, PXE_SKIP_DISCOVERY, PoolConfig,
    RequestPort,
};
use dhcproto::v4::{
    Architecture, DhcpOption, Flags, Message, MessageType, Opcode, OptionCode, UnknownOption,
};
use dhcproto::{Encodable, Encoder};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 254);
const SCRIPT: &str = "http://10.77.0.1:7480/boot.ipxe";
const GUID: [u8; 17] = [
    0, 0x78, 0x56, 0x34, 0x12, 0x34, 0x12, 0x78, 0x56, 0x9a, 0xbc, 0xde, 0xf0, 0x12, 0x34, 0x56,
    0x78,
];

fn boot() -> BootConfig {
    BootConfig::standard(SERVER, 7480)
}

fn proxy() -> DhcpCore {
    DhcpCore::proxy(boot())
}

fn authoritative() -> DhcpCore {
    let net = NetworkConfig {
        subnet_mask: Ipv4Addr::new(255, 255, 255, 0),
        routers: vec![SERVER],
        dns_servers: vec![SERVER],
        domain_name: Some("lab.example".into()),
    };
    let pool = PoolConfig {
        first: Ipv4Addr::new(10, 77, 0, 100),
        last: Ipv4Addr::new(10, 77, 0, 101),
        lease_secs: 3600,
        offer_hold_secs: 30,
        decline_secs: 600,
        reservations: BTreeMap::new(),
    };
    DhcpCore::authoritative(boot(), net, pool)
}

fn base(kind: MessageType, mac: [u8; 6], xid: u32) -> Message {
    let u = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(xid, u, u, u, u, &mac);
    m.set_flags(Flags::default().set_broadcast());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m
}

fn prl(m: &mut Message) {
    use OptionCode::*;
    m.opts_mut().insert(DhcpOption::ParameterRequestList(vec![
        SubnetMask,
        Router,
        DomainNameServer,
        DomainName,
        VendorExtensions,
        ClassIdentifier,
        TFTPServerName,
        BootfileName,
    ]));
}

/// Firmware PXE: what OVMF (EDK2 PxeBcDxe) or a NIC PXE ROM puts in its DISCOVER.
fn firmware_pxe(kind: MessageType, mac: [u8; 6], arch: u16, class: &str) -> Message {
    let mut m = base(kind, mac, 0x1234_5678);
    m.set_secs(4);
    prl(&mut m);
    m.opts_mut().insert(DhcpOption::MaxMessageSize(1472));
    m.opts_mut().insert(DhcpOption::ClientSystemArchitecture(Architecture::from(arch)));
    m.opts_mut().insert(DhcpOption::ClientNetworkInterface(1, 3, 16));
    m.opts_mut().insert(DhcpOption::ClientMachineIdentifier(GUID.to_vec()));
    m.opts_mut().insert(DhcpOption::ClassIdentifier(class.as_bytes().to_vec()));
    m
}

fn ovmf_x64(kind: MessageType) -> Message {
    firmware_pxe(kind, [0x52, 0x54, 0, 0x12, 0x34, 0x56], 7, "PXEClient:Arch:00007:UNDI:003016")
}

fn arm64(kind: MessageType) -> Message {
    firmware_pxe(kind, [0x52, 0x54, 0, 0xaa, 0, 1], 11, "PXEClient:Arch:00011:UNDI:003000")
}

fn bios_pxe_rom() -> Message {
    firmware_pxe(
        MessageType::Discover,
        [0x00, 0x1b, 0x21, 0, 0, 7],
        0,
        "PXEClient:Arch:00000:UNDI:002001",
    )
}

fn http_client() -> Message {
    firmware_pxe(
        MessageType::Discover,
        [0x52, 0x54, 0, 0xbb, 0, 1],
        16,
        "HTTPClient:Arch:00016:UNDI:003001",
    )
}

/// SeaBIOS booting QEMU's iPXE NIC ROM: iPXE's own DHCP, user class "iPXE", option 175.
fn seabios_ipxe() -> Message {
    let mut m = base(MessageType::Discover, [0x52, 0x54, 0, 0x12, 0x34, 0x57], 0x0bad_cafe);
    m.set_flags(Flags::default());
    prl(&mut m);
    m.opts_mut().insert(DhcpOption::MaxMessageSize(1472));
    m.opts_mut().insert(DhcpOption::ClientSystemArchitecture(Architecture::from(0)));
    m.opts_mut().insert(DhcpOption::ClientNetworkInterface(1, 2, 1));
    m.opts_mut().insert(DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()));
    m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
    // iPXE feature flags: priority, PXE, HTTP, DNS, bus id...
    m.opts_mut().insert(DhcpOption::Unknown(UnknownOption::new(
        OptionCode::from(175),
        vec![0xb1, 0x05, 0x01, 0x80, 0x86, 0x10, 0x0e, 0x10, 0x01, 0x01, 0x13, 0x01, 0x01],
    )));
    m
}

/// An ordinary laptop: Windows-style vendor class, hostname, client id, nothing PXE.
fn laptop(kind: MessageType) -> Message {
    let mut m = base(kind, [0x3c, 0x22, 0xfb, 0, 0, 9], 0x5555_0001);
    m.set_flags(Flags::default());
    prl(&mut m);
    m.opts_mut().insert(DhcpOption::ClassIdentifier(b"MSFT 5.0".to_vec()));
    m.opts_mut().insert(DhcpOption::Hostname("laptop".into()));
    m.opts_mut().insert(DhcpOption::ClientIdentifier(vec![1, 0x3c, 0x22, 0xfb, 0, 0, 9]));
    m
}

fn bytes(m: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).unwrap();
    buf
}

/// Sends `m` through the whole pipeline and decodes the reply from its bytes.
fn roundtrip(
    core: &mut DhcpCore,
    m: &Message,
    port: RequestPort,
    now: u64,
) -> Option<(Message, Destination)> {
    let out = core.handle(&bytes(m), port, now)?;
    assert!(out.bytes.len() >= dhcp::MIN_REPLY_LEN);
    let reply = dhcp::parse(&out.bytes).unwrap();
    // dhcproto keeps the NUL terminator of `file` when decoding, so compare the options.
    assert_eq!(reply.opts(), out.reply.opts());
    Some((reply, out.destination))
}

/// The `file` header field without its NUL padding.
fn fname(m: &Message) -> String {
    String::from_utf8(m.fname().unwrap_or_default().to_vec())
        .unwrap()
        .trim_end_matches('\0')
        .to_owned()
}

fn opt(m: &Message, code: OptionCode) -> Option<&DhcpOption> {
    m.opts().get(code)
}

fn bytes_opt(m: &Message, code: OptionCode) -> Option<Vec<u8>> {
    match opt(m, code)? {
        DhcpOption::ClassIdentifier(b)
        | DhcpOption::BootfileName(b)
        | DhcpOption::VendorExtensions(b)
        | DhcpOption::ClientMachineIdentifier(b) => Some(b.clone()),
        _ => None,
    }
}

/// The checks every proxyDHCP boot reply must pass.
fn assert_boot_reply(
    reply: &Message,
    request: &Message,
    kind: MessageType,
    file: &str,
    class: &str,
) {
    assert_eq!(reply.opcode(), Opcode::BootReply);
    assert_eq!(reply.opts().msg_type(), Some(kind));
    assert_eq!(reply.xid(), request.xid());
    assert_eq!(reply.chaddr(), request.chaddr());
    assert_eq!(reply.yiaddr(), Ipv4Addr::UNSPECIFIED, "proxyDHCP never hands out addresses");
    assert_eq!(
        opt(reply, OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER))
    );
    assert_eq!(bytes_opt(reply, OptionCode::ClassIdentifier).unwrap(), class.as_bytes());
    assert_eq!(bytes_opt(reply, OptionCode::BootfileName).unwrap(), file.as_bytes());
    assert_eq!(fname(reply), file);
}

#[test]
fn ovmf_x64_pxe_gets_ipxe_efi_over_tftp() {
    let req = ovmf_x64(MessageType::Discover);
    let (reply, dest) = roundtrip(&mut proxy(), &req, RequestPort::Dhcp, 0).unwrap();
    assert_boot_reply(&reply, &req, MessageType::Offer, "ipxe.efi", "PXEClient");
    assert_eq!(reply.siaddr(), SERVER);
    // UEFI gets no discovery control by default (it then asks on port 4011).
    assert_eq!(opt(&reply, OptionCode::VendorExtensions), None);
    assert_eq!(bytes_opt(&reply, OptionCode::ClientMachineIdentifier).unwrap(), GUID);
    assert!(reply.flags().broadcast());
    assert_eq!(dest, Destination::To(SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)));
}

#[test]
fn bios_pxe_rom_gets_undionly() {
    let req = bios_pxe_rom();
    let (reply, _) = roundtrip(&mut proxy(), &req, RequestPort::Dhcp, 0).unwrap();
    assert_boot_reply(&reply, &req, MessageType::Offer, "undionly.kpxe", "PXEClient");
    assert_eq!(reply.siaddr(), SERVER);
    assert_eq!(bytes_opt(&reply, OptionCode::VendorExtensions).unwrap(), PXE_SKIP_DISCOVERY);
}

#[test]
fn arm64_gets_arm64_binary() {
    let req = arm64(MessageType::Discover);
    let (reply, _) = roundtrip(&mut proxy(), &req, RequestPort::Dhcp, 0).unwrap();
    assert_boot_reply(&reply, &req, MessageType::Offer, "ipxe-arm64.efi", "PXEClient");
}

#[test]
fn ipxe_gets_the_script_not_itself() {
    let req = seabios_ipxe();
    let (reply, dest) = roundtrip(&mut proxy(), &req, RequestPort::Dhcp, 0).unwrap();
    assert_boot_reply(&reply, &req, MessageType::Offer, SCRIPT, "PXEClient");
    // No broadcast flag and no ciaddr: still broadcast, we cannot unicast to an unknown IP.
    assert_eq!(dest, Destination::To(SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)));

    // Option 175 alone is enough to recognise iPXE, on any architecture.
    let mut req = ovmf_x64(MessageType::Discover);
    req.opts_mut()
        .insert(DhcpOption::Unknown(UnknownOption::new(OptionCode::from(175), vec![0x13, 1, 1])));
    let (reply, _) = roundtrip(&mut proxy(), &req, RequestPort::Dhcp, 0).unwrap();
    assert_boot_reply(&reply, &req, MessageType::Offer, SCRIPT, "PXEClient");
}

/// With GRUB as the boot loader there is no iPXE chain: an iPXE NIC ROM is just a PXE client
/// and gets GRUB's image like any firmware.
#[test]
fn with_grub_every_pxe_client_gets_the_grub_image() {
    let mut core = DhcpCore::proxy(boot().with_grub("http://10.77.0.1:7480/"));
    let req = seabios_ipxe();
    let (reply, _) = roundtrip(&mut core, &req, RequestPort::Dhcp, 0).unwrap();
    assert_boot_reply(&reply, &req, MessageType::Offer, "core.0", "PXEClient");
    let req = ovmf_x64(MessageType::Discover);
    let (reply, _) = roundtrip(&mut core, &req, RequestPort::Dhcp, 0).unwrap();
    assert_boot_reply(&reply, &req, MessageType::Offer, "grubx64.efi", "PXEClient");
    let req = http_client();
    let (reply, _) = roundtrip(&mut core, &req, RequestPort::Dhcp, 0).unwrap();
    assert_boot_reply(
        &reply,
        &req,
        MessageType::Offer,
        "http://10.77.0.1:7480/grubx64.efi",
        "HTTPClient",
    );
}

#[test]
fn uefi_http_boot_gets_a_url() {
    let req = http_client();
    let (reply, _) = roundtrip(&mut proxy(), &req, RequestPort::Dhcp, 0).unwrap();
    assert_boot_reply(
        &reply,
        &req,
        MessageType::Offer,
        "http://10.77.0.1:7480/ipxe.efi",
        "HTTPClient",
    );
    assert_eq!(opt(&reply, OptionCode::VendorExtensions), None);
    assert_eq!(reply.siaddr(), Ipv4Addr::UNSPECIFIED);

    // Arch 19 with no vendor class at all is still HTTP boot (arm64).
    let mut req = http_client();
    req.opts_mut().remove(OptionCode::ClassIdentifier);
    req.opts_mut().insert(DhcpOption::ClientSystemArchitecture(Architecture::from(19)));
    let (reply, _) = roundtrip(&mut proxy(), &req, RequestPort::Dhcp, 0).unwrap();
    assert_boot_reply(
        &reply,
        &req,
        MessageType::Offer,
        "http://10.77.0.1:7480/ipxe-arm64.efi",
        "HTTPClient",
    );
}

#[test]
fn proxy_ignores_ordinary_clients_and_unknown_arches() {
    assert!(
        roundtrip(&mut proxy(), &laptop(MessageType::Discover), RequestPort::Dhcp, 0).is_none()
    );
    assert!(roundtrip(&mut proxy(), &laptop(MessageType::Request), RequestPort::Dhcp, 0).is_none());
    let unknown = firmware_pxe(
        MessageType::Discover,
        [2, 0, 0, 0, 0, 1],
        0x31,
        "PXEClient:Arch:00049:UNDI:003016",
    );
    assert!(roundtrip(&mut proxy(), &unknown, RequestPort::Dhcp, 0).is_none());
    // EFI IA32 has no file configured by default.
    let ia32 = firmware_pxe(
        MessageType::Discover,
        [2, 0, 0, 0, 0, 2],
        6,
        "PXEClient:Arch:00006:UNDI:003016",
    );
    assert!(roundtrip(&mut proxy(), &ia32, RequestPort::Dhcp, 0).is_none());
}

#[test]
fn proxy_request_on_67_only_when_addressed_to_us() {
    let mut req = ovmf_x64(MessageType::Request);
    req.opts_mut().insert(DhcpOption::ServerIdentifier(ROUTER));
    req.opts_mut().insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 77, 0, 50)));
    assert!(roundtrip(&mut proxy(), &req, RequestPort::Dhcp, 0).is_none());
    req.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    let (reply, _) = roundtrip(&mut proxy(), &req, RequestPort::Dhcp, 0).unwrap();
    assert_boot_reply(&reply, &req, MessageType::Ack, "ipxe.efi", "PXEClient");
}

#[test]
fn port_4011_request_gets_ack_back_to_sender() {
    let client = Ipv4Addr::new(10, 77, 0, 50);
    let mut req = ovmf_x64(MessageType::Request);
    req.set_ciaddr(client).set_flags(Flags::default());
    let (reply, dest) = roundtrip(&mut proxy(), &req, RequestPort::PxeBootServer, 0).unwrap();
    assert_boot_reply(&reply, &req, MessageType::Ack, "ipxe.efi", "PXEClient");
    assert_eq!(reply.ciaddr(), client);
    assert_eq!(dest, Destination::Sender);

    // iPXE's ProxyDHCP request on 4011 gets the script.
    let mut req = seabios_ipxe();
    req.opts_mut().insert(DhcpOption::MessageType(MessageType::Request));
    req.set_ciaddr(client);
    let (reply, _) = roundtrip(&mut proxy(), &req, RequestPort::PxeBootServer, 0).unwrap();
    assert_boot_reply(&reply, &req, MessageType::Ack, SCRIPT, "PXEClient");

    // A DISCOVER on 4011 is not part of the protocol.
    assert!(
        roundtrip(&mut proxy(), &ovmf_x64(MessageType::Discover), RequestPort::PxeBootServer, 0)
            .is_none()
    );
}

#[test]
fn authoritative_discover_request_release_inform_decline() {
    let mut core = authoritative();
    let first = Ipv4Addr::new(10, 77, 0, 100);

    // PXE client: address plus boot info.
    let req = ovmf_x64(MessageType::Discover);
    let (offer, _) = roundtrip(&mut core, &req, RequestPort::Dhcp, 1000).unwrap();
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr(), first);
    assert_eq!(
        opt(&offer, OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
    );
    assert_eq!(opt(&offer, OptionCode::Router), Some(&DhcpOption::Router(vec![SERVER])));
    assert_eq!(
        opt(&offer, OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![SERVER]))
    );
    assert_eq!(
        opt(&offer, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(3600))
    );
    assert_eq!(
        opt(&offer, OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER))
    );
    assert_eq!(bytes_opt(&offer, OptionCode::BootfileName).unwrap(), b"ipxe.efi");
    assert_eq!(offer.siaddr(), SERVER);

    let mut req = ovmf_x64(MessageType::Request);
    req.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    req.opts_mut().insert(DhcpOption::RequestedIpAddress(first));
    let (ack, _) = roundtrip(&mut core, &req, RequestPort::Dhcp, 1001).unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), first);
    assert_eq!(bytes_opt(&ack, OptionCode::BootfileName).unwrap(), b"ipxe.efi");

    // The laptop gets the next address, no boot info.
    let (offer, _) =
        roundtrip(&mut core, &laptop(MessageType::Discover), RequestPort::Dhcp, 1002).unwrap();
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 77, 0, 101));
    assert_eq!(opt(&offer, OptionCode::BootfileName), None);
    assert_eq!(opt(&offer, OptionCode::ClassIdentifier), None);

    // Asking for the PXE machine's address is refused with a broadcast NAK.
    let mut steal = laptop(MessageType::Request);
    steal.opts_mut().insert(DhcpOption::RequestedIpAddress(first));
    let (nak, dest) = roundtrip(&mut core, &steal, RequestPort::Dhcp, 1003).unwrap();
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(dest, Destination::To(SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)));

    // Renewal (RENEWING: ciaddr, no option 50, unicast) extends and is unicast back.
    let mut renew = ovmf_x64(MessageType::Request);
    renew.set_ciaddr(first).set_flags(Flags::default());
    let (ack, dest) = roundtrip(&mut core, &renew, RequestPort::Dhcp, 2000).unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(dest, Destination::To(SocketAddrV4::new(first, 68)));
    let lease = core
        .leases
        .as_ref()
        .unwrap()
        .lease_of(MacAddr::new([0x52, 0x54, 0, 0x12, 0x34, 0x56]), 2000);
    assert_eq!(lease.unwrap().expires, 5600);

    // INFORM: ACK without yiaddr.
    let mut inform = laptop(MessageType::Inform);
    inform.set_ciaddr(Ipv4Addr::new(10, 77, 0, 7));
    let (ack, dest) = roundtrip(&mut core, &inform, RequestPort::Dhcp, 2001).unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(opt(&ack, OptionCode::AddressLeaseTime), None);
    assert_eq!(dest, Destination::To(SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 7), 68)));

    // RELEASE: no reply, address free again.
    let mut release = ovmf_x64(MessageType::Release);
    release.set_ciaddr(first);
    assert!(roundtrip(&mut core, &release, RequestPort::Dhcp, 2002).is_none());
    let mac = MacAddr::new([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert_eq!(core.leases.as_ref().unwrap().lease_of(mac, 2002), None);

    // DECLINE: no reply, and that address is not offered again for a while.
    let mut decline = laptop(MessageType::Decline);
    decline.opts_mut().insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 77, 0, 101)));
    assert!(roundtrip(&mut core, &decline, RequestPort::Dhcp, 2003).is_none());
    let (offer, _) =
        roundtrip(&mut core, &laptop(MessageType::Discover), RequestPort::Dhcp, 2004).unwrap();
    assert_eq!(offer.yiaddr(), first);

    // Pool exhausted (one address declined, the other offered): a third client gets nothing.
    assert!(roundtrip(&mut core, &arm64(MessageType::Discover), RequestPort::Dhcp, 2005).is_none());
}

#[test]
fn authoritative_request_for_another_server_is_silent_and_frees_the_offer() {
    let mut core = authoritative();
    let (offer, _) =
        roundtrip(&mut core, &laptop(MessageType::Discover), RequestPort::Dhcp, 0).unwrap();
    let mut req = laptop(MessageType::Request);
    req.opts_mut().insert(DhcpOption::ServerIdentifier(ROUTER));
    req.opts_mut().insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 168, 1, 5)));
    assert!(roundtrip(&mut core, &req, RequestPort::Dhcp, 1).is_none());
    // The held address is immediately available to someone else: the pool has two
    // addresses, allocation continues after the last one handed out, so the second newcomer
    // gets the freed one instead of finding the pool exhausted.
    let (other, _) = roundtrip(&mut core, &bios_pxe_rom(), RequestPort::Dhcp, 2).unwrap();
    assert_ne!(other.yiaddr(), offer.yiaddr());
    let third = base(MessageType::Discover, [2, 0, 0, 0, 0, 3], 3);
    let (third, _) = roundtrip(&mut core, &third, RequestPort::Dhcp, 3).unwrap();
    assert_eq!(third.yiaddr(), offer.yiaddr());
}

#[test]
fn authoritative_ipxe_gets_address_and_script() {
    let (offer, _) =
        roundtrip(&mut authoritative(), &seabios_ipxe(), RequestPort::Dhcp, 0).unwrap();
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 77, 0, 100));
    assert_eq!(bytes_opt(&offer, OptionCode::BootfileName).unwrap(), SCRIPT.as_bytes());
    assert_eq!(bytes_opt(&offer, OptionCode::ClassIdentifier).unwrap(), b"PXEClient");
}

#[test]
fn arch_falls_back_to_the_vendor_class_text() {
    let mut req = arm64(MessageType::Discover);
    req.opts_mut().remove(OptionCode::ClientSystemArchitecture);
    let info = dhcp::classify(&dhcp::parse(&bytes(&req)).unwrap()).unwrap();
    assert_eq!(info.arch, Some(dhcp::ClientArch::EfiArm64));
    assert!(info.pxe && !info.http && !info.ipxe);
    assert_eq!(info.mac, Some(MacAddr::new([0x52, 0x54, 0, 0xaa, 0, 1])));
    assert_eq!(info.uuid.unwrap().to_string(), "12345678-1234-5678-9abc-def012345678");
    let (reply, _) = roundtrip(&mut proxy(), &req, RequestPort::Dhcp, 0).unwrap();
    assert_boot_reply(&reply, &req, MessageType::Offer, "ipxe-arm64.efi", "PXEClient");
}

#[test]
fn relayed_requests_go_back_to_the_relay() {
    let relay = Ipv4Addr::new(10, 99, 0, 1);
    let mut req = ovmf_x64(MessageType::Discover);
    req.set_giaddr(relay).set_hops(1);
    let (reply, dest) = roundtrip(&mut proxy(), &req, RequestPort::Dhcp, 0).unwrap();
    assert_eq!(reply.giaddr(), relay);
    assert_eq!(dest, Destination::To(SocketAddrV4::new(relay, 67)));
}

#[test]
fn authoritative_serves_relays_on_its_subnet_only() {
    let mut core = authoritative();
    // A relay on our subnet (giaddr 10.77.0.2): the address comes from our pool and the
    // OFFER and ACK go back to the relay's server port.
    let relay = Ipv4Addr::new(10, 77, 0, 2);
    let mut discover = laptop(MessageType::Discover);
    discover.set_giaddr(relay).set_hops(1);
    let (offer, dest) = roundtrip(&mut core, &discover, RequestPort::Dhcp, 0).unwrap();
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 77, 0, 100));
    assert_eq!(offer.giaddr(), relay);
    assert_eq!(dest, Destination::To(SocketAddrV4::new(relay, 67)));
    let mut request = laptop(MessageType::Request);
    request.set_giaddr(relay).set_hops(1);
    request.opts_mut().insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
    request.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    let (ack, dest) = roundtrip(&mut core, &request, RequestPort::Dhcp, 1).unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), offer.yiaddr());
    assert_eq!(dest, Destination::To(SocketAddrV4::new(relay, 67)));

    // A relay of another subnet: nothing from our pool fits there, so no answer (also not
    // to INFORM, whose ACK would carry our subnet mask), and the pool is untouched.
    let foreign = Ipv4Addr::new(10, 99, 0, 1);
    let mut other = base(MessageType::Discover, [2, 0, 0, 0, 0, 9], 9);
    other.set_giaddr(foreign).set_hops(1);
    assert!(core.handle(&bytes(&other), RequestPort::Dhcp, 2).is_none());
    let mut inform = base(MessageType::Inform, [2, 0, 0, 0, 0, 9], 10);
    inform.set_giaddr(foreign).set_ciaddr(Ipv4Addr::new(10, 99, 0, 7));
    assert!(core.handle(&bytes(&inform), RequestPort::Dhcp, 2).is_none());
    let local = base(MessageType::Discover, [2, 0, 0, 0, 0, 9], 11);
    let (offer, _) = roundtrip(&mut core, &local, RequestPort::Dhcp, 3).unwrap();
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 77, 0, 101));
}

#[test]
fn reply_destination_follows_rfc_2131() {
    let ack = base(MessageType::Ack, [0; 6], 1);
    let nak = base(MessageType::Nak, [0; 6], 1);
    let mut req = base(MessageType::Request, [2, 0, 0, 0, 0, 1], 1);
    assert_eq!(dhcp::reply_destination(&req, &ack), SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
    req.set_ciaddr(Ipv4Addr::new(10, 0, 0, 5));
    assert_eq!(
        dhcp::reply_destination(&req, &ack),
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 5), 68)
    );
    assert_eq!(dhcp::reply_destination(&req, &nak), SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
    req.set_giaddr(Ipv4Addr::new(10, 0, 9, 1));
    assert_eq!(
        dhcp::reply_destination(&req, &nak),
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 9, 1), 67)
    );
}

/// A DISCOVER assembled byte by byte in the order EDK2 writes it (message type first, pad
/// bytes after the end option), independent of dhcproto's encoder.
#[test]
fn hand_assembled_ovmf_discover() {
    let mut raw = vec![
        1, 1, 6, 0, // op, htype, hlen, hops
        0xde, 0xad, 0xbe, 0xef, // xid
        0, 4, 0x80, 0, // secs, flags (broadcast)
    ];
    raw.extend([0u8; 16]); // ciaddr, yiaddr, siaddr, giaddr
    raw.extend([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    raw.extend([0u8; 10 + 64 + 128]); // chaddr padding, sname, file
    raw.extend([99, 130, 83, 99]);
    raw.extend([53, 1, 1]);
    raw.extend([57, 2, 0x05, 0xc0]);
    raw.extend([55, 8, 1, 2, 3, 4, 5, 6, 12, 43]);
    raw.extend([97, 17]);
    raw.extend(GUID);
    raw.extend([94, 3, 1, 3, 16]);
    raw.extend([93, 2, 0, 7]);
    raw.extend([60, 32]);
    raw.extend(b"PXEClient:Arch:00007:UNDI:003016");
    raw.push(255);
    raw.resize(548, 0);

    let out = proxy().handle(&raw, RequestPort::Dhcp, 0).unwrap();
    let reply = dhcp::parse(&out.bytes).unwrap();
    assert_eq!(reply.xid(), 0xdead_beef);
    assert_eq!(reply.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(fname(&reply), "ipxe.efi");
    assert_eq!(reply.siaddr(), SERVER);
    // Reply header and options, checked on the wire.
    assert_eq!(&out.bytes[..4], &[2, 1, 6, 0]);
    assert_eq!(&out.bytes[20..24], &SERVER.octets());
    assert_eq!(&out.bytes[108..116], b"ipxe.efi");
    let opts = &out.bytes[240..];
    assert!(opts.windows(11).any(|w| w == b"\x3c\x09PXEClient"));
    assert!(opts.windows(10).any(|w| w == b"\x43\x08ipxe.efi"));
    assert!(!opts.windows(6).any(|w| w == [43, 4, 6, 1, 8, 255]));

    // With discovery control switched on for UEFI, option 43 is on the wire.
    let mut cfg = boot();
    cfg.efi_skip_discovery = true;
    let out = DhcpCore::proxy(cfg).handle(&raw, RequestPort::Dhcp, 0).unwrap();
    assert!(out.bytes[240..].windows(6).any(|w| w == [43, 4, 6, 1, 8, 255]));
}

fn fixtures() -> Vec<Message> {
    let mut release = ovmf_x64(MessageType::Release);
    release.set_ciaddr(Ipv4Addr::new(10, 77, 0, 100));
    vec![
        ovmf_x64(MessageType::Discover),
        ovmf_x64(MessageType::Request),
        arm64(MessageType::Discover),
        bios_pxe_rom(),
        http_client(),
        seabios_ipxe(),
        laptop(MessageType::Discover),
        laptop(MessageType::Inform),
        release,
    ]
}

fn every_core() -> Vec<(DhcpCore, RequestPort)> {
    vec![
        (proxy(), RequestPort::Dhcp),
        (proxy(), RequestPort::PxeBootServer),
        (authoritative(), RequestPort::Dhcp),
        (authoritative(), RequestPort::PxeBootServer),
    ]
}

#[test]
fn truncated_fixtures_never_panic() {
    for (mut core, port) in every_core() {
        for m in fixtures() {
            let full = bytes(&m);
            for cut in 0..full.len() {
                let _ = core.handle(&full[..cut], port, 0);
            }
        }
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[test]
fn garbage_and_bit_flips_never_panic() {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let fixtures: Vec<Vec<u8>> = fixtures().iter().map(bytes).collect();
    for (mut core, port) in every_core() {
        for i in 0..20_000u64 {
            let mut buf = if i % 3 == 0 {
                // Pure garbage behind a valid header and cookie, so the option parser runs.
                let mut b = fixtures[0][..240].to_vec();
                let n = (rng.next() % 400) as usize;
                b.extend((0..n).map(|_| rng.next() as u8));
                b
            } else {
                fixtures[(rng.next() % fixtures.len() as u64) as usize].clone()
            };
            let flips = 1 + rng.next() % 8;
            for _ in 0..flips {
                let at = (rng.next() % buf.len() as u64) as usize;
                buf[at] ^= 1 << (rng.next() % 8);
            }
            let _ = core.handle(&buf, port, i);
        }
    }
}

/// Well-framed but nonsensical options: every code with random lengths and contents, some
/// repeated back to back (RFC 3396 concatenation), the shapes dhcproto's option decoders see.
#[test]
fn random_option_streams_never_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let header = bytes(&ovmf_x64(MessageType::Discover))[..240].to_vec();
    for (mut core, port) in every_core() {
        for i in 0..20_000u64 {
            let mut b = header.clone();
            if rng.next().is_multiple_of(2) {
                b.extend([53, 1, 1 + (rng.next() % 8) as u8]);
            }
            for _ in 0..1 + rng.next() % 6 {
                let code = (rng.next() % 256) as u8;
                let repeats = 1 + u64::from(rng.next().is_multiple_of(3));
                for _ in 0..repeats {
                    let len = (rng.next() % 12) as u8;
                    b.extend([code, len]);
                    b.extend((0..len).map(|_| rng.next() as u8));
                }
            }
            if !rng.next().is_multiple_of(4) {
                b.push(255);
            }
            let _ = core.handle(&b, port, i);
        }
    }
}

#[test]
fn hostile_specifics_are_dropped() {
    let good = bytes(&ovmf_x64(MessageType::Discover));
    let mut core = proxy();

    // hlen beyond chaddr: dhcproto would panic slicing chaddr.
    let mut b = good.clone();
    b[2] = 200;
    assert!(matches!(dhcp::parse(&b), Err(dhcp::ParseError::BadHardwareLength(200))));
    assert!(core.handle(&b, RequestPort::Dhcp, 0).is_none());
    // Even a Message decoded without our pre-check is refused by decide, not a panic.
    let raw = <Message as dhcproto::Decodable>::decode(&mut dhcproto::Decoder::new(&b)).unwrap();
    assert!(dhcp::decide(&raw, RequestPort::Dhcp, &dhcp::Mode::Proxy, &boot(), None).is_none());
    assert_eq!(dhcp::classify(&raw), Err(dhcp::Reject::BadHardwareLength(200)));

    // Options dhcproto debug_asserts on.
    for (code, data) in
        [(94u8, vec![1u8, 2]), (80, vec![1]), (81, vec![]), (151, vec![]), (152, vec![1])]
    {
        let mut b = good[..240].to_vec();
        b.extend([53, 1, 1, code, data.len() as u8]);
        b.extend(&data);
        b.push(255);
        assert!(
            matches!(dhcp::parse(&b), Err(dhcp::ParseError::BadOptionLength { .. })),
            "option {code}"
        );
        assert!(core.handle(&b, RequestPort::Dhcp, 0).is_none());
    }
    // A split option 94 whose parts add up to 3 is fine (RFC 3396 concatenation).
    let mut b = good[..240].to_vec();
    b.extend([53, 1, 1, 94, 1, 1, 94, 2, 3, 16, 255]);
    assert!(dhcp::parse(&b).is_ok());

    // A reply (op 2) sent to the server, a missing message type, a wrong cookie, too short.
    let mut b = good.clone();
    b[0] = 2;
    assert!(core.handle(&b, RequestPort::Dhcp, 0).is_none());
    let mut no_type = ovmf_x64(MessageType::Discover);
    no_type.opts_mut().remove(OptionCode::MessageType);
    assert!(core.handle(&bytes(&no_type), RequestPort::Dhcp, 0).is_none());
    let mut b = good.clone();
    b[236] = 0;
    assert_eq!(dhcp::parse(&b), Err(dhcp::ParseError::BadMagic));
    assert_eq!(dhcp::parse(&good[..100]), Err(dhcp::ParseError::TooShort(100)));

    // A server message type in a request is ignored.
    let mut offer = ovmf_x64(MessageType::Discover);
    offer.opts_mut().insert(DhcpOption::MessageType(MessageType::Offer));
    assert!(core.handle(&bytes(&offer), RequestPort::Dhcp, 0).is_none());

    // A boot URL longer than the 128-byte file field goes in option 67 only.
    let mut long = boot();
    long.ipxe_script_url = Some(format!("http://10.77.0.1:7480/{}", "x".repeat(200)));
    let mut core = DhcpCore::proxy(long.clone());
    let out = core.handle(&bytes(&seabios_ipxe()), RequestPort::Dhcp, 0).unwrap();
    let reply = dhcp::parse(&out.bytes).unwrap();
    assert_eq!(reply.fname(), None);
    assert_eq!(
        bytes_opt(&reply, OptionCode::BootfileName).unwrap(),
        long.ipxe_script_url.unwrap().as_bytes()
    );
}

/// The thin socket loop over loopback: a port-4011 exchange, whose reply goes back to the
/// sender, so no privileged ports or broadcast are needed.
#[tokio::test]
async fn socket_loop_answers_on_the_boot_server_port() {
    use std::sync::{Arc, Mutex};
    use tokio::net::UdpSocket;
    use tokio_util::sync::CancellationToken;

    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    let core = Arc::new(Mutex::new(proxy()));
    let shutdown = CancellationToken::new();
    let task =
        tokio::spawn(dhcp::server::run(server, RequestPort::PxeBootServer, core, shutdown.clone()));

    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Garbage first: the loop must survive it and stay silent.
    client.send_to(b"not dhcp", server_addr).await.unwrap();
    let mut req = ovmf_x64(MessageType::Request);
    req.set_ciaddr(Ipv4Addr::new(127, 0, 0, 1));
    client.send_to(&bytes(&req), server_addr).await.unwrap();
    let mut buf = vec![0u8; 1500];
    let (len, from) =
        tokio::time::timeout(std::time::Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(from, server_addr);
    let reply = dhcp::parse(&buf[..len]).unwrap();
    assert_boot_reply(&reply, &req, MessageType::Ack, "ipxe.efi", "PXEClient");

    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// Each sent reply becomes a `dhcp_replied` event naming the machine, the reply, the address
/// (none in proxyDHCP) and the stage it was sent to.
#[test]
fn replies_describe_themselves_as_events() {
    let req = bios_pxe_rom();
    let out = proxy().handle(&bytes(&req), RequestPort::Dhcp, 0).unwrap();
    let event = dhcp::reply_event(&out.reply, "w1".into()).unwrap();
    assert_eq!(
        event,
        ctpf_common::EventBody::DhcpReplied {
            worker: "w1".into(),
            mac: MacAddr::new([0x00, 0x1b, 0x21, 0, 0, 7]),
            reply: "offer".into(),
            ip: None,
            boot_file: Some("undionly.kpxe".into()),
        }
    );

    let mut core = authoritative();
    let discover = seabios_ipxe();
    let offer = core.handle(&bytes(&discover), RequestPort::Dhcp, 0).unwrap();
    match dhcp::reply_event(&offer.reply, "w1".into()).unwrap() {
        ctpf_common::EventBody::DhcpReplied { reply, ip, boot_file, .. } => {
            assert_eq!(reply, "offer");
            assert_eq!(ip, Some(Ipv4Addr::new(10, 77, 0, 100)));
            assert_eq!(boot_file.as_deref(), Some(SCRIPT));
        }
        other => panic!("{other:?}"),
    }
}
