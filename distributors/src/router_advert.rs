//! IPv6 router advertisements on the boot interface, so iPXE stops waiting ~13 s for one.
//!
//! We do not pose as a router: every advertisement has router lifetime 0 (not a default
//! router), M/O flags 0 (no DHCPv6) and, unless prefixes are asked for, no prefix options,
//! so no host configures an address from us. The pure part builds the message
//! ([`router_advertisement`]) and recognises solicitations ([`is_router_solicitation`]);
//! [`RouterAdvertiser`] is the thin socket loop around them.
//!
//! Socket: a raw ICMPv6 socket tied to the interface (SO_BINDTODEVICE) that joins ff02::2
//! (all-routers) to hear router solicitations and sends to ff02::1 (all-nodes) with hop
//! limit 255, which receivers require (RFC 4861 §6.1.2). The kernel fills in the ICMPv6
//! checksum. The source is the interface's link-local address, given per packet
//! (IPV6_PKTINFO), because receivers drop advertisements from any other source; while that
//! address is missing or still tentative, sending fails and is retried.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::Duration;

use ctpf_common::MacAddr;
use nix::libc;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn6, recvmsg, sendmsg, setsockopt,
    sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// ICMPv6 type of a router solicitation (RFC 4861 §4.1).
pub const ROUTER_SOLICITATION: u8 = 133;
/// ICMPv6 type of a router advertisement (RFC 4861 §4.2).
pub const ROUTER_ADVERTISEMENT: u8 = 134;
/// All-nodes link-local multicast: where advertisements go.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// All-routers link-local multicast: where solicitations arrive.
pub const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
/// Neighbour discovery packets must carry (and arrive with) this hop limit.
pub const ND_HOP_LIMIT: u8 = 255;
/// Unsolicited advertisements are sent this often.
pub const ADVERT_INTERVAL: Duration = Duration::from_secs(3);
/// After a failed send (no usable link-local address yet), the next try comes this soon.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Replies to solicitations come at most this often.
pub const MIN_REPLY_GAP: Duration = Duration::from_millis(500);

/// Cur hop limit advertised to hosts (the usual default).
const CUR_HOP_LIMIT: u8 = 64;
const OPTION_SOURCE_LINK_LAYER: u8 = 1;
const OPTION_PREFIX_INFORMATION: u8 = 3;
const PREFIX_FLAG_ON_LINK: u8 = 0x80;
const PREFIX_FLAG_AUTONOMOUS: u8 = 0x40;

/// A Prefix Information option (RFC 4861 §4.6.2), only sent when configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixInfo {
    pub prefix: Ipv6Addr,
    pub length: u8,
    /// L flag: the prefix is on this link.
    pub on_link: bool,
    /// A flag: hosts may configure addresses from it (SLAAC).
    pub autonomous: bool,
    pub valid_lifetime_secs: u32,
    pub preferred_lifetime_secs: u32,
}

/// The ICMPv6 router advertisement we send: type 134, code 0, checksum 0 (the kernel fills
/// it in), cur hop limit 64, no flags, router lifetime 0, reachable time and retrans timer
/// 0 (unspecified), then a Source Link-Layer Address option when the MAC is known and one
/// Prefix Information option per entry of `prefixes` (none by default).
pub fn router_advertisement(source_mac: Option<[u8; 6]>, prefixes: &[PrefixInfo]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(16 + 8 + 32 * prefixes.len());
    packet.extend_from_slice(&[ROUTER_ADVERTISEMENT, 0, 0, 0]); // type, code, checksum
    packet.push(CUR_HOP_LIMIT);
    packet.push(0); // M, O and the rest of the flags
    packet.extend_from_slice(&0u16.to_be_bytes()); // router lifetime: not a default router
    packet.extend_from_slice(&0u32.to_be_bytes()); // reachable time
    packet.extend_from_slice(&0u32.to_be_bytes()); // retrans timer
    if let Some(mac) = source_mac {
        packet.extend_from_slice(&[OPTION_SOURCE_LINK_LAYER, 1]); // length in units of 8 bytes
        packet.extend_from_slice(&mac);
    }
    for prefix in prefixes {
        let mut flags = 0;
        if prefix.on_link {
            flags |= PREFIX_FLAG_ON_LINK;
        }
        if prefix.autonomous {
            flags |= PREFIX_FLAG_AUTONOMOUS;
        }
        packet.extend_from_slice(&[OPTION_PREFIX_INFORMATION, 4, prefix.length.min(128), flags]);
        packet.extend_from_slice(&prefix.valid_lifetime_secs.to_be_bytes());
        packet.extend_from_slice(&prefix.preferred_lifetime_secs.to_be_bytes());
        packet.extend_from_slice(&[0; 4]); // reserved
        packet.extend_from_slice(&prefix.prefix.octets());
    }
    packet
}

