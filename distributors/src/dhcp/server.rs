//! The thin socket loop around [`DhcpCore`]: receive, hand the bytes to the core, send what
//! it returns. All protocol decisions live in the pure modules.
//!
//! [`bind`] does not tie the socket to an interface; [`crate::boot_service`] binds with
//! SO_BINDTODEVICE, so on a multi-homed host broadcasts leave by the boot interface.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::{CLIENT_PORT, Destination, DhcpCore, LeaseLog, RequestPort, SERVER_PORT, Seconds};

/// Ethernet MTU; DHCP clients must accept 576, and nobody sends more than 1500 here.
const BUFFER: usize = 1500;

/// How a loop runs beyond its socket and core.
#[derive(Debug, Clone)]
pub struct Options {
    /// The lease journal. With one, an ACK leaves only once its lease is durable; without,
    /// leases live in memory only (proxy mode, tests).
    pub journal: Option<Arc<LeaseLog>>,
    /// Where replies to clients (68) and relays (67) go; other values only for testing
    /// without privileged ports, like dnsmasq's `--dhcp-alternate-port`.
    pub client_port: u16,
    pub relay_port: u16,
}

impl Default for Options {
    fn default() -> Self {
        Self { journal: None, client_port: CLIENT_PORT, relay_port: SERVER_PORT }
    }
}

/// Serves `port` (67 or 4011) on `socket` until `shutdown` is cancelled, with default
/// [`Options`] (no journal). See [`run_with`].
pub async fn run(
    socket: UdpSocket,
    port: RequestPort,
    core: Arc<Mutex<DhcpCore>>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    run_with(socket, port, core, Options::default(), shutdown).await
}

/// Serves `port` on `socket` until `shutdown` is cancelled. Several loops (67 and 4011)
/// share one core, and with it the lease table. Returns an error only if the socket fails.
///
/// Durable replies: records are queued to the journal under the core lock (so the journal
/// sees changes in the table's order), and a reply that depends on one is sent by its own
/// task once the journal confirms it, so the loop never waits for the disk and concurrent
/// ACKs share one fsync. If the record cannot be made durable the ACK is not sent; the
/// client retries.
pub async fn run_with(
    socket: UdpSocket,
    port: RequestPort,
    core: Arc<Mutex<DhcpCore>>,
    options: Options,
    shutdown: CancellationToken,
) -> io::Result<()> {
    // Replies to clients without an address are broadcast.
    socket.set_broadcast(true)?;
    let socket = Arc::new(socket);
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let (len, from) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            received = socket.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(error) if is_transient(&error) => {
                    tracing::debug!(%error, "dhcp: transient receive error");
                    continue;
                }
                Err(error) => return Err(error),
            },
        };
        let Some(datagram) = buffer.get(..len) else {
            continue;
        };
        let (outgoing, commit) = {
            // A panic elsewhere must not take DHCP down with it; the table stays consistent
            // because every mutation is a single call.
            let mut core = core.lock().unwrap_or_else(PoisonError::into_inner);
            let processed = core.process(datagram, port, unix_now());
            let commit = match (processed.record, &options.journal) {
                (Some(record), Some(journal)) if processed.outgoing.is_some() => {
                    Some(journal.append(record))
                }
                (Some(record), Some(journal)) => {
                    journal.append_detached(record);
                    None
                }
                _ => None,
            };
            (processed.outgoing, commit)
        };
        let Some(outgoing) = outgoing else {
            continue;
        };
        let to = match outgoing.destination {
            Destination::To(addr) => SocketAddr::V4(redirect(addr, &options)),
            Destination::Sender => from,
        };
        match commit {
            None => send(&socket, &outgoing.bytes, to).await,
            Some(commit) => {
                let socket = socket.clone();
                tokio::spawn(async move {
                    match commit.wait().await {
                        Ok(()) => send(&socket, &outgoing.bytes, to).await,
                        Err(error) => {
                            tracing::error!(%error, %to, "dhcp: lease not durable; ACK withheld");
                        }
                    }
                });
            }
        }
    }
}

async fn send(socket: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    if let Err(error) = socket.send_to(bytes, to).await {
        tracing::warn!(%error, %to, "dhcp: could not send reply");
    }
}

fn redirect(addr: SocketAddrV4, options: &Options) -> SocketAddrV4 {
    match addr.port() {
        CLIENT_PORT => SocketAddrV4::new(*addr.ip(), options.client_port),
        SERVER_PORT => SocketAddrV4::new(*addr.ip(), options.relay_port),
        _ => addr,
    }
}

/// Binds a socket for `port` on all addresses (DHCP requests arrive broadcast, so binding a
/// unicast address would miss them).
pub async fn bind(port: u16) -> io::Result<UdpSocket> {
    UdpSocket::bind(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port)).await
}

fn unix_now() -> Seconds {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// ICMP errors from earlier sends surface as receive errors on some platforms.
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}
