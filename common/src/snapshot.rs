//! A datacenter's desired state, as the manager publishes it to the datacenter's workers:
//! everything a distributor needs to answer DHCP, TFTP and HTTP boot on its own, also while
//! the manager or Redis is unreachable.
//!
//! The manager publishes a whole snapshot with a generation that only grows; a worker checks
//! it ([`DatacenterSnapshot::validate`]), fetches the files it names by digest, keeps it on
//! disk and swaps it in whole.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{Arch, HostState, MacAddr, Name, ParseError, Sha256Digest};

/// Which DHCP role a datacenter's distributors play on their boot interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DhcpMode {
    /// No DHCP: another server does everything; only TFTP and HTTP run.
    Off,
    /// proxyDHCP beside the site's router (which keeps handing out addresses).
    #[default]
    Proxy,
    /// The distributor hands out addresses from `range` itself.
    Authoritative,
}

/// A datacenter's DHCP settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DhcpSettings {
    #[serde(default)]
    pub mode: DhcpMode,
    /// First and last address handed out (authoritative mode).
    #[serde(default)]
    #[schema(value_type = Option<Vec<String>>)]
    pub range: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Prefix length of the boot network (authoritative mode; default 24).
    #[serde(default)]
    pub prefix_len: Option<u8>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub router: Option<Ipv4Addr>,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub dns: Vec<Ipv4Addr>,
}

impl DhcpSettings {
    pub fn validate(&self) -> Result<(), ParseError> {
        match (self.mode, self.range) {
            (DhcpMode::Authoritative, None) => {
                return Err(ParseError::new("dhcp.range", "", "authoritative mode needs a range"));
            }
            (DhcpMode::Authoritative, Some((first, last))) if first > last => {
                return Err(ParseError::new(
                    "dhcp.range",
                    format!("{first}-{last}"),
                    "the first address must not be above the last",
                ));
            }
            (DhcpMode::Off | DhcpMode::Proxy, Some(_)) => {
                let (first, last) =
                    self.range.unwrap_or((Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED));
                return Err(ParseError::new(
                    "dhcp.range",
                    format!("{first}-{last}"),
                    "a range only makes sense in authoritative mode",
                ));
            }
            _ => {}
        }
        if let Some(len) = self.prefix_len
            && !(8..=30).contains(&len)
        {
            return Err(ParseError::new("dhcp.prefix_len", len.to_string(), "between 8 and 30"));
        }
        Ok(())
    }
}

/// A fixed address for one MAC, answered by the datacenter's DHCP in authoritative mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    pub mac: MacAddr,
    #[schema(value_type = String)]
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub hostname: Option<Name>,
}

/// A file a snapshot names: the worker fetches it by digest into its cache before it swaps
/// the snapshot in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
pub struct SnapshotFile {
    pub digest: Sha256Digest,
    pub size: u64,
}

/// The discovery kernel and initramfs of one architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiscoveryFiles {
    pub kernel: SnapshotFile,
    pub initrd: SnapshotFile,
}

/// What a known machine boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BootAction {
    /// The discovery environment (it enrolls, or enrolls again).
    Discovery,
    /// Its own disk: installed machines never net-boot into a loop.
    LocalDisk,
}

/// A host of the datacenter, as its distributors need to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostAssignment {
    pub host_id: Uuid,
    pub macs: Vec<MacAddr>,
    #[serde(default)]
    pub smbios_uuid: Option<Uuid>,
    #[serde(default)]
    pub hostname: Option<String>,
    pub state: HostState,
    pub boot: BootAction,
}

impl HostAssignment {
    pub fn boot_for(state: HostState) -> BootAction {
        match state {
            HostState::Installed | HostState::Ready => BootAction::LocalDisk,
            _ => BootAction::Discovery,
        }
    }
}

