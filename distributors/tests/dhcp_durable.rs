//! Durable authoritative leases: the records `DhcpCore::process` emits, and the real socket
//! loop over loopback surviving a restart on the same journal. Replies are relayed
//! (giaddr 127.0.0.1) and the relay port pointed at the test client, so no privileged ports;
//! the served subnet is 127.0.0.0/8, because relays of other subnets get no answer.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ctpf_common::MacAddr;
use ctpf_distributors::dhcp::server::{self, Options};
use ctpf_distributors::dhcp::{
    self, BootConfig, DhcpCore, LeaseLog, NetworkConfig, PoolConfig, Record, RequestPort,
};
use dhcproto::v4::{DhcpOption, Message, MessageType};
use dhcproto::{Encodable, Encoder};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SERVER: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 1);
const FIRST: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 100);
const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];

fn net() -> NetworkConfig {
    NetworkConfig {
        subnet_mask: Ipv4Addr::new(255, 0, 0, 0),
        routers: vec![SERVER],
        dns_servers: vec![],
        domain_name: None,
    }
}

fn pool() -> PoolConfig {
    PoolConfig {
        first: FIRST,
        last: Ipv4Addr::new(127, 77, 0, 101),
        lease_secs: 3600,
        offer_hold_secs: 30,
        decline_secs: 600,
        reservations: BTreeMap::new(),
    }
}

/// A relayed request, so the reply goes to giaddr and the relay port.
fn msg(kind: MessageType, mac: [u8; 6], xid: u32) -> Message {
    let u = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(xid, u, u, u, LOOPBACK, &mac);
    m.set_hops(1);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m
}

fn request(mac: [u8; 6], xid: u32, ip: Ipv4Addr) -> Message {
    let mut m = msg(MessageType::Request, mac, xid);
    m.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
    m
}

fn bytes(m: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).unwrap();
    buf
}

struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Opens the journal, rebuilds the table from it and runs the socket loop.
async fn start(journal: &Path, client_port: u16) -> Running {
    let (log, records) = LeaseLog::open(journal).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let table = dhcp::restore_table(pool(), &records, now);
    let core = DhcpCore::with_table(BootConfig::standard(SERVER, 7480), net(), table);
    let socket = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let options = Options {
        journal: Some(Arc::new(log)),
        client_port,
        relay_port: client_port,
        ..Options::default()
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server::run_with(
        socket,
        RequestPort::Dhcp,
        Arc::new(Mutex::new(core)),
        options,
        shutdown.clone(),
    ));
    Running { addr, shutdown, task }
}

async fn exchange(client: &UdpSocket, server: SocketAddr, m: &Message) -> Message {
    client.send_to(&bytes(m), server).await.unwrap();
    let mut buf = vec![0u8; 1500];
    loop {
        let (len, _) = tokio::time::timeout(Duration::from_secs(10), client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let reply = dhcp::parse(&buf[..len]).unwrap();
        if reply.xid() == m.xid() {
            return reply;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_lease_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("leases.journal");
    let client = UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
    let client_port = client.local_addr().unwrap().port();

    let first = start(&journal, client_port).await;
    let offer = exchange(&client, first.addr, &msg(MessageType::Discover, MAC_A, 1)).await;
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    let ip = offer.yiaddr();
    assert_eq!(ip, FIRST);
    let ack = exchange(&client, first.addr, &request(MAC_A, 2, ip)).await;
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), ip);
    first.stop().await;

    let second = start(&journal, client_port).await;
    // RENEWING: the client names its address in ciaddr and no server identifier.
    let mut renew = msg(MessageType::Request, MAC_A, 3);
    renew.set_ciaddr(ip);
    let ack = exchange(&client, second.addr, &renew).await;
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), ip);
    // Another machine asking for the same address is refused: the binding was restored.
    let nak = exchange(&client, second.addr, &request(MAC_B, 4, ip)).await;
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    // ...and offered the other address instead.
    let offer = exchange(&client, second.addr, &msg(MessageType::Discover, MAC_B, 5)).await;
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(127, 77, 0, 101));
    second.stop().await;
}

#[test]
fn process_emits_a_record_per_binding_change() {
    let mut core = DhcpCore::authoritative(BootConfig::standard(SERVER, 7480), net(), pool());
    let mac = MacAddr::new(MAC_A);
    let now = 1000;

    let out = core.process(&bytes(&msg(MessageType::Discover, MAC_A, 1)), RequestPort::Dhcp, now);
    assert!(out.outgoing.is_some());
    assert_eq!(out.record, None, "an OFFER is only a hold in memory");

    let out = core.process(&bytes(&request(MAC_A, 2, FIRST)), RequestPort::Dhcp, now);
    assert_eq!(out.outgoing.unwrap().reply.opts().msg_type(), Some(MessageType::Ack));
    let Some(Record::Bind(lease)) = out.record else { panic!("{:?}", out.record) };
    assert_eq!((lease.mac, lease.ip, lease.expires), (mac, FIRST, now + 3600));

    // A retransmitted REQUEST still gets (and waits for) its own record.
    let out = core.process(&bytes(&request(MAC_A, 2, FIRST)), RequestPort::Dhcp, now);
    assert!(matches!(out.record, Some(Record::Bind(_))));

    // A NAK changes nothing.
    let out = core.process(&bytes(&request(MAC_B, 3, FIRST)), RequestPort::Dhcp, now);
    assert_eq!(out.outgoing.unwrap().reply.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(out.record, None);

    let mut release = msg(MessageType::Release, MAC_A, 4);
    release.set_ciaddr(FIRST);
    let out = core.process(&bytes(&release), RequestPort::Dhcp, now);
    assert!(out.outgoing.is_none());
    assert_eq!(out.record, Some(Record::Release { mac, ip: FIRST }));
    // Releasing again (or someone else's address) is not journaled.
    assert_eq!(core.process(&bytes(&release), RequestPort::Dhcp, now).record, None);

    let mut decline = msg(MessageType::Decline, MAC_B, 5);
    decline.opts_mut().insert(DhcpOption::RequestedIpAddress(FIRST));
    let out = core.process(&bytes(&decline), RequestPort::Dhcp, now);
    assert!(out.outgoing.is_none());
    assert_eq!(out.record, Some(Record::Decline { ip: FIRST, until: now + 600 }));

    // Proxy mode never journals.
    let mut proxy = DhcpCore::proxy(BootConfig::standard(SERVER, 7480));
    assert_eq!(
        proxy.process(&bytes(&request(MAC_A, 6, FIRST)), RequestPort::Dhcp, now).record,
        None
    );
}
