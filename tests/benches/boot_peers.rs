//! ctpf's boot services side by side with the servers sites run today, in one run and on
//! one machine, through the same clients:
//!
//! - DHCP: perfdhcp (kea-admin) relays from a second namespace to ctpf (authoritative),
//!   Kea (memfile) and dnsmasq: the highest clean rate (< 1% drops in both exchanges) found
//!   by stepping and bisecting, and a 5,000-client avalanche.
//! - TFTP: a 32 MiB file, blksize 1468, one client and 50 concurrent ones, with and without
//!   windowsize, against ctpf, tftpd-hpa and atftpd. The client is this binary (re-executed in
//!   the client namespace): RFC 2347/2348/7440, every byte checked.
//! - HTTP: wrk (2 threads, 50 connections) fetching the same 32 MiB boot file and the
//!   rendered iPXE entry script from ctpf and from nginx.
//!
//! Run: `tests/benches/install-peers.sh` once (root), `cargo build --release -p ctpf`, then
//! `cargo bench -p ctpf-e2e --bench boot_peers [-- dhcp|tftp|http ...]`. Needs root (network
//! namespaces). Installs nothing. `CTPF_BIN` overrides the ctpf binary.
//!
//! Topology: namespace `srv` (10.80.0.1/12 on a veth) holds one server at a time; namespace
//! `cli` (10.80.0.2/12) holds the load tool. Each measurement gets a freshly started server
//! with empty state; the pool 10.80.1.0-10.95.255.254 (about a million addresses) is the same
//! for all DHCP servers.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use ctpf_e2e::{CtpfProcess, Daemon, Netns, ctpf_binary, unique_suffix};

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 2);
const PREFIX_LEN: u8 = 12;
const POOL_FIRST: Ipv4Addr = Ipv4Addr::new(10, 80, 1, 0);
const POOL_LAST: Ipv4Addr = Ipv4Addr::new(10, 95, 255, 254);
/// Lease time handed out by every DHCP server (ctpf's fixed 12 h).
const LEASE_SECS: u32 = 12 * 60 * 60;
/// perfdhcp: simulated clients and seconds per rate step.
const PERF_CLIENTS: &str = "2000000";
const PERF_SECS: u64 = 8;
const AVALANCHE_CLIENTS: &str = "5000";
/// "Clean" means fewer drops than this in each exchange.
const CLEAN_DROPS: f64 = 0.01;

const BOOT_FILE: &str = "boot.img";
const FILE_SIZE: usize = 32 << 20;
const BLKSIZE: u16 = 1468;
const TFTP_CLIENTS: usize = 50;
const HTTP_CONNECTIONS: &str = "50";
const HTTP_SECS: &str = "10";
/// The path ctpf serves discovery initrds under; nginx gets the same file at the same path.
const INITRD_PATH: &str = "boot/discovery/x86_64/initrd";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__tftp-client") {
        return tftp_client_main(&args[1..]);
    }
    // cargo passes `--bench`; everything else names a group.
    let mut groups: Vec<&str> =
        args.iter().map(String::as_str).filter(|a| !a.starts_with('-')).collect();
    if groups.is_empty() {
        groups = vec!["dhcp", "tftp", "http"];
    }
    for group in &groups {
        ensure!(matches!(*group, "dhcp" | "tftp" | "http"), "unknown group {group:?}");
    }
    check_tools(&groups)?;
    let bed = Testbed::new()?;
    let mut report = String::new();
    for group in groups {
        let started = Instant::now();
        eprintln!("== {group}");
        let table = match group {
            "dhcp" => bench_dhcp(&bed)?,
            "tftp" => bench_tftp(&bed)?,
            _ => bench_http(&bed)?,
        };
        eprintln!("{table}({group}: {:.0} s)\n", started.elapsed().as_secs_f64());
        report.push_str(&table);
        report.push('\n');
    }
    println!("\n{report}");
    Ok(())
}

/// The load tools and peers, with the one command that installs them all.
fn check_tools(groups: &[&str]) -> Result<()> {
    let mut needed = vec![ctpf_binary()?.to_string_lossy().into_owned()];
    for group in groups {
        needed.extend(
            match *group {
                "dhcp" => vec!["perfdhcp", "kea-dhcp4", "dnsmasq"],
                "tftp" => vec!["in.tftpd", ATFTPD],
                _ => vec!["nginx", "wrk", "curl"],
            }
            .into_iter()
            .map(str::to_owned),
        );
    }
    let missing: Vec<_> = needed.iter().filter(|tool| which(tool).is_none()).collect();
    ensure!(missing.is_empty(), "missing {missing:?}: run tests/benches/install-peers.sh as root");
    Ok(())
}

const ATFTPD: &str = "/opt/ctpf-bench/atftpd/usr/sbin/atftpd";

fn atftpd() -> PathBuf {
    std::env::var_os("ATFTPD_DIR")
        .map_or_else(|| PathBuf::from(ATFTPD), |dir| Path::new(&dir).join("usr/sbin/atftpd"))
}

