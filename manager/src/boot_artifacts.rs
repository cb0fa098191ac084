//! Keeping what booting machines download in the artifact store current, so it is served
//! with HEAD, Range and ETag like any artifact: the iPXE binaries of the boot root (for UEFI
//! HTTP boot), and the discovery image. For the latter the control plane resolves the inputs
//! on start, and builds and stores the kernel and initramfs only when their build key differs
//! from the stored one (issue 4 turns this into a builder job).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::Args;
use ctpf_builders::{DiscoveryPlan, DiscoverySources};
use ctpf_common::{Artifact, ArtifactKind, ArtifactName, Sha256Digest, Tag, Tags};
use ctpf_registries::{Registry, RegistryError};
use ctpf_store::artifacts::ArtifactStore;
use time::OffsetDateTime;

/// Tag on the stored discovery artifacts naming the inputs they were built from.
const BUILD_KEY_TAG: &str = "build-key";
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

/// Makes `discovery-x86_64-vmlinuz` and `discovery-x86_64-initrd` match `sources`: a no-op
/// (hashing the inputs only) when the stored ones carry the same build key.
pub async fn ensure(
    registry: &Registry,
    artifacts: &dyn ArtifactStore,
    sources: DiscoverySources,
) -> Result<()> {
    let resolve = sources.clone();
    let plan = tokio::task::spawn_blocking(move || DiscoveryPlan::resolve(&resolve))
        .await?
        .context("discovery image inputs")?;
    // 128 bits of the key: a tag value holds at most 63 characters.
    let key_text = &plan.key.hex()[..32];
    let key_tag = Tag::parse("build-key", &format!("{BUILD_KEY_TAG}={key_text}"))?;
    let kernel_name = format!("discovery-{ARCH}-vmlinuz");
    let initrd_name = format!("discovery-{ARCH}-initrd");
    if is_current(registry, &kernel_name, &key_tag).await?
        && is_current(registry, &initrd_name, &key_tag).await?
    {
        tracing::info!(key = key_text, "discovery image is current");
        return Ok(());
    }
    if !plan.missing_modules.is_empty() {
        tracing::info!(modules = ?plan.missing_modules, "NIC drivers this kernel lacks");
    }
    let started = std::time::Instant::now();
    let epoch =
        ctpf_builders::parse_source_date_epoch(std::env::var("SOURCE_DATE_EPOCH").ok().as_deref())?;
    let initrd_file = tempfile::NamedTempFile::new().context("temporary file for the initrd")?;
    let (build_plan, build_sources, out) = (plan.clone(), sources, initrd_file.reopen()?);
    let built = tokio::task::spawn_blocking(move || {
        build_plan.build_initrd(&build_sources, epoch, std::io::BufWriter::new(out))
    })
    .await?
    .context("building the discovery initramfs")?;

    let tags: Tags = [key_tag.clone()].into_iter().collect();
    store(registry, artifacts, &kernel_name, &plan.kernel, ArtifactKind::Kernel, &tags).await?;
    store(registry, artifacts, &initrd_name, initrd_file.path(), ArtifactKind::Initrd, &tags)
        .await?;
    tracing::info!(
        kernel = plan.kernel_version,
        modules = plan.modules.len(),
        initrd_bytes = built.compressed_size,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "discovery image built"
    );
    Ok(())
}

async fn is_current(registry: &Registry, name: &str, key: &Tag) -> Result<bool> {
    match registry.artifact(name).await {
        Ok(artifact) => Ok(artifact.tags.iter().any(|tag| &tag == key)),
        Err(RegistryError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
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
pub const HTTP_BOOT_FILES: &[&str] =
    &["ipxe.efi", "ipxe-arm64.efi", "undionly.kpxe", "grubx64.efi", "grubaa64.efi", "core.0"];

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

/// Builds the GRUB boot images (`--pxe-loader grub`) with the entry config for `base_url`
/// embedded, and stores them as `boot-FILE` like the iPXE files. grub-mkimage takes a
/// fraction of a second and is reproducible, so they are made on every start; unchanged
/// bytes land on the same digest. arm64 is built only where its modules are installed.
pub async fn build_grub_images(
    registry: &Registry,
    artifacts: &dyn ArtifactStore,
    base_url: &ctpf_scripts::BaseUrl,
) -> Result<BTreeMap<String, Sha256Digest>> {
    use ctpf_builders::grub::{GrubError, GrubImageRequest, GrubTarget, build_image};
    let mut stored = BTreeMap::new();
    for (target, arch) in [
        (GrubTarget::X86_64Efi, ctpf_scripts::ScriptArch::X86_64Efi),
        (GrubTarget::I386PcPxe, ctpf_scripts::ScriptArch::X86_64Bios),
        (GrubTarget::Arm64Efi, ctpf_scripts::ScriptArch::Arm64Efi),
    ] {
        let config = ctpf_scripts::render_grub_entry(base_url, arch)?;
        let request = GrubImageRequest::new(target, config);
        let dir = tempfile::tempdir().context("a build directory")?;
        let cancel = tokio_util::sync::CancellationToken::new();
        let log = |line: ctpf_builders::process::LogLine| {
            tracing::debug!(target = target.format(), "{}", line.text);
        };
        let image = match build_image(&request, dir.path(), cancel, log).await {
            Ok(image) => image,
            Err(GrubError::MissingModules { .. }) if target == GrubTarget::Arm64Efi => {
                tracing::info!(
                    "no arm64 GRUB modules (grub-efi-arm64-bin); arm64 PXE clients get no image"
                );
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let file = target.file_name();
        let tags = Tags::default();
        let artifact = store(
            registry,
            artifacts,
            &boot_file_artifact(file),
            &image.path,
            ArtifactKind::Bootloader,
            &tags,
        )
        .await?;
        tracing::info!(file, digest = %artifact.digest, bytes = artifact.size, "GRUB image built");
        stored.insert(file.to_owned(), artifact.digest);
    }
    Ok(stored)
}
