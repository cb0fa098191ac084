//! `router_advert::run` on a real link: two network namespaces joined by a veth pair, the
//! advertiser in A (a thread that `setns`es into A and runs its own tokio runtime), a raw
//! ICMPv6 listener in B. Checks the advertisement's fields on the wire, that a router
//! solicitation is answered at once, and that cancelling stops the loop. Needs root and
//! iproute2; no packet leaves the two namespaces it creates.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ctpf_distributors::router_advert::{self, ALL_ROUTERS, ND_HOP_LIMIT};
use nix::libc;
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrIn6, recvmsg, sendmsg, setsockopt, sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio_util::sync::CancellationToken;

const A_IF: &str = "ra0";
const B_IF: &str = "ra1";
const A_MAC: [u8; 6] = [0x02, 0x78, 0x00, 0x00, 0x00, 0x01];

fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip").args(args).output().context("running ip")?;
    ensure!(
        output.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Two namespaces joined by a veth pair, deleted (with the veth) on drop.
struct NetnsPair {
    a: String,
    b: String,
}

impl NetnsPair {
    fn create() -> Result<Self> {
        let pid = std::process::id();
        let pair = Self { a: format!("ctpf-ra-{pid}-a"), b: format!("ctpf-ra-{pid}-b") };
        ip(&["netns", "add", &pair.a])?;
        ip(&["netns", "add", &pair.b])?;
        let (a, b) = (pair.a.as_str(), pair.b.as_str());
        ip(&["-n", a, "link", "add", A_IF, "type", "veth", "peer", "name", B_IF, "netns", b])?;
        ip(&["-n", a, "link", "set", A_IF, "address", "02:78:00:00:00:01"])?;
        ip(&["-n", a, "addr", "add", "fd78::1/64", "dev", A_IF, "nodad"])?;
        ip(&["-n", b, "addr", "add", "fd78::2/64", "dev", B_IF, "nodad"])?;
        // B's kernel would solicit when the link comes up; the test sends its own.
        let quiet = format!("net.ipv6.conf.{B_IF}.router_solicitations=0");
        let status = Command::new("ip")
            .args(["netns", "exec", b, "sysctl", "-q", "-w", &quiet])
            .status()
            .context("running sysctl")?;
        ensure!(status.success(), "sysctl {quiet} failed");
        for (ns, dev) in [(a, "lo"), (a, A_IF), (b, "lo"), (b, B_IF)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Moves the calling thread (only) into the named namespace.
fn enter(netns: &str) -> Result<()> {
    let file = File::open(format!("/run/netns/{netns}")).context("opening the netns")?;
    setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
    Ok(())
}

/// What B saw of one ICMPv6 message.
#[derive(Debug)]
struct Received {
    packet: Vec<u8>,
    from: Ipv6Addr,
    hop_limit: Option<i32>,
    at: Instant,
}

/// A raw ICMPv6 socket on B's end of the veth.
struct Listener {
    socket: Socket,
    index: u32,
}

impl Listener {
    fn open() -> Result<Self> {
        let index = nix::net::if_::if_nametoindex(B_IF)?;
        let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        socket.bind_device(Some(B_IF.as_bytes()))?;
        socket.set_multicast_hops_v6(ND_HOP_LIMIT.into())?;
        socket.set_multicast_if_v6(index)?;
        setsockopt(&socket, sockopt::Ipv6RecvHopLimit, &true)?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(Self { socket, index })
    }

    /// The next router advertisement from a link-local source, within `timeout`.
    fn next_advert(&self, timeout: Duration) -> Result<Received> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            let mut buf = [0u8; 1500];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!(libc::c_int);
            let msg = match recvmsg::<SockaddrIn6>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            ) {
                Ok(msg) => msg,
                Err(nix::errno::Errno::EAGAIN) => continue,
                Err(err) => bail!("recvmsg: {err}"),
            };
            let hop_limit = msg.cmsgs()?.find_map(|c| match c {
                ControlMessageOwned::Ipv6HopLimit(hops) => Some(hops),
                _ => None,
            });
            let from = msg.address.map(|a| a.ip()).context("no source address")?;
            let len = msg.bytes;
            let packet = buf[..len].to_vec();
            // Before A's link-local address passes DAD, the kernel may not send at all; we
            // only accept what a host would (RFC 4861 §6.1.2: link-local source).
            if packet.first() == Some(&134) && from.segments()[0] & 0xffc0 == 0xfe80 {
                return Ok(Received { packet, from, hop_limit, at: Instant::now() });
            }
            seen.push((from, packet.first().copied()));
        }
        bail!("no router advertisement within {timeout:?}; saw {seen:?}")
    }

    fn send_to_all_routers(&self, message: &[u8]) -> Result<()> {
        let to = SockaddrIn6::from(SocketAddrV6::new(ALL_ROUTERS, 0, 0, self.index));
        let sent = sendmsg(
            self.socket.as_raw_fd(),
            &[IoSlice::new(message)],
            &[],
            MsgFlags::empty(),
            Some(&to),
        )?;
        ensure!(sent == message.len(), "short send");
        Ok(())
    }
}

fn check_advert(advert: &Received) {
    let p = &advert.packet;
    assert!(p.len() >= 16, "{p:?}");
    assert_eq!(p[1], 0, "code");
    assert_eq!(p[4], 64, "cur hop limit");
    assert_eq!(p[5], 0, "M/O flags");
    assert_eq!(&p[6..8], [0, 0], "router lifetime must be 0: we are no default router");
    assert_eq!(&p[8..16], [0; 8], "reachable time and retrans timer");
    assert_eq!(&p[16..], [&[1, 1][..], &A_MAC[..]].concat(), "only the source link-layer option");
    assert_eq!(advert.hop_limit, Some(255), "hop limit on the wire");
}

#[test]
fn advertises_on_a_veth_and_answers_solicitations() -> Result<()> {
    let pair = NetnsPair::create()?;
    let stop = CancellationToken::new();

    // A: the advertiser, on its own thread and runtime inside namespace A.
    let (a_ns, a_stop) = (pair.a.clone(), stop.clone());
    let (done_tx, done_rx) = mpsc::channel();
    let advertiser = std::thread::spawn(move || -> Result<()> {
        enter(&a_ns)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let result = runtime.block_on(router_advert::run(A_IF, a_stop));
        let _ = done_tx.send(());
        result.context("router_advert::run")
    });

    // B: listen, then solicit.
    let b_ns = pair.b.clone();
    let observer = std::thread::spawn(move || -> Result<()> {
        enter(&b_ns)?;
        let listener = Listener::open()?;

        // The first advertisement arrives once A's link-local address is usable (DAD ~1-2 s).
        let first = listener.next_advert(Duration::from_secs(10))?;
        check_advert(&first);

        // Unsolicited ones follow every few seconds.
        let second = listener.next_advert(Duration::from_secs(6))?;
        check_advert(&second);
        let gap = second.at - first.at;
        assert!(gap >= Duration::from_secs(2), "periodic advertisements {gap:?} apart");

        // A malformed solicitation (7 bytes) is ignored without harm; a good one is answered
        // well before the next periodic advertisement (~3 s after `second`).
        std::thread::sleep(Duration::from_millis(600));
        listener.send_to_all_routers(&[133, 0, 0, 0, 0, 0, 0])?;
        let solicited = Instant::now();
        listener.send_to_all_routers(&[133, 0, 0, 0, 0, 0, 0, 0])?;
        let reply = listener.next_advert(Duration::from_secs(1)).context("reply to RS")?;
        check_advert(&reply);
        assert_eq!(reply.from, second.from, "same link-local source");
        let latency = reply.at - solicited;
        assert!(latency < Duration::from_secs(1), "reply after {latency:?}");
        Ok(())
    });
    let observed = observer.join().expect("observer thread panicked");

    stop.cancel();
    if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(Duration::from_secs(2)) {
        observed?;
        bail!("run did not stop within 2 s of cancellation");
    }
    advertiser.join().expect("advertiser thread panicked")?;
    observed?;
    drop(pair);
    Ok(())
}
