//! The socket loop: the main socket only receives requests; every read transfer gets its
//! own connected socket and runs its send/ACK loop on a dedicated thread, delegating all
//! protocol decisions to [`super::session`].
//!
//! Why a thread per transfer: a lock-step transfer is bound by the ACK round trip, and on a
//! blocking socket each ACK -> DATA turnaround is one `recv` and one `send` with no reactor
//! wake-up or task hop in between (the same shape as tftpd-hpa and atftpd). The file is read
//! by an async task a few chunks ahead of the sender, so file I/O stays off that path.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io::IoSlice;
use std::os::fd::AsRawFd;

use bytes::{Bytes, BytesMut};
use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, sendmmsg};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use ctpf_common::EventBody;

use crate::boot_events::{BootEvents, clip};

use super::packet::{ErrorCode, Packet, TftpOption};
use super::session::{RequestDecision, Step, Transfer, decide, negotiate};
use super::{FileSource, SourceError, TftpConfig};

/// RFC 2347 limits requests to 512 bytes; anything longer is truncated by the kernel and
/// then fails to parse, which is the right outcome.
const REQUEST_BUFFER: usize = 1024;
/// Clients only send ACKs and ERRORs to a transfer socket.
const TRANSFER_BUFFER: usize = 1024;
/// File bytes read at once, rounded down to whole blocks so blocks are slices of a chunk.
/// tokio runs every file read on its blocking pool, a thread hop that costs more than a send;
/// ~64 KiB is ~45 blocks of 1468 bytes per hop. Up to [`READ_AHEAD_CHUNKS`] + 2 chunks per
/// transfer are in memory (queued, being read, being sent).
const READ_AHEAD: usize = 64 * 1024;
const READ_AHEAD_CHUNKS: usize = 1;
/// Most DATA packets per `sendmmsg` call; larger windows take several calls.
const SENDMMSG_BATCH: usize = 64;
/// How long a transfer thread may sit in `recv` before it looks at the shutdown token.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// Serves read requests arriving on `socket` until `shutdown` is cancelled, then stops the
/// running transfers and waits for them. Returns an error only if the main socket fails.
pub async fn run(
    socket: UdpSocket,
    source: Arc<dyn FileSource>,
    config: TftpConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    run_with_events(socket, source, config, BootEvents::off(), shutdown).await
}

