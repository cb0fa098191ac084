//! Datacenters as sites: their DHCP settings and reservations, the snapshots their
//! distributors get, worker credentials and health, and what a site worker may report.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{sync::Arc, time::Duration};

use ctpf_bus::{Bus, BusConfig, MemoryBus};
use ctpf_common::{
    Arch, ArtifactKind, BootAction, DatacenterPatch, DatacenterSnapshot, DhcpMode, DhcpSettings,
    EventBody, HostReport, HostState, Name, NewDatacenter, NewEvent, NewJob, OffsetDateTime,
    Reservation, Role, WorkerHeartbeat, WorkerIdentity, WorkerState,
};
use ctpf_registries::{Filter, Registry, RegistryError, SnapshotSettings};
use ctpf_store::state::RedbStateStore;

fn setup(dir: &tempfile::TempDir) -> (Registry, Arc<MemoryBus>) {
    let state = Arc::new(RedbStateStore::open(&dir.path().join("state.redb")).unwrap());
    let bus = Arc::new(MemoryBus::new(BusConfig::default()));
    (Registry::new(state, bus.clone()), bus)
}

fn name(text: &str) -> Name {
    text.parse().unwrap()
}

async fn datacenter(reg: &Registry, dc: &str) -> Name {
    let new = NewDatacenter { name: name(dc), tags: Default::default(), dhcp: Default::default() };
    reg.create_datacenter(new).await.unwrap().name
}

fn reservation(mac: &str, ip: &str) -> Reservation {
    Reservation { mac: mac.parse().unwrap(), ip: ip.parse().unwrap(), hostname: None }
}

async fn latest(bus: &MemoryBus, dc: &Name) -> Option<DatacenterSnapshot> {
    let published = bus.snapshot_after(dc, 0, Duration::ZERO).await.unwrap()?;
    Some(serde_json::from_slice(&published.body).unwrap())
}

#[tokio::test]
async fn snapshots_get_a_new_generation_only_when_the_desired_state_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, bus) = setup(&dir);
    let (a, b) = (datacenter(&reg, "dc-a").await, datacenter(&reg, "dc-b").await);
    let settings = SnapshotSettings { discovery_cmdline: "quiet".into() };

    let first = reg.publish_snapshots(&settings).await.unwrap();
    assert_eq!(first, [(a.clone(), 1), (b.clone(), 1)]);
    assert_eq!(reg.publish_snapshots(&settings).await.unwrap(), [], "nothing changed");

    let dhcp = DhcpSettings {
        mode: DhcpMode::Authoritative,
        range: Some(("10.1.0.100".parse().unwrap(), "10.1.0.199".parse().unwrap())),
        ..Default::default()
    };
    reg.update_datacenter(&a, DatacenterPatch { dhcp: Some(dhcp.clone()), ..Default::default() })
        .await
        .unwrap();
    reg.add_reservation(&a, reservation("52:54:00:aa:00:01", "10.1.0.10")).await.unwrap();
    assert_eq!(reg.publish_snapshots(&settings).await.unwrap(), [(a.clone(), 2)]);

    let snapshot = latest(&bus, &a).await.unwrap();
    assert_eq!(snapshot.generation, 2);
    assert_eq!(snapshot.state.dhcp, dhcp);
    assert_eq!(snapshot.state.reservations, [reservation("52:54:00:aa:00:01", "10.1.0.10")]);
    assert_eq!(snapshot.state.boot.discovery_cmdline, "quiet");
    snapshot.validate(&a, 1).unwrap();
    // dc-b's snapshot knows nothing of dc-a's reservation.
    assert_eq!(latest(&bus, &b).await.unwrap().state.reservations, []);
    assert_eq!(reg.snapshot(&a).await.unwrap().unwrap(), snapshot);

    // A host of dc-a appears in its snapshot, booting discovery until it is installed.
    let report = HostReport {
        macs: vec!["52:54:00:aa:00:02".parse().unwrap()],
        smbios_uuid: None,
        arch: Arch::X86_64,
        addresses: Vec::new(),
        inventory: Default::default(),
    };
    let (host, _) = reg.enroll_forwarded(&a, report).await.unwrap();
    reg.publish_snapshots(&settings).await.unwrap();
    let snapshot = latest(&bus, &a).await.unwrap();
    assert_eq!(snapshot.generation, 3);
    assert_eq!(snapshot.state.hosts.len(), 1);
    assert_eq!(snapshot.state.hosts[0].boot, BootAction::Discovery);
    let patch = ctpf_common::HostPatch { state: Some(HostState::Installed), ..Default::default() };
    reg.update_host(host.id, patch).await.unwrap();
    reg.publish_snapshots(&settings).await.unwrap();
    assert_eq!(latest(&bus, &a).await.unwrap().state.hosts[0].boot, BootAction::LocalDisk);
}

