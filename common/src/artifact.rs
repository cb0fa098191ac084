use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::{ArtifactName, Sha256Digest, Tags};

/// What an artifact is for; decides where packagers and distributors put it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    Kernel,
    Initrd,
    Bootloader,
    Iso,
    DiskImage,
    PxeBundle,
    Script,
    Source,
    Manifest,
    Other,
}

impl std::str::FromStr for ArtifactKind {
    type Err = crate::ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
            crate::ParseError::new(
                "kind",
                s,
                "expected one of kernel, initrd, bootloader, iso, disk_image, pxe_bundle, script, source, manifest, other",
            )
        })
    }
}

/// A named, content-addressed object in the artifact store. The name points at one digest;
/// storing new content under the same name moves the name, the old content stays addressable
/// by its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Artifact {
    pub name: ArtifactName,
    pub digest: Sha256Digest,
    pub kind: ArtifactKind,
    pub size: u64,
    pub tags: Tags,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}
