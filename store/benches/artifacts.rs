//! Throughput and peak memory of `FsArtifactStore` on a 1 GiB blob of pseudo-random bytes,
//! against `cp` of the same file on the same filesystem:
//! - `cp SRC DST`, and `cp SRC DST && sync DST` (the store fsyncs, so that is the fair peer);
//! - `put` of SRC opened as a `tokio::fs::File`;
//! - `get`, written in 1 MiB chunks by a blocking thread into a new file, timed without and
//!   with the final `sync_all`.
//!
//! `put` and `get` run in child processes (this binary re-executed with `CTPF_BENCH_ROLE`), so
//! the peak RSS each child reports (`VmHWM`) is the store's alone. Every measurement is taken
//! `ROUNDS` times, interleaved, and the median reported; the source file is generated once
//! and stays in the page cache, as it does for `cp`. The files live under a temporary
//! directory in `/var/tmp` (or `CTPF_BENCH_DIR`), which must not be a tmpfs.
//!
//! Run with `cargo bench -p ctpf-store --bench artifacts`. Misses are reported, not failed.

use std::{
    collections::HashMap,
    ffi::OsStr,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};
use ctpf_common::Sha256Digest;
use ctpf_store::artifacts::{ArtifactStore, FsArtifactStore};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SIZE: u64 = 1 << 30;
const ROUNDS: usize = 3;
/// Throughput targets, as a fraction of the `cp` peer's.
const MIN_RATIO: f64 = 0.8;
/// Peak RSS target for a `put` or `get` of `SIZE` bytes.
const MAX_PEAK_KIB: u64 = 64 * 1024;

const ROLE: &str = "CTPF_BENCH_ROLE";
const STORE: &str = "CTPF_BENCH_STORE";
const SRC: &str = "CTPF_BENCH_SRC";
const OUT: &str = "CTPF_BENCH_OUT";
const DIGEST: &str = "CTPF_BENCH_DIGEST";
const GET_MODE: &str = "CTPF_BENCH_GET_MODE";

fn main() -> Result<()> {
    match std::env::var(ROLE).ok().as_deref() {
        None => parent(),
        Some("put") => child(child_put),
        Some("get") => child(child_get),
        Some(other) => bail!("unknown {ROLE}={other}"),
    }
}

// ---------------------------------------------------------------------------------------
// Children: one `put` or `get`, reported as `key=value` lines on stdout.

fn env_path(name: &str) -> Result<PathBuf> {
    std::env::var_os(name).map(PathBuf::from).with_context(|| format!("{name} is not set"))
}

/// A field of `/proc/self/status`, in KiB.
fn proc_status_kib(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    let kib = line.trim().trim_end_matches("kB").trim();
    kib.parse().with_context(|| format!("{field}: {line}"))
}

