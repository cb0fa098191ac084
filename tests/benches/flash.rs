//! `ctpf flash` against `dd bs=4M oflag=direct conv=fsync`, both writing the same 256 MiB
//! image to the same loop device (over a file under /var/tmp, on disk rather than tmpfs, with
//! the loop driver's direct I/O on where the filesystem allows it, so writes reach the disk
//! the way they reach a stick). The runs alternate, three of each; medians are printed.
//!
//! ctpf also reads the image back and compares digests, which dd does not, so it is reported
//! twice: its write phase alone (writes and fsync, as it reports with `--json`), the one to
//! compare with dd, and the whole command (write, verify and process start).
//!
//! Run: `cargo build --release -p ctpf && cargo bench -p ctpf-e2e --bench flash` (as root:
//! losetup). `CTPF_BIN` overrides the ctpf binary.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ctpf_e2e::LoopDevice;

const IMAGE_BYTES: usize = 256 << 20;
const ROUNDS: usize = 3;

fn main() -> Result<()> {
    let ctpf = ctpf_e2e::ctpf_binary()?;
    println!("binary: {}", ctpf.display());
    let dir = tempfile::Builder::new().prefix("ctpf-flash-bench-").tempdir_in("/var/tmp")?;
    let image = dir.path().join("image.img");
    write_noise(&image, IMAGE_BYTES)?;
    // A fully allocated backing file, so no run pays for allocating blocks.
    let backing = dir.path().join("disk.img");
    let mut file = std::fs::File::create(&backing)?;
    let zeros = vec![0u8; 4 << 20];
    for _ in 0..IMAGE_BYTES / zeros.len() {
        file.write_all(&zeros)?;
    }
    file.sync_all()?;
    drop(file);
    let (device, loop_mode) = match LoopDevice::attach(&backing, &["--direct-io=on"]) {
        Ok(device) => (device, "direct I/O"),
        Err(_) => (LoopDevice::attach(&backing, &[])?, "buffered"),
    };
    let target = device.path().to_str().context("device path")?.to_owned();
    let image = image.to_str().context("image path")?.to_owned();
    println!(
        "{} MiB image, loop device {target} over {} ({loop_mode}), {ROUNDS} rounds each",
        IMAGE_BYTES >> 20,
        backing.display()
    );

    let mut ctpf_write = Vec::new();
    let mut ctpf_total = Vec::new();
    let mut dd = Vec::new();
    for round in 1..=ROUNDS {
        let started = Instant::now();
        let output = Command::new(&ctpf)
            .args(["flash", "--json", &image, &target, "--yes"])
            .stdin(Stdio::null())
            .output()?;
        let total = started.elapsed();
        if !output.status.success() {
            bail!("ctpf flash failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        let write = Duration::from_secs_f64(report["write_seconds"].as_f64().context("report")?);
        let started = Instant::now();
        let status = Command::new("dd")
            .args([&format!("if={image}"), &format!("of={target}")])
            .args(["bs=4M", "oflag=direct", "conv=fsync", "status=none"])
            .status()?;
        let dd_time = started.elapsed();
        if !status.success() {
            bail!("dd failed: {status}");
        }
        println!(
            "round {round}: ctpf write {:.1} MB/s, ctpf total {:.1} MB/s, dd {:.1} MB/s",
            mb_per_s(write),
            mb_per_s(total),
            mb_per_s(dd_time)
        );
        ctpf_write.push(write);
        ctpf_total.push(total);
        dd.push(dd_time);
    }
    let (write, total, dd) = (median(ctpf_write), median(ctpf_total), median(dd));
    println!(
        "\nmedian: ctpf write phase {:.1} MB/s, ctpf whole command (write + verify) {:.1} MB/s, \
         dd {:.1} MB/s",
        mb_per_s(write),
        mb_per_s(total),
        mb_per_s(dd)
    );
    println!(
        "ratio ctpf/dd: write phase {:.2}, whole command {:.2}",
        mb_per_s(write) / mb_per_s(dd),
        mb_per_s(total) / mb_per_s(dd)
    );
    Ok(())
}

fn mb_per_s(time: Duration) -> f64 {
    IMAGE_BYTES as f64 / time.as_secs_f64() / 1e6
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

/// Incompressible, non-repeating bytes (xorshift), written in 4 MiB pieces.
fn write_noise(path: &Path, len: usize) -> Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut piece = vec![0u8; 4 << 20];
    for _ in 0..len / piece.len() {
        for word in piece.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&piece)?;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}