/// The files distributors serve.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BootFiles {
    /// Boot loaders by the name TFTP and HTTP serve them under (`undionly.kpxe`, ...).
    #[serde(default)]
    pub loaders: BTreeMap<String, SnapshotFile>,
    /// The discovery image per architecture.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, DiscoveryFiles>)]
    pub discovery: BTreeMap<Arch, DiscoveryFiles>,
    /// Extra kernel parameters of discovery boots.
    #[serde(default)]
    pub discovery_cmdline: String,
    /// The PXE bundle the datacenter serves (`ctpf datacenter pxe-bundle`): every file of the
    /// tar by its path, over TFTP and HTTP, after the loaders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pxe_bundle: Option<BundleFile>,
}

/// A PXE bundle artifact a snapshot names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BundleFile {
    pub name: crate::ArtifactName,
    #[serde(flatten)]
    pub file: SnapshotFile,
}

/// A datacenter's desired state, whole, at one generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DatacenterSnapshot {
    pub datacenter: Name,
    /// Grows by one with every change the manager publishes.
    pub generation: u64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub published_at: OffsetDateTime,
    #[serde(flatten)]
    pub state: DesiredState,
}

/// The part of a snapshot that says what to serve (everything but its generation), so the
/// manager can tell whether anything changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DesiredState {
    pub dhcp: DhcpSettings,
    pub reservations: Vec<Reservation>,
    pub hosts: Vec<HostAssignment>,
    pub boot: BootFiles,
}

/// Why a worker refuses a snapshot (it keeps serving the last good one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot is not valid JSON: {0}")]
    Malformed(String),
    #[error("snapshot is for datacenter {got}, this worker serves {expected}")]
    WrongDatacenter { expected: Name, got: Name },
    #[error("snapshot generation {got} is not newer than the {current} being served")]
    Stale { current: u64, got: u64 },
    #[error("snapshot field {field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl SnapshotError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SnapshotError::Invalid { field: field.into(), reason: reason.into() }
    }
}

impl DatacenterSnapshot {
    /// Decodes and checks a published snapshot for a worker of `datacenter` serving
    /// generation `current` (0: none yet).
    pub fn decode(body: &[u8], datacenter: &Name, current: u64) -> Result<Self, SnapshotError> {
        let snapshot: Self =
            serde_json::from_slice(body).map_err(|e| SnapshotError::Malformed(e.to_string()))?;
        snapshot.validate(datacenter, current)?;
        Ok(snapshot)
    }

    /// Everything a worker relies on before it swaps this snapshot in: that it is its own
    /// datacenter's, newer than what it serves, and consistent in itself.
    pub fn validate(&self, datacenter: &Name, current: u64) -> Result<(), SnapshotError> {
        if &self.datacenter != datacenter {
            return Err(SnapshotError::WrongDatacenter {
                expected: datacenter.clone(),
                got: self.datacenter.clone(),
            });
        }
        if self.generation <= current {
            return Err(SnapshotError::Stale { current, got: self.generation });
        }
        self.state.validate()
    }
}

impl DesiredState {
    pub fn validate(&self) -> Result<(), SnapshotError> {
        self.dhcp
            .validate()
            .map_err(|e| SnapshotError::invalid(e.field.clone(), e.reason.clone()))?;
        let (mut macs, mut ips) = (BTreeSet::new(), BTreeSet::new());
        for r in &self.reservations {
            if !macs.insert(r.mac) {
                return Err(SnapshotError::invalid("reservations", format!("{} twice", r.mac)));
            }
            if !ips.insert(r.ip) {
                return Err(SnapshotError::invalid("reservations", format!("{} twice", r.ip)));
            }
        }
        let mut host_macs = BTreeSet::new();
        for host in &self.hosts {
            for mac in &host.macs {
                if !host_macs.insert(*mac) {
                    return Err(SnapshotError::invalid(
                        "hosts",
                        format!("{mac} belongs to two hosts"),
                    ));
                }
            }
        }
        for name in self.boot.loaders.keys() {
            if !is_plain_file_name(name) {
                return Err(SnapshotError::invalid(
                    "boot.loaders",
                    format!("{name:?} is not a plain file name"),
                ));
            }
        }
        // The scripts check each word again when they render it; this keeps obvious junk
        // (control characters, quotes, a runaway length) out of the snapshot itself.
        let cmdline = &self.boot.discovery_cmdline;
        let printable =
            cmdline.bytes().all(|b| (b' '..=b'~').contains(&b) && !b"\"'`$;\\".contains(&b));
        if cmdline.len() > 1024 || !printable {
            return Err(SnapshotError::invalid(
                "boot.discovery_cmdline",
                "printable kernel words without quotes, `$`, `;` or backslashes, at most 1024 bytes",
            ));
        }
        Ok(())
    }

