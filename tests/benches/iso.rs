//! Packaging the hybrid ISO (BIOS + UEFI, CD + USB): ctpf's writer against `xorriso -as
//! mkisofs` with the equivalent options, the same content, in the same run, writing to the
//! same file system (/var/tmp, on disk).
//!
//! Content, the size of a real discovery medium: the discovery kernel (`.ci/run`'s unpacked
//! package, else 8 MiB of noise), a 40 MiB initrd of incompressible deterministic bytes, a
//! 2 MiB GRUB-like EFI image, isolinux.bin and ldlinux.c32 from the syslinux packages, and the
//! two boot configs. xorriso gets a staged directory holding the same files, including the
//! ESP (`boot/efi.img`, ctpf's bytes); ctpf's time includes building that ESP in memory,
//! xorriso's does not (staging is outside the clock). ctpf runs in this process (the
//! packagers library, called as the media tests call it: plan, then write to a
//! `BufWriter<File>`); xorriso's time includes its process start.
//!
//! Two modes, each with every output removed (and `sync` run) before a run, so both tools
//! create a fresh file on a quiet disk:
//! - **fsync**: ctpf ends with `File::sync_all`, xorriso with `--stdio_sync end` (one fsync
//!   once all data is written); this is the time until the image is on disk;
//! - **page cache**: neither syncs (xorriso's `-as mkisofs` default, `-stdio_sync off`).
//!
//! The tools alternate which goes first in each round. Median, p90 and minimum per tool, MB/s
//! (the tool's own image bytes over its median time) and the ratio of medians ctpf/xorriso
//! are printed. Target: ctpf at or below xorriso. xorriso's main thread waits for its writer
//! thread in 100 ms sleeps (strace), so its wall time is never below ~105 ms here and is
//! often bimodal: it sometimes exits several sleeps after the writer has written and fsynced
//! everything. Its minimum is that floor rather than its work, which this bench does not
//! separate out.
//!
//! Run: `cargo bench -p ctpf-e2e --bench iso [-- ROUNDS]` (needs xorriso, isolinux and
//! syslinux-common).

use std::{
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use ctpf_packagers::{
    iso9660::Source,
    media::{self, BootFiles, MediaConfig, Syslinux},
};

const ROUNDS: usize = 9;
const INITRD_BYTES: usize = 40 << 20;
const EFI_BYTES: usize = 2 << 20;
const FALLBACK_KERNEL_BYTES: usize = 8 << 20;
const ISOLINUX_BIN: &str = "/usr/lib/ISOLINUX/isolinux.bin";
const ISOHDPFX_BIN: &str = "/usr/lib/ISOLINUX/isohdpfx.bin";
const LDLINUX_C32: &str = "/usr/lib/syslinux/modules/bios/ldlinux.c32";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Fsync,
    PageCache,
}

impl Mode {
    fn describe(self) -> &'static str {
        match self {
            Mode::Fsync => "with fsync (ctpf: File::sync_all, xorriso: --stdio_sync end)",
            Mode::PageCache => "to the page cache (neither syncs)",
        }
    }
}

