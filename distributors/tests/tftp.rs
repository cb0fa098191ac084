//! The TFTP server over loopback: an in-test client written from the RFCs (independent of the
//! crate's packet code), the real tftp-hpa client, and hostile requests.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ctpf_distributors::tftp::{DirSource, TftpConfig, run};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Generous: the CI machine is small and busy. Nothing asserts on timing.
const PACKET_TIMEOUT: Duration = Duration::from_secs(5);
const CLIENT_RETRIES: u32 = 6;
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

struct TestServer {
    addr: SocketAddr,
    root: tempfile::TempDir,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    async fn start() -> TestServer {
        Self::start_with(TftpConfig::default()).await
    }

    async fn start_with(config: TftpConfig) -> TestServer {
        let root = tempfile::tempdir().unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let source = Arc::new(DirSource::new(root.path()).unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(socket, source, config, shutdown.clone()));
        TestServer { addr, root, shutdown, task }
    }

    fn write(&self, name: &str, contents: &[u8]) {
        let path = self.root.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, contents).unwrap();
    }

    async fn stop(self) {
        self.shutdown.cancel();
        timeout(TEST_TIMEOUT, self.task).await.expect("server did not stop").unwrap().unwrap();
    }
}

fn pattern(len: usize) -> Vec<u8> {
    // xorshift so the content is not periodic at any block size.
    let mut state: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect()
}

// --- a minimal client, straight from RFC 1350/2347/7440 ---

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn request(opcode: u16, path: &str, mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut packet = opcode.to_be_bytes().to_vec();
    for text in
        [path, mode].into_iter().chain(options.iter().flat_map(|(name, value)| [*name, *value]))
    {
        packet.extend_from_slice(text.as_bytes());
        packet.push(0);
    }
    packet
}

fn ack(block: u16) -> Vec<u8> {
    let mut packet = vec![0, 4];
    packet.extend_from_slice(&block.to_be_bytes());
    packet
}

fn nul_separated(bytes: &[u8]) -> Vec<String> {
    let mut parts: Vec<String> = bytes
        .split(|&byte| byte == 0)
        .map(|part| String::from_utf8(part.to_vec()).unwrap())
        .collect();
    assert_eq!(parts.pop().as_deref(), Some(""), "not NUL-terminated");
    parts
}

#[derive(Debug)]
enum Reply {
    Data { oack: Option<Vec<(String, String)>>, data: Vec<u8> },
    Error { code: u16, message: String },
}

async fn recv_from_server(
    socket: &UdpSocket,
    buffer: &mut [u8],
) -> Result<Option<(usize, SocketAddr)>> {
    match timeout(PACKET_TIMEOUT, socket.recv_from(buffer)).await {
        Ok(received) => Ok(Some(received?)),
        Err(_) => Ok(None),
    }
}

/// Fetches `path`; follows the server's OACK (blksize, windowsize) and ACKs every window.
async fn fetch(server: SocketAddr, path: &str, options: &[(&str, &str)]) -> Result<Reply> {
    fetch_lossy(server, path, options, None).await
}