fn which(program: &str) -> Option<PathBuf> {
    if program == ATFTPD {
        return Some(atftpd()).filter(|p| p.is_file());
    }
    if program.contains('/') {
        return Some(PathBuf::from(program)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Two namespaces joined by a veth pair, and a work directory on disk (not tmpfs: fsync
/// must cost what it costs).
struct Testbed {
    // Namespaces are dropped after the servers (each run owns its server guard).
    server: Netns,
    client: Netns,
    server_if: String,
    dir: tempfile::TempDir,
    file: Arc<Vec<u8>>,
}

impl Testbed {
    fn new() -> Result<Self> {
        let suffix = unique_suffix();
        let server = Netns::create("ctpf-bsrv")?;
        let client = Netns::create("ctpf-bcli")?;
        let (server_if, client_if) = (format!("bsrv{suffix}"), format!("bcli{suffix}"));
        server.ip(&["link", "add", &server_if, "type", "veth", "peer", "name", &client_if])?;
        server.ip(&["link", "set", &client_if, "netns", client.name()])?;
        server.ip(&["addr", "add", &format!("{SERVER_IP}/{PREFIX_LEN}"), "dev", &server_if])?;
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/{PREFIX_LEN}"), "dev", &client_if])?;
        server.ip(&["link", "set", &server_if, "up"])?;
        client.ip(&["link", "set", &client_if, "up"])?;
        let dir = tempfile::Builder::new().prefix("ctpf-bench-").tempdir_in("/var/tmp")?;
        // Bytes no compressor or dedup can shortcut, deterministic so every server serves
        // the same file.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let file: Vec<u8> = (0..FILE_SIZE / 8)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()
            })
            .collect();
        Ok(Self { server, client, server_if, dir, file: Arc::new(file) })
    }

    /// A fresh directory for one server instance.
    fn run_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.dir.path().join(format!("{name}-{}", unique_suffix()));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// A directory holding the boot file (hard links: one copy on disk, one page cache).
    fn file_root(&self) -> Result<PathBuf> {
        let root = self.dir.path().join("files");
        if !root.join(BOOT_FILE).is_file() {
            std::fs::create_dir_all(root.join(Path::new(INITRD_PATH).parent().context("path")?))?;
            std::fs::write(root.join(BOOT_FILE), self.file.as_slice())?;
            std::fs::hard_link(root.join(BOOT_FILE), root.join(INITRD_PATH))?;
        }
        Ok(root)
    }

    /// `ctpf up` in the server namespace; waits for `ready` on its stdout.
    fn ctpf_up(&self, dir: &Path, extra: &[&str], ready: &str) -> Result<CtpfProcess> {
        let data = dir.join("data");
        let api = format!("http://{SERVER_IP}:0");
        let mut args = vec!["up", "--data-dir", path_str(&data)?, "--api", &api];
        args.extend_from_slice(extra);
        let process =
            CtpfProcess::start_in_netns(&self.server, &args, &[], dir.join("ctpf.log"), ready)?;
        settle();
        Ok(process)
    }
}

/// Every server gets the same quiet moment between "listening" and load: a server that
/// binds its sockets before it has finished starting would otherwise lose the first burst.
fn settle() {
    std::thread::sleep(std::time::Duration::from_secs(2));
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("non-UTF-8 path")
}

/// Something serving in the server namespace, stopped on drop.
#[allow(dead_code)] // Held only for their Drop.
enum Server {
    Ctpf(CtpfProcess),
    Peer(Daemon),
}

/// One row of a result table: a figure per server, the first one being ctpf.
struct Row {
    metric: String,
    values: Vec<Option<f64>>,
    /// How the figure is printed.
    unit: &'static str,
    lower_is_better: bool,
    target: String,
}

fn table(title: &str, servers: &[&str], rows: &[Row], notes: &[String]) -> String {
    let mut out = format!("### {title}\n\n| metric |");
    for server in servers {
        let _ = write!(out, " {server} |");
    }
    for peer in &servers[1..] {
        let _ = write!(out, " ctpf vs {peer} |");
    }
    out.push_str(" target |\n|---|");
    for _ in 0..servers.len() * 2 - 1 {
        out.push_str("---:|");
    }
    out.push_str("---|\n");
    for row in rows {
        let _ = write!(out, "| {} |", row.metric);
        for value in &row.values {
            match value {
                Some(v) => {
                    let _ = write!(out, " {} {} |", human(*v), row.unit);
                }
                None => out.push_str(" failed |"),
            }
        }
        for peer in &row.values[1..] {
            match (row.values[0], peer) {
                (Some(ours), Some(theirs)) if ours > 0.0 && *theirs > 0.0 => {
                    // Always "how many times better ctpf is": > 1 is ctpf ahead.
                    let ratio = if row.lower_is_better { theirs / ours } else { ours / theirs };
                    let _ = write!(out, " {ratio:.2}x |");
                }
                _ => out.push_str(" - |"),
            }
        }
        let _ = writeln!(out, " {} |", row.target);
    }
    for note in notes {
        let _ = writeln!(out, "\n{note}");
    }
    out
}

fn human(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
}

// ---------------------------------------------------------------------------------------
// DHCP

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DhcpServer {
    Ctpf,
    Kea,
    Dnsmasq,
}

impl DhcpServer {
    fn name(self) -> &'static str {
        match self {
            Self::Ctpf => "ctpf",
            Self::Kea => "kea",
            Self::Dnsmasq => "dnsmasq",
        }
    }

    /// Where the rate search starts (about half of what testbed.md measured).
    fn start_rate(self) -> u32 {
        match self {
            Self::Ctpf | Self::Kea => 2000,
            Self::Dnsmasq => 100,
        }
    }
}

fn start_dhcp(bed: &Testbed, which: DhcpServer) -> Result<Server> {
    let dir = bed.run_dir(which.name())?;
    let log = dir.join("server.log");
    let range = format!("{POOL_FIRST}-{POOL_LAST}");
    let server = match which {
        DhcpServer::Ctpf => {
            let tftp = dir.join("tftp");
            std::fs::create_dir_all(&tftp)?;
            let extra = [
                "--boot-interface",
                &bed.server_if,
                "--dhcp",
                "authoritative",
                "--dhcp-range",
                &range,
                "--tftp-root",
                path_str(&tftp)?,
            ];
            return Ok(Server::Ctpf(bed.ctpf_up(&dir, &extra, "(tftp)")?));
        }
        DhcpServer::Kea => {
            // memfile with persist: every lease is appended to the CSV file, without fsync.
            // Logging at WARN: Kea logs every allocation at INFO, which would slow it down.
            let config = serde_json::json!({"Dhcp4": {
                "interfaces-config": {"interfaces": [bed.server_if], "dhcp-socket-type": "udp"},
                "lease-database": {"type": "memfile", "persist": true, "lfc-interval": 0,
                    "name": dir.join("kea-leases4.csv")},
                "valid-lifetime": LEASE_SECS,
                "renew-timer": LEASE_SECS / 2,
                "rebind-timer": LEASE_SECS / 8 * 7,
                "authoritative": true,
                "subnet4": [{"id": 1, "subnet": format!("10.80.0.0/{PREFIX_LEN}"),
                    "pools": [{"pool": format!("{POOL_FIRST} - {POOL_LAST}")}]}],
                "loggers": [{"name": "kea-dhcp4", "severity": "WARN",
                    "output_options": [{"output": dir.join("kea.log")}]}],
            }});
            let conf = dir.join("kea-dhcp4.json");
            std::fs::write(&conf, serde_json::to_vec_pretty(&config)?)?;
            let mut cmd = bed.server.command("kea-dhcp4");
            cmd.arg("-c").arg(&conf).env("KEA_PIDFILE_DIR", &dir).env("KEA_LOCKFILE_DIR", &dir);
            bed.server.spawn(&mut cmd, &log)?
        }
        DhcpServer::Dnsmasq => {
            let mut cmd = bed.server.command("dnsmasq");
            cmd.args(["--keep-in-foreground", "--conf-file=/dev/null", "--port=0"])
                .args(["--user=root", "--group=root", "--no-ping", "--dhcp-authoritative"])
                .arg(format!("--interface={}", bed.server_if))
                .arg(format!("--dhcp-range={POOL_FIRST},{POOL_LAST},255.240.0.0,{LEASE_SECS}"))
                .arg("--dhcp-lease-max=2000000")
                .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
                .arg(format!("--pid-file={}", dir.join("pid").display()))
                .arg(format!("--log-facility={}", dir.join("dnsmasq.log").display()));
            bed.server.spawn(&mut cmd, &log)?
        }
    };
    let mut server = server;
    bed.server.wait_listening("udp", 67, &mut server)?;
    settle();
    Ok(Server::Peer(server))
}

/// What one perfdhcp run measured.
#[derive(Debug, Clone, Copy)]
struct PerfRun {
    /// Completed 4-way exchanges (ACKs) per second.
    rate: f64,
    discover_drops: f64,
    request_drops: f64,
}

impl PerfRun {
    fn clean(&self) -> bool {
        self.discover_drops < CLEAN_DROPS && self.request_drops < CLEAN_DROPS
    }
}

/// An avalanche against a server that loses clients never ends; this caps every run.
const PERFDHCP_LIMIT_SECS: u64 = 90;

fn perfdhcp(bed: &Testbed, args: &[&str]) -> Result<String> {
    let output = bed
        .client
        .command("timeout")
        .args([&PERFDHCP_LIMIT_SECS.to_string(), "perfdhcp", "-4", "-l", &CLIENT_IP.to_string()])
        .args(args)
        .arg(SERVER_IP.to_string())
        .stdin(Stdio::null())
        .output()
        .context("running perfdhcp")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.code() != Some(124),
        "perfdhcp {args:?} did not finish within {PERFDHCP_LIMIT_SECS} s (clients never served)"
    );
    // perfdhcp exits 3 when packets were dropped; that is a result, not an error.
    ensure!(matches!(output.status.code(), Some(0 | 3)), "perfdhcp {args:?} failed:\n{text}");
    Ok(text)
}