#[tokio::test]
async fn a_datacenter_serves_the_pxe_bundle_it_chose_while_it_exists() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, bus) = setup(&dir);
    let (a, b) = (datacenter(&reg, "dc-a").await, datacenter(&reg, "dc-b").await);
    let settings = SnapshotSettings::default();
    let artifact = |name: &str, kind| ctpf_common::Artifact {
        name: name.parse().unwrap(),
        digest: ctpf_common::Sha256Digest::of(name.as_bytes()),
        kind,
        size: 10,
        tags: Default::default(),
        created_at: OffsetDateTime::now_utc(),
    };
    reg.record_artifact(&artifact("rack-bundle", ArtifactKind::PxeBundle)).await.unwrap();
    reg.record_artifact(&artifact("an-iso", ArtifactKind::Iso)).await.unwrap();
    let choose = |name: Option<&str>| DatacenterPatch {
        pxe_bundle: Some(name.map(|n| n.parse().unwrap())),
        ..Default::default()
    };

    let missing = reg.update_datacenter(&a, choose(Some("nope"))).await.unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
    let wrong_kind = reg.update_datacenter(&a, choose(Some("an-iso"))).await.unwrap_err();
    assert!(wrong_kind.to_string().contains("not pxe_bundle"), "{wrong_kind}");

    reg.update_datacenter(&a, choose(Some("rack-bundle"))).await.unwrap();
    reg.publish_snapshots(&settings).await.unwrap();
    let served = latest(&bus, &a).await.unwrap().state.boot.pxe_bundle.unwrap();
    assert_eq!((served.name.as_str(), served.file.size), ("rack-bundle", 10));
    assert!(latest(&bus, &b).await.unwrap().state.boot.pxe_bundle.is_none());
    assert!(
        latest(&bus, &a).await.unwrap().state.files().contains(&served.file),
        "workers fetch the bundle like every other file"
    );

    // Deleted, it is no longer served; cleared, the datacenter names none.
    reg.delete_artifact(&"rack-bundle".parse().unwrap()).await.unwrap();
    reg.publish_snapshots(&settings).await.unwrap();
    assert!(latest(&bus, &a).await.unwrap().state.boot.pxe_bundle.is_none());
    let cleared = reg.update_datacenter(&a, choose(None)).await.unwrap();
    assert_eq!(cleared.pxe_bundle, None);

    // Discovery: the latest built image unless the datacenter chose its own.
    for (name, kind) in [
        ("discovery-x86_64-vmlinuz", ArtifactKind::Kernel),
        ("discovery-x86_64-initrd", ArtifactKind::Initrd),
        ("lab-vmlinuz", ArtifactKind::Kernel),
        ("lab-initrd", ArtifactKind::Initrd),
    ] {
        reg.record_artifact(&artifact(name, kind)).await.unwrap();
    }
    let pick = |kernel: &str, initrd: &str| DatacenterPatch {
        discovery: Some(
            [(
                Arch::X86_64,
                ctpf_common::DiscoveryChoice {
                    kernel: kernel.parse().unwrap(),
                    initrd: initrd.parse().unwrap(),
                },
            )]
            .into(),
        ),
        ..Default::default()
    };
    let swapped = reg.update_datacenter(&a, pick("lab-initrd", "lab-vmlinuz")).await.unwrap_err();
    assert!(swapped.to_string().contains("not kernel"), "{swapped}");
    reg.update_datacenter(&a, pick("lab-vmlinuz", "lab-initrd")).await.unwrap();
    reg.publish_snapshots(&settings).await.unwrap();
    let kernel_of =
        |snapshot: DatacenterSnapshot| snapshot.state.boot.discovery[&Arch::X86_64].kernel;
    let digest = |name: &str| ctpf_common::Sha256Digest::of(name.as_bytes());
    assert_eq!(kernel_of(latest(&bus, &a).await.unwrap()).digest, digest("lab-vmlinuz"));
    assert_eq!(
        kernel_of(latest(&bus, &b).await.unwrap()).digest,
        digest("discovery-x86_64-vmlinuz")
    );
}

