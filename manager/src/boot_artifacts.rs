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
    Artifact, ArtifactKind, ArtifactName, BuildRequest, Job, NewBuild, Sha256Digest, TagSelector,
    Tags, Uuid,
};
use ctpf_registries::Registry;
use ctpf_store::artifacts::ArtifactStore;
use time::OffsetDateTime;
/// The architecture of the discovery image this build makes (the agent's and kernel's).
const ARCH: &str = "x86_64";

#[derive(Debug, Clone, Args)]
pub struct DiscoveryArgs {
    /// An unpacked Debian linux-image package (dpkg -x) whose kernel and NIC drivers the
    /// discovery image uses (default: / when it has /boot/vmlinuz-* and /lib/modules).
    #[arg(long, env = "CTPF_DISCOVERY_LINUX")]
    pub discovery_linux: Option<PathBuf>,
    /// A static busybox for the discovery initramfs.
    #[arg(long, env = "CTPF_DISCOVERY_BUSYBOX", default_value = "/bin/busybox")]
    pub discovery_busybox: PathBuf,
    /// The static discovery agent (default: ctpf-agent beside the ctpf binary).
    #[arg(long, env = "CTPF_DISCOVERY_AGENT")]
    pub discovery_agent: Option<PathBuf>,
    /// Extra kernel parameters for discovery boots, e.g. console=ttyS0.
    #[arg(long, env = "CTPF_DISCOVERY_CMDLINE", default_value = "")]
    pub discovery_cmdline: String,
}

impl DiscoveryArgs {
    /// Whether the operator named an input: then missing inputs are an error at start, not
    /// a warning (a typo must not leave a site silently unable to enroll machines).
    pub fn asked_for(&self) -> bool {
        self.discovery_linux.is_some() || self.discovery_agent.is_some()
    }

    /// The inputs, or why there are none (then discovery boots get a 404 and ctpf says so).
    pub fn sources(&self) -> Result<DiscoverySources, String> {
        let linux_root = match &self.discovery_linux {
            Some(root) => root.clone(),
            None if has_kernel(Path::new("/")) => PathBuf::from("/"),
            None => {
                return Err("no kernel: pass --discovery-linux DIR (an unpacked Debian \
                            linux-image package)"
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
        Ok(DiscoverySources { linux_root, busybox: self.discovery_busybox.clone(), agent })
    }
}

fn has_kernel(root: &Path) -> bool {
    let kernels = std::fs::read_dir(root.join("boot")).into_iter().flatten().flatten();
    let has_vmlinuz =
        kernels.into_iter().any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"));
    has_vmlinuz && root.join("lib/modules").is_dir()
}

/// The build request for the discovery image from these inputs.
pub fn discovery_request(sources: &DiscoverySources) -> BuildRequest {
    BuildRequest::Discovery {
        linux: absolute(&sources.linux_root),
        busybox: absolute(&sources.busybox),
        agent: absolute(&sources.agent),
    }
}

fn absolute(path: &Path) -> String {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned()).display().to_string()
}

/// The artifact name prefix of the discovery image: its outputs become
/// `discovery-x86_64-vmlinuz` and `discovery-x86_64-initrd`.
pub fn discovery_name() -> ArtifactName {
    ArtifactName::parse("name", &format!("discovery-{ARCH}")).expect("a valid constant name")
}

/// Submits the discovery image build. The builder answers from its cache when the inputs'
/// key was built before, so an unchanged image costs only the hashing.
pub async fn submit_discovery(registry: &Registry, sources: &DiscoverySources) -> Result<Job> {
    let build = NewBuild {
        request: discovery_request(sources),
        name: Some(discovery_name()),
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