/// Numbers of one "***Statistics for: NAME***" section.
fn perf_section(text: &str, name: &str) -> Option<(f64, f64)> {
    let start = text.find(&format!("Statistics for: {name}"))?;
    let section = &text[start..];
    let body = section.find('\n').map_or("", |i| &section[i..]);
    let section = &body[..body.find("***").unwrap_or(body.len())];
    let field = |key: &str| -> Option<f64> {
        section.lines().find_map(|l| l.trim().strip_prefix(key)?.trim().parse().ok())
    };
    Some((field("sent packets:")?, field("received packets:")?))
}

/// [`run_once`], and once more if it was not clean: the machine is shared (builds, VMs,
/// other fsyncs), and one disturbed run must not end a server's search early. Every server
/// gets the same second chance.
fn run_rate(bed: &Testbed, which: DhcpServer, rate: u32) -> Result<PerfRun> {
    let first = run_once(bed, which, rate)?;
    if first.clean() {
        return Ok(first);
    }
    let second = run_once(bed, which, rate)?;
    Ok(if second.clean() || second.rate > first.rate { second } else { first })
}

fn run_once(bed: &Testbed, which: DhcpServer, rate: u32) -> Result<PerfRun> {
    let _server = start_dhcp(bed, which)?;
    let text = perfdhcp(
        bed,
        &["-r", &rate.to_string(), "-R", PERF_CLIENTS, "-p", &PERF_SECS.to_string()],
    )?;
    let drops = |name| {
        perf_section(&text, name)
            .map(|(sent, received)| if sent > 0.0 { 1.0 - received / sent } else { 1.0 })
            .with_context(|| format!("no {name} statistics in perfdhcp output:\n{text}"))
    };
    let (discover_drops, request_drops) = (drops("DISCOVER-OFFER")?, drops("REQUEST-ACK")?);
    let acks = perf_section(&text, "REQUEST-ACK").map_or(0.0, |(_, received)| received);
    let run = PerfRun { rate: acks / PERF_SECS as f64, discover_drops, request_drops };
    eprintln!(
        "  {:8} -r {rate:6}: {:8.0} leases/s, drops {:.2}% / {:.2}%",
        which.name(),
        run.rate,
        run.discover_drops * 100.0,
        run.request_drops * 100.0
    );
    Ok(run)
}