#[tokio::test]
async fn a_lost_snapshot_is_published_again_with_the_same_generation() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = setup(&dir);
    let a = datacenter(&reg, "dc-a").await;
    reg.publish_snapshots(&SnapshotSettings::default()).await.unwrap();
    let before = reg.snapshot(&a).await.unwrap().unwrap();

    // The same state store with a fresh (empty) bus: Redis lost its data.
    let bus = Arc::new(MemoryBus::new(BusConfig::default()));
    let reg = Registry::new(reg.state().clone(), bus.clone());
    assert_eq!(reg.publish_snapshots(&SnapshotSettings::default()).await.unwrap(), []);
    assert_eq!(latest(&bus, &a).await.unwrap(), before);
}

#[tokio::test]
async fn reservations_claim_their_address_once() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = setup(&dir);
    let (a, b) = (datacenter(&reg, "dc-a").await, datacenter(&reg, "dc-b").await);
    reg.add_reservation(&a, reservation("52:54:00:00:00:01", "10.0.0.5")).await.unwrap();
    let taken = reg.add_reservation(&a, reservation("52:54:00:00:00:02", "10.0.0.5")).await;
    let message = taken.unwrap_err().to_string();
    assert!(message.contains("10.0.0.5") && message.contains("52:54:00:00:00:01"), "{message}");
    let twice = reg.add_reservation(&a, reservation("52:54:00:00:00:01", "10.0.0.6")).await;
    assert!(matches!(twice, Err(RegistryError::AlreadyExists { .. })));
    // Another site may use the same address.
    reg.add_reservation(&b, reservation("52:54:00:00:00:02", "10.0.0.5")).await.unwrap();
    reg.remove_reservation(&a, "52:54:00:00:00:01".parse().unwrap()).await.unwrap();
    reg.add_reservation(&a, reservation("52:54:00:00:00:03", "10.0.0.5")).await.unwrap();
    let broadcast =
        reg.add_reservation(&a, reservation("52:54:00:00:00:04", "255.255.255.255")).await;
    assert!(matches!(broadcast, Err(RegistryError::Invalid(_))));
    let ghost =
        reg.add_reservation(&name("nowhere"), reservation("52:54:00:00:00:05", "10.0.0.9")).await;
    assert!(matches!(ghost, Err(RegistryError::NotFound { .. })));
}

fn heartbeat(id: &str, dc: &Name) -> WorkerHeartbeat {
    WorkerHeartbeat {
        identity: WorkerIdentity {
            id: id.into(),
            datacenter: dc.clone(),
            tags: Default::default(),
            roles: vec![Role::Distributor],
        },
        version: "test".into(),
        addresses: Vec::new(),
        generation: Some(1),
        started_at: OffsetDateTime::now_utc(),
    }
}

async fn event_types(reg: &Registry) -> Vec<&'static str> {
    let (events, _) = reg.events(0, 1000, &Filter::default()).await.unwrap();
    events.iter().map(|e| e.body.type_name()).collect()
}