/// Whether an ICMPv6 message (as a raw ICMPv6 socket delivers it, without the IPv6 header)
/// is a router solicitation: type 133, code 0, at least the 8-byte fixed part.
pub fn is_router_solicitation(packet: &[u8]) -> bool {
    matches!(packet, [ROUTER_SOLICITATION, 0, _, _, _, _, _, _, ..])
}

#[derive(Debug, thiserror::Error)]
pub enum RouterAdvertError {
    #[error("interface {interface}: {source}")]
    Interface {
        interface: String,
        #[source]
        source: nix::Error,
    },
    #[error("opening the ICMPv6 socket on interface {interface} ({what}): {source}")]
    Socket {
        interface: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("ICMPv6 socket on interface {interface} failed: {source}")]
    Serve {
        interface: String,
        #[source]
        source: io::Error,
    },
}

/// Settings of [`RouterAdvertiser`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterAdvertConfig {
    pub interface: String,
    /// Prefix Information options to advertise; empty (the default) sends none.
    pub prefixes: Vec<PrefixInfo>,
}

impl RouterAdvertConfig {
    pub fn new(interface: impl Into<String>) -> Self {
        Self { interface: interface.into(), prefixes: Vec::new() }
    }
}

/// The opened socket, ready to [`RouterAdvertiser::run`]. Opening first lets the caller fail
/// start-up (no CAP_NET_RAW, no such interface) before anything runs, as
/// [`crate::boot_service::BootService::bind`] does.
#[derive(Debug)]
pub struct RouterAdvertiser {
    socket: Socket,
    interface: String,
    index: u32,
    message: Vec<u8>,
}

/// Opens the socket on `interface` and sends router advertisements (no prefixes) until
/// `stop` is cancelled.
pub async fn run(interface: &str, stop: CancellationToken) -> Result<(), RouterAdvertError> {
    RouterAdvertiser::open(RouterAdvertConfig::new(interface))?.run(stop).await
}

impl RouterAdvertiser {
    /// Opens and configures the raw ICMPv6 socket on the interface and reads its MAC.
    pub fn open(config: RouterAdvertConfig) -> Result<Self, RouterAdvertError> {
        let interface = config.interface;
        let index = nix::net::if_::if_nametoindex(interface.as_str()).map_err(|source| {
            RouterAdvertError::Interface { interface: interface.clone(), source }
        })?;
        let socket = open_socket(&interface, index).map_err(|(what, source)| {
            RouterAdvertError::Socket { interface: interface.clone(), what, source }
        })?;
        let mac = interface_mac(&interface);
        let message = router_advertisement(mac.map(|m| m.octets()), &config.prefixes);
        tracing::info!(
            interface = %interface,
            mac = ?mac.map(|m| m.to_string()),
            "sending IPv6 router advertisements (router lifetime 0)"
        );
        Ok(Self { socket, interface, index, message })
    }