/// The highest clean rate: double from the start rate until drops appear, then bisect.
/// Returns (best clean leases/s, peak leases/s of any run).
fn clean_rate(bed: &Testbed, which: DhcpServer) -> Result<(Option<f64>, f64)> {
    let (mut best, mut peak) = (None::<f64>, 0.0_f64);
    let mut record = |run: &PerfRun| {
        peak = peak.max(run.rate);
        if run.clean() {
            best = Some(best.map_or(run.rate, |b| b.max(run.rate)));
        }
        run.clean()
    };
    let (mut low, mut high) = (0u32, None::<u32>);
    let mut rate = which.start_rate();
    while high.is_none() && rate <= 128_000 {
        if record(&run_rate(bed, which, rate)?) {
            low = rate;
            rate *= 2;
        } else {
            high = Some(rate);
        }
    }
    if let Some(mut high) = high {
        if low == 0 {
            // Not clean even at the start rate: search downwards.
            let mut rate = which.start_rate() / 2;
            while rate >= 25 {
                if record(&run_rate(bed, which, rate)?) {
                    low = rate;
                    break;
                }
                high = rate;
                rate /= 2;
            }
        }
        // Three bisection steps: within 1/8 of the interval.
        for _ in 0..3 {
            if low == 0 || high - low <= low / 16 {
                break;
            }
            let mid = (low + high) / 2;
            if record(&run_rate(bed, which, mid)?) {
                low = mid;
            } else {
                high = mid;
            }
        }
    }
    Ok((best, peak))
}

/// Seconds for `AVALANCHE_CLIENTS` clients to all get a lease, as perfdhcp reports it.
fn avalanche(bed: &Testbed, which: DhcpServer) -> Result<(f64, String)> {
    let _server = start_dhcp(bed, which)?;
    let started = Instant::now();
    let text = perfdhcp(bed, &["--scenario", "avalanche", "-R", AVALANCHE_CLIENTS])?;
    let wall = started.elapsed().as_secs_f64();
    let acks = perf_section(&text, "REQUEST-ACK").map_or(0.0, |(_, received)| received);
    // "It took 5.812 seconds ..." when perfdhcp prints it; else our own clock.
    let took = text
        .lines()
        .find_map(|l| {
            // "It took 00:00:04.911820 to provision 5000 clients."
            let clock = l.split("took").nth(1)?.split_whitespace().next()?;
            clock
                .split(':')
                .try_fold(0.0, |secs, part| Some(secs * 60.0 + part.parse::<f64>().ok()?))
        })
        .unwrap_or(wall);
    let detail = format!("{acks:.0} of {AVALANCHE_CLIENTS} leased");
    for line in text.lines().filter(|l| l.contains("took") || l.contains("econds")) {
        eprintln!("    perfdhcp: {}", line.trim());
    }
    eprintln!("  {:8} avalanche: {took:.2} s ({detail})", which.name());
    Ok((took, detail))
}