fn child(run: fn() -> Result<Vec<(&'static str, String)>>) -> Result<()> {
    let rss_start = proc_status_kib("VmRSS")?;
    let fields = run()?;
    let hwm = proc_status_kib("VmHWM")?;
    let mut out = std::io::stdout().lock();
    for (key, value) in fields {
        writeln!(out, "{key}={value}")?;
    }
    writeln!(out, "rss_start_kib={rss_start}")?;
    writeln!(out, "hwm_kib={hwm}")?;
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn child_put() -> Result<Vec<(&'static str, String)>> {
    let (root, src) = (env_path(STORE)?, env_path(SRC)?);
    runtime()?.block_on(async {
        let store = FsArtifactStore::open(root).await?;
        let start = Instant::now();
        let file = tokio::fs::File::open(&src).await?;
        let info = store.put(Box::pin(file), None).await?;
        let secs = start.elapsed().as_secs_f64();
        Ok(vec![
            ("secs", secs.to_string()),
            ("digest", info.digest.to_string()),
            ("size", info.size.to_string()),
        ])
    })
}

/// `get`, consumed as `GET_MODE` says:
/// - `chunks`: 1 MiB chunks handed to a blocking thread that writes a `std::fs::File`, the way
///   ctpf writes files itself (the headline figure);
/// - `copy`: `tokio::io::copy` into a `tokio::fs::File` (8 KiB writes, each a blocking-pool
///   round trip: shows what a naive consumer gets);
/// - `sink`: `tokio::io::copy` into `tokio::io::sink()`, the store's read side alone.
fn child_get() -> Result<Vec<(&'static str, String)>> {
    let (root, out) = (env_path(STORE)?, env_path(OUT)?);
    let digest: Sha256Digest = std::env::var(DIGEST)?.parse()?;
    let mode = std::env::var(GET_MODE)?;
    runtime()?.block_on(async {
        let store = FsArtifactStore::open(root).await?;
        let start = Instant::now();
        let mut blob = store.get(&digest).await?;
        let (copied, file) = match mode.as_str() {
            "copy" => {
                let mut file = tokio::fs::File::create(&out).await?;
                let copied = tokio::io::copy(&mut blob.reader, &mut file).await?;
                file.flush().await?;
                (copied, Some(file))
            }
            "chunks" => {
                let mut file = std::fs::File::create(&out)?;
                let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
                let writer =
                    tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
                        while let Some(chunk) = rx.blocking_recv() {
                            std::io::Write::write_all(&mut file, &chunk)?;
                        }
                        Ok(file)
                    });
                let mut copied = 0u64;
                loop {
                    let mut buf = bytes::BytesMut::with_capacity(1 << 20);
                    while buf.len() < 1 << 20 {
                        if blob.reader.read_buf(&mut buf).await? == 0 {
                            break;
                        }
                    }
                    if buf.is_empty() {
                        break;
                    }
                    copied += buf.len() as u64;
                    if tx.send(buf.freeze()).await.is_err() {
                        break; // the writer failed; its error comes out below
                    }
                }
                drop(tx);
                let file = writer.await??;
                (copied, Some(tokio::fs::File::from_std(file)))
            }
            "sink" => (tokio::io::copy(&mut blob.reader, &mut tokio::io::sink()).await?, None),
            other => bail!("unknown {GET_MODE}={other}"),
        };
        let copy_secs = start.elapsed().as_secs_f64();
        if let Some(file) = file {
            file.sync_all().await?;
        }
        let secs = start.elapsed().as_secs_f64();
        ensure!(copied == blob.size, "copied {copied} of {} bytes", blob.size);
        Ok(vec![("copy_secs", copy_secs.to_string()), ("secs", secs.to_string())])
    })
}

// ---------------------------------------------------------------------------------------
// Parent: generate the file, run the rounds, report.

/// Runs this binary as a child in `role`; returns its `key=value` report.
fn run_child(role: &str, env: &[(&str, &OsStr)]) -> Result<HashMap<String, String>> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(ROLE, role);
    for (key, value) in env {
        cmd.env(key, value);
    }
    let output = cmd.output()?;
    ensure!(
        output.status.success(),
        "{role} child failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

fn field<T: std::str::FromStr>(report: &HashMap<String, String>, key: &str) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    Ok(report.get(key).with_context(|| format!("child did not report {key}"))?.parse()?)
}

/// Runs a command to completion and returns its wall time.
fn timed(program: &str, args: &[&str]) -> Result<f64> {
    let start = Instant::now();
    let status = Command::new(program).args(args).status()?;
    let secs = start.elapsed().as_secs_f64();
    ensure!(status.success(), "{program} {args:?}: {status}");
    Ok(secs)
}

/// Flushes every dirty page, so one measurement's writeback does not land in the next.
fn sync_all_filesystems() -> Result<()> {
    let status = Command::new("sync").status()?;
    ensure!(status.success(), "sync: {status}");
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| format!("non-UTF-8 path {}", path.display()))
}

/// Writes `size` xorshift bytes to `path` and fsyncs it.
fn generate(path: &Path, size: u64) -> Result<()> {
    let mut file = std::fs::File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut left = size;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64);
        file.write_all(&buf[..n as usize])?;
        left -= n;
    }
    file.sync_all()?;
    Ok(())
}

