//! The thin socket loop around [`DhcpCore`]: receive, hand the bytes to the core, send what
//! it returns. All protocol decisions live in the pure modules.
//!
//! [`bind`] does not tie the socket to an interface; [`crate::boot_service`] binds with
//! SO_BINDTODEVICE, so on a multi-homed host broadcasts leave by the boot interface.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::boot_events::BootEvents;

use super::{
    CLIENT_PORT, Destination, DhcpCore, LeaseLog, Outgoing, RequestPort, SERVER_PORT, Seconds,
};

/// Ethernet MTU; DHCP clients must accept 576, and nobody sends more than 1500 here.
const BUFFER: usize = 1500;
/// How long shutting down may take the loop to notice.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

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
    /// Where each sent reply is recorded for the event stream (off by default).
    pub events: BootEvents,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            journal: None,
            client_port: CLIENT_PORT,
            relay_port: SERVER_PORT,
            events: BootEvents::off(),
        }
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
/// sees changes in the table's order), and a reply that depends on one is sent by the
/// journal's writer thread right after the fsync that made it durable, so the loop never
/// waits for the disk, concurrent ACKs share one fsync, and no task or wake-up is spent per
/// ACK. If the record cannot be made durable the ACK is not sent; the client retries.
///
/// The loop runs on tokio's blocking pool (see the body); it stops when `shutdown` is
/// cancelled, within [`SHUTDOWN_POLL`], not when this future is dropped.
pub async fn run_with(
    socket: UdpSocket,
    port: RequestPort,
    core: Arc<Mutex<DhcpCore>>,
    options: Options,
    shutdown: CancellationToken,
) -> io::Result<()> {
    // Replies to clients without an address are broadcast.
    socket.set_broadcast(true)?;
    // The loop is a plain blocking thread: under load a datagram is almost always waiting,
    // and a blocking receive then costs one syscall, where the async loop paid for epoll
    // and task wake-ups around every packet. The timeout is how often it looks at
    // `shutdown`.
    let socket = socket.into_std()?;
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(SHUTDOWN_POLL))?;
    // The journal's writer thread sends the durable replies itself, right after their
    // fsync, through a second handle on the same socket.
    let durable_sender = Arc::new(socket.try_clone()?);
    let serve = move || {
        let mut buffer = vec![0u8; BUFFER];
        while !shutdown.is_cancelled() {
            let (len, from) = match socket.recv_from(&mut buffer) {
                Ok(received) => received,
                Err(error) if error.kind() == io::ErrorKind::TimedOut || is_transient(&error) => {
                    continue;
                }
                Err(error) => return Err(error),
            };
            let Some(datagram) = buffer.get(..len) else {
                continue;
            };
            let immediate = {
                // A panic elsewhere must not take DHCP down with it; the table stays
                // consistent because every mutation is a single call.
                let mut core = core.lock().unwrap_or_else(PoisonError::into_inner);
                let processed = core.process(datagram, port, unix_now());
                match (processed.record, &options.journal, processed.outgoing) {
                    // Queued under the lock, so the journal sees changes in the table's order.
                    (Some(record), Some(journal), Some(outgoing)) => {
                        let to = destination(&outgoing, from, &options);
                        let sender = durable_sender.clone();
                        let events = options.events.clone();
                        journal.append_then(record, move |durable| match durable {
                            Ok(()) => {
                                send_now(&sender, &outgoing.bytes, to);
                                record_reply(&events, &outgoing);
                            }
                            Err(error) => {
                                tracing::error!(%error, %to, "dhcp: lease not durable; ACK withheld");
                            }
                        });
                        None
                    }
                    (Some(record), Some(journal), outgoing) => {
                        journal.append_detached(record);
                        outgoing
                    }
                    (_, _, outgoing) => outgoing,
                }
            };
            if let Some(outgoing) = immediate {
                send_now(&socket, &outgoing.bytes, destination(&outgoing, from, &options));
                record_reply(&options.events, &outgoing);
            }
        }
        Ok(())
    };
    tokio::task::spawn_blocking(serve).await.map_err(io::Error::other)?
}

fn record_reply(events: &BootEvents, outgoing: &Outgoing) {
    events.record(|worker| super::reply_event(&outgoing.reply, worker));
}

/// A blocking send (from the loop, or from the journal's writer thread for durable replies).
fn send_now(socket: &std::net::UdpSocket, bytes: &[u8], to: SocketAddr) {
    if let Err(error) = socket.send_to(bytes, to) {
        tracing::warn!(%error, %to, "dhcp: could not send reply");
    }
}

fn destination(outgoing: &Outgoing, from: SocketAddr, options: &Options) -> SocketAddr {
    match outgoing.destination {
        Destination::To(addr) => SocketAddr::V4(redirect(addr, options)),
        Destination::Sender => from,
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