fn bench_dhcp(bed: &Testbed) -> Result<String> {
    let servers = [DhcpServer::Ctpf, DhcpServer::Kea, DhcpServer::Dnsmasq];
    let (mut clean, mut peak, mut storm, mut storm_notes) = (vec![], vec![], vec![], vec![]);
    for which in servers {
        let (best, top) = clean_rate(bed, which).unwrap_or_else(|e| {
            eprintln!("  {} rate search failed: {e:#}", which.name());
            (None, 0.0)
        });
        clean.push(best);
        peak.push(Some(top).filter(|p| *p > 0.0));
        match avalanche(bed, which) {
            Ok((secs, detail)) => {
                storm.push(Some(secs));
                storm_notes.push(format!("{}: {detail}", which.name()));
            }
            Err(e) => {
                eprintln!("  {} avalanche failed: {e:#}", which.name());
                storm.push(None);
            }
        }
    }
    let rows = [
        Row {
            metric: "clean leases/s (<1% drops)".into(),
            values: clean,
            unit: "/s",
            lower_is_better: false,
            target: ">= 2x kea".into(),
        },
        Row {
            metric: "peak leases/s (any drops)".into(),
            values: peak,
            unit: "/s",
            lower_is_better: false,
            target: String::new(),
        },
        Row {
            metric: format!("avalanche, {AVALANCHE_CLIENTS} clients"),
            values: storm,
            unit: "s",
            lower_is_better: true,
            target: String::new(),
        },
    ];
    let notes = [
        format!(
            "perfdhcp -4 -r RATE -R {PERF_CLIENTS} -p {PERF_SECS} -l {CLIENT_IP} {SERVER_IP} \
             (relay mode from a second namespace); avalanche: --scenario avalanche -R \
             {AVALANCHE_CLIENTS} ({}).",
            storm_notes.join(", ")
        ),
        "Durability differs: ctpf sends an ACK only after the lease is fsynced to its journal \
         (group commit); Kea memfile (persist: true) appends to its CSV without fsync; \
         dnsmasq rewrites its lease file without fsync."
            .to_owned(),
    ];
    Ok(table("DHCP", &["ctpf", "kea", "dnsmasq"], &rows, &notes))
}

// ---------------------------------------------------------------------------------------
// TFTP

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TftpServer {
    Ctpf,
    TftpdHpa,
    Atftpd,
}

impl TftpServer {
    fn name(self) -> &'static str {
        match self {
            Self::Ctpf => "ctpf",
            Self::TftpdHpa => "tftpd-hpa",
            Self::Atftpd => "atftpd",
        }
    }
}

fn start_tftp(bed: &Testbed, which: TftpServer) -> Result<Server> {
    let dir = bed.run_dir(which.name())?;
    let root = bed.file_root()?;
    let log = dir.join("server.log");
    let mut server = match which {
        TftpServer::Ctpf => {
            let extra = [
                "--boot-interface",
                &bed.server_if,
                "--dhcp",
                "off",
                "--tftp-root",
                path_str(&root)?,
            ];
            return Ok(Server::Ctpf(bed.ctpf_up(&dir, &extra, "(tftp)")?));
        }
        TftpServer::TftpdHpa => {
            let mut cmd = bed.server.command("in.tftpd");
            cmd.args(["--listen", "--foreground", "--user", "root", "--secure"])
                .args(["--address", &format!("{SERVER_IP}:69")])
                .arg(&root);
            bed.server.spawn(&mut cmd, &log)?
        }
        TftpServer::Atftpd => {
            let mut cmd = bed.server.command(path_str(&atftpd())?);
            cmd.args(["--daemon", "--no-fork", "--port", "69", "--user", "root.root"])
                .args(["--bind-address", &SERVER_IP.to_string(), "--maxthread", "200"])
                .args(["--logfile", path_str(&dir.join("atftpd.log"))?])
                .arg(&root);
            bed.server.spawn(&mut cmd, &log)?
        }
    };
    bed.server.wait_listening("udp", 69, &mut server)?;
    settle();
    Ok(Server::Peer(server))
}

/// One TFTP measurement: aggregate MB/s and the windowsize the server granted.
fn tftp_run(bed: &Testbed, which: TftpServer, clients: usize, window: u16) -> Result<(f64, u16)> {
    let _server = start_tftp(bed, which)?;
    let exe = std::env::current_exe()?;
    let output = bed
        .client
        .command(path_str(&exe)?)
        .arg("__tftp-client")
        .args([SERVER_IP.to_string(), BOOT_FILE.into(), clients.to_string(), window.to_string()])
        .arg(bed.file_root()?.join(BOOT_FILE))
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "tftp client against {} failed: {}{}",
        which.name(),
        text,
        String::from_utf8_lossy(&output.stderr)
    );
    // "BYTES SECONDS GRANTED_WINDOW"
    let fields: Vec<&str> = text.split_whitespace().collect();
    let [bytes, secs, granted] = fields[..] else { bail!("odd tftp client output {text:?}") };
    let mbps = bytes.parse::<f64>()? / 1e6 / secs.parse::<f64>()?;
    let granted: u16 = granted.parse()?;
    eprintln!(
        "  {:10} {clients:2} client(s), windowsize {window:2} (granted {granted}): {mbps:7.1} MB/s",
        which.name()
    );
    Ok((mbps, granted))
}

