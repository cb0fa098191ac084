//! The thin socket loop around [`DhcpCore`]: receive, hand the bytes to the core, send what
//! it returns. All protocol decisions live in the pure modules.
//!
//! Limits (later work): the socket is not bound to one interface (SO_BINDTODEVICE needs a
//! crate we do not depend on yet), so on a multi-homed host broadcasts leave by the default
//! route's interface; run it in a namespace or on a single-NIC host until then.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::{Destination, DhcpCore, RequestPort, Seconds};

/// Ethernet MTU; DHCP clients must accept 576, and nobody sends more than 1500 here.
const BUFFER: usize = 1500;

/// Serves `port` (67 or 4011) on `socket` until `shutdown` is cancelled. Several loops (67
/// and 4011) share one core, and with it the lease table. Returns an error only if the
/// socket fails.
pub async fn run(
    socket: UdpSocket,
    port: RequestPort,
    core: Arc<Mutex<DhcpCore>>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    // Replies to clients without an address are broadcast.
    socket.set_broadcast(true)?;
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
        let outgoing = {
            // A panic elsewhere must not take DHCP down with it; the table stays consistent
            // because every mutation is a single call.
            let mut core = core.lock().unwrap_or_else(PoisonError::into_inner);
            core.handle(datagram, port, unix_now())
        };
        let Some(outgoing) = outgoing else {
            continue;
        };
        let to = match outgoing.destination {
            Destination::To(addr) => SocketAddr::V4(addr),
            Destination::Sender => from,
        };
        if let Err(error) = socket.send_to(&outgoing.bytes, to).await {
            tracing::warn!(%error, %to, "dhcp: could not send reply");
        }
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