/// In-memory SHA-256 throughput, to tell hashing cost from I/O cost.
fn sha256_mb_per_s() -> f64 {
    let data = vec![0x5au8; 64 << 20];
    let start = Instant::now();
    let digest = Sha256::digest(&data);
    let secs = start.elapsed().as_secs_f64();
    std::hint::black_box(digest);
    mb_per_s(data.len() as u64, secs)
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or_else(|_| "?".into(), |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// Wall times of one measurement, one per round.
#[derive(Default)]
struct Series(Vec<f64>);

impl Series {
    fn median(&self) -> f64 {
        median(&self.0)
    }

    fn rate(&self) -> f64 {
        mb_per_s(SIZE, self.median())
    }

    fn line(&self, name: &str) -> String {
        let rounds: Vec<String> =
            self.0.iter().map(|s| format!("{:.0}", mb_per_s(SIZE, *s))).collect();
        format!(
            "  {name:<34} {:>5.2} s {:>6.0} MB/s  (rounds: {} MB/s)",
            self.median(),
            self.rate(),
            rounds.join(", ")
        )
    }
}

#[derive(Default)]
struct Samples {
    cp: Series,
    cp_sync: Series,
    put: Series,
    get_chunks: Series,
    get_chunks_sync: Series,
    get_copy: Series,
    get_sink: Series,
    put_hwm: Vec<u64>,
    get_hwm: Vec<u64>,
    rss_start: Vec<u64>,
}

fn parent() -> Result<()> {
    let base = std::env::var_os("CTPF_BENCH_DIR").map_or_else(|| "/var/tmp".into(), PathBuf::from);
    let dir = tempfile::Builder::new().prefix("ctpf-artifacts-bench-").tempdir_in(&base)?;
    let result = bench(dir.path());
    // The files are removed by `dir`'s drop whatever happened.
    drop(dir);
    result
}

fn bench(dir: &Path) -> Result<()> {
    let fs_type = Command::new("stat").args(["-f", "-c", "%T", path_str(dir)?]).output()?;
    let fs_type = String::from_utf8_lossy(&fs_type.stdout).trim().to_owned();
    ensure!(fs_type != "tmpfs", "{} is on a tmpfs; set CTPF_BENCH_DIR to a disk", dir.display());
    let src = dir.join("src.bin");
    let cp_dst = dir.join("cp.bin");
    let get_out = dir.join("get.bin");

    println!("FsArtifactStore vs cp, {SIZE} bytes (1 GiB) of pseudo-random data");
    println!("  directory {} ({fs_type}); source, copies and store all there", dir.display());
    println!("  load average at start: {}", loadavg());
    let start = Instant::now();
    generate(&src, SIZE)?;
    println!("  generated the source in {:.1} s", start.elapsed().as_secs_f64());
    let sha = sha256_mb_per_s();
    println!("  in-memory SHA-256 (one core): {sha:.0} MB/s");

    let (src_s, cp_s) = (path_str(&src)?, path_str(&cp_dst)?);
    let mut s = Samples::default();
    let mut digest: Option<String> = None;
    for round in 0..ROUNDS {
        sync_all_filesystems()?;
        s.cp.0.push(timed("cp", &[src_s, cp_s])?);
        std::fs::remove_file(&cp_dst)?;
        sync_all_filesystems()?;
        s.cp_sync.0.push(timed("sh", &["-c", r#"cp "$1" "$2" && sync "$2""#, "sh", src_s, cp_s])?);
        std::fs::remove_file(&cp_dst)?;
        sync_all_filesystems()?;

        let store = dir.join(format!("store-{round}"));
        let put = run_child("put", &[(STORE, store.as_os_str()), (SRC, src.as_os_str())])?;
        s.put.0.push(field(&put, "secs")?);
        s.put_hwm.push(field(&put, "hwm_kib")?);
        s.rss_start.push(field(&put, "rss_start_kib")?);
        ensure!(field::<u64>(&put, "size")? == SIZE, "put stored the wrong size");
        let put_digest: String = field(&put, "digest")?;
        match &digest {
            Some(d) => ensure!(*d == put_digest, "digest changed: {d} then {put_digest}"),
            None => digest = Some(put_digest.clone()),
        }
        sync_all_filesystems()?;

        for mode in ["chunks", "copy", "sink"] {
            let env = [
                (STORE, store.as_os_str()),
                (OUT, get_out.as_os_str()),
                (DIGEST, OsStr::new(&put_digest)),
                (GET_MODE, OsStr::new(mode)),
            ];
            let get = run_child("get", &env)?;
            let (copy_secs, secs) = (field(&get, "copy_secs")?, field(&get, "secs")?);
            match mode {
                "chunks" => {
                    s.get_chunks.0.push(copy_secs);
                    s.get_chunks_sync.0.push(secs);
                    s.get_hwm.push(field(&get, "hwm_kib")?);
                    if round == 0 {
                        let same = Command::new("cmp")
                            .args(["-s", src_s, path_str(&get_out)?])
                            .status()?;
                        ensure!(same.success(), "get returned different bytes from what was put");
                    }
                }
                "sink" => s.get_sink.0.push(secs),
                _ => s.get_copy.0.push(copy_secs),
            }
            if get_out.exists() {
                std::fs::remove_file(&get_out)?;
            }
            sync_all_filesystems()?;
        }
        std::fs::remove_dir_all(&store)?;
    }

    let (cp, cp_sync, put) = (s.cp.rate(), s.cp_sync.rate(), s.put.rate());
    let (get, get_sync) = (s.get_chunks.rate(), s.get_chunks_sync.rate());
    let put_hwm = s.put_hwm.iter().copied().max().unwrap_or(0);
    let get_hwm = s.get_hwm.iter().copied().max().unwrap_or(0);
    let rss_start = s.rss_start.iter().copied().max().unwrap_or(0);

    println!("  load average at end: {}", loadavg());
    println!();
    println!("median of {ROUNDS} interleaved rounds (MB = 10^6 bytes):");
    println!("{}", s.cp.line("cp"));
    println!("{}", s.cp_sync.line("cp && sync DST"));
    println!("{}", s.put.line("put (hash, write, fsync, rename)"));
    println!("{}", s.get_chunks.line("get, 1 MiB chunks to a File"));
    println!("{}", s.get_chunks_sync.line("get, same + sync_all"));
    println!("  diagnostics (same get, other consumers):");
    println!("{}", s.get_sink.line("get, io::copy to io::sink"));
    println!("{}", s.get_copy.line("get, tokio::io::copy to tokio File"));
    println!();
    println!(
        "fs put 1 GiB: {put:.0} MB/s (cp {cp:.0} MB/s, ratio {:.2}; cp+sync {cp_sync:.0} MB/s, \
         ratio {:.2}), peak RSS {:.1} MiB",
        put / cp,
        put / cp_sync,
        mib(put_hwm)
    );
    println!(
        "fs get 1 GiB: {get:.0} MB/s (cp {cp:.0} MB/s, ratio {:.2}); with sync_all {get_sync:.0} \
         MB/s (cp+sync {cp_sync:.0} MB/s, ratio {:.2}), peak RSS {:.1} MiB",
        get / cp,
        get_sync / cp_sync,
        mib(get_hwm)
    );
    println!(
        "  peak RSS is the child's VmHWM, which is {:.1} MiB before the store does anything",
        mib(rss_start)
    );
    println!(
        "  put hashes every byte, so it cannot beat SHA-256 ({sha:.0} MB/s, {:.2}x cp) whatever \
         the I/O",
        sha / cp
    );
    println!(
        "  tokio::io::copy moves 8 KiB at a time and tokio::fs::File turns each write into a \
         blocking-pool round trip: consumers should write in large chunks, as ctpf does"
    );
    println!();
    println!("targets:");
    println!(
        "  put >= {MIN_RATIO}x cp:        {} ({:.2}x; {:.2}x of cp+sync, which also fsyncs)",
        verdict(put / cp >= MIN_RATIO),
        put / cp,
        put / cp_sync
    );
    println!(
        "  get >= {MIN_RATIO}x cp:        {} ({:.2}x; read side alone {:.2}x)",
        verdict(get / cp >= MIN_RATIO),
        get / cp,
        s.get_sink.rate() / cp
    );
    println!(
        "  put peak RSS < 64 MiB: {} ({:.1} MiB)",
        verdict(put_hwm < MAX_PEAK_KIB),
        mib(put_hwm)
    );
    println!(
        "  get peak RSS < 64 MiB: {} ({:.1} MiB)",
        verdict(get_hwm < MAX_PEAK_KIB),
        mib(get_hwm)
    );
    Ok(())
}