fn window_size() -> u16 {
    std::env::var("CTPF_BENCH_WINDOWSIZE").ok().and_then(|w| w.parse().ok()).unwrap_or(16)
}

fn bench_tftp(bed: &Testbed) -> Result<String> {
    let servers = [TftpServer::Ctpf, TftpServer::TftpdHpa, TftpServer::Atftpd];
    let window = window_size();
    let cases = [(1, 1), (TFTP_CLIENTS, 1), (1, window), (TFTP_CLIENTS, window)];
    let mut rows = Vec::new();
    let mut no_window = Vec::new();
    for (clients, win) in cases {
        let mut values = Vec::new();
        for which in servers {
            match tftp_run(bed, which, clients, win) {
                Ok((mbps, granted)) => {
                    if win > 1 && granted == 1 && !no_window.contains(&which.name()) {
                        no_window.push(which.name());
                    }
                    values.push(Some(mbps));
                }
                Err(e) => {
                    eprintln!("  {} failed: {e:#}", which.name());
                    values.push(None);
                }
            }
        }
        let best_peer = values[1..].iter().flatten().copied().fold(0.0_f64, f64::max);
        let met = values[0].is_some_and(|ours| ours >= best_peer);
        rows.push(Row {
            metric: format!(
                "{clients} client{}, windowsize {win}",
                if clients == 1 { "" } else { "s" }
            ),
            values,
            unit: "MB/s",
            lower_is_better: false,
            target: format!(">= best peer ({})", if met { "met" } else { "missed" }),
        });
    }
    let mut notes = vec![format!(
        "32 MiB file, blksize {BLKSIZE}, MB = 10^6 bytes, aggregate over all clients from the \
         first request to the last byte; client: this bench (tokio, RFC 2347/2348/7440, every \
         byte compared with the file)."
    )];
    if !no_window.is_empty() {
        notes.push(format!(
            "No windowsize support (the option is declined, transfers run lock-step): {}.",
            no_window.join(", ")
        ));
    }
    Ok(table("TFTP", &["ctpf", "tftpd-hpa", "atftpd"], &rows, &notes))
}

/// `__tftp-client SERVER FILE CLIENTS WINDOW EXPECTED_FILE`: runs CLIENTS concurrent
/// downloads and prints "BYTES SECONDS GRANTED_WINDOW".
fn tftp_client_main(args: &[String]) -> Result<()> {
    let [server, file, clients, window, expected] = args else {
        bail!("usage: __tftp-client SERVER FILE CLIENTS WINDOW EXPECTED_FILE")
    };
    let server = SocketAddr::V4(SocketAddrV4::new(server.parse()?, 69));
    let clients: usize = clients.parse()?;
    let window: u16 = window.parse()?;
    let expected = Arc::new(std::fs::read(expected)?);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (bytes, secs, granted) = runtime.block_on(async move {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (file, expected) = (file.clone(), expected.clone());
            tasks
                .spawn(async move { tftp::fetch(server, &file, BLKSIZE, window, &expected).await });
        }
        let (mut bytes, mut granted) = (0u64, u16::MAX);
        while let Some(done) = tasks.join_next().await {
            let (got, win) = done??;
            bytes += got;
            granted = granted.min(win);
        }
        anyhow::Ok((bytes, started.elapsed().as_secs_f64(), granted))
    })?;
    println!("{bytes} {secs} {granted}");
    Ok(())
}

/// A minimal, strict TFTP read client for load generation.
mod tftp {
    use std::net::SocketAddr;
    use std::time::Duration;

    use anyhow::{Result, bail, ensure};
    use tokio::net::UdpSocket;
    use tokio::time::{Instant, timeout};

    const RRQ: u16 = 1;
    const DATA: u16 = 3;
    const ACK: u16 = 4;
    const ERROR: u16 = 5;
    const OACK: u16 = 6;
    /// Resend the last ACK (or the request) after this long without a useful packet.
    const RESEND: Duration = Duration::from_millis(500);
    const GIVE_UP: Duration = Duration::from_secs(60);

    fn ack(block: u16) -> [u8; 4] {
        let [hi, lo] = block.to_be_bytes();
        [0, ACK as u8, hi, lo]
    }

    fn request(file: &str, blksize: u16, window: u16) -> Vec<u8> {
        let mut rrq = RRQ.to_be_bytes().to_vec();
        let mut field = |s: &str| {
            rrq.extend_from_slice(s.as_bytes());
            rrq.push(0);
        };
        field(file);
        field("octet");
        field("blksize");
        field(&blksize.to_string());
        field("tsize");
        field("0");
        if window > 1 {
            field("windowsize");
            field(&window.to_string());
        }
        rrq
    }

