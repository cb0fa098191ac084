//! Keeping what booting machines download in the artifact store current, so it is served
//! with HEAD, Range and ETag like any artifact: the iPXE binaries of the boot root (for UEFI
//! HTTP boot), and, as build jobs, the discovery image and the GRUB boot images. A builder
//! answers an unchanged job from its cache, so a restart costs only hashing the inputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use ctpf_builders::DiscoverySources;
use ctpf_common::{
    Arch, Artifact, ArtifactKind, ArtifactName, BuildRequest, Job, NewBuild, Sha256Digest,
    TagSelector, Tags, Uuid,
};
use ctpf_registries::Registry;
use ctpf_store::artifacts::ArtifactStore;
use time::OffsetDateTime;
/// Inputs of the discovery images: one per architecture. The x86_64 one falls back to this
/// machine's own kernel, busybox and a `ctpf-agent` beside ctpf; the arm64 one is built only
/// when its inputs are named, and then needs all three.
#[derive(Debug, Clone, Args)]
pub struct DiscoveryArgs {
    /// An unpacked Debian linux-image-*-amd64 package (dpkg -x) whose kernel and NIC drivers
    /// the x86_64 discovery image uses (default: / on an x86_64 machine with /boot/vmlinuz-*
    /// and /lib/modules).
    #[arg(long, env = "CTPF_DISCOVERY_LINUX")]
    pub discovery_linux: Option<PathBuf>,
    /// A static x86_64 busybox for the discovery initramfs.
    #[arg(long, env = "CTPF_DISCOVERY_BUSYBOX", default_value = "/bin/busybox")]
    pub discovery_busybox: PathBuf,
    /// The static x86_64 discovery agent (default: ctpf-agent beside the ctpf binary).
    #[arg(long, env = "CTPF_DISCOVERY_AGENT")]
    pub discovery_agent: Option<PathBuf>,
    /// An unpacked Debian linux-image-*-arm64 package with its modules: builds the arm64
    /// discovery image (discovery-arm64-*) too, from this and the two flags below.
    #[arg(long, env = "CTPF_DISCOVERY_LINUX_ARM64")]
    pub discovery_linux_arm64: Option<PathBuf>,
    /// A static arm64 busybox (bin/busybox of Debian's busybox-static:arm64, unpacked).
    #[arg(long, env = "CTPF_DISCOVERY_BUSYBOX_ARM64")]
    pub discovery_busybox_arm64: Option<PathBuf>,
    /// The discovery agent built for aarch64-unknown-linux-musl.
    #[arg(long, env = "CTPF_DISCOVERY_AGENT_ARM64")]
    pub discovery_agent_arm64: Option<PathBuf>,
    /// Extra kernel parameters for discovery boots, e.g. console=ttyS0.
    #[arg(long, env = "CTPF_DISCOVERY_CMDLINE", default_value = "")]
    pub discovery_cmdline: String,
}

impl DiscoveryArgs {
    /// Whether the operator named an x86_64 input: then missing inputs are an error at start,
    /// not a warning (a typo must not leave a site silently unable to enroll machines).
    pub fn asked_for(&self) -> bool {
        self.discovery_linux.is_some() || self.discovery_agent.is_some()
    }

