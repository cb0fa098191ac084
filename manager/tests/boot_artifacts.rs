//! The discovery image and boot loaders kept current in the artifact store: built on first
//! start, left alone while the inputs are unchanged, rebuilt when one changes.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{fs, path::Path, sync::Arc, time::Duration};

use ctpf_builders::DiscoverySources;
use ctpf_bus::{BusConfig, MemoryBus};
use ctpf_common::{Role, WorkerIdentity};
use ctpf_distributors::jobs::WorkerConfig;
use ctpf_manager::boot_artifacts::{import_boot_files, submit_discovery, wait_for_job};
use ctpf_manager::server::{ingest_reports, open_builder};
use ctpf_registries::Registry;
use ctpf_store::artifacts::ArtifactStore as _;
use ctpf_store::{artifacts::FsArtifactStore, state::RedbStateStore};
use tokio_util::sync::CancellationToken;

/// A minimal static ELF (one PT_LOAD program header), which is what the recipe accepts.
fn static_elf(payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0u8; 64 + 56];
    bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
    bytes[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    bytes[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    bytes[64..68].copy_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// A kernel package as `dpkg -x` leaves it, with one NIC driver, plus busybox and an agent.
fn inputs(dir: &Path) -> DiscoverySources {
    let linux = dir.join("linux");
    let modules = linux.join("lib/modules/6.1.0-test/kernel/drivers/net");
    fs::create_dir_all(&modules).unwrap();
    fs::write(modules.join("virtio_net.ko"), b"\x7fELF\0depends=\0").unwrap();
    fs::create_dir_all(linux.join("boot")).unwrap();
    fs::write(linux.join("boot/vmlinuz-6.1.0-test"), b"a kernel").unwrap();
    fs::write(dir.join("busybox"), b"busybox").unwrap();
    fs::write(dir.join("agent"), static_elf(b"agent v1")).unwrap();
    DiscoverySources { linux_root: linux, busybox: dir.join("busybox"), agent: dir.join("agent") }
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
        let job = submit_discovery(&self.registry, sources).await.unwrap();
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
    assert_eq!(kernel.size, 8);
    assert!(initrd.tags.iter().any(|t| t.to_string().starts_with("build-key=")), "{initrd:?}");

    // Unchanged inputs: a cache hit, and the stored records are not touched.
    let again = plane.discovery(&sources).await.manifest.unwrap();
    assert!(again.cached);
    assert_eq!(again.outputs, manifest.outputs);
    let record = plane.registry.artifact("discovery-x86_64-initrd").await.unwrap();
    assert_eq!(record.created_at, initrd.created_at);

    // A new agent: a new initrd, same reproducible kernel.
    fs::write(dir.path().join("agent"), static_elf(b"agent v2")).unwrap();
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
