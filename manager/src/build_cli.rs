//! `ctpf build ...` (submit a build and follow it) and `ctpf builds list|show|logs`.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use ctpf_common::{
    Arch, ArtifactName, BuildRequest, Job, JobSpec, JobStatus, LogStream, NewBuild, TagSelector,
};

use crate::cli::{Cli, client, label, or_dash, print, tag_query};
use crate::client::ApiClient;

#[derive(Debug, Subcommand)]
pub enum BuildCmd {
    /// A standalone GRUB image with an embedded config (default: this ctpf's entry config,
    /// which fetches each machine's config over HTTP).
    Grub {
        /// x86_64-efi, arm64-efi, i386-pc-pxe (PXE core.0) or i386-pc-eltorito.
        #[arg(long)]
        target: String,
        /// A GRUB config file to embed instead.
        #[arg(long, conflicts_with = "chain_ipxe")]
        config: Option<PathBuf>,
        /// Embed a config that loads iPXE from this ctpf (ipxe.efi, or ipxe.lkrn under BIOS)
        /// and has it chain ctpf's script. BIOS needs iPXE 1.21 or later; UEFI does not boot
        /// yet (GRUB keeps the NIC).
        #[arg(long)]
        chain_ipxe: bool,
        #[command(flatten)]
        common: BuildArgs,
    },
    /// iPXE from a source tree, with an embedded script and build options.
    Ipxe {
        /// The iPXE tree (or its src directory) on the builder, artifact:NAME or sha256:HEX
        /// (a tar/tar.gz in the artifact store), or a git URL with an optional #REV.
        #[arg(long, env = "CTPF_IPXE_SRC")]
        source: String,
        /// bin/undionly.kpxe, bin/ipxe.lkrn, bin-x86_64-efi/ipxe.efi, bin-arm64-efi/ipxe.efi
        /// (repeatable).
        #[arg(long = "target", required = true)]
        targets: Vec<String>,
        /// An iPXE script (starting with #!ipxe) to embed.
        #[arg(long)]
        embed: Option<PathBuf>,
        /// A CA certificate for HTTPS (TRUST=), repeatable.
        #[arg(long)]
        trust: Vec<PathBuf>,
        /// A client certificate (CERT=), repeatable.
        #[arg(long)]
        cert: Vec<PathBuf>,
        /// A build option: NAME (#define), NAME=1 or NAME=0 (#undef), repeatable.
        #[arg(long = "option")]
        options: Vec<String>,
        /// Build with NO_WERROR=1 (older trees with newer compilers).
        #[arg(long)]
        no_werror: bool,
        #[command(flatten)]
        common: BuildArgs,
    },
    /// isolinux.bin, isohdpfx.bin, ldlinux.c32 and pxelinux.0 from Debian's packages.
    Syslinux {
        #[command(flatten)]
        common: BuildArgs,
    },
    /// The Raspberry Pi boot files: firmware from Debian's raspi-firmware, device trees from
    /// an arm64 kernel package.
    RaspiFirmware {
        /// The unpacked raspi-firmware package (dpkg -x), or /.
        #[arg(long)]
        firmware: PathBuf,
        /// The unpacked arm64 linux-image package.
        #[arg(long)]
        linux: PathBuf,
        #[command(flatten)]
        common: BuildArgs,
    },
    /// The discovery image (kernel and initramfs with NIC drivers, busybox and the agent).
    Discovery {
        /// An unpacked Debian linux-image package (dpkg -x), or /.
        #[arg(long)]
        linux: PathBuf,
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// The static ctpf-agent.
        #[arg(long)]
        agent: PathBuf,
        /// Refuse a kernel of another architecture (x86_64 or arm64); busybox, agent and
        /// modules must always match the kernel.
        #[arg(long)]
        arch: Option<Arch>,
        #[command(flatten)]
        common: BuildArgs,
    },
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Also record the outputs as artifacts NAME-FILE.
    #[arg(long)]
    name: Option<String>,
    /// Tags the builder must carry (k=v,k=v).
    #[arg(long, default_value = "")]
    selector: String,
    /// Print the build id and return instead of following the build.
    #[arg(long)]
    detach: bool,
}

