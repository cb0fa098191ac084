//! The socket loop: the main socket only receives requests; every read transfer runs as its
//! own task on its own socket and delegates all protocol decisions to [`super::session`].

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::packet::{ErrorCode, Packet, TftpOption};
use super::session::{RequestDecision, Step, Transfer, decide, negotiate};
use super::{FileSource, SourceError, TftpConfig};

/// RFC 2347 limits requests to 512 bytes; anything longer is truncated by the kernel and
/// then fails to parse, which is the right outcome.
const REQUEST_BUFFER: usize = 1024;
/// Clients only send ACKs and ERRORs to a transfer socket.
const TRANSFER_BUFFER: usize = 1024;
/// File bytes read at once. tokio runs every file read on its blocking pool, a thread hop
/// that cost more than the send itself when done per block; 128 KiB is ~90 blocks of 1468
/// bytes per hop, and bounds the memory of `max_transfers` transfers.
const READ_AHEAD: usize = 128 * 1024;

/// Serves read requests arriving on `socket` until `shutdown` is cancelled, then stops the
/// running transfers and waits for them. Returns an error only if the main socket fails.
pub async fn run(
    socket: UdpSocket,
    source: Arc<dyn FileSource>,
    config: TftpConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let local_ip = socket.local_addr()?.ip();
    let transfer_slots = Arc::new(Semaphore::new(config.max_transfers.max(1)));
    let transfers = TaskTracker::new();
    let transfers_shutdown = shutdown.child_token();
    let mut buffer = vec![0u8; REQUEST_BUFFER];
    let result = loop {
        let (len, client) = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            received = socket.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(error) if is_transient(&error) => {
                    debug!(%error, "tftp: transient receive error");
                    continue;
                }
                Err(error) => break Err(error),
            },
        };
        let Some(datagram) = buffer.get(..len) else {
            continue;
        };
        let packet = match Packet::parse(datagram) {
            Ok(packet) => packet,
            Err(error) => {
                debug!(%client, %error, "tftp: ignoring malformed datagram");
                continue;
            }
        };
        match decide(packet) {
            RequestDecision::Ignore => debug!(%client, "tftp: ignoring non-request packet"),
            RequestDecision::Refuse(reply) => {
                info!(%client, reply = ?reply, "tftp: request refused");
                // try_send_to: a reply must never stall the receive loop.
                let _ = socket.try_send_to(&reply.encode(), client);
            }
            RequestDecision::Read { filename, options } => {
                let Ok(permit) = Arc::clone(&transfer_slots).try_acquire_owned() else {
                    warn!(%client, path = %filename, "tftp: too many transfers, refusing");
                    let reply = Packet::error(ErrorCode::NotDefined, "server busy");
                    let _ = socket.try_send_to(&reply.encode(), client);
                    continue;
                };
                transfers.spawn(serve_read(ReadRequest {
                    client,
                    local_ip,
                    filename,
                    options,
                    source: Arc::clone(&source),
                    config: config.clone(),
                    shutdown: transfers_shutdown.clone(),
                    _permit: permit,
                }));
            }
        }
    };
    transfers_shutdown.cancel();
    transfers.close();
    transfers.wait().await;
    result
}

fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

struct ReadRequest {
    client: SocketAddr,
    local_ip: IpAddr,
    filename: String,
    options: Vec<TftpOption>,
    source: Arc<dyn FileSource>,
    config: TftpConfig,
    shutdown: CancellationToken,
    /// Held for the whole transfer so `max_transfers` bounds concurrent transfers.
    _permit: OwnedSemaphorePermit,
}

/// How a transfer ended, for the log line.
#[derive(Debug)]
enum Outcome {
    Completed,
    FileNotFound,
    AccessDenied(&'static str),
    ClientError { code: ErrorCode, message: String },
    ClientGone,
    ProtocolViolation,
    GaveUp,
    Shutdown,
    Io(io::Error),
}

impl fmt::Display for Outcome {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Completed => write!(formatter, "completed"),
            Outcome::FileNotFound => write!(formatter, "file not found"),
            Outcome::AccessDenied(reason) => write!(formatter, "access denied ({reason})"),
            Outcome::ClientError { code, message } => {
                write!(formatter, "client error {}: {message:?}", code.as_u16())
            }
            Outcome::ClientGone => write!(formatter, "client unreachable"),
            Outcome::ProtocolViolation => write!(formatter, "protocol violation by client"),
            Outcome::GaveUp => write!(formatter, "gave up after retries"),
            Outcome::Shutdown => write!(formatter, "server shutdown"),
            Outcome::Io(error) => write!(formatter, "I/O error: {error}"),
        }
    }
}

