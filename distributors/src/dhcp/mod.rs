//! DHCP and proxyDHCP for network boot: parse with `dhcproto`, [`decide::decide`], encode.
//! Everything but [`server`] and [`lease_log`] is pure (no sockets, no clock, no files); the
//! socket loop feeds bytes to [`DhcpCore::process`], journals the binding changes it reports
//! and sends what it returns, an ACK only once its lease is durable ([`server::run_with`]).

pub mod classify;
pub mod decide;
pub mod lease_log;
pub mod leases;
pub mod server;

use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{Message, MessageType};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

pub use classify::{ClientArch, ClientInfo, ClientUuid, Reject, classify};
pub use decide::{
    BootConfig, BootTarget, Mode, NetworkConfig, PXE_SKIP_DISCOVERY, RequestPort, boot_target,
    decide, lease_query,
};
pub use lease_log::{Commit, LeaseLog, LogConfig, LogError, LogStats, Record, restore_table};
pub use leases::{Entry, Lease, LeaseAnswer, LeaseQuery, LeaseTable, Nak, PoolConfig, Seconds};

/// Fixed BOOTP header (236 bytes) plus the magic cookie.
const HEADER_LEN: usize = 240;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// BOOTP's minimum message size; some PXE ROMs drop shorter replies (RFC 1542 2.1).
pub const MIN_REPLY_LEN: usize = 300;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
pub const PXE_PORT: u16 = 4011;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0} bytes is shorter than a DHCP header")]
    TooShort(usize),
    #[error("no DHCP magic cookie")]
    BadMagic,
    #[error("hardware address length {0} is larger than chaddr")]
    BadHardwareLength(u8),
    #[error("option {code} has invalid length {len}")]
    BadOptionLength { code: u8, len: usize },
    #[error("undecodable: {0}")]
    Decode(String),
}

#[derive(Debug, thiserror::Error)]
#[error("encoding DHCP reply: {0}")]
pub struct EncodeError(#[from] dhcproto::error::EncodeError);

/// Decodes a datagram. Checks first what `dhcproto` 0.15 would panic on in debug builds
/// (`debug_assert!`s and length underflows on a few options) or later (hlen > 16 makes
/// `Message::chaddr` slice out of bounds), so hostile input is an error, never a panic.
pub fn parse(bytes: &[u8]) -> Result<Message, ParseError> {
    if bytes.len() < HEADER_LEN {
        return Err(ParseError::TooShort(bytes.len()));
    }
    if bytes[236..240] != MAGIC_COOKIE {
        return Err(ParseError::BadMagic);
    }
    if bytes[2] > 16 {
        return Err(ParseError::BadHardwareLength(bytes[2]));
    }
    check_option_lengths(&bytes[HEADER_LEN..])?;
    Message::decode(&mut Decoder::new(bytes)).map_err(|e| ParseError::Decode(e.to_string()))
}

/// Walks the options like dhcproto does (consecutive instances of one code are
/// concatenated, RFC 3396) and rejects lengths its decoder asserts on or underflows with.
fn check_option_lengths(mut opts: &[u8]) -> Result<(), ParseError> {
    let mut run: Option<(u8, usize)> = None;
    let check = |run: Option<(u8, usize)>| match run {
        Some((code, len)) if !option_length_ok(code, len) => {
            Err(ParseError::BadOptionLength { code, len })
        }
        _ => Ok(()),
    };
    loop {
        match opts {
            [] | [255, ..] => break,
            [0, rest @ ..] => {
                check(run.take())?;
                opts = rest;
            }
            [code, len, rest @ ..] if rest.len() >= usize::from(*len) => {
                let len = usize::from(*len);
                run = match run {
                    Some((c, total)) if c == *code => Some((c, total + len)),
                    other => {
                        check(other)?;
                        Some((*code, len))
                    }
                };
                opts = &rest[len..];
            }
            // Truncated option: dhcproto drops it but may still decode the run before it.
            _ => break,
        }
    }
    check(run)
}

fn option_length_ok(code: u8, len: usize) -> bool {
    match code {
        80 => len == 0,
        81 => len >= 3,
        94 => len == 3,
        151 => len >= 1,
        152..=155 => len == 4,
        _ => true,
    }
}

/// Encodes a reply, padded to [`MIN_REPLY_LEN`].
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut buf = Vec::with_capacity(MIN_REPLY_LEN);
    msg.encode(&mut Encoder::new(&mut buf))?;
    if buf.len() < MIN_REPLY_LEN {
        buf.resize(MIN_REPLY_LEN, 0);
    }
    Ok(buf)
}