fn main() -> Result<()> {
    let rounds =
        std::env::args().skip(1).find_map(|a| a.parse::<usize>().ok()).unwrap_or(ROUNDS).max(1);
    for tool in [ISOLINUX_BIN, ISOHDPFX_BIN, LDLINUX_C32] {
        ensure!(Path::new(tool).is_file(), "{tool} missing (apt isolinux syslinux-common)");
    }
    let version = Command::new("xorriso").arg("-version").output().context("xorriso (apt)")?;
    let version = String::from_utf8_lossy(&version.stdout);
    let version = version.lines().next().unwrap_or("xorriso").to_owned();

    let dir = tempfile::Builder::new().prefix("ctpf-iso-bench-").tempdir_in("/var/tmp")?;
    let inputs = dir.path().join("inputs");
    std::fs::create_dir_all(&inputs)?;
    let (kernel, kernel_note) = match real_kernel() {
        Some(path) => (path.clone(), format!("discovery kernel {}", path.display())),
        None => {
            let path = inputs.join("vmlinuz");
            write_noise(&path, FALLBACK_KERNEL_BYTES, 1, b"")?;
            (path, "no discovery kernel here: 8 MiB of noise as the kernel".to_owned())
        }
    };
    let initrd = inputs.join("initrd.img");
    write_noise(&initrd, INITRD_BYTES, 2, b"")?;
    let grub = inputs.join("grubx64.efi");
    write_noise(&grub, EFI_BYTES, 3, b"MZ")?;

    let files = BootFiles {
        kernel: Source::file(&kernel)?,
        initrd: Source::file(&initrd)?,
        efi_x86_64: Some(Source::file(&grub)?),
        arm64: None,
        efi_arm64: None,
        syslinux: Some(Syslinux {
            isolinux_bin: Source::file(ISOLINUX_BIN)?,
            ldlinux_c32: Source::file(LDLINUX_C32)?,
            isohdpfx_bin: Source::file(ISOHDPFX_BIN)?,
        }),
    };
    let config = MediaConfig {
        label: "CTPF_BOOT".into(),
        kernel_words: vec![
            "console=ttyS0".into(),
            "ctpf.url=http://10.0.2.2:8080/".into(),
            "ctpf.token=bench".into(),
        ],
        timestamp: 1_700_000_000,
        serial: 0xC7F0_0001,
    };
    let stage = dir.path().join("stage");
    stage_tree(&stage, &files, &config, &kernel, &initrd)?;
    let content: u64 = dir_bytes(&stage)?;

    println!("ctpf: in-process media::hybrid_iso; {version}");
    println!(
        "content: {kernel_note}, {} MiB noise initrd, {} MiB EFI image, isolinux",
        INITRD_BYTES >> 20,
        EFI_BYTES >> 20
    );
    println!(
        "{:.1} MB of files (ESP included), images written under {}, {rounds} rounds per tool and mode",
        content as f64 / 1e6,
        dir.path().display()
    );

    let ctpf_out = dir.path().join("ctpf.iso");
    let xorriso_out = dir.path().join("xorriso.iso");
    for mode in [Mode::Fsync, Mode::PageCache] {
        println!("\n== {}", mode.describe());
        let (mut ctpf_times, mut xorriso_times) = (Vec::new(), Vec::new());
        let (mut ctpf_size, mut xorriso_size) = (0, 0);
        for round in 0..rounds {
            for ctpf_turn in if round % 2 == 0 { [true, false] } else { [false, true] } {
                let out = if ctpf_turn { &ctpf_out } else { &xorriso_out };
                quiesce(out)?;
                if ctpf_turn {
                    let (time, size) = run_ctpf(&files, &config, out, mode)?;
                    ctpf_times.push(time);
                    ctpf_size = size;
                } else {
                    let (time, size) = run_xorriso(&stage, out, mode)?;
                    xorriso_times.push(time);
                    xorriso_size = size;
                }
            }
            println!(
                "round {}: ctpf {}, xorriso {}",
                round + 1,
                ms(ctpf_times[round]),
                ms(xorriso_times[round])
            );
        }
        ctpf_times.sort_unstable();
        xorriso_times.sort_unstable();
        let (c50, x50) = (percentile(&ctpf_times, 0.5), percentile(&xorriso_times, 0.5));
        println!(
            "{:<9} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "tool", "image MB", "median", "p90", "min", "MB/s"
        );
        for (tool, times, size) in
            [("ctpf", &ctpf_times, ctpf_size), ("xorriso", &xorriso_times, xorriso_size)]
        {
            let median = percentile(times, 0.5);
            println!(
                "{tool:<9} {:>10.1} {:>10} {:>10} {:>10} {:>10.0}",
                size as f64 / 1e6,
                ms(median),
                ms(percentile(times, 0.9)),
                ms(times[0]),
                size as f64 / median.as_secs_f64() / 1e6
            );
        }
        let ratio = c50.as_secs_f64() / x50.as_secs_f64();
        println!(
            "ratio ctpf/xorriso: median {ratio:.2} (target <= 1: {}), minimum {:.2}",
            if ratio <= 1.0 { "met" } else { "MISSED" },
            ctpf_times[0].as_secs_f64() / xorriso_times[0].as_secs_f64()
        );
    }
    Ok(())
}