async fn serve_read(request: ReadRequest) {
    let started = Instant::now();
    let mut bytes = 0;
    let outcome = match transfer_file(&request, &mut bytes).await {
        Ok(outcome) => outcome,
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => Outcome::ClientGone,
        Err(error) => Outcome::Io(error),
    };
    let duration_ms = started.elapsed().as_millis();
    let client = request.client;
    let path = request.filename.as_str();
    match outcome {
        // Client-side aborts are routine: PXE ROMs often ask for tsize only, then abort.
        Outcome::Completed | Outcome::FileNotFound | Outcome::ClientError { .. } => {
            info!(%client, path, bytes, duration_ms, %outcome, "tftp transfer");
        }
        _ => warn!(%client, path, bytes, duration_ms, %outcome, "tftp transfer"),
    }
}

/// Runs one transfer; `bytes` tracks acknowledged bytes even when the transfer fails.
async fn transfer_file(request: &ReadRequest, bytes: &mut u64) -> io::Result<Outcome> {
    let socket = UdpSocket::bind((request.local_ip, 0)).await?;
    // Connected: the kernel drops datagrams from other ports (foreign TIDs) and reports a
    // vanished client as ConnectionRefused instead of leaving us to time out.
    socket.connect(request.client).await?;
    let send = |packet: Packet| {
        let socket = &socket;
        async move { socket.send(&packet.encode()).await.map(|_| ()) }
    };

    let file = match request.source.open(&request.filename).await {
        Ok(Some(file)) => file,
        Ok(None) => {
            send(Packet::error(ErrorCode::FileNotFound, "file not found")).await?;
            return Ok(Outcome::FileNotFound);
        }
        Err(SourceError::AccessDenied { reason, .. }) => {
            warn!(client = %request.client, path = %request.filename, reason, "tftp: access violation");
            send(Packet::error(ErrorCode::AccessViolation, "access violation")).await?;
            return Ok(Outcome::AccessDenied(reason));
        }
        Err(SourceError::Io { source, .. }) => {
            send(Packet::error(ErrorCode::NotDefined, "cannot open file")).await?;
            return Ok(Outcome::Io(source));
        }
    };

    let negotiation = negotiate(&request.options, file.size, &request.config);
    let mut transfer = Transfer::new(&negotiation, request.config.retries);
    // Never send more than announced in tsize, even if the file grows meanwhile.
    let mut reader = tokio::io::BufReader::with_capacity(READ_AHEAD, file.reader.take(file.size));
    let mut buffer = vec![0u8; TRANSFER_BUFFER];
    let mut deadline = Instant::now() + negotiation.timeout;
    loop {
        while transfer.wants_block() {
            match read_block(&mut reader, transfer.blksize()).await {
                Ok(block) => transfer.supply_block(block),
                Err(error) => {
                    send(Packet::error(ErrorCode::NotDefined, "read error")).await?;
                    return Ok(Outcome::Io(error));
                }
            }
        }
        let packets = transfer.take_transmission();
        if !packets.is_empty() {
            for packet in packets {
                send(packet).await?;
            }
            deadline = Instant::now() + negotiation.timeout;
        }
        // The deadline only moves when something is (re)sent, so a client sending junk or
        // stale ACKs cannot keep a stalled transfer alive.
        let step = tokio::select! {
            () = request.shutdown.cancelled() => {
                let _ = send(Packet::error(ErrorCode::NotDefined, "server shutting down")).await;
                return Ok(Outcome::Shutdown);
            }
            received = timeout_at(deadline, socket.recv(&mut buffer)) => match received {
                Err(_elapsed) => transfer.on_timeout(),
                Ok(received) => {
                    let len = received?;
                    match buffer.get(..len).map(Packet::parse) {
                        Some(Ok(packet)) => transfer.on_packet(packet),
                        _ => {
                            debug!(client = %request.client, "tftp: ignoring malformed datagram");
                            Step::Continue
                        }
                    }
                }
            },
        };
        *bytes = transfer.acknowledged_bytes();
        match step {
            Step::Continue => {}
            Step::Complete => return Ok(Outcome::Completed),
            Step::ClientError { code, message } => {
                return Ok(Outcome::ClientError { code, message });
            }
            Step::Violation(reply) => {
                send(reply).await?;
                return Ok(Outcome::ProtocolViolation);
            }
            Step::GaveUp => return Ok(Outcome::GaveUp),
        }
    }
}

/// Reads up to `blksize` bytes, fewer only at end of file.
async fn read_block<R: AsyncRead + Unpin>(reader: &mut R, blksize: usize) -> io::Result<Bytes> {
    let mut block = BytesMut::zeroed(blksize);
    let mut filled = 0;
    while let Some(free) = block.get_mut(filled..)
        && !free.is_empty()
    {
        let read = reader.read(free).await?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    block.truncate(filled);
    Ok(block.freeze())
}