/// Where a reply to a port-67 request goes (RFC 2131 4.1): through the relay if there is
/// one; NAKs broadcast; to ciaddr when the client has an address; otherwise broadcast
/// (the RFC's unicast to yiaddr needs an ARP entry we cannot inject from a UDP socket).
/// Port-4011 replies go back to the datagram's source instead (see [`Destination`]).
pub fn reply_destination(request: &Message, reply: &Message) -> SocketAddrV4 {
    let giaddr = request.giaddr();
    if !giaddr.is_unspecified() {
        return SocketAddrV4::new(giaddr, SERVER_PORT);
    }
    let ciaddr = request.ciaddr();
    if reply.opts().msg_type() != Some(MessageType::Nak) && !ciaddr.is_unspecified() {
        return SocketAddrV4::new(ciaddr, CLIENT_PORT);
    }
    SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT)
}

/// Subnet selection for relayed requests (RFC 2131 4.3.1: the address comes from the
/// subnet of giaddr). Authoritative mode serves one subnet, the boot interface's (our
/// address and the handed-out mask), so a request relayed from any other subnet is not ours
/// to answer: an address from our pool would be useless there. Direct requests (giaddr
/// 0.0.0.0), proxy mode (no addresses) and port 4011 always pass.
pub fn relay_is_ours(
    request: &Message,
    port: RequestPort,
    mode: &Mode,
    server_ip: Ipv4Addr,
) -> bool {
    let giaddr = request.giaddr();
    match (port, mode) {
        (RequestPort::Dhcp, Mode::Authoritative(net)) if !giaddr.is_unspecified() => {
            let mask = net.subnet_mask.to_bits();
            giaddr.to_bits() & mask == server_ip.to_bits() & mask
        }
        _ => true,
    }
}

/// Where the socket loop sends a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    To(SocketAddrV4),
    /// Back to the address and port the request came from (port 4011 exchanges).
    Sender,
}

/// An encoded reply and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub bytes: Vec<u8>,
    pub destination: Destination,
    pub reply: Message,
}

/// The whole pipeline for one datagram: parse, ask the lease table (authoritative mode),
/// decide, encode. Owns the lease table; still no I/O and no clock.
#[derive(Debug, Clone)]
pub struct DhcpCore {
    pub mode: Mode,
    pub boot: BootConfig,
    /// Required in authoritative mode; without it DISCOVERs get no offer.
    pub leases: Option<LeaseTable>,
}

impl DhcpCore {
    pub fn proxy(boot: BootConfig) -> Self {
        Self { mode: Mode::Proxy, boot, leases: None }
    }

    pub fn authoritative(boot: BootConfig, net: NetworkConfig, pool: PoolConfig) -> Self {
        Self { mode: Mode::Authoritative(net), boot, leases: Some(LeaseTable::new(pool)) }
    }

    /// Authoritative mode over an existing table, e.g. one rebuilt by [`restore_table`].
    pub fn with_table(boot: BootConfig, net: NetworkConfig, table: LeaseTable) -> Self {
        Self { mode: Mode::Authoritative(net), boot, leases: Some(table) }
    }

    /// [`DhcpCore::process`] without the journal record: for proxy mode and in-memory use.
    /// A server with durable leases must use `process` and persist the record.
    pub fn handle(&mut self, bytes: &[u8], port: RequestPort, now: Seconds) -> Option<Outgoing> {
        self.process(bytes, port, now).outgoing
    }

    /// Handles one datagram and says what the lease table changed. If both a reply and a
    /// record come back, the reply (an ACK) must not leave before the record is durable.
    pub fn process(&mut self, bytes: &[u8], port: RequestPort, now: Seconds) -> Processed {
        let request = match parse(bytes) {
            Ok(msg) => msg,
            Err(error) => {
                tracing::debug!(%error, len = bytes.len(), "dropping undecodable DHCP packet");
                return Processed::default();
            }
        };
        if !relay_is_ours(&request, port, &self.mode, self.boot.server_ip) {
            tracing::debug!(giaddr = %request.giaddr(), "relayed from a subnet we do not serve");
            return Processed::default();
        }
        let (answer, record) = match (
            lease_query(&request, port, &self.mode, self.boot.server_ip),
            &mut self.leases,
        ) {
            (Some(query), Some(table)) => {
                let before = query_ip(&query).and_then(|ip| table.entry(ip));
                let answer = table.answer(query, now);
                let record = journal_record(table, &query, answer.as_ref(), before);
                (answer, record)
            }
            _ => (None, None),
        };
        let outgoing = self.reply(&request, port, answer.as_ref());
        // A REQUEST whose ACK could not be built still changed the table: keep the record.
        Processed { outgoing, record }
    }