/// Like [`fetch`], but pretends every `drop_every`-th DATA packet got lost.
async fn fetch_lossy(
    server: SocketAddr,
    path: &str,
    options: &[(&str, &str)],
    drop_every: Option<usize>,
) -> Result<Reply> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let rrq = request(1, path, "octet", options);
    let mut buffer = vec![0u8; 70_000];

    // First answer: OACK, DATA 1 or ERROR; it also tells us the server's transfer port.
    let mut tries = 0;
    let (len, tid) = loop {
        socket.send_to(&rrq, server).await?;
        if let Some(received) = recv_from_server(&socket, &mut buffer).await? {
            break received;
        }
        tries += 1;
        if tries > CLIENT_RETRIES {
            bail!("no answer to RRQ {path}");
        }
    };
    let first = buffer[..len].to_vec();
    let (mut blksize, mut windowsize) = (512usize, 1usize);
    let mut oack = None;
    let mut data = Vec::new();
    let mut expected: u16 = 1;
    let mut in_window = 0usize;
    match u16_at(&first, 0) {
        5 => {
            return Ok(Reply::Error {
                code: u16_at(&first, 2),
                message: nul_separated(&first[4..]).join(""),
            });
        }
        6 => {
            let parts = nul_separated(&first[2..]);
            let pairs: Vec<(String, String)> =
                parts.chunks(2).map(|pair| (pair[0].clone(), pair[1].clone())).collect();
            for (name, value) in &pairs {
                match name.as_str() {
                    "blksize" => blksize = value.parse()?,
                    "windowsize" => windowsize = value.parse()?,
                    _ => {}
                }
            }
            oack = Some(pairs);
            socket.send_to(&ack(0), tid).await?;
        }
        3 => {
            // Handled by the loop below as if just received.
        }
        other => bail!("unexpected first opcode {other}"),
    }
    let mut pending = (u16_at(&first, 0) == 3).then_some(first);
    let mut silent_rounds = 0;
    let mut data_packets_seen = 0usize;
    loop {
        let packet = match pending.take() {
            Some(packet) => packet,
            None => match recv_from_server(&socket, &mut buffer).await? {
                Some((len, from)) if from == tid => {
                    silent_rounds = 0;
                    buffer[..len].to_vec()
                }
                Some(_) => continue,
                None => {
                    silent_rounds += 1;
                    if silent_rounds > CLIENT_RETRIES {
                        bail!("server went silent after {} bytes", data.len());
                    }
                    // RFC 7440: on timeout, acknowledge the last block received in order.
                    let last = expected.wrapping_sub(1);
                    let resend = if last == 0 && oack.is_some() { ack(0) } else { ack(last) };
                    socket.send_to(&resend, tid).await?;
                    in_window = 0;
                    continue;
                }
            },
        };
        match u16_at(&packet, 0) {
            3 => {
                data_packets_seen += 1;
                if drop_every.is_some_and(|every| data_packets_seen.is_multiple_of(every)) {
                    continue;
                }
                let block = u16_at(&packet, 2);
                if block != expected {
                    // Out of order or a duplicate: tell the server where we are.
                    socket.send_to(&ack(expected.wrapping_sub(1)), tid).await?;
                    in_window = 0;
                    continue;
                }
                let payload = &packet[4..];
                if payload.len() > blksize {
                    bail!("block {block} has {} > {blksize} bytes", payload.len());
                }
                data.extend_from_slice(payload);
                expected = expected.wrapping_add(1);
                in_window += 1;
                if payload.len() < blksize {
                    socket.send_to(&ack(block), tid).await?;
                    return Ok(Reply::Data { oack, data });
                }
                if in_window == windowsize {
                    socket.send_to(&ack(block), tid).await?;
                    in_window = 0;
                }
            }
            5 => {
                return Ok(Reply::Error {
                    code: u16_at(&packet, 2),
                    message: nul_separated(&packet[4..]).join(""),
                });
            }
            other => bail!("unexpected opcode {other} during transfer"),
        }
    }
}

fn expect_data(reply: Reply) -> (Option<Vec<(String, String)>>, Vec<u8>) {
    match reply {
        Reply::Data { oack, data } => (oack, data),
        Reply::Error { code, message } => panic!("expected data, got error {code}: {message}"),
    }
}

fn expect_error(reply: Reply) -> u16 {
    match reply {
        Reply::Error { code, .. } => code,
        Reply::Data { data, .. } => panic!("expected an error, got {} bytes", data.len()),
    }
}

async fn fetch_with_options(server: &TestServer, name: &str, size: usize) {
    let contents = pattern(size);
    server.write(name, &contents);
    let reply =
        fetch(server.addr, name, &[("blksize", "1468"), ("tsize", "0"), ("windowsize", "16")])
            .await
            .unwrap();
    let (oack, data) = expect_data(reply);
    let oack = oack.expect("options were requested, so an OACK must come first");
    let size_text = size.to_string();
    let expected_oack: Vec<(String, String)> =
        [("blksize", "1468"), ("tsize", size_text.as_str()), ("windowsize", "16")]
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
    assert_eq!(oack, expected_oack);
    assert_eq!(data.len(), contents.len());
    assert!(data == contents, "{name}: content differs");
}