#[tokio::test]
async fn workers_are_lost_when_silent_and_datacenters_with_workers_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, bus) = setup(&dir);
    let a = datacenter(&reg, "dc-a").await;
    let (credential, token) = reg.create_worker_credential(&a).await.unwrap();
    assert_eq!(credential.datacenter, a);
    assert_eq!(token.id, credential.id);
    assert_eq!(reg.authorize_workers().await.unwrap(), 1);
    assert_eq!(reg.verify_worker_token(&token).await.unwrap(), credential);
    let mut forged = token.clone();
    forged.secret = "0".repeat(token.secret.len());
    assert!(matches!(reg.verify_worker_token(&forged).await, Err(RegistryError::Forbidden(_))));

    bus.heartbeat(&heartbeat("w1", &a)).await.unwrap();
    let seen = reg.observe_workers(Duration::from_secs(60)).await.unwrap();
    assert_eq!(seen[0].state, WorkerState::Alive);
    // With a timeout shorter than its silence the worker is lost, once.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let seen = reg.observe_workers(Duration::from_millis(10)).await.unwrap();
    assert_eq!(seen[0].state, WorkerState::Lost);
    reg.observe_workers(Duration::from_millis(10)).await.unwrap();
    bus.heartbeat(&heartbeat("w1", &a)).await.unwrap();
    reg.observe_workers(Duration::from_secs(60)).await.unwrap();
    let types = event_types(&reg).await;
    let health: Vec<_> = types.into_iter().filter(|t| t.starts_with("worker_")).collect();
    assert_eq!(
        health,
        ["worker_credential_created", "worker_joined", "worker_lost", "worker_back"]
    );

    // Lost or not, its datacenter is not deleted without force.
    let refused = reg.delete_datacenter(&a, false).await.unwrap_err().to_string();
    assert!(
        refused.contains("1 worker(s)") && refused.contains("1 worker credential(s)"),
        "{refused}"
    );
    reg.delete_datacenter(&a, true).await.unwrap();
    assert_eq!(reg.authorize_workers().await.unwrap(), 0, "its credential is revoked");
    assert!(reg.verify_worker_token(&token).await.is_err(), "revoked");
    assert!(bus.workers().await.unwrap().is_empty());
    let listed = reg.worker_credentials(&Filter::default()).await.unwrap();
    assert!(listed[0].revoked_at.is_some());
}

#[tokio::test]
async fn a_site_worker_may_only_report_for_its_own_datacenter() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = setup(&dir);
    let (a, b) = (datacenter(&reg, "dc-a").await, datacenter(&reg, "dc-b").await);
    let job_b = reg
        .submit_job(NewJob {
            spec: ctpf_common::JobSpec::Probe { sleep_ms: 0, fail: false },
            selector: "datacenter=dc-b".parse().unwrap(),
        })
        .await
        .unwrap();
    let started = EventBody::JobStarted { job_id: job_b.id, worker: "wa".into(), attempt: 1 };
    reg.apply_report_from(NewEvent::new(None, started), Some(&a)).await.unwrap();
    let foreign = NewEvent::new(Some(b.clone()), EventBody::WorkerStarted { worker: "wa".into() });
    reg.apply_report_from(foreign, Some(&a)).await.unwrap();
    // Records only the manager keeps are not a worker's to send, even for its datacenter.
    let spoofed = NewEvent::new(None, EventBody::DatacenterDeleted { name: a.clone() });
    reg.apply_report_from(spoofed, Some(&a)).await.unwrap();
    assert_eq!(reg.job(job_b.id).await.unwrap().status, ctpf_common::JobStatus::Queued);
    let types = event_types(&reg).await;
    assert_eq!(types.iter().filter(|t| **t == "report_refused").count(), 3, "{types:?}");
    assert!(!types.contains(&"datacenter_deleted"), "{types:?}");

    // Its boot activity is recorded, in its datacenter whatever the report named.
    let lease = EventBody::DhcpReplied {
        worker: "wa".into(),
        mac: "52:54:00:bb:00:09".parse().unwrap(),
        reply: "ack".into(),
        ip: Some("10.0.0.9".parse().unwrap()),
        boot_file: Some("undionly.kpxe".into()),
    };
    let recorded = reg.apply_report_from(NewEvent::new(None, lease), Some(&a)).await.unwrap();
    assert_eq!(recorded.unwrap().datacenter.as_ref(), Some(&a));

    // A forwarded callback enrolls into the worker's datacenter; forwarded twice, one host.
    let report = HostReport {
        macs: vec!["52:54:00:bb:00:01".parse().unwrap()],
        smbios_uuid: None,
        arch: Arch::X86_64,
        addresses: Vec::new(),
        inventory: Default::default(),
    };
    let forwarded = EventBody::HostCallbackForwarded {
        worker: "wa".into(),
        report: Box::new(report.clone()),
        received_at: OffsetDateTime::now_utc(),
    };
    for _ in 0..2 {
        reg.apply_report_from(NewEvent::new(None, forwarded.clone()), Some(&a)).await.unwrap();
    }
    let hosts = reg.hosts(&Filter::default()).await.unwrap();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].datacenter, a);
    // dc-b's worker cannot claim that host.
    reg.apply_report_from(NewEvent::new(None, forwarded), Some(&b)).await.unwrap();
    assert_eq!(reg.hosts(&Filter::default()).await.unwrap()[0].datacenter, a);
}