    /// Sends an advertisement now, then every [`ADVERT_INTERVAL`] and in reply to each router
    /// solicitation (at most once per [`MIN_REPLY_GAP`]) until `stop` is cancelled. Failed
    /// sends are logged and retried; only a failure of the socket itself ends it early.
    pub async fn run(self, stop: CancellationToken) -> Result<(), RouterAdvertError> {
        let Self { socket, interface, index, message } = self;
        let serve_err = |source| RouterAdvertError::Serve { interface: interface.clone(), source };
        // `AsyncFd::new` is deprecated because an arbitrary `T: AsRawFd` may close or swap its
        // fd; a `Socket` owns its fd for its whole life, and `register` would need `unsafe`.
        #[allow(deprecated)]
        let fd = AsyncFd::new(socket).map_err(serve_err)?;
        let mut next_periodic = Instant::now();
        let mut reply_due: Option<Instant> = None;
        let mut last_sent: Option<Instant> = None;
        let mut failing = false;
        let mut buf = [0u8; 1500];
        loop {
            let deadline = reply_due.map_or(next_periodic, |due| due.min(next_periodic));
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(deadline) => {
                    let now = Instant::now();
                    reply_due = None;
                    match send(fd.get_ref(), index, &interface, &message) {
                        Ok(()) => {
                            if failing {
                                tracing::info!(interface = %interface, "router advertisements are going out");
                            }
                            failing = false;
                            last_sent = Some(now);
                            if now >= next_periodic {
                                next_periodic = now + ADVERT_INTERVAL;
                            }
                        }
                        Err(err) => {
                            if failing {
                                tracing::debug!(interface = %interface, "router advertisement not sent, retrying: {err}");
                            } else {
                                tracing::warn!(interface = %interface, "router advertisement not sent, retrying: {err}");
                            }
                            failing = true;
                            next_periodic = now + RETRY_INTERVAL;
                        }
                    }
                }
                ready = fd.readable() => {
                    let mut guard = ready.map_err(serve_err)?;
                    let received = match guard.try_io(|inner| receive(inner.get_ref(), &mut buf)) {
                        Ok(received) => received,
                        Err(_would_block) => continue,
                    };
                    match received {
                        Ok((len, hop_limit, from)) => {
                            let packet = &buf[..len];
                            if !is_router_solicitation(packet) {
                                if packet.first() == Some(&ROUTER_SOLICITATION) {
                                    tracing::debug!(interface = %interface, ?from, len, "ignoring malformed router solicitation");
                                }
                                continue;
                            }
                            if hop_limit.is_some_and(|hops| hops != i32::from(ND_HOP_LIMIT)) {
                                tracing::debug!(interface = %interface, ?from, ?hop_limit, "ignoring router solicitation with hop limit other than 255");
                                continue;
                            }
                            tracing::debug!(interface = %interface, ?from, "router solicitation");
                            let now = Instant::now();
                            let earliest = last_sent.map_or(now, |sent| (sent + MIN_REPLY_GAP).max(now));
                            reply_due = Some(reply_due.map_or(earliest, |due| due.min(earliest)));
                        }
                        Err(err) => {
                            tracing::debug!(interface = %interface, "receiving on the ICMPv6 socket: {err}");
                        }
                    }
                }
            }
        }
    }
}

fn open_socket(interface: &str, index: u32) -> Result<Socket, (&'static str, io::Error)> {
    let socket =
        Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).map_err(|e| ("socket", e))?;
    socket.bind_device(Some(interface.as_bytes())).map_err(|e| ("SO_BINDTODEVICE", e))?;
    socket.set_multicast_hops_v6(ND_HOP_LIMIT.into()).map_err(|e| ("IPV6_MULTICAST_HOPS", e))?;
    socket.set_unicast_hops_v6(ND_HOP_LIMIT.into()).map_err(|e| ("IPV6_UNICAST_HOPS", e))?;
    socket.set_multicast_if_v6(index).map_err(|e| ("IPV6_MULTICAST_IF", e))?;
    socket.set_multicast_loop_v6(false).map_err(|e| ("IPV6_MULTICAST_LOOP", e))?;
    socket.join_multicast_v6(&ALL_ROUTERS, index).map_err(|e| ("join ff02::2", e))?;
    setsockopt(&socket, sockopt::Ipv6RecvHopLimit, &true)
        .map_err(|e| ("IPV6_RECVHOPLIMIT", io::Error::from(e)))?;
    socket.set_nonblocking(true).map_err(|e| ("O_NONBLOCK", e))?;
    Ok(socket)
}

/// The interface's MAC (its AF_PACKET address from getifaddrs); `None` (no Source
/// Link-Layer option) if it has no Ethernet address. Not read from
/// `/sys/class/net/IFACE/address`: sysfs shows the network namespace it was mounted in,
/// which need not be the one the socket lives in.
fn interface_mac(interface: &str) -> Option<MacAddr> {
    let addresses = match nix::ifaddrs::getifaddrs() {
        Ok(addresses) => addresses,
        Err(err) => {
            tracing::debug!("no MAC for {interface} (getifaddrs: {err}); sending without one");
            return None;
        }
    };
    let mac = addresses
        .filter(|a| a.interface_name == interface)
        .filter_map(|a| a.address.and_then(|s| s.as_link_addr().copied()))
        .find(|link| link.halen() == 6)
        .and_then(|link| link.addr())
        .filter(|octets| *octets != [0; 6])
        .map(MacAddr::new);
    if mac.is_none() {
        tracing::debug!("no Ethernet address on {interface}; sending without one");
    }
    mac
}

/// The interface's link-local address (fe80::/10), if it has one.
fn link_local_address(interface: &str) -> io::Result<Option<Ipv6Addr>> {
    let addresses = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addresses
        .filter(|a| a.interface_name == interface)
        .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in6().map(|s| s.ip())))
        .find(|ip| ip.segments()[0] & 0xffc0 == 0xfe80))
}

