//! Per-datacenter snapshots of desired state: built from the registries, numbered, recorded,
//! then published on the bus for the datacenter's distributors.
//!
//! A new generation is made only when the desired state changed (its SHA-256 differs from
//! the last published one). The record is written before the bus is told, so a manager that
//! dies in between republishes the same generation on its next pass; a generation therefore
//! never goes back, also across manager restarts and Redis data loss. The record of a
//! deleted datacenter is kept, so one made again under the same name continues its count.

use std::collections::BTreeMap;

use ctpf_bus::PublishedSnapshot;
use ctpf_common::{
    Arch, Artifact, ArtifactKind, ArtifactName, BootFiles, BundleFile, Datacenter,
    DatacenterSnapshot, DesiredState, DiscoveryFiles, EventBody, Host, HostAssignment, Name,
    NewEvent, Reservation, SnapshotFile,
};
use ctpf_store::state::{Commit, Precondition, StateError, Table, Write};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{Registry, RegistryError, encode, now};

/// What the manager adds to the registries' data when it builds a snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotSettings {
    /// Extra kernel parameters of discovery boots.
    pub discovery_cmdline: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PublishedRecord {
    state_sha256: String,
    snapshot: DatacenterSnapshot,
}

/// Artifacts named `boot-FILE` are the boot loaders served as `FILE`.
const LOADER_PREFIX: &str = "boot-";

fn file_of(artifact: &Artifact) -> SnapshotFile {
    SnapshotFile { digest: artifact.digest, size: artifact.size }
}

/// The records every datacenter's desired state is built from, read once per pass.
struct Sources {
    artifacts: Vec<Artifact>,
    hosts: Vec<Host>,
    reservations: Vec<Reservation>,
    /// `reservations[i]` belongs to `reservation_dcs[i]`.
    reservation_dcs: Vec<Name>,
}

impl Registry {
    async fn snapshot_sources(&self) -> Result<Sources, RegistryError> {
        let mut reservations = Vec::new();
        let mut reservation_dcs = Vec::new();
        for (key, record) in self.state.list(Table::Reservations).await? {
            let reservation: Reservation = crate::decode(Table::Reservations, &key, &record)?;
            // Keys are `DATACENTER/MAC`.
            if let Some(dc) = key.split_once('/').and_then(|(dc, _)| dc.parse().ok()) {
                reservation_dcs.push(dc);
                reservations.push(reservation);
            }
        }
        Ok(Sources {
            artifacts: self.all(Table::Artifacts).await?,
            hosts: self.all(Table::Hosts).await?,
            reservations,
            reservation_dcs,
        })
    }

    /// What `datacenter`'s distributors should serve now.
    pub async fn desired_state(
        &self,
        datacenter: &Name,
        settings: &SnapshotSettings,
    ) -> Result<DesiredState, RegistryError> {
        let dc = self.datacenter(datacenter).await?;
        Ok(desired_state_of(&dc, &self.snapshot_sources().await?, settings))
    }

    /// The snapshot last published for `datacenter`, if any.
    pub async fn snapshot(
        &self,
        datacenter: &Name,
    ) -> Result<Option<DatacenterSnapshot>, RegistryError> {
        Ok(self
            .get::<PublishedRecord>(Table::Snapshots, datacenter.as_str())
            .await?
            .map(|(record, _)| record.snapshot))
    }

    /// Publishes a new generation for every datacenter whose desired state changed, and
    /// publishes the current one again where the bus lost it. Returns the datacenters that
    /// got a new generation, with it.
    pub async fn publish_snapshots(
        &self,
        settings: &SnapshotSettings,
    ) -> Result<Vec<(Name, u64)>, RegistryError> {
        self.publish_pass(settings, true).await
    }

    /// Like [`Registry::publish_snapshots`] without asking the bus whether it still holds
    /// the unchanged ones: the pass that runs after every commit, where that question would
    /// cost a round trip per datacenter each time.
    pub async fn publish_changed_snapshots(
        &self,
        settings: &SnapshotSettings,
    ) -> Result<Vec<(Name, u64)>, RegistryError> {
        self.publish_pass(settings, false).await
    }

    async fn publish_pass(
        &self,
        settings: &SnapshotSettings,
        check_bus: bool,
    ) -> Result<Vec<(Name, u64)>, RegistryError> {
        let sources = self.snapshot_sources().await?;
        let mut published = Vec::new();
        for dc in self.datacenters(&crate::Filter::default()).await? {
            let state = desired_state_of(&dc, &sources, settings);
            if let Some(generation) = self.publish_state(&dc.name, state, check_bus).await? {
                published.push((dc.name, generation));
            }
        }
        Ok(published)
    }