    /// The x86_64 inputs, or why there are none (then discovery boots get a 404 and ctpf
    /// says so).
    pub fn sources(&self) -> Result<DiscoverySources, String> {
        let linux_root = match &self.discovery_linux {
            Some(root) => root.clone(),
            // This machine's own kernel only when it is an x86_64 one.
            None if std::env::consts::ARCH == "x86_64" && has_kernel(Path::new("/")) => {
                PathBuf::from("/")
            }
            None => {
                return Err("no kernel: pass --discovery-linux DIR (an unpacked Debian \
                            linux-image-*-amd64 package)"
                    .into());
            }
        };
        let agent = match &self.discovery_agent {
            Some(agent) => agent.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| Some(exe.parent()?.join("ctpf-agent")))
                .filter(|agent| agent.is_file())
                .ok_or("no agent: pass --discovery-agent PATH (ctpf-agent, built for musl)")?,
        };
        Ok(DiscoverySources {
            linux_root,
            busybox: self.discovery_busybox.clone(),
            agent,
            arch: Some(Arch::X86_64),
        })
    }

    /// The arm64 inputs: `None` when none is named; all three when one is, or an error
    /// naming the missing flags.
    pub fn arm64_sources(&self) -> Result<Option<DiscoverySources>, String> {
        let flags = [
            ("--discovery-linux-arm64", &self.discovery_linux_arm64),
            ("--discovery-busybox-arm64", &self.discovery_busybox_arm64),
            ("--discovery-agent-arm64", &self.discovery_agent_arm64),
        ];
        let missing: Vec<&str> =
            flags.iter().filter(|(_, value)| value.is_none()).map(|(flag, _)| *flag).collect();
        match (
            &self.discovery_linux_arm64,
            &self.discovery_busybox_arm64,
            &self.discovery_agent_arm64,
        ) {
            (Some(linux), Some(busybox), Some(agent)) => Ok(Some(DiscoverySources {
                linux_root: linux.clone(),
                busybox: busybox.clone(),
                agent: agent.clone(),
                arch: Some(Arch::Arm64),
            })),
            (None, None, None) => Ok(None),
            _ => Err(format!("the arm64 discovery image also needs {}", missing.join(" and "))),
        }
    }
}

fn has_kernel(root: &Path) -> bool {
    let kernels = std::fs::read_dir(root.join("boot")).into_iter().flatten().flatten();
    let has_vmlinuz =
        kernels.into_iter().any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"));
    has_vmlinuz && root.join("lib/modules").is_dir()
}

/// The build request for the discovery image of `arch` from these inputs (the builder
/// refuses a kernel of another architecture, and parts that do not match the kernel).
pub fn discovery_request(arch: Arch, sources: &DiscoverySources) -> BuildRequest {
    BuildRequest::Discovery {
        linux: absolute(&sources.linux_root),
        busybox: absolute(&sources.busybox),
        agent: absolute(&sources.agent),
        arch: Some(arch),
    }
}

fn absolute(path: &Path) -> String {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned()).display().to_string()
}

/// The artifact name prefix of the discovery image for `arch`: its outputs become
/// `discovery-ARCH-vmlinuz` and `discovery-ARCH-initrd`, which `/boot/discovery/ARCH/` serves.
pub fn discovery_name(arch: Arch) -> ArtifactName {
    ArtifactName::parse("name", &format!("discovery-{arch}")).expect("a valid constant name")
}

/// Submits the discovery image build for `arch`. The builder answers from its cache when the
/// inputs' key was built before, so an unchanged image costs only the hashing.
pub async fn submit_discovery(
    registry: &Registry,
    arch: Arch,
    sources: &DiscoverySources,
) -> Result<Job> {
    let build = NewBuild {
        request: discovery_request(arch, sources),
        name: Some(discovery_name(arch)),
        selector: TagSelector::any(),
    };
    Ok(registry.submit_build(build).await?)
}

/// Waits until job `id` is final, up to `timeout`.
pub async fn wait_for_job(registry: &Registry, id: Uuid, timeout: Duration) -> Result<Job> {
    let job = registry.wait_until_final(id, tokio::time::Instant::now() + timeout).await?;
    if !job.status.is_final() {
        bail!("job {id} still {:?} after {timeout:?}", job.status);
    }
    Ok(job)
}

async fn store(
    registry: &Registry,
    artifacts: &dyn ArtifactStore,
    name: &str,
    path: &Path,
    kind: ArtifactKind,
    tags: &Tags,
) -> Result<Artifact> {
    let file =
        tokio::fs::File::open(path).await.with_context(|| format!("opening {}", path.display()))?;
    let info = artifacts.put(Box::pin(file), None).await?;
    let artifact = Artifact {
        name: ArtifactName::parse("name", name)?,
        digest: info.digest,
        kind,
        size: info.size,
        tags: tags.clone(),
        created_at: OffsetDateTime::now_utc(),
    };
    registry.record_artifact(&artifact).await?;
    Ok(artifact)
}