    fn reply(
        &self,
        request: &Message,
        port: RequestPort,
        answer: Option<&LeaseAnswer>,
    ) -> Option<Outgoing> {
        let reply = decide(request, port, &self.mode, &self.boot, answer)?;
        tracing::debug!(
            xid = request.xid(),
            ?port,
            yiaddr = %reply.yiaddr(),
            file = %String::from_utf8_lossy(reply.fname().unwrap_or_default()),
            "dhcp reply"
        );
        let bytes = match encode(&reply) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(%error, "could not encode DHCP reply");
                return None;
            }
        };
        let destination = match port {
            RequestPort::Dhcp => Destination::To(reply_destination(request, &reply)),
            RequestPort::PxeBootServer => Destination::Sender,
        };
        Some(Outgoing { bytes, destination, reply })
    }
}

/// The `dhcp_replied` event for a reply that was sent (see [`crate::boot_events`]); `None`
/// for a reply without an Ethernet client address.
pub fn reply_event(reply: &Message, worker: String) -> Option<ctpf_common::EventBody> {
    let octets: [u8; 6] = reply.chaddr().get(..6)?.try_into().ok()?;
    let kind = match reply.opts().msg_type()? {
        MessageType::Offer => "offer",
        MessageType::Ack => "ack",
        MessageType::Nak => "nak",
        _ => "other",
    };
    let ip = Some(reply.yiaddr()).filter(|ip| !ip.is_unspecified());
    let boot_file = match reply.opts().get(dhcproto::v4::OptionCode::BootfileName) {
        Some(dhcproto::v4::DhcpOption::BootfileName(name)) => Some(name.as_slice()),
        _ => reply.fname(),
    }
    .filter(|name| !name.is_empty())
    .map(|name| crate::boot_events::clip(&String::from_utf8_lossy(name)));
    Some(ctpf_common::EventBody::DhcpReplied {
        worker,
        mac: ctpf_common::MacAddr::new(octets),
        reply: kind.to_owned(),
        ip,
        boot_file,
    })
}

/// What [`DhcpCore::process`] produced for one datagram.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Processed {
    pub outgoing: Option<Outgoing>,
    /// The binding change to journal (authoritative mode only). OFFERs produce none: a
    /// hold lost in a crash costs the client one more DISCOVER.
    pub record: Option<Record>,
}

fn query_ip(query: &LeaseQuery) -> Option<Ipv4Addr> {
    match query {
        LeaseQuery::Request { ip, .. }
        | LeaseQuery::Decline { ip, .. }
        | LeaseQuery::Release { ip, .. } => Some(*ip),
        LeaseQuery::Offer { .. } | LeaseQuery::OtherServerChosen { .. } => None,
    }
}

/// The record for what `query` did to `table`; `before` is the entry of its address before.
fn journal_record(
    table: &LeaseTable,
    query: &LeaseQuery,
    answer: Option<&LeaseAnswer>,
    before: Option<Entry>,
) -> Option<Record> {
    match *query {
        // Every ACK, even one that changed nothing (a retransmitted REQUEST), waits for its
        // own record: the identical earlier one may still be on its way to disk.
        LeaseQuery::Request { ip, .. } if matches!(answer, Some(LeaseAnswer::Ack { .. })) => {
            match table.entry(ip) {
                Some(Entry::Bound(lease)) => Some(Record::Bind(lease)),
                _ => None,
            }
        }
        LeaseQuery::Decline { ip, .. } => match table.entry(ip) {
            Some(Entry::Declined { until }) if table.entry(ip) != before => {
                Some(Record::Decline { ip, until })
            }
            _ => None,
        },
        LeaseQuery::Release { mac, ip } => match before {
            Some(Entry::Bound(lease)) if lease.mac == mac && table.entry(ip).is_none() => {
                Some(Record::Release { mac, ip })
            }
            _ => None,
        },
        _ => None,
    }
}