    /// Publishes `state` as `datacenter`'s next generation unless it is what the last one
    /// holds; `Some(generation)` when a new one was made.
    async fn publish_state(
        &self,
        datacenter: &Name,
        state: DesiredState,
        check_bus: bool,
    ) -> Result<Option<u64>, RegistryError> {
        let state_sha256 = hex::encode(Sha256::digest(encode(&state)?));
        let previous = self.get::<PublishedRecord>(Table::Snapshots, datacenter.as_str()).await?;
        if let Some((record, _)) = &previous
            && record.state_sha256 == state_sha256
        {
            if check_bus {
                self.ensure_on_bus(&record.snapshot).await?;
            }
            return Ok(None);
        }
        let generation = previous.as_ref().map_or(0, |(r, _)| r.snapshot.generation) + 1;
        let snapshot = DatacenterSnapshot {
            datacenter: datacenter.clone(),
            generation,
            published_at: now(),
            state,
        };
        let expect = match &previous {
            Some((_, version)) => Precondition::Version(*version),
            None => Precondition::Absent,
        };
        let record = PublishedRecord { state_sha256, snapshot };
        let commit = Commit::new()
            .write(Write::put(Table::Snapshots, datacenter.as_str(), encode(&record)?, expect))
            .event(NewEvent::new(
                Some(datacenter.clone()),
                EventBody::SnapshotPublished { generation },
            ));
        match self.state.commit(commit).await {
            Ok(_) => {}
            // Another manager published first; the next pass compares against its record.
            Err(StateError::Conflict { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        self.put_on_bus(&record.snapshot).await?;
        tracing::info!(%datacenter, generation, "snapshot published");
        Ok(Some(generation))
    }

    async fn put_on_bus(&self, snapshot: &DatacenterSnapshot) -> Result<(), RegistryError> {
        let published =
            PublishedSnapshot { generation: snapshot.generation, body: encode(snapshot)? };
        self.bus.publish_snapshot(&snapshot.datacenter, &published).await?;
        Ok(())
    }

    /// Publishes `snapshot` again if the bus does not hold it (or a newer one): a manager
    /// that stopped between recording and publishing, or a Redis that lost its data.
    async fn ensure_on_bus(&self, snapshot: &DatacenterSnapshot) -> Result<(), RegistryError> {
        let held = self
            .bus
            .snapshot_after(
                &snapshot.datacenter,
                snapshot.generation.saturating_sub(1),
                std::time::Duration::ZERO,
            )
            .await?;
        if held.is_none() {
            tracing::info!(datacenter = %snapshot.datacenter, generation = snapshot.generation,
                "the bus lacks the current snapshot; publishing it again");
            self.put_on_bus(snapshot).await?;
        }
        Ok(())
    }
}

/// `dc`'s desired state from the records of one pass.
fn desired_state_of(
    dc: &Datacenter,
    sources: &Sources,
    settings: &SnapshotSettings,
) -> DesiredState {
    let by_name: BTreeMap<&str, &Artifact> =
        sources.artifacts.iter().map(|a| (a.name.as_str(), a)).collect();
    let mut boot =
        BootFiles { discovery_cmdline: settings.discovery_cmdline.clone(), ..BootFiles::default() };
    for artifact in &sources.artifacts {
        if let Some(file) = artifact.name.as_str().strip_prefix(LOADER_PREFIX) {
            boot.loaders.insert(file.to_owned(), file_of(artifact));
        }
    }
    for arch in Arch::ALL {
        // The datacenter's own choice, else the latest built image. A chosen image that is
        // gone is not replaced by another one behind the operator's back.
        let (kernel, initrd) = match dc.discovery.get(&arch) {
            Some(choice) => {
                let of_kind = |name: &ArtifactName, kind| {
                    by_name.get(name.as_str()).copied().filter(|a| a.kind == kind)
                };
                let chosen = (
                    of_kind(&choice.kernel, ArtifactKind::Kernel),
                    of_kind(&choice.initrd, ArtifactKind::Initrd),
                );
                if chosen.0.is_none() || chosen.1.is_none() {
                    tracing::warn!(datacenter = %dc.name, %arch, "the chosen discovery image's artifacts are missing; serving none");
                }
                chosen
            }
            None => (
                by_name.get(format!("discovery-{arch}-vmlinuz").as_str()).copied(),
                by_name.get(format!("discovery-{arch}-initrd").as_str()).copied(),
            ),
        };
        if let (Some(kernel), Some(initrd)) = (kernel, initrd) {
            boot.discovery
                .insert(arch, DiscoveryFiles { kernel: file_of(kernel), initrd: file_of(initrd) });
        }
    }
    // A bundle deleted (or replaced by another kind) since it was chosen is not served.
    boot.pxe_bundle = dc.pxe_bundle.as_ref().and_then(|name| {
        let artifact = by_name.get(name.as_str()).filter(|a| a.kind == ArtifactKind::PxeBundle);
        if artifact.is_none() {
            tracing::warn!(datacenter = %dc.name, bundle = %name, "the chosen PXE bundle is not a stored pxe_bundle artifact; serving none");
        }
        artifact.map(|a| BundleFile { name: a.name.clone(), file: file_of(a) })
    });
    let mut hosts: Vec<HostAssignment> = sources
        .hosts
        .iter()
        .filter(|h| h.datacenter == dc.name)
        .map(|h| HostAssignment {
            host_id: h.id,
            macs: h.macs.clone(),
            smbios_uuid: h.smbios_uuid,
            hostname: h.hostname.as_ref().map(ToString::to_string),
            boot: HostAssignment::boot_for(h.state),
            state: h.state,
        })
        .collect();
    hosts.sort_by_key(|h| h.host_id);
    let mut reservations: Vec<Reservation> = sources
        .reservations
        .iter()
        .zip(&sources.reservation_dcs)
        .filter(|(_, owner)| **owner == dc.name)
        .map(|(r, _)| r.clone())
        .collect();
    reservations.sort_by_key(|r| r.mac);
    DesiredState { dhcp: dc.dhcp.clone(), reservations, hosts, boot }
}
