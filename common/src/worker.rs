use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use time::OffsetDateTime;

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

/// What a worker announces about itself, again with every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkerHeartbeat {
    #[serde(flatten)]
    pub identity: WorkerIdentity,
    /// The ctpf version it runs.
    pub version: String,
    /// Where machines in its site reach it (its boot interface address, when it has one).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The generation of its datacenter's snapshot it serves (distributors only).
    #[serde(default)]
    pub generation: Option<u64>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub started_at: OffsetDateTime,
}

/// Whether a worker still heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Alive,
    /// Silent for longer than the manager's timeout. Nothing of its datacenter is deleted;
    /// it is alive again with its next heartbeat.
    Lost,
}

/// A worker as the manager shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkerStatus {
    #[serde(flatten)]
    pub heartbeat: WorkerHeartbeat,
    /// When its last heartbeat arrived (the bus's clock, not the worker's).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub last_seen: OffsetDateTime,
    pub state: WorkerState,
}

/// A credential a site worker connects with, as the manager lists it (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkerCredential {
    pub id: String,
    /// The one datacenter it may read and act for.
    pub datacenter: Name,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<OffsetDateTime>,
}

/// What `ctpf worker token create` hands out once: `ctpf_wk_ID_SECRET`. The worker passes it
/// with `--token`; the manager keeps only the secret's SHA-256.
#[derive(Clone, PartialEq, Eq)]
pub struct WorkerToken {
    pub id: String,
    pub secret: String,
}

const WORKER_TOKEN_PREFIX: &str = "ctpf_wk_";

impl WorkerToken {
    pub fn secret_sha256(&self) -> [u8; 32] {
        use sha2::Digest as _;
        sha2::Sha256::digest(self.secret.as_bytes()).into()
    }
}

impl std::fmt::Debug for WorkerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerToken").field("id", &self.id).finish_non_exhaustive()
    }
}

impl std::fmt::Display for WorkerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{WORKER_TOKEN_PREFIX}{}_{}", self.id, self.secret)
    }
}

impl std::str::FromStr for WorkerToken {
    type Err = ParseError;
    fn from_str(text: &str) -> Result<Self, ParseError> {
        // Never echo the text: it is a secret.
        let bad = |reason: &str| ParseError::new("token", "(hidden)", reason);
        let rest = text
            .trim()
            .strip_prefix(WORKER_TOKEN_PREFIX)
            .ok_or_else(|| bad("a worker token starts with ctpf_wk_"))?;
        let (id, secret) = rest.split_once('_').ok_or_else(|| bad("expected ctpf_wk_ID_SECRET"))?;
        let id_ok = !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit());
        let secret_ok = secret.len() >= 32 && secret.bytes().all(|b| b.is_ascii_alphanumeric());
        if !id_ok || !secret_ok {
            return Err(bad("expected ctpf_wk_ID_SECRET (hex id, 32+ letters and digits)"));
        }
        Ok(Self { id: id.to_owned(), secret: secret.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_tokens_round_trip_and_hide_their_secret() {
        let token = WorkerToken { id: "0a1b2c".into(), secret: "s".repeat(40) };
        let text = token.to_string();
        assert_eq!(text.parse::<WorkerToken>().unwrap(), token);
        assert!(!format!("{token:?}").contains("sss"));
        for bad in ["", "ctpf_wk_", "ctpf_wk_zz_ssssssssssssssssssssssssssssssssssss", "ctpf_x"] {
            let error = bad.parse::<WorkerToken>().unwrap_err().to_string();
            assert!(!error.contains("ssss"), "{error}");
        }
    }

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
