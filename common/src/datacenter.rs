use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use std::collections::BTreeMap;

use crate::{Arch, ArtifactName, DhcpSettings, Name, Tags};

/// What a client sends to create a datacenter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDatacenter {
    pub name: Name,
    #[serde(default)]
    pub tags: Tags,
    /// DHCP on its distributors' boot interfaces (default: proxyDHCP).
    #[serde(default)]
    pub dhcp: DhcpSettings,
}

/// A site where machines boot: a flat, a rack, a cloud region. Workers carry its name and
/// tags; every resource in it can be filtered by those tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Datacenter {
    pub name: Name,
    pub tags: Tags,
    #[serde(default)]
    pub dhcp: DhcpSettings,
    /// The PXE bundle (an artifact of kind `pxe_bundle`) its distributors serve, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pxe_bundle: Option<ArtifactName>,
    /// Discovery images it boots instead of the latest built ones, per architecture.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, DiscoveryChoice>)]
    pub discovery: BTreeMap<Arch, DiscoveryChoice>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

impl Datacenter {
    pub fn new(new: NewDatacenter, now: OffsetDateTime) -> Self {
        Self {
            name: new.name,
            tags: new.tags,
            dhcp: new.dhcp,
            pxe_bundle: None,
            discovery: BTreeMap::new(),
            created_at: now,
        }
    }
}

/// A change to a datacenter: what is given is replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatacenterPatch {
    #[serde(default)]
    pub tags: Option<Tags>,
    #[serde(default)]
    pub dhcp: Option<DhcpSettings>,
    /// An artifact name to serve that PXE bundle; `null` to serve none.
    #[serde(default, deserialize_with = "given", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub pxe_bundle: Option<Option<ArtifactName>>,
    /// Replaces the per-architecture discovery choices (an empty map: the latest built).
    #[serde(default)]
    #[schema(value_type = Option<BTreeMap<String, DiscoveryChoice>>)]
    pub discovery: Option<BTreeMap<Arch, DiscoveryChoice>>,
}

/// A discovery image by its artifacts (of kinds `kernel` and `initrd`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryChoice {
    pub kernel: ArtifactName,
    pub initrd: ArtifactName,
}

/// For patch fields where absent (`None`) and `null` (`Some(None)`) differ.
fn given<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}