/// [`run`], recording every finished read (completed or not) in `events`.
pub async fn run_with_events(
    socket: UdpSocket,
    source: Arc<dyn FileSource>,
    config: TftpConfig,
    events: BootEvents,
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
                    events: events.clone(),
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
    events: BootEvents,
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
    let (result, bytes) = transfer_file(&request).await;
    let outcome = match result {
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
    request.events.record(|worker| {
        Some(EventBody::TftpTransfer {
            worker,
            client: client.ip().to_string(),
            file: clip(path),
            bytes,
            millis: u64::try_from(duration_ms).unwrap_or(u64::MAX),
            outcome: outcome.to_string(),
        })
    });
}

/// Runs one transfer; returns how it ended and the bytes the client acknowledged.
async fn transfer_file(request: &ReadRequest) -> (io::Result<Outcome>, u64) {
    // Connected: the kernel drops datagrams from other ports (foreign TIDs) and reports a
    // vanished client as ConnectionRefused instead of leaving us to time out.
    let socket = match std::net::UdpSocket::bind((request.local_ip, 0))
        .and_then(|socket| socket.connect(request.client).map(|()| socket))
    {
        Ok(socket) => socket,
        Err(error) => return (Err(error), 0),
    };
    let refuse =
        |code, message: &str| socket.send(&Packet::error(code, message).encode()).map(|_| ());
    let file = match request.source.open(&request.filename).await {
        Ok(Some(file)) => file,
        Ok(None) => {
            let sent = refuse(ErrorCode::FileNotFound, "file not found");
            return (sent.map(|()| Outcome::FileNotFound), 0);
        }
        Err(SourceError::AccessDenied { reason, .. }) => {
            warn!(client = %request.client, path = %request.filename, reason, "tftp: access violation");
            let sent = refuse(ErrorCode::AccessViolation, "access violation");
            return (sent.map(|()| Outcome::AccessDenied(reason)), 0);
        }
        Err(SourceError::Io { source, .. }) => {
            let sent = refuse(ErrorCode::NotDefined, "cannot open file");
            return (sent.map(|()| Outcome::Io(source)), 0);
        }
    };

    let negotiation = negotiate(&request.options, file.size, &request.config);
    let transfer = Transfer::new(&negotiation, request.config.retries);
    let blksize = transfer.blksize();
    let chunk_len = (READ_AHEAD / blksize).max(1) * blksize;
    let (chunk_sender, chunk_receiver) = mpsc::channel(READ_AHEAD_CHUNKS);
    let (done_sender, done) = oneshot::channel();
    let sender = SendLoop {
        socket,
        blocks: Blocks::new(chunk_receiver, blksize),
        timeout: negotiation.timeout,
        shutdown: request.shutdown.clone(),
    };
    let spawned = std::thread::Builder::new().name("tftp-transfer".into()).spawn(move || {
        let mut bytes = 0;
        let result = sender.run(transfer, &mut bytes);
        let _ = done_sender.send((result, bytes));
    });
    if let Err(error) = spawned {
        return (Err(error), 0);
    }
    // Never send more than announced in tsize, even if the file grows meanwhile.
    let reader = file.reader.take(file.size);
    let ((), done) =
        tokio::join!(read_ahead(reader, chunk_len, chunk_sender, request.shutdown.clone()), done);
    done.unwrap_or_else(|_| (Err(io::Error::other("transfer thread panicked")), 0))
}

/// A chunk of the file; `last` when it ends the file (it may then be short or empty).
struct Chunk {
    bytes: Bytes,
    last: bool,
}

/// Reads the file in chunks of `chunk_len` ahead of the sender. Stops at the end of the file,
/// on a read error (passed on), on shutdown, or when the sender is gone.
async fn read_ahead<R: AsyncRead + Unpin>(
    mut reader: R,
    chunk_len: usize,
    chunks: mpsc::Sender<io::Result<Chunk>>,
    shutdown: CancellationToken,
) {
    loop {
        let read = tokio::select! {
            () = shutdown.cancelled() => return,
            () = chunks.closed() => return,
            read = read_chunk(&mut reader, chunk_len) => read,
        };
        let chunk = read.map(|bytes| Chunk { last: bytes.len() < chunk_len, bytes });
        let more = matches!(&chunk, Ok(Chunk { last: false, .. }));
        if chunks.send(chunk).await.is_err() || !more {
            return;
        }
    }
}

/// Reads up to `len` bytes, fewer only at end of file.
async fn read_chunk<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> io::Result<Bytes> {
    let mut chunk = BytesMut::zeroed(len);
    let mut filled = 0;
    while let Some(free) = chunk.get_mut(filled..)
        && !free.is_empty()
    {
        let read = reader.read(free).await?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    chunk.truncate(filled);
    Ok(chunk.freeze())
}

/// Cuts the read-ahead chunks into blocks without copying (chunks are whole blocks).
struct Blocks {
    chunks: mpsc::Receiver<io::Result<Chunk>>,
    current: Bytes,
    at_end: bool,
    blksize: usize,
}

impl Blocks {
    fn new(chunks: mpsc::Receiver<io::Result<Chunk>>, blksize: usize) -> Self {
        Self { chunks, current: Bytes::new(), at_end: false, blksize }
    }

    /// The next block, short (possibly empty) at the end of the file. `Ok(None)`: the reader
    /// stopped before the end, which only happens on shutdown.
    fn next_block(&mut self) -> io::Result<Option<Bytes>> {
        while self.current.len() < self.blksize && !self.at_end {
            let Some(chunk) = self.chunks.blocking_recv() else {
                return Ok(None);
            };
            let chunk = chunk?;
            self.at_end = chunk.last;
            self.current = if self.current.is_empty() {
                chunk.bytes
            } else {
                // Only if a chunk were not whole blocks; kept correct rather than assumed.
                let mut joined = BytesMut::from(&self.current[..]);
                joined.extend_from_slice(&chunk.bytes);
                joined.freeze()
            };
        }
        let len = self.blksize.min(self.current.len());
        Ok(Some(self.current.split_to(len)))
    }
}

/// The blocking side of one transfer: send, wait for the answer, repeat.
struct SendLoop {
    socket: std::net::UdpSocket,
    blocks: Blocks,
    timeout: Duration,
    shutdown: CancellationToken,
}

impl SendLoop {
    /// `bytes` tracks acknowledged bytes even when the transfer fails.
    fn run(mut self, mut transfer: Transfer, bytes: &mut u64) -> io::Result<Outcome> {
        // recv wakes up at least this often, to notice shutdown and the retransmission
        // deadline; the deadline itself is checked against the clock.
        self.socket.set_read_timeout(Some(self.timeout.min(SHUTDOWN_POLL)))?;
        let mut packets = Vec::new();
        let mut window = WindowSender::new(SENDMMSG_BATCH);
        let mut buffer = [0u8; TRANSFER_BUFFER];
        let mut now = Instant::now();
        let mut deadline = now + self.timeout;
        let mut next_shutdown_check = now;
        loop {
            while transfer.wants_block() {
                match self.blocks.next_block() {
                    Ok(Some(block)) => transfer.supply_block(block),
                    Ok(None) => return self.shut_down(),
                    Err(error) => {
                        self.send(&Packet::error(ErrorCode::NotDefined, "read error"))?;
                        return Ok(Outcome::Io(error));
                    }
                }
            }
            transfer.take_transmission_into(&mut packets);
            if !packets.is_empty() {
                if !window.send(&self.socket, &packets)? {
                    for packet in &packets {
                        self.send(packet)?;
                    }
                }
                now = Instant::now();
                deadline = now + self.timeout;
            }
            if now >= next_shutdown_check {
                if self.shutdown.is_cancelled() {
                    return self.shut_down();
                }
                next_shutdown_check = now + SHUTDOWN_POLL;
            }
            // The deadline only moves when something is (re)sent, so a client sending junk
            // or stale ACKs cannot keep a stalled transfer alive.
            let step = if now >= deadline {
                transfer.on_timeout()
            } else {
                let received = self.socket.recv(&mut buffer);
                now = Instant::now();
                match received {
                    Ok(len) => match buffer.get(..len).map(Packet::parse) {
                        Some(Ok(packet)) => transfer.on_packet(packet),
                        _ => {
                            debug!("tftp: ignoring malformed datagram");
                            Step::Continue
                        }
                    },
                    Err(error) if is_timeout(&error) => Step::Continue,
                    Err(error) => return Err(error),
                }
            };
            *bytes = transfer.acknowledged_bytes();
            match step {
                Step::Continue => {}
                Step::Complete => return Ok(Outcome::Completed),
                Step::ClientError { code, message } => {
                    return Ok(Outcome::ClientError { code, message });
                }
                Step::Violation(reply) => {
                    self.send(&reply)?;
                    return Ok(Outcome::ProtocolViolation);
                }
                Step::GaveUp => return Ok(Outcome::GaveUp),
            }
        }
    }

    fn send(&self, packet: &Packet) -> io::Result<()> {
        self.socket.send(&packet.encode()).map(|_| ())
    }

    fn shut_down(&self) -> io::Result<Outcome> {
        let _ = self.send(&Packet::error(ErrorCode::NotDefined, "server shutting down"));
        Ok(Outcome::Shutdown)
    }
}

/// Sends the DATA packets of a window with `sendmmsg`, one system call for the window instead
/// of one per block, each packet as a 4-byte header and the block itself (no copy). Built on
/// the transfer's thread: nix's message headers hold raw pointers and are not `Send`.
struct WindowSender {
    headers: Vec<[u8; 4]>,
    messages: MultiHeaders<()>,
    /// The socket is connected: no destination address per message. `()` rather than a
    /// real address type also keeps nix from reading back addresses it never wrote.
    addresses: Vec<Option<()>>,
}

impl WindowSender {
    fn new(batch: usize) -> Self {
        let batch = batch.max(1);
        Self {
            headers: Vec::with_capacity(batch),
            messages: MultiHeaders::preallocate(batch, None),
            addresses: vec![None; batch],
        }
    }

    /// Sends `packets` if they are all DATA; `Ok(false)` means "not DATA, send them singly".
    fn send(&mut self, socket: &std::net::UdpSocket, packets: &[Packet]) -> io::Result<bool> {
        self.headers.clear();
        for packet in packets {
            let Packet::Data { block, .. } = packet else {
                return Ok(false);
            };
            let [high, low] = block.to_be_bytes();
            self.headers.push([0, 3, high, low]);
        }
        let slices: Vec<[IoSlice<'_>; 2]> = self
            .headers
            .iter()
            .zip(packets)
            .filter_map(|(header, packet)| match packet {
                Packet::Data { data, .. } => Some([IoSlice::new(header), IoSlice::new(data)]),
                _ => None,
            })
            .collect();
        let mut remaining = slices.as_slice();
        while !remaining.is_empty() {
            let count = remaining.len().min(self.addresses.len());
            let no_control: [ControlMessage<'_>; 0] = [];
            let sent = match sendmmsg(
                socket.as_raw_fd(),
                &mut self.messages,
                remaining.iter().take(count),
                self.addresses.get(..count).unwrap_or_default(),
                no_control,
                MsgFlags::empty(),
            ) {
                Ok(results) => results.count(),
                Err(Errno::EINTR) => 0,
                Err(errno) => return Err(errno.into()),
            };
            remaining = remaining.get(sent..).unwrap_or_default();
        }
        Ok(true)
    }
}

/// A receive timeout (EAGAIN on Linux) or an interrupted call: just look around and retry.
fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn blocks_of(chunks: &[(&'static [u8], bool)], blksize: usize) -> Vec<Bytes> {
        let (sender, receiver) = mpsc::channel(chunks.len().max(1));
        for &(bytes, last) in chunks {
            sender.try_send(Ok(Chunk { bytes: Bytes::from_static(bytes), last })).unwrap();
        }
        drop(sender);
        let mut blocks = Blocks::new(receiver, blksize);
        let mut out = Vec::new();
        while let Some(block) = blocks.next_block().unwrap() {
            let short = block.len() < blksize;
            out.push(block);
            if short {
                break;
            }
        }
        out
    }

    #[test]
    fn blocks_are_cut_from_chunks_and_end_short() {
        // Whole-block chunks, then an empty last chunk (the file is an exact multiple).
        assert_eq!(blocks_of(&[(b"aabb", false), (b"", true)], 2), [&b"aa"[..], b"bb", b""]);
        assert_eq!(blocks_of(&[(b"aabbc", true)], 2), [&b"aa"[..], b"bb", b"c"]);
        // Chunks that are not whole blocks are still joined correctly.
        assert_eq!(blocks_of(&[(b"aab", false), (b"bc", true)], 2), [&b"aa"[..], b"bb", b"c"]);
        // The reader stopped early (shutdown): no more blocks.
        assert_eq!(blocks_of(&[(b"aa", false)], 2), [&b"aa"[..]]);
    }
}
