use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::{Name, Tags};

/// What a client sends to create a datacenter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDatacenter {
    pub name: Name,
    #[serde(default)]
    pub tags: Tags,
}

/// A site where machines boot: a flat, a rack, a cloud region. Workers carry its name and
/// tags; every resource in it can be filtered by those tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Datacenter {
    pub name: Name,
    pub tags: Tags,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

impl Datacenter {
    pub fn new(new: NewDatacenter, now: OffsetDateTime) -> Self {
        Self { name: new.name, tags: new.tags, created_at: now }
    }
}
