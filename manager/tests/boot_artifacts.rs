//! The discovery image and boot loaders kept current in the artifact store: built on first
//! start, left alone while the inputs are unchanged, rebuilt when one changes.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{fs, path::Path, sync::Arc, time::Duration};

use ctpf_builders::DiscoverySources;
use ctpf_bus::{BusConfig, MemoryBus};
use ctpf_common::{Arch, Role, WorkerIdentity};
use ctpf_distributors::jobs::WorkerConfig;
use ctpf_manager::boot_artifacts::{import_boot_files, submit_discovery, wait_for_job};
use ctpf_manager::server::{ingest_reports, open_builder};
use ctpf_registries::Registry;
use ctpf_store::artifacts::ArtifactStore as _;
use ctpf_store::{artifacts::FsArtifactStore, state::RedbStateStore};
use tokio_util::sync::CancellationToken;

/// A minimal static ELF for `arch` (one PT_LOAD program header), which is what the recipe
/// accepts for busybox and the agent.
fn static_elf(arch: Arch, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0u8; 64 + 56];
    bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
    let machine: u16 = if arch == Arch::Arm64 { 183 } else { 62 };
    bytes[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
    bytes[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    bytes[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    bytes[64..68].copy_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// The headers the recipe reads a kernel's architecture from: x86's setup header, arm64's
/// Image magic.
fn kernel(arch: Arch) -> Vec<u8> {
    let mut bytes = vec![0u8; 0x400];
    match arch {
        Arch::X86_64 => bytes[0x202..0x206].copy_from_slice(b"HdrS"),
        Arch::Arm64 => bytes[0x38..0x3c].copy_from_slice(b"ARM\x64"),
    }
    bytes
}

/// A kernel package for `arch` as `dpkg -x` leaves it, with one NIC driver, plus busybox and
/// an agent, in `dir/ARCH`.
fn inputs_for(dir: &Path, arch: Arch) -> DiscoverySources {
    let dir = dir.join(arch.as_str());
    let linux = dir.join("linux");
    let modules = linux.join("lib/modules/6.1.0-test/kernel/drivers/net");
    fs::create_dir_all(&modules).unwrap();
    let mut module = static_elf(arch, b"");
    module.extend_from_slice(b"\0depends=\0");
    fs::write(modules.join("virtio_net.ko"), module).unwrap();
    fs::create_dir_all(linux.join("boot")).unwrap();
    fs::write(linux.join("boot/vmlinuz-6.1.0-test"), kernel(arch)).unwrap();
    fs::write(dir.join("busybox"), static_elf(arch, b"busybox")).unwrap();
    fs::write(dir.join("agent"), static_elf(arch, b"agent v1")).unwrap();
    DiscoverySources {
        linux_root: linux,
        busybox: dir.join("busybox"),
        agent: dir.join("agent"),
        arch: Some(arch),
    }
}

fn inputs(dir: &Path) -> DiscoverySources {
    inputs_for(dir, Arch::X86_64)
}

/// A control plane's pieces in one process: registry, in-process bus, a worker with the
/// builder role and the report loop, as `ctpf up` wires them.
struct Plane {
    registry: Registry,
    artifacts: Arc<FsArtifactStore>,
    stop: CancellationToken,
}

impl Plane {
    async fn start(dir: &Path) -> Self {
        let state = Arc::new(RedbStateStore::open(&dir.join("state.redb")).unwrap());
        let artifacts = Arc::new(FsArtifactStore::open(dir.join("artifacts")).await.unwrap());
        let bus = Arc::new(MemoryBus::new(BusConfig::default()));
        let registry = Registry::new(state, bus.clone());
        let stop = CancellationToken::new();
        let builder = open_builder(dir, artifacts.clone()).unwrap();
        let identity = WorkerIdentity {
            id: "test-builder".into(),
            datacenter: "local".parse().unwrap(),
            tags: Default::default(),
            roles: vec![Role::Builder],
        };
        let mut config = WorkerConfig::new(identity, Duration::from_secs(30), Some(builder));
        config.poll = Duration::from_millis(100);
        tokio::spawn(ctpf_distributors::jobs::run(config, bus, stop.clone()));
        tokio::spawn(ingest_reports(registry.clone(), "test".into(), stop.clone()));
        Self { registry, artifacts, stop }
    }

    async fn discovery(&self, sources: &DiscoverySources) -> ctpf_common::Job {
        let arch = sources.arch.unwrap();
        let job = submit_discovery(&self.registry, arch, sources).await.unwrap();
        wait_for_job(&self.registry, job.id, Duration::from_secs(60)).await.unwrap()
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test]
async fn the_discovery_image_is_rebuilt_only_when_an_input_changes() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(dir.path()).await;
    let sources = inputs(dir.path());

    let job = plane.discovery(&sources).await;
    let manifest = job.manifest.unwrap();
    assert!(!manifest.cached);
    let kernel = plane.registry.artifact("discovery-x86_64-vmlinuz").await.unwrap();
    let initrd = plane.registry.artifact("discovery-x86_64-initrd").await.unwrap();
    assert_eq!(kernel.size, 0x400);
    assert_eq!(manifest.inputs["arch"], "x86_64");
    assert!(initrd.tags.iter().any(|t| t.to_string().starts_with("build-key=")), "{initrd:?}");

    // Unchanged inputs: a cache hit, and the stored records are not touched.
    let again = plane.discovery(&sources).await.manifest.unwrap();
    assert!(again.cached);
    assert_eq!(again.outputs, manifest.outputs);
    let record = plane.registry.artifact("discovery-x86_64-initrd").await.unwrap();
    assert_eq!(record.created_at, initrd.created_at);

    // A new agent: a new initrd, same reproducible kernel.
    fs::write(sources.agent.clone(), static_elf(Arch::X86_64, b"agent v2")).unwrap();
    let rebuilt = plane.discovery(&sources).await.manifest.unwrap();
    assert!(!rebuilt.cached);
    let record = plane.registry.artifact("discovery-x86_64-initrd").await.unwrap();
    assert_ne!(record.digest, initrd.digest);
    assert_eq!(
        plane.registry.artifact("discovery-x86_64-vmlinuz").await.unwrap().digest,
        kernel.digest
    );
    assert!(plane.artifacts.stat(&record.digest).await.unwrap().is_some());
}

#[tokio::test]
async fn an_arm64_image_is_built_beside_the_x86_64_one_and_mixed_parts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(dir.path()).await;
    let (x86, arm64) = (inputs(dir.path()), inputs_for(dir.path(), Arch::Arm64));
    let built = plane.discovery(&arm64).await.manifest.unwrap();
    assert_eq!(built.inputs["arch"], "arm64");
    plane.discovery(&x86).await.manifest.unwrap();
    let arm64_kernel = plane.registry.artifact("discovery-arm64-vmlinuz").await.unwrap();
    let x86_kernel = plane.registry.artifact("discovery-x86_64-vmlinuz").await.unwrap();
    assert_ne!(arm64_kernel.digest, x86_kernel.digest);
    assert!(plane.registry.artifact("discovery-arm64-initrd").await.is_ok());

    // An x86_64 busybox in the arm64 image; an arm64 kernel where x86_64 was asked for.
    let mixed = DiscoverySources { busybox: x86.busybox.clone(), ..arm64.clone() };
    let job = plane.discovery(&mixed).await;
    let error = job.error.unwrap();
    assert!(error.contains("busybox") && error.contains("is for x86_64"), "{error}");
    assert!(error.contains("vmlinuz-6.1.0-test is for arm64"), "{error}");
    let swapped = DiscoverySources { arch: Some(Arch::X86_64), ..arm64.clone() };
    let error = plane.discovery(&swapped).await.error.unwrap();
    assert!(error.contains("is for arm64, but this discovery image is for x86_64"), "{error}");
    // Neither failure touched the stored images.
    let again = plane.registry.artifact("discovery-arm64-vmlinuz").await.unwrap();
    assert_eq!(again.digest, arm64_kernel.digest);
}

#[tokio::test]
async fn missing_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(dir.path()).await;
    let mut sources = inputs(dir.path());
    sources.agent = dir.path().join("no-such-agent");
    let job = plane.discovery(&sources).await;
    assert_eq!(job.status, ctpf_common::JobStatus::Failed);
    let error = job.error.unwrap();
    assert!(error.contains("no-such-agent"), "{error}");
}

#[tokio::test]
async fn boot_files_are_stored_through_links_and_absent_ones_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(RedbStateStore::open(&dir.path().join("state.redb")).unwrap());
    let artifacts = FsArtifactStore::open(dir.path().join("artifacts")).await.unwrap();
    let registry = Registry::new(state, Arc::new(MemoryBus::new(BusConfig::default())));
    let root = dir.path().join("boot");
    fs::create_dir(&root).unwrap();
    fs::write(dir.path().join("real-ipxe.efi"), b"MZ efi").unwrap();
    // Debian's /usr/lib/ipxe/ipxe.efi is a link to /boot/ipxe.efi.
    std::os::unix::fs::symlink(dir.path().join("real-ipxe.efi"), root.join("ipxe.efi")).unwrap();
    fs::write(root.join("undionly.kpxe"), b"pxe").unwrap();

    let files = import_boot_files(&registry, &artifacts, &root).await.unwrap();
    assert_eq!(files.keys().map(String::as_str).collect::<Vec<_>>(), ["ipxe.efi", "undionly.kpxe"]);
    assert_eq!(registry.artifact("boot-ipxe.efi").await.unwrap().size, 6);
    assert!(registry.artifact("boot-ipxe-arm64.efi").await.is_err());
}