#[derive(Debug, Subcommand)]
pub enum BuildsCmd {
    /// List builds, newest first.
    List {
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// A build with its manifest (recipe, inputs, tools, outputs).
    Show { id: String },
    /// A build's log; --follow keeps printing until the build ends.
    Logs {
        id: String,
        #[arg(long, short)]
        follow: bool,
    },
    /// Stop a queued or running build (its whole process group is killed).
    Cancel { id: String },
}

/// Files named on the command line are read here, paths for the builder made absolute.
fn request(cmd: &BuildCmd) -> Result<(BuildRequest, &BuildArgs)> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let absolute = |path: &PathBuf| -> Result<String> {
        Ok(std::path::absolute(path)
            .with_context(|| format!("resolving {}", path.display()))?
            .display()
            .to_string())
    };
    Ok(match cmd {
        BuildCmd::Grub { target, config, chain_ipxe, common } => {
            let config = config.as_ref().map(read).transpose()?;
            let request =
                BuildRequest::Grub { target: target.clone(), config, chain_ipxe: *chain_ipxe };
            (request, common)
        }
        BuildCmd::Ipxe { source, targets, embed, trust, cert, options, no_werror, common } => {
            let mut parsed = BTreeMap::new();
            for option in options {
                let (name, on) = match option.split_once('=') {
                    None => (option.as_str(), true),
                    Some((name, "1")) => (name, true),
                    Some((name, "0")) => (name, false),
                    Some(_) => bail!("--option {option:?}: use NAME, NAME=1 or NAME=0"),
                };
                parsed.insert(name.to_owned(), on);
            }
            let request = BuildRequest::Ipxe {
                source: source_location(source)?,
                targets: targets.clone(),
                embed: embed.as_ref().map(read).transpose()?,
                trust: trust.iter().map(absolute).collect::<Result<_>>()?,
                certs: cert.iter().map(absolute).collect::<Result<_>>()?,
                options: parsed,
                no_werror: *no_werror,
            };
            (request, common)
        }
        BuildCmd::Syslinux { common } => (BuildRequest::Syslinux {}, common),
        BuildCmd::RaspiFirmware { firmware, linux, common } => (
            BuildRequest::RaspiFirmware { firmware: absolute(firmware)?, linux: absolute(linux)? },
            common,
        ),
        BuildCmd::Discovery { linux, busybox, agent, arch, common } => {
            let request = BuildRequest::Discovery {
                linux: absolute(linux)?,
                busybox: absolute(busybox)?,
                agent: absolute(agent)?,
                arch: *arch,
            };
            (request, common)
        }
    })
}

/// Artifact, digest and URL sources are passed on as given; anything else is a local path,
/// made absolute.
fn source_location(source: &str) -> Result<String> {
    let passed_on = ["artifact:", "sha256:", "https://", "http://", "git://", "ssh://", "file://"];
    if passed_on.iter().any(|prefix| source.starts_with(prefix)) {
        return Ok(source.to_owned());
    }
    let path = std::path::absolute(source).with_context(|| format!("resolving {source}"))?;
    Ok(path.display().to_string())
}

pub async fn build(cli: &Cli, cmd: &BuildCmd) -> Result<()> {
    let (request, common) = request(cmd)?;
    let new = NewBuild {
        request,
        name: common.name.as_deref().map(|n| ArtifactName::parse("--name", n)).transpose()?,
        selector: common.selector.parse::<TagSelector>()?,
    };
    let api = client(cli)?;
    if cli.json && !common.detach {
        // No log to show: let the server answer once the build is over.
        let job: Job = api.post("/v1/builds?wait=600", &new).await?;
        return finish(cli, &job);
    }
    let job: Job = api.post("/v1/builds", &new).await?;
    if common.detach {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&job)?);
        } else {
            println!("build {} queued", job.id);
        }
        return Ok(());
    }
    eprintln!("build {} queued", job.id);
    print_log(&api, &job.id.to_string(), true).await?;
    let job: Job = api.get(&format!("/v1/builds/{}", job.id), &[]).await?;
    finish(cli, &job)
}