    /// Every file the snapshot names, each once.
    pub fn files(&self) -> BTreeSet<SnapshotFile> {
        let loaders = self.boot.loaders.values().copied();
        let discovery = self.boot.discovery.values().flat_map(|d| [d.kernel, d.initrd]);
        let bundle = self.boot.pxe_bundle.iter().map(|b| b.file);
        loaders.chain(discovery).chain(bundle).collect()
    }

    /// The host a machine is, by SMBIOS UUID first, then by MAC (as the manager decides).
    pub fn host_by_identity(&self, uuid: Option<Uuid>, mac: MacAddr) -> Option<&HostAssignment> {
        uuid.and_then(|u| self.hosts.iter().find(|h| h.smbios_uuid == Some(u)))
            .or_else(|| self.hosts.iter().find(|h| h.macs.contains(&mac)))
    }
}

/// A name safe to serve and to keep as a file: no directories, no dot names, printable.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn snapshot() -> DatacenterSnapshot {
        let mac: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        DatacenterSnapshot {
            datacenter: "dc-a".parse().unwrap(),
            generation: 3,
            published_at: OffsetDateTime::UNIX_EPOCH,
            state: DesiredState {
                dhcp: DhcpSettings {
                    mode: DhcpMode::Authoritative,
                    range: Some(("10.0.0.100".parse().unwrap(), "10.0.0.200".parse().unwrap())),
                    ..DhcpSettings::default()
                },
                reservations: vec![Reservation {
                    mac,
                    ip: "10.0.0.5".parse().unwrap(),
                    hostname: None,
                }],
                hosts: Vec::new(),
                boot: BootFiles::default(),
            },
        }
    }

    #[test]
    fn a_good_snapshot_round_trips_and_passes() {
        let s = snapshot();
        let body = serde_json::to_vec(&s).unwrap();
        assert_eq!(DatacenterSnapshot::decode(&body, &"dc-a".parse().unwrap(), 2).unwrap(), s);
    }

    #[test]
    fn workers_refuse_foreign_stale_and_inconsistent_snapshots() {
        let s = snapshot();
        let body = serde_json::to_vec(&s).unwrap();
        let other: Name = "dc-b".parse().unwrap();
        let a: Name = "dc-a".parse().unwrap();
        assert!(matches!(
            DatacenterSnapshot::decode(&body, &other, 0),
            Err(SnapshotError::WrongDatacenter { .. })
        ));
        assert_eq!(
            DatacenterSnapshot::decode(&body, &a, 3),
            Err(SnapshotError::Stale { current: 3, got: 3 })
        );
        assert!(matches!(
            DatacenterSnapshot::decode(b"{\"datacenter\":", &a, 0),
            Err(SnapshotError::Malformed(_))
        ));

        let mut twice = s.clone();
        twice.state.reservations.push(twice.state.reservations[0].clone());
        assert!(twice.validate(&a, 0).unwrap_err().to_string().contains("twice"));
        let mut hostile = s.clone();
        hostile.state.boot.loaders.insert(
            "../../etc/passwd".into(),
            SnapshotFile { digest: Sha256Digest::of(b""), size: 0 },
        );
        assert!(hostile.validate(&a, 0).unwrap_err().to_string().contains("plain file name"));
        let mut no_range = s;
        no_range.state.dhcp.range = None;
        assert!(no_range.validate(&a, 0).unwrap_err().to_string().contains("range"));
    }
}