#[tokio::test]
async fn serves_large_file_with_negotiated_options() {
    timeout(TEST_TIMEOUT, async {
        let server = TestServer::start().await;
        fetch_with_options(&server, "boot/large.img", 5 * 1024 * 1024 + 123).await;
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn serves_file_that_is_an_exact_multiple_of_blksize() {
    timeout(TEST_TIMEOUT, async {
        let server = TestServer::start().await;
        fetch_with_options(&server, "exact.bin", 1468 * 64).await;
        fetch_with_options(&server, "empty.bin", 0).await;
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn serves_without_options_and_with_leading_slash() {
    timeout(TEST_TIMEOUT, async {
        let server = TestServer::start().await;
        let contents = pattern(10_000);
        server.write("pxelinux.0", &contents);
        for path in ["pxelinux.0", "/pxelinux.0"] {
            let (oack, data) = expect_data(fetch(server.addr, path, &[]).await.unwrap());
            assert!(oack.is_none(), "no options requested, so no OACK");
            assert!(data == contents);
        }
        // Unknown options alone are declined, which also means no OACK.
        let (oack, data) =
            expect_data(fetch(server.addr, "pxelinux.0", &[("foo", "1")]).await.unwrap());
        assert!(oack.is_none());
        assert!(data == contents);
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn refuses_traversal_writes_missing_files_and_netascii() {
    timeout(TEST_TIMEOUT, async {
        let server = TestServer::start().await;
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), server.root.path().join("leak"))
            .unwrap();
        server.write("ok.bin", b"fine");

        for path in ["../etc/passwd", "/../x", "leak", "a/../../leak", "dir\\..\\x"] {
            let code = expect_error(fetch(server.addr, path, &[("tsize", "0")]).await.unwrap());
            assert_eq!(code, 2, "{path} must be an access violation");
        }
        let code = expect_error(fetch(server.addr, "missing.bin", &[]).await.unwrap());
        assert_eq!(code, 1);

        let code = expect_error(raw_request(&server, request(2, "up.bin", "octet", &[])).await);
        assert_eq!(code, 2, "WRQ on a read-only server");
        let code = expect_error(raw_request(&server, request(1, "ok.bin", "netascii", &[])).await);
        assert_eq!(code, 4, "netascii is refused");
        assert!(!server.root.path().join("up.bin").exists());
        server.stop().await;
    })
    .await
    .unwrap();
}

/// Sends one request and returns the first answer (expected to be an ERROR).
async fn raw_request(server: &TestServer, packet: Vec<u8>) -> Reply {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(&packet, server.addr).await.unwrap();
    let mut buffer = vec![0u8; 2048];
    let (len, _) =
        timeout(TEST_TIMEOUT, socket.recv_from(&mut buffer)).await.expect("no answer").unwrap();
    let reply = &buffer[..len];
    match u16_at(reply, 0) {
        5 => Reply::Error { code: u16_at(reply, 2), message: nul_separated(&reply[4..]).join("") },
        other => panic!("expected ERROR, got opcode {other}"),
    }
}

#[tokio::test]
async fn garbage_is_ignored_and_the_server_keeps_serving() {
    timeout(TEST_TIMEOUT, async {
        let server = TestServer::start().await;
        server.write("after-garbage.bin", &pattern(3000));
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let garbage: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\xff\xff\xff",
            b"\x00\x01no-nul",
            b"\x00\x01file\x00bogusmode\x00",
            b"\x00\x04\x00\x01",
            b"\x00\x03\x00\x01data",
            &[0u8; 1500],
        ];
        for datagram in garbage {
            socket.send_to(datagram, server.addr).await.unwrap();
        }
        // None of that deserves an answer.
        let mut buffer = [0u8; 64];
        assert!(
            timeout(Duration::from_millis(500), socket.recv_from(&mut buffer)).await.is_err(),
            "garbage got an answer"
        );
        let (_, data) = expect_data(
            fetch(server.addr, "after-garbage.bin", &[("blksize", "1024")]).await.unwrap(),
        );
        assert!(data == pattern(3000));
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn concurrent_transfers() {
    timeout(TEST_TIMEOUT, async {
        let server = TestServer::start().await;
        server.write("a.bin", &pattern(200_000));
        let fetches: Vec<_> = (0..8)
            .map(|i| {
                let addr = server.addr;
                tokio::spawn(async move {
                    let blksize = (512 + i * 100).to_string();
                    fetch(addr, "a.bin", &[("blksize", &blksize), ("windowsize", "4")]).await
                })
            })
            .collect();
        for handle in fetches {
            let (_, data) = expect_data(handle.await.unwrap().unwrap());
            assert!(data == pattern(200_000));
        }
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn recovers_from_lost_packets() {
    timeout(TEST_TIMEOUT, async {
        // A short retransmission timeout only makes the test faster; nothing depends on it.
        let server = TestServer::start_with(TftpConfig {
            timeout: Duration::from_secs(1),
            ..TftpConfig::default()
        })
        .await;
        let contents = pattern(60_000);
        server.write("lossy.bin", &contents);
        for (windowsize, drop_every) in [("8", 17), ("1", 23)] {
            let reply = fetch_lossy(
                server.addr,
                "lossy.bin",
                &[("blksize", "512"), ("windowsize", windowsize)],
                Some(drop_every),
            )
            .await
            .unwrap();
            let (_, data) = expect_data(reply);
            assert!(data == contents, "windowsize {windowsize}: content differs");
        }
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn shutdown_ends_running_transfers() {
    timeout(TEST_TIMEOUT, async {
        let server = TestServer::start().await;
        server.write("stalled.bin", &pattern(10_000));
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.send_to(&request(1, "stalled.bin", "octet", &[]), server.addr).await.unwrap();
        let mut buffer = vec![0u8; 2048];
        let (len, _) = socket.recv_from(&mut buffer).await.unwrap();
        assert_eq!(u16_at(&buffer[..len], 0), 3, "expected DATA 1");
        // Never acknowledge; stopping must not wait for the transfer to give up.
        server.stop().await;
        loop {
            let (len, _) = socket.recv_from(&mut buffer).await.unwrap();
            match u16_at(&buffer[..len], 0) {
                3 => continue, // a retransmission that raced the shutdown
                5 => break,
                other => panic!("unexpected opcode {other}"),
            }
        }
    })
    .await
    .unwrap();
}

/// The real client PXE setups are usually debugged with. tftp-hpa 5.2's client sends no
/// options, so this covers the plain RFC 1350 path with 512-byte blocks.
#[tokio::test]
async fn tftp_hpa_client_fetches_byte_identical_file() {
    timeout(TEST_TIMEOUT, async {
        let server = TestServer::start().await;
        let contents = pattern(700_000);
        server.write("bios/undionly.kpxe", &contents);
        let download = tempfile::tempdir().unwrap();
        let local = download.path().join("got");
        let output = run_tftp_hpa(server.addr, "bios/undionly.kpxe", &local).await.unwrap();
        let fetched = std::fs::read(&local)
            .with_context(|| format!("tftp wrote nothing; its output: {output}"))
            .unwrap();
        assert_eq!(fetched.len(), contents.len(), "tftp output: {output}");
        assert!(fetched == contents, "content differs; tftp output: {output}");
        server.stop().await;
    })
    .await
    .unwrap();
}

/// More than 65536 blocks of 512 bytes: the block number must roll over to 0, which is what
/// tftp-hpa's client expects (it counts with a wrapping 16-bit number).
#[tokio::test]
async fn tftp_hpa_client_follows_block_number_rollover() {
    timeout(TEST_TIMEOUT, async {
        let server = TestServer::start().await;
        let contents = pattern(512 * 65_536 + 1000);
        server.write("big.img", &contents);
        let download = tempfile::tempdir().unwrap();
        let local = download.path().join("got");
        let output = run_tftp_hpa(server.addr, "big.img", &local).await.unwrap();
        let fetched = std::fs::read(&local).unwrap();
        assert_eq!(fetched.len(), contents.len(), "tftp output: {output}");
        assert!(fetched == contents, "content differs; tftp output: {output}");
        server.stop().await;
    })
    .await
    .unwrap();
}

async fn run_tftp_hpa(server: SocketAddr, remote: &str, local: &Path) -> Result<String> {
    let output = tokio::process::Command::new("tftp")
        .args(["-m", "binary"])
        .arg(server.ip().to_string())
        .arg(server.port().to_string())
        .args(["-c", "get", remote])
        .arg(local)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                anyhow!(
                    "the `tftp` client is not installed: this test needs Debian's tftp-hpa \
                     package (apt-get install -y tftp-hpa)"
                )
            } else {
                anyhow!("running tftp: {error}")
            }
        })?;
    let text = format!(
        "status {}; stdout {:?}; stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("tftp failed: {text}");
    }
    Ok(text)
}