/// The discovery kernel `.ci/run` unpacks, if this machine has it.
fn real_kernel() -> Option<PathBuf> {
    let linux = ctpf_e2e::qemu::discovery_linux().ok()?;
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(linux.join("boot"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .collect();
    kernels.sort();
    kernels.pop()
}

/// ctpf: plan (ESP in memory, isohdpfx read), create the file, write it in one pass.
fn run_ctpf(
    files: &BootFiles,
    config: &MediaConfig,
    out: &Path,
    mode: Mode,
) -> Result<(Duration, u64)> {
    let started = Instant::now();
    let plan = media::hybrid_iso(files, config)?;
    let mut writer = BufWriter::new(std::fs::File::create(out)?);
    let written = plan.write(&mut writer)?;
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    if mode == Mode::Fsync {
        file.sync_all()?;
    }
    drop(file);
    let elapsed = started.elapsed();
    let size = std::fs::metadata(out)?.len();
    ensure!(size > 0 && size == written && size == plan.size(), "ctpf wrote {size} bytes");
    Ok((elapsed, size))
}

/// `xorriso -as mkisofs` with the options of a hybrid isolinux + EFI image.
fn run_xorriso(stage: &Path, out: &Path, mode: Mode) -> Result<(Duration, u64)> {
    let mut cmd = Command::new("xorriso");
    cmd.args(["-as", "mkisofs", "-o"]).arg(out);
    cmd.args(["-isohybrid-mbr", ISOHDPFX_BIN, "-b", "isolinux/isolinux.bin"])
        .args(["-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4"])
        .args(["-boot-info-table", "-eltorito-alt-boot", "-e", "boot/efi.img"])
        .args(["-no-emul-boot", "-isohybrid-gpt-basdat", "-R", "-V", "CTPF_BOOT"]);
    if mode == Mode::Fsync {
        cmd.args(["--stdio_sync", "end"]);
    }
    cmd.arg(stage).stdin(Stdio::null());
    let started = Instant::now();
    let output = cmd.output().context("running xorriso")?;
    let elapsed = started.elapsed();
    if !output.status.success() {
        bail!("xorriso failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    let size = std::fs::metadata(out).context("xorriso's image")?.len();
    ensure!(size > 0, "xorriso wrote an empty image");
    Ok((elapsed, size))
}

/// The files of the ctpf medium as a directory for xorriso (same bytes, same paths).
fn stage_tree(
    stage: &Path,
    files: &BootFiles,
    config: &MediaConfig,
    kernel: &Path,
    initrd: &Path,
) -> Result<()> {
    let put = |path: &str, bytes: &[u8]| -> Result<()> {
        let target = stage.join(path);
        std::fs::create_dir_all(target.parent().context("path")?)?;
        std::fs::write(target, bytes)?;
        Ok(())
    };
    for (path, from) in [
        ("boot/vmlinuz", kernel),
        ("boot/initrd.img", initrd),
        ("isolinux/isolinux.bin", Path::new(ISOLINUX_BIN)),
        ("isolinux/ldlinux.c32", Path::new(LDLINUX_C32)),
    ] {
        put(path, &std::fs::read(from)?)?;
    }
    put("isolinux/isolinux.cfg", media::isolinux_cfg(config).as_bytes())?;
    put(media::GRUB_CONFIG_PATH, media::grub_cfg(config).as_bytes())?;
    put("boot/efi.img", &media::efi_system_partition(files, config)?)?;
    Ok(())
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { dir_bytes(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}

/// Removes the previous output and flushes everything dirty, so each run creates a fresh
/// file on a quiet disk.
fn quiesce(out: &Path) -> Result<()> {
    match std::fs::remove_file(out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    ensure!(Command::new("sync").status()?.success(), "sync failed");
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// `prefix`, then incompressible, non-repeating bytes (xorshift from `seed`).
fn write_noise(path: &Path, len: usize, seed: u64, prefix: &[u8]) -> Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut piece = vec![0u8; 1 << 20];
    let mut left = len;
    let mut first = true;
    while left > 0 {
        for word in piece.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        if first {
            piece[..prefix.len()].copy_from_slice(prefix);
            first = false;
        }
        let n = left.min(piece.len());
        file.write_all(&piece[..n])?;
        left -= n;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}
