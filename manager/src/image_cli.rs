//! `ctpf image build FILE` (an image definition to media), `ctpf image list` and
//! `ctpf image download NAME`. Building runs, over the API, the builds the media need (GRUB
//! for media, SYSLINUX: cache hits when nothing changed), then one packaging job per format;
//! each medium is stored as the artifact `NAME.EXT`.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use ctpf_common::{
    Arch, Artifact, ArtifactKind, ArtifactName, BuildManifest, BuildRequest, ImageDefinition,
    InputArtifact, Job, JobStatus, MediaFormat, NewBuild, NewPackage, PackageManifest,
    PackageRequest, TagSelector,
};
use ctpf_packagers::service::{
    EFI_ARM64, EFI_X86_64, FIRMWARE_PREFIX, INITRD, INITRD_ARM64, ISOHDPFX_BIN, ISOLINUX_BIN,
    KERNEL, KERNEL_ARM64, LDLINUX_C32,
};

use crate::cli::{Cli, client, label, print};
use crate::client::ApiClient;

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Build the media an image definition (images/*.toml) describes.
    Build {
        file: PathBuf,
        /// Write the media again even when nothing changed.
        #[arg(long)]
        no_cache: bool,
    },
    /// Media stored so far (ISOs, disk images, PXE bundles).
    List,
    /// Download a medium by name (e.g. demo.iso), checked against its digest.
    Download {
        name: String,
        /// Where to write it (default: ./NAME).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

/// Longest a build or packaging job is waited for.
const JOB_WAIT_SECS: u64 = 600;
/// File times when neither the environment nor the definition sets them: 1980-01-01, the
/// earliest date FAT can record.
const DEFAULT_EPOCH: u64 = 315_532_800;

pub async fn image(cli: &Cli, cmd: &ImageCmd) -> Result<()> {
    let api = client(cli)?;
    match cmd {
        ImageCmd::Build { file, no_cache } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let definition = ImageDefinition::from_toml(&text)
                .with_context(|| format!("image definition {}", file.display()))?;
            let media = build(&api, &cli.api, &definition, *no_cache).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&media)?);
                return Ok(());
            }
            for (name, medium) in media {
                let modes: Vec<String> = medium.boot_modes.iter().map(label).collect();
                println!(
                    "{name}: {} bytes, {}{}\n  boots: {}",
                    medium.size,
                    medium.digest,
                    if medium.cached { " (unchanged, from the cache)" } else { "" },
                    modes.join(", ")
                );
            }
            Ok(())
        }
        ImageCmd::List => {
            let artifacts: Vec<Artifact> = api.get("/v1/artifacts", &[]).await?;
            let media: Vec<Artifact> = artifacts
                .into_iter()
                .filter(|a| {
                    matches!(
                        a.kind,
                        ArtifactKind::Iso | ArtifactKind::DiskImage | ArtifactKind::PxeBundle
                    )
                })
                .collect();
            print(cli.json, &media, &["NAME", "KIND", "SIZE", "DIGEST", "CREATED"], |a| {
                vec![
                    a.name.to_string(),
                    label(&a.kind),
                    a.size.to_string(),
                    a.digest.to_string(),
                    a.created_at.to_string(),
                ]
            })
        }
        ImageCmd::Download { name, output } => {
            let name = ArtifactName::parse("name", name)?;
            let output = output.clone().unwrap_or_else(|| PathBuf::from(name.as_str()));
            let (size, digest) = crate::cli::download_artifact(&api, &name, &output).await?;
            println!("{} written: {size} bytes, {digest} verified", output.display());
            Ok(())
        }
    }
}

/// Runs the builds and packaging jobs of `definition`; returns each medium by artifact name.
async fn build(
    api: &ApiClient,
    api_url: &str,
    definition: &ImageDefinition,
    no_cache: bool,
) -> Result<BTreeMap<String, PackageManifest>> {
    let arches = definition.arches();
    let kernel_words = kernel_words(api, api_url, definition).await?;
    let source_date_epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(value) => value.trim().parse().context("SOURCE_DATE_EPOCH is not a number")?,
        Err(_) => DEFAULT_EPOCH,
    };
    let artifacts: BTreeMap<String, InputArtifact> = api
        .get::<Vec<Artifact>>("/v1/artifacts", &[])
        .await?
        .into_iter()
        .map(|a| (a.name.to_string(), InputArtifact { digest: a.digest, size: a.size }))
        .collect();
    let stored = |name: String| {
        artifacts.get(&name).copied().with_context(|| format!("no artifact named {name}"))
    };
    // Each architecture's kernel and initrd: the definition's (one architecture only) or
    // ctpf's discovery image.
    let mut kernels = Vec::new();
    for &arch in &arches {
        let kernel = match &definition.artifacts.kernel {
            Some(name) => stored(name.to_string())?,
            None => stored(format!("discovery-{}-vmlinuz", arch.as_str()))?,
        };
        let initrd = match &definition.artifacts.initrd {
            Some(name) => stored(name.to_string())?,
            None => stored(format!("discovery-{}-initrd", arch.as_str()))?,
        };
        kernels.push((arch, kernel, initrd));
    }
    let (_, kernel, initrd) = kernels[0];

    let mut media = BTreeMap::new();
    for &format in &definition.formats {
        let mut inputs = BTreeMap::new();
        match format {
            MediaFormat::Iso | MediaFormat::Usb => {
                inputs.insert(KERNEL.to_owned(), kernel);
                inputs.insert(INITRD.to_owned(), initrd);
                if let [_, (Arch::Arm64, kernel, initrd)] = kernels.as_slice() {
                    inputs.insert(KERNEL_ARM64.to_owned(), *kernel);
                    inputs.insert(INITRD_ARM64.to_owned(), *initrd);
                }
                for &arch in &arches {
                    let (target, role) = match arch {
                        Arch::X86_64 => ("x86_64-efi", EFI_X86_64),
                        Arch::Arm64 => ("arm64-efi", EFI_ARM64),
                    };
                    let grub = run_build(
                        api,
                        BuildRequest::Grub {
                            target: target.into(),
                            config: Some(ctpf_packagers::media::GRUB_EMBEDDED_CONFIG.into()),
                            chain_ipxe: false,
                        },
                    )
                    .await?;
                    inputs.insert(role.to_owned(), output(&grub, "")?);
                }
                let bios = definition.boot.bios && arches.contains(&Arch::X86_64);
                if format == MediaFormat::Iso && bios {
                    let syslinux = run_build(api, BuildRequest::Syslinux {}).await?;
                    inputs.insert(ISOLINUX_BIN.to_owned(), output(&syslinux, "isolinux.bin")?);
                    inputs.insert(LDLINUX_C32.to_owned(), output(&syslinux, "ldlinux.c32")?);
                    inputs.insert(ISOHDPFX_BIN.to_owned(), output(&syslinux, "isohdpfx.bin")?);
                }
            }
            MediaFormat::PxeBundle => {
                for (arch, kernel, initrd) in &kernels {
                    let dir = format!("discovery/{}", arch.as_str());
                    inputs.insert(format!("{dir}/vmlinuz"), *kernel);
                    inputs.insert(format!("{dir}/initrd"), *initrd);
                }
                let discovery_files = inputs.len();
                let loaders = crate::boot_artifacts::HTTP_BOOT_FILES;
                for file in loaders {
                    let name = crate::boot_artifacts::boot_file_artifact(file);
                    if let Some(input) = artifacts.get(&name) {
                        inputs.insert((*file).to_owned(), *input);
                    }
                }
                if inputs.len() == discovery_files {
                    let names: Vec<String> = loaders
                        .iter()
                        .map(|f| crate::boot_artifacts::boot_file_artifact(f))
                        .collect();
                    bail!(
                        "a PXE bundle needs boot loaders, and none of {} is stored (`ctpf up \
                         --boot-interface` stores them; or `ctpf artifacts push FILE --name \
                         boot-ipxe.efi --kind bootloader`)",
                        names.join(", ")
                    );
                }
            }
            MediaFormat::Raspi => {
                let raspi = definition.raspi.as_ref().context("no [raspi] section")?;
                inputs.insert(KERNEL.to_owned(), kernel);
                inputs.insert(INITRD.to_owned(), initrd);
                let request = BuildRequest::RaspiFirmware {
                    firmware: raspi.firmware.clone(),
                    linux: raspi.linux.clone(),
                };
                for output in run_build(api, request).await?.outputs {
                    let input = InputArtifact { digest: output.digest, size: output.size };
                    inputs.insert(format!("{FIRMWARE_PREFIX}{}", output.file), input);
                }
            }
        }
        let request = PackageRequest {
            format,
            label: definition.label(),
            inputs,
            kernel_words: if format == MediaFormat::PxeBundle {
                Vec::new()
            } else {
                kernel_words.clone()
            },
            source_date_epoch,
        };
        let name = definition.artifact_name(format);
        eprintln!("packaging {name} ({format})");
        let new = NewPackage {
            request,
            name: Some(name.clone()),
            no_cache,
            selector: TagSelector::any(),
        };
        let job: Job = api
            .post(&format!("/v1/packages?wait={JOB_WAIT_SECS}"), &new)
            .await
            .with_context(|| format!("packaging {name}"))?;
        let job = finished(job, &format!("packaging {name}"))?;
        let manifest = job.package.context("the packaging job succeeded without a manifest")?;
        media.insert(name.to_string(), manifest);
    }
    Ok(media)
}

/// The discovery kernel's words on media: the definition's own, then where the manager is
/// and the media key's secret.
async fn kernel_words(
    api: &ApiClient,
    api_url: &str,
    definition: &ImageDefinition,
) -> Result<Vec<String>> {
    let Some(key_name) = &definition.boot.media_key else {
        return Ok(Vec::new()); // Only PXE bundles (checked when parsed), which need no key.
    };
    let key: serde_json::Value =
        api.get(&format!("/v1/media-keys/{key_name}"), &[]).await.with_context(|| {
            format!("media key {key_name} (create it with `ctpf media-keys create`)")
        })?;
    if !key["revoked_at"].is_null() {
        bail!("media key {key_name} is revoked; name another in boot.media_key");
    }
    let secret = key["secret"].as_str().context("the media key has no secret")?;
    let url = definition.boot.manager_url.as_deref().unwrap_or(api_url);
    let url = if url.ends_with('/') { url.to_owned() } else { format!("{url}/") };
    let mut words = definition.boot.kernel_cmdline.clone();
    words.push(format!("ctpf.url={url}"));
    words.push(format!("ctpf.token={secret}"));
    ctpf_packagers::media::check_kernel_words(&words)
        .context("boot.kernel_cmdline or boot.manager_url")?;
    Ok(words)
}

/// Submits a build and waits for it (a cache hit answers at once).
async fn run_build(api: &ApiClient, request: BuildRequest) -> Result<BuildManifest> {
    let what = format!("{} build", request.recipe());
    let new = NewBuild { request, name: None, selector: TagSelector::any() };
    let job: Job = api
        .post(&format!("/v1/builds?wait={JOB_WAIT_SECS}"), &new)
        .await
        .with_context(|| what.clone())?;
    let job = finished(job, &what)?;
    let manifest = job.manifest.context("the build succeeded without a manifest")?;
    eprintln!(
        "{what}: {}",
        if manifest.cached {
            "cached".to_owned()
        } else {
            format!("built in {} ms", manifest.duration_ms)
        }
    );
    Ok(manifest)
}

fn finished(job: Job, what: &str) -> Result<Job> {
    match job.status {
        JobStatus::Succeeded => Ok(job),
        status if status.is_final() => {
            bail!("{what} {}: {}", status.label(), job.error.as_deref().unwrap_or("no details"))
        }
        _ => bail!("{what}: still {} after {JOB_WAIT_SECS} s (job {})", job.status.label(), job.id),
    }
}

/// The output `file` of a build (`""`: its only output).
fn output(manifest: &BuildManifest, file: &str) -> Result<InputArtifact> {
    let found = if file.is_empty() {
        manifest.outputs.first()
    } else {
        manifest.outputs.iter().find(|o| o.file == file)
    };
    let output = found.with_context(|| format!("the {} build made no {file}", manifest.recipe))?;
    Ok(InputArtifact { digest: output.digest, size: output.size })
}