/// Shows the build; an error unless it succeeded.
fn finish(cli: &Cli, job: &Job) -> Result<()> {
    show(cli, job)?;
    if job.status != JobStatus::Succeeded {
        bail!("build {} {}", job.id, label(&job.status));
    }
    Ok(())
}

/// Prints the build's log: what is there now, or with `follow` everything until the build
/// is over (long polls).
async fn print_log(api: &ApiClient, id: &str, follow: bool) -> Result<()> {
    const PAGE: usize = 10_000;
    let mut after = 0u64;
    loop {
        let mut query = vec![("after", after.to_string()), ("limit", PAGE.to_string())];
        if follow {
            query.push(("wait", "30".to_owned()));
        }
        let page: serde_json::Value = api.get(&format!("/v1/builds/{id}/logs"), &query).await?;
        let lines: Vec<ctpf_common::BuildLogLine> =
            serde_json::from_value(page["lines"].clone()).context("reading the log page")?;
        lines.iter().for_each(print_line);
        after = page["next"].as_u64().unwrap_or(after);
        let done = if follow { page["finished"] == true } else { lines.len() < PAGE };
        if done {
            return Ok(());
        }
    }
}

fn print_line(line: &ctpf_common::BuildLogLine) {
    match line.stream {
        LogStream::Stdout => println!("{}", line.text),
        LogStream::Stderr => println!("[stderr] {}", line.text),
        LogStream::Builder => println!("[ctpf] {}", line.text),
    }
}

fn show(cli: &Cli, job: &Job) -> Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(job)?);
        return Ok(());
    }
    let recipe = match &job.spec {
        JobSpec::Build { request, .. } => request.recipe(),
        other => other.kind(),
    };
    println!("build {} ({recipe}): {}", job.id, label(&job.status));
    if let Some(error) = &job.error {
        println!("error: {error}");
    }
    if let Some(manifest) = &job.manifest {
        let how = if manifest.cached { "cache hit" } else { "built" };
        println!("key {} ({how}, build took {} ms)", manifest.key, manifest.duration_ms);
        for (tool, version) in &manifest.tools {
            println!("tool {tool}: {version}");
        }
        print(false, &manifest.outputs, &["FILE", "KIND", "SIZE", "DIGEST"], |o| {
            vec![o.file.clone(), label(&o.kind), o.size.to_string(), o.digest.to_string()]
        })?;
    }
    Ok(())
}

pub async fn builds(cli: &Cli, cmd: &BuildsCmd) -> Result<()> {
    let api = client(cli)?;
    match cmd {
        BuildsCmd::List { tags } => {
            let list: Vec<Job> = api.get("/v1/builds", &tag_query(tags)?).await?;
            print(
                cli.json,
                &list,
                &["ID", "RECIPE", "STATUS", "CACHED", "WORKER", "CREATED", "ERROR"],
                |j| {
                    let recipe = match &j.spec {
                        JobSpec::Build { request, .. } => request.recipe(),
                        other => other.kind(),
                    };
                    vec![
                        j.id.to_string(),
                        recipe.to_owned(),
                        label(&j.status),
                        j.manifest.as_ref().map_or("-".into(), |m| m.cached.to_string()),
                        or_dash(j.worker.as_ref()),
                        j.created_at.to_string(),
                        or_dash(j.error.as_ref().map(|e| e.lines().next().unwrap_or(""))),
                    ]
                },
            )
        }
        BuildsCmd::Show { id } => {
            let job: Job = api.get(&format!("/v1/builds/{id}"), &[]).await?;
            show(cli, &job)
        }
        BuildsCmd::Logs { id, follow } => print_log(&api, id, *follow).await,
        BuildsCmd::Cancel { id } => crate::cli::cancel_job(cli, &api, id).await,
    }
}
