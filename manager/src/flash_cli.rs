//! `ctpf flash`: writes an image (a file, or an artifact downloaded from the manager) to a USB
//! stick, an SD card, a loop device or a regular file, then verifies it. The safety rules and
//! the I/O live in `ctpf_packagers::flash`; this module asks, draws progress and reports.

use std::{
    io::{BufRead as _, IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use ctpf_common::ArtifactName;
use ctpf_packagers::flash::{self, FlashReport, Phase, Plan, Target, TargetKind};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::{Cli, client, download_artifact};

#[derive(Debug, Args)]
#[command(
    override_usage = "ctpf flash [OPTIONS] IMAGE DEVICE\n       ctpf flash [OPTIONS] --image-name NAME DEVICE"
)]
pub struct FlashArgs {
    /// IMAGE and DEVICE (only DEVICE with --image-name). DEVICE is a USB stick or SD card
    /// (/dev/sdX, /dev/mmcblkN, /dev/disk/by-id/...), a loop device, or a regular file (created
    /// if missing, truncated to the image's length).
    #[arg(value_name = "IMAGE DEVICE", num_args = 1..=2, required = true)]
    pub paths: Vec<PathBuf>,
    /// Download artifact NAME from the manager (checking its SHA-256) and flash it.
    #[arg(long, value_name = "NAME")]
    pub image_name: Option<String>,
    /// Do not ask for confirmation (needed when stdin is not a terminal).
    #[arg(long, short)]
    pub yes: bool,
    /// Also write to a disk that is neither removable nor on USB. Never lifts the refusal of
    /// a mounted device or of the disk holding /.
    #[arg(long)]
    pub force: bool,
}

pub async fn flash(cli: &Cli, args: &FlashArgs) -> Result<()> {
    let (image, device) = match (&args.image_name, args.paths.as_slice()) {
        (None, [image, device]) => (Source::File(image.clone()), device.clone()),
        (Some(name), [device]) => {
            (Source::Artifact(ArtifactName::parse("--image-name", name)?), device.clone())
        }
        (None, _) => bail!("missing DEVICE: ctpf flash IMAGE DEVICE"),
        (Some(_), _) => {
            bail!("with --image-name, pass only DEVICE: ctpf flash --image-name NAME DEVICE")
        }
    };
    // Everything that can refuse does so before a download.
    let target = Target::inspect(&device)?;
    flash::check_target(&target, args.force)?;
    if !args.yes && target.exists && !std::io::stdin().is_terminal() {
        bail!(
            "stdin is not a terminal, so ctpf cannot ask before erasing {}; pass --yes to \
             confirm; nothing was written",
            device.display()
        );
    }
    // A download lives in a temporary directory until the flash is over.
    let (image, label, _download_dir) = match image {
        Source::File(path) => (path.clone(), path.display().to_string(), None),
        Source::Artifact(name) => {
            let dir = tempfile::Builder::new()
                .prefix("ctpf-flash-")
                .tempdir()
                .context("creating a temporary directory for the download")?;
            let path = dir.path().join(name.as_str());
            let (size, digest) = download_artifact(&client(cli)?, &name, &path).await?;
            eprintln!("downloaded {name}: {size} bytes, {digest} verified");
            (path, format!("artifact {name}"), Some(dir))
        }
    };
    let (yes, force, json) = (args.yes, args.force, cli.json);
    tokio::task::spawn_blocking(move || {
        write_and_verify(&image, &label, target, Flags { yes, force, json })
    })
    .await
    .context("the flash task stopped")?
}

/// Where the image comes from.
#[derive(Debug)]
enum Source {
    File(PathBuf),
    Artifact(ArtifactName),
}

#[derive(Debug, Clone, Copy)]
struct Flags {
    yes: bool,
    force: bool,
    json: bool,
}

/// Checks again (time has passed), asks, writes, verifies and reports. `label` names the
/// image for people: its path, or the artifact it was downloaded from.
fn write_and_verify(image: &Path, label: &str, target: Target, flags: Flags) -> Result<()> {
    let plan = Plan::new(image, target, flags.force)?;
    if !flags.yes && plan.target().exists {
        confirm(&plan, label)?;
    }
    let device = plan.target().path.clone();
    let report = plan.execute(&mut Bars::default())?;
    if flags.json {
        let summary = serde_json::json!({
            "image": label,
            "device": device,
            "bytes": report.bytes,
            "sha256": report.digest,
            "direct": report.direct,
            "write_seconds": report.write_time.as_secs_f64(),
            "verify_seconds": report.verify_time.as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{}", summary(&device, &report));
    }
    Ok(())
}

/// `/dev/sdb: wrote 256.0 MiB in 1.21 s (221.8 MB/s, direct I/O), verified in 0.40 s
/// (671.1 MB/s); sha256:...`
fn summary(device: &Path, report: &FlashReport) -> String {
    let io = if report.direct { "direct I/O" } else { "buffered" };
    format!(
        "{}: wrote {} in {:.2} s ({}, {io}), verified in {:.2} s ({}); {}",
        device.display(),
        size(report.bytes),
        report.write_time.as_secs_f64(),
        rate(report.bytes, report.write_time),
        report.verify_time.as_secs_f64(),
        rate(report.bytes, report.verify_time),
        report.digest
    )
}

fn size(bytes: u64) -> String {
    indicatif::BinaryBytes(bytes).to_string()
}

/// Decimal megabytes per second, as dd prints them.
fn rate(bytes: u64, time: Duration) -> String {
    format!("{:.1} MB/s", bytes as f64 / time.as_secs_f64().max(1e-9) / 1e6)
}

/// Says what will be erased and waits for "yes" on stdin.
fn confirm(plan: &Plan, image: &str) -> Result<()> {
    let target = plan.target();
    let what = match target.kind {
        TargetKind::RegularFile => "file".to_owned(),
        TargetKind::Loop => match &target.backing_file {
            Some(file) => format!("loop device over {}", file.display()),
            None => "loop device".to_owned(),
        },
        TargetKind::Disk => target.model.clone().unwrap_or_else(|| "disk".to_owned()),
    };
    let mut stderr = std::io::stderr().lock();
    write!(stderr, "This erases everything on {} ({what}", target.path.display())?;
    if let Some(bytes) = target.size {
        write!(stderr, ", {}", size(bytes))?;
    }
    writeln!(stderr, ")")?;
    writeln!(stderr, "and writes {image} ({}) to it.", size(plan.image_len()))?;
    write!(stderr, "Type yes to continue: ")?;
    stderr.flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        bail!("not confirmed; nothing was written");
    }
    Ok(())
}

/// Progress bars on stderr (drawn only on a terminal): bytes, throughput, ETA.
#[derive(Debug, Default)]
struct Bars {
    bar: Option<ProgressBar>,
    phase: Option<Phase>,
}

impl flash::Progress for Bars {
    fn start(&mut self, phase: Phase, total: u64) {
        let style = ProgressStyle::with_template(
            "{prefix:>9} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
            .with_style(style)
            .with_prefix(match phase {
                Phase::Write => "writing",
                Phase::Verify => "verifying",
            });
        self.bar = Some(bar);
        self.phase = Some(phase);
    }

    fn update(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            if self.phase == Some(Phase::Write) && Some(done) == bar.length() {
                bar.set_message("syncing");
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.set_message("");
            bar.finish();
        }
    }

    fn note(&mut self, message: &str) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(format!("note: {message}")),
            _ => eprintln!("note: {message}"),
        }
    }
}