/// Sends `message` to all-nodes from the interface's link-local address.
fn send(socket: &Socket, index: u32, interface: &str, message: &[u8]) -> io::Result<()> {
    let Some(source) = link_local_address(interface)? else {
        return Err(io::Error::new(io::ErrorKind::AddrNotAvailable, "no link-local address yet"));
    };
    let info = libc::in6_pktinfo {
        ipi6_addr: libc::in6_addr { s6_addr: source.octets() },
        ipi6_ifindex: index,
    };
    let to = SockaddrIn6::from(SocketAddrV6::new(ALL_NODES, 0, 0, index));
    let sent = sendmsg(
        socket.as_raw_fd(),
        &[IoSlice::new(message)],
        &[ControlMessage::Ipv6PacketInfo(&info)],
        MsgFlags::empty(),
        Some(&to),
    )
    .map_err(|errno| io::Error::other(format!("from {source}: {errno}")))?;
    if sent != message.len() {
        return Err(io::Error::other(format!("sent {sent} of {} bytes", message.len())));
    }
    Ok(())
}

/// Receives one ICMPv6 message: its length, the hop limit it arrived with (if the kernel
/// said) and the sender.
fn receive(socket: &Socket, buf: &mut [u8]) -> io::Result<(usize, Option<i32>, Option<Ipv6Addr>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::c_int);
    let msg = recvmsg::<SockaddrIn6>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let mut hop_limit = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::Ipv6HopLimit(hops) = cmsg {
                hop_limit = Some(hops);
            }
        }
    }
    Ok((msg.bytes, hop_limit, msg.address.map(|a| a.ip())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn advertisement_with_mac_is_not_a_router() {
        #[rustfmt::skip]
        let want = [
            134, 0, 0, 0,      // type, code, checksum (kernel)
            64, 0, 0, 0,       // cur hop limit, flags M=O=0, router lifetime 0
            0, 0, 0, 0,        // reachable time
            0, 0, 0, 0,        // retrans timer
            1, 1, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // source link-layer address
        ];
        assert_eq!(router_advertisement(Some(MAC), &[]), want);
    }

    #[test]
    fn advertisement_without_mac_has_no_options() {
        assert_eq!(
            router_advertisement(None, &[]),
            [134, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn prefix_option_only_when_asked() {
        let prefix = PrefixInfo {
            prefix: "fd77::".parse().unwrap(),
            length: 64,
            on_link: true,
            autonomous: false,
            valid_lifetime_secs: 600,
            preferred_lifetime_secs: 300,
        };
        let packet = router_advertisement(None, &[prefix]);
        #[rustfmt::skip]
        let option = [
            3, 4, 64, 0x80,          // type, length 4 (32 bytes), prefix length, L only
            0, 0, 0x02, 0x58,        // valid lifetime 600
            0, 0, 0x01, 0x2c,        // preferred lifetime 300
            0, 0, 0, 0,              // reserved
            0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(packet.len(), 16 + 32);
        assert_eq!(&packet[16..], option);
        assert_eq!(&packet[6..8], [0, 0], "router lifetime stays 0");
    }

    #[test]
    fn recognises_router_solicitations() {
        // From a host with an address: RS plus its source link-layer option.
        let with_option = [133, 0, 0x7d, 0x2a, 0, 0, 0, 0, 1, 1, 0x52, 0x54, 0, 0, 0, 1];
        assert!(is_router_solicitation(&with_option));
        // From an unspecified source: no options at all.
        assert!(is_router_solicitation(&[133, 0, 0, 0, 0, 0, 0, 0]));
    }

    #[test]
    fn rejects_everything_else() {
        let cases: [&[u8]; 8] = [
            &[],
            &[133],
            &[133, 0, 0, 0, 0, 0, 0],                 // 7 bytes: too short
            &[133, 1, 0, 0, 0, 0, 0, 0],              // code 1
            &[134, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0], // an advertisement
            &[135, 0, 0, 0, 0, 0, 0, 0],              // neighbour solicitation
            &[128, 0, 0, 0, 0, 1, 0, 1],              // echo request
            &[0xff; 3],
        ];
        for case in cases {
            assert!(!is_router_solicitation(case), "{case:?}");
        }
    }

    #[test]
    fn parser_never_panics_on_any_short_input() {
        for len in 0..16 {
            for first in [0, 133, 134, 255] {
                let mut packet = vec![0u8; len];
                if let Some(b) = packet.first_mut() {
                    *b = first;
                }
                let _ = is_router_solicitation(&packet);
            }
        }
    }
}