    /// Parses an OACK into (blksize, windowsize); options not echoed keep their defaults
    /// (512, 1), as RFC 2347 says.
    fn oack(options: &[u8]) -> Result<(usize, u16)> {
        let mut parts = options.split(|b| *b == 0);
        let (mut blksize, mut window) = (512, 1);
        while let (Some(name), Some(value)) = (parts.next(), parts.next()) {
            let value = std::str::from_utf8(value)?;
            match std::str::from_utf8(name)?.to_ascii_lowercase().as_str() {
                "blksize" => blksize = value.parse()?,
                "windowsize" => window = value.parse()?,
                _ => {}
            }
        }
        Ok((blksize, window))
    }

    /// Downloads `file`, checking every byte against `expected`; returns the bytes received
    /// and the windowsize the server granted.
    pub async fn fetch(
        server: SocketAddr,
        file: &str,
        blksize: u16,
        window: u16,
        expected: &[u8],
    ) -> Result<(u64, u16)> {
        let socket = UdpSocket::bind("0.0.0.0:0").await?;
        let rrq = request(file, blksize, window);
        socket.send_to(&rrq, server).await?;
        let mut buffer = vec![0u8; usize::from(blksize) + 64];
        // The server's transfer port (its TID), learnt from its first answer.
        let mut peer: Option<SocketAddr> = None;
        let (mut block_size, mut granted) = (512usize, 1u16);
        let mut next: u16 = 1; // wire number of the block we wait for
        let mut received = 0usize;
        let mut since_ack = 0u16;
        let mut last_ack: Option<u16> = None;
        let mut gap_reported = false;
        let give_up = Instant::now() + GIVE_UP;
        loop {
            ensure!(Instant::now() < give_up, "transfer stalled at {received} bytes");
            let (len, from) = match timeout(RESEND, socket.recv_from(&mut buffer)).await {
                Err(_) => {
                    match (peer, last_ack) {
                        (Some(peer), Some(block)) => socket.send_to(&ack(block), peer).await?,
                        _ => socket.send_to(&rrq, server).await?,
                    };
                    continue;
                }
                Ok(received) => received?,
            };
            if peer.is_some_and(|p| p != from) {
                continue; // another TID: not ours (RFC 1350 would answer ERROR 5)
            }
            let packet = &buffer[..len];
            ensure!(len >= 4, "short packet");
            let opcode = u16::from_be_bytes([packet[0], packet[1]]);
            match opcode {
                OACK if peer.is_none() => {
                    peer = Some(from);
                    (block_size, granted) = oack(&packet[2..])?;
                    ensure!(
                        block_size == usize::from(blksize),
                        "server granted blksize {block_size}"
                    );
                    socket.send_to(&ack(0), from).await?;
                    last_ack = Some(0);
                }
                DATA => {
                    peer.get_or_insert(from);
                    let block = u16::from_be_bytes([packet[2], packet[3]]);
                    let data = &packet[4..];
                    let ahead = block.wrapping_sub(next);
                    if ahead == 0 {
                        let end = received + data.len();
                        ensure!(
                            data.len() <= block_size && expected.get(received..end) == Some(data),
                            "block {block}: wrong data"
                        );
                        received = end;
                        next = next.wrapping_add(1);
                        since_ack += 1;
                        gap_reported = false;
                        if data.len() < block_size {
                            socket.send_to(&ack(block), from).await?;
                            ensure!(received == expected.len(), "got {received} bytes");
                            return Ok((received as u64, granted));
                        }
                        if since_ack >= granted {
                            socket.send_to(&ack(block), from).await?;
                            last_ack = Some(block);
                            since_ack = 0;
                        }
                    } else if ahead < 0x8000 && !gap_reported {
                        // A block went missing: acknowledge the last one in order, the
                        // server resends from there (RFC 7440).
                        let good = next.wrapping_sub(1);
                        socket.send_to(&ack(good), from).await?;
                        last_ack = Some(good);
                        since_ack = 0;
                        gap_reported = true;
                    }
                    // Blocks behind `next` are duplicates: ignored, never re-ACKed.
                }
                ERROR => {
                    let message = String::from_utf8_lossy(&packet[4..]);
                    bail!("server error: {}", message.trim_end_matches('\0'));
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP

/// wrk's figures: requests/s and transfer MB/s.
fn wrk(bed: &Testbed, url: &str) -> Result<(f64, f64)> {
    let output = bed
        .client
        .command("wrk")
        .args(["-t2", "-c", HTTP_CONNECTIONS, "-d", &format!("{HTTP_SECS}s"), "--timeout", "60s"])
        .arg(url)
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "wrk {url} failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(!text.contains("Non-2xx"), "wrk {url}: error responses:\n{text}");
    let field = |key: &str| text.lines().find_map(|l| l.trim().strip_prefix(key).map(str::trim));
    let rps: f64 = field("Requests/sec:").context("no Requests/sec")?.parse()?;
    let transfer = field("Transfer/sec:").context("no Transfer/sec")?;
    let (number, unit) = transfer
        .split_at(transfer.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(transfer.len()));
    let scale = match unit {
        "B" => 1.0,
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("unknown wrk unit {other:?}"),
    };
    let mbps = number.parse::<f64>()? * scale / 1e6;
    eprintln!("  {url}: {rps:.0} requests/s, {mbps:.0} MB/s");
    Ok((rps, mbps))
}

fn curl(bed: &Testbed, url: &str) -> Result<Vec<u8>> {
    let output = bed.client.command("curl").args(["-sSf", url]).stdin(Stdio::null()).output()?;
    ensure!(output.status.success(), "curl {url}: {}", String::from_utf8_lossy(&output.stderr));
    Ok(output.stdout)
}

fn bench_http(bed: &Testbed) -> Result<String> {
    let root = bed.file_root()?;
    // ctpf: the boot file is the discovery initrd artifact; the script is /boot.ipxe.
    let dir = bed.run_dir("ctpf-http")?;
    let ctpf = bed.ctpf_up(&dir, &[], "(api)")?;
    let api = ctpf.api().to_owned();
    let token = std::fs::read_to_string(dir.join("data/admin.token"))?;
    let push = bed
        .client
        .command(path_str(&ctpf_binary()?)?)
        .args(["artifacts", "push", "--name", "discovery-x86_64-initrd", "--kind", "initrd"])
        .arg(root.join(BOOT_FILE))
        .env("CTPF_API", &api)
        .env("CTPF_TOKEN", token.trim())
        .output()?;
    ensure!(
        push.status.success(),
        "pushing the artifact: {}",
        String::from_utf8_lossy(&push.stderr)
    );
    let (file_url, script_url) = (format!("{api}/{INITRD_PATH}"), format!("{api}/boot.ipxe"));
    ensure!(curl(bed, &file_url)? == *bed.file, "ctpf served a different file");
    let script = curl(bed, &script_url)?;
    let ctpf_file = wrk(bed, &file_url);
    let ctpf_script = wrk(bed, &script_url);
    drop(ctpf);

    // nginx: the same bytes at the same paths.
    let dir = bed.run_dir("nginx")?;
    let www = dir.join("www");
    std::fs::create_dir_all(www.join(Path::new(INITRD_PATH).parent().context("path")?))?;
    std::fs::hard_link(root.join(BOOT_FILE), www.join(INITRD_PATH))?;
    std::fs::write(www.join("boot.ipxe"), &script)?;
    let port = 8080;
    let d = dir.display();
    let conf = format!(
        "user root;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         daemon off;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 100000;\n\
           default_type application/octet-stream;\n  types {{ text/plain ipxe; }}\n\
           client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n\
           uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{ listen {SERVER_IP}:{port}; root {www}; }}\n}}\n",
        www = www.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let mut cmd = bed.server.command("nginx");
    cmd.arg("-p").arg(&dir).arg("-c").arg(dir.join("nginx.conf"));
    let mut nginx = bed.server.spawn(&mut cmd, &dir.join("server.log"))?;
    bed.server.wait_listening("tcp", port, &mut nginx)?;
    let base = format!("http://{SERVER_IP}:{port}");
    let (nginx_file_url, nginx_script_url) =
        (format!("{base}/{INITRD_PATH}"), format!("{base}/boot.ipxe"));
    ensure!(curl(bed, &nginx_file_url)? == *bed.file, "nginx served a different file");
    let nginx_file = wrk(bed, &nginx_file_url);
    let nginx_script = wrk(bed, &nginx_script_url);
    drop(nginx);

    let ok = |r: &Result<(f64, f64)>, pick: fn(&(f64, f64)) -> f64| {
        r.as_ref().map_err(|e| eprintln!("  failed: {e:#}")).ok().map(pick)
    };
    let ratio_met = |ours: Option<f64>, theirs: Option<f64>, factor: f64| match (ours, theirs) {
        (Some(o), Some(t)) if o >= factor * t => "met",
        _ => "missed",
    };
    let (cf, nf) = (ok(&ctpf_file, |r| r.1), ok(&nginx_file, |r| r.1));
    let (cs, ns) = (ok(&ctpf_script, |r| r.0), ok(&nginx_script, |r| r.0));
    let rows = [
        Row {
            metric: "32 MiB boot file".into(),
            values: vec![cf, nf],
            unit: "MB/s",
            lower_is_better: false,
            target: format!(">= 0.8x nginx ({})", ratio_met(cf, nf, 0.8)),
        },
        Row {
            metric: "32 MiB boot file".into(),
            values: vec![ok(&ctpf_file, |r| r.0), ok(&nginx_file, |r| r.0)],
            unit: "req/s",
            lower_is_better: false,
            target: String::new(),
        },
        Row {
            metric: format!("iPXE entry script ({} bytes)", script.len()),
            values: vec![cs, ns],
            unit: "req/s",
            lower_is_better: false,
            target: format!(
                ">= 20,000 req/s ({})",
                if cs.is_some_and(|c| c >= 20_000.0) { "met" } else { "missed" }
            ),
        },
    ];
    let notes = [format!(
        "wrk -t2 -c{HTTP_CONNECTIONS} -d{HTTP_SECS}s from the client namespace. ctpf: \
         /{INITRD_PATH} (artifact discovery-x86_64-initrd) and /boot.ipxe rendered per request; \
         nginx: the same bytes as static files (sendfile, access_log off, {} workers).",
        std::thread::available_parallelism().map_or(1, usize::from)
    )];
    Ok(table("HTTP", &["ctpf", "nginx"], &rows, &notes))
}
