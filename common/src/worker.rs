use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Name, ParseError, Tag, Tags};

/// The roles a worker process can take on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Distributor,
    Builder,
    Packager,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Distributor => "distributor",
            Role::Builder => "builder",
            Role::Packager => "packager",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "distributor" => Ok(Role::Distributor),
            "builder" => Ok(Role::Builder),
            "packager" => Ok(Role::Packager),
            _ => Err(ParseError::new("role", s, "expected distributor, builder or packager")),
        }
    }
}

/// Who a worker is, as far as job routing is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkerIdentity {
    /// Unique per process (host name plus a random suffix by default).
    pub id: String,
    pub datacenter: Name,
    pub tags: Tags,
    pub roles: Vec<Role>,
}

impl WorkerIdentity {
    /// The tags a job selector is matched against: the worker's own tags plus the implicit
    /// `datacenter=NAME` and one `role=R` per role. (A worker with several roles matches a
    /// selector naming any one of them; the selector's single `role` key picks which.)
    pub fn routing_tags(&self, role: Option<Role>) -> Tags {
        let mut tags = self.tags.clone();
        if let Ok(t) = Tag::new("datacenter", self.datacenter.as_str()) {
            tags.insert(t);
        }
        if let Some(role) = role
            && let Ok(t) = Tag::new("role", role.as_str())
        {
            tags.insert(t);
        }
        tags
    }

    /// True when some role of this worker lets it take a job with `selector`.
    pub fn accepts(&self, selector: &crate::TagSelector) -> bool {
        if self.roles.is_empty() {
            return selector.matches(&self.routing_tags(None));
        }
        self.roles.iter().any(|r| selector.matches(&self.routing_tags(Some(*r))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_accept_by_datacenter_role_and_tags() {
        let w = WorkerIdentity {
            id: "w1".into(),
            datacenter: "home".parse().unwrap(),
            tags: ["arch=x86_64".parse().unwrap()].into_iter().collect(),
            roles: vec![Role::Distributor, Role::Builder],
        };
        let yes = ["", "datacenter=home", "role=builder,arch=x86_64", "role=distributor"];
        for s in yes {
            assert!(w.accepts(&s.parse().unwrap()), "{s}");
        }
        let no = ["datacenter=away", "role=packager", "arch=arm64", "gpu=yes"];
        for s in no {
            assert!(!w.accepts(&s.parse().unwrap()), "{s}");
        }
    }
}