/// Boot loader files UEFI HTTP boot fetches by URL (the DHCP answer names them), stored as
/// artifacts `boot-FILE`.
pub const HTTP_BOOT_FILES: &[&str] = &[
    "ipxe.efi",
    "ipxe-arm64.efi",
    "undionly.kpxe",
    "ipxe.lkrn",
    "grubx64.efi",
    "grubaa64.efi",
    "core.0",
];

/// The artifact name of an HTTP boot file.
pub fn boot_file_artifact(file: &str) -> String {
    format!("boot-{file}")
}

/// Stores each of [`HTTP_BOOT_FILES`] found in `boot_root` (the TFTP root), so HTTP boot and
/// TFTP serve the same bytes, by digest (links in the root, like Debian's
/// `ipxe.efi -> /boot/ipxe.efi`, are read here by the operator's choice of root, while TFTP
/// itself never follows a link out of the root). Absent files are skipped: not every site has
/// an arm64 iPXE. Returns file name to digest.
pub async fn import_boot_files(
    registry: &Registry,
    artifacts: &dyn ArtifactStore,
    boot_root: &Path,
) -> Result<BTreeMap<String, Sha256Digest>> {
    let mut stored = BTreeMap::new();
    for file in HTTP_BOOT_FILES {
        let path = boot_root.join(file);
        if !path.is_file() {
            continue;
        }
        let tags = Tags::default();
        let artifact = store(
            registry,
            artifacts,
            &boot_file_artifact(file),
            &path,
            ArtifactKind::Bootloader,
            &tags,
        )
        .await?;
        stored.insert((*file).to_owned(), artifact.digest);
    }
    Ok(stored)
}

/// Builds the GRUB boot images (`--pxe-loader grub`) as build jobs, with the entry config
/// for `base_url` embedded; they are named `boot-FILE` like the iPXE files. An unchanged
/// config is a cache hit. arm64 is built only where its modules are installed.
pub async fn build_grub_images(
    registry: &Registry,
    base_url: &ctpf_scripts::BaseUrl,
) -> Result<BTreeMap<String, Sha256Digest>> {
    use ctpf_builders::grub::GrubTarget;
    let mut jobs = Vec::new();
    for (target, arch) in [
        (GrubTarget::X86_64Efi, ctpf_scripts::ScriptArch::X86_64Efi),
        (GrubTarget::I386PcPxe, ctpf_scripts::ScriptArch::X86_64Bios),
        (GrubTarget::Arm64Efi, ctpf_scripts::ScriptArch::Arm64Efi),
    ] {
        let config = ctpf_scripts::render_grub_entry(base_url, arch)?;
        let request = BuildRequest::Grub {
            target: target.format().into(),
            config: Some(config),
            chain_ipxe: false,
        };
        let name = Some(ArtifactName::parse("name", "boot")?);
        let job =
            registry.submit_build(NewBuild { request, name, selector: TagSelector::any() }).await?;
        jobs.push((target, job.id));
    }
    let mut stored = BTreeMap::new();
    for (target, id) in jobs {
        let job = wait_for_job(registry, id, Duration::from_secs(600)).await?;
        let Some(manifest) = job.manifest else {
            let error = job.error.unwrap_or_default();
            if target == GrubTarget::Arm64Efi && error.contains("grub-efi-arm64-bin") {
                tracing::info!(
                    "no arm64 GRUB modules (grub-efi-arm64-bin); arm64 PXE clients get no image"
                );
                continue;
            }
            bail!("GRUB {} image: {error}", target.format());
        };
        for output in manifest.outputs {
            tracing::info!(file = output.file, digest = %output.digest, bytes = output.size, cached = manifest.cached, "GRUB image ready");
            stored.insert(output.file, output.digest);
        }
    }
    Ok(stored)
}
