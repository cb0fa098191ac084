//! ctpf's shared vocabulary: validated identifiers and the records every service exchanges.
//! No I/O lives here; every constructor that takes text validates it and, on failure, returns
//! a [`ParseError`] naming the field and the bad value.

mod artifact;
mod datacenter;
mod digest;
mod error;
mod event;
mod host;
mod job;
mod mac;
mod name;
mod schema;
mod ssh_key;
mod tag;
mod worker;

pub use artifact::{Artifact, ArtifactKind};
pub use datacenter::{Datacenter, NewDatacenter};
pub use digest::Sha256Digest;
pub use error::ParseError;
pub use event::{Event, EventBody, NewEvent};
pub use host::{Arch, Host, HostState, NewHost};
pub use job::{Job, JobSpec, JobStatus, NewJob};
pub use mac::MacAddr;
pub use name::{ArtifactName, Name};
pub use ssh_key::{NewSshKey, SshKey, SshPublicKey};
pub use tag::{Tag, TagSelector, Tags};
pub use worker::{Role, WorkerIdentity};

/// Re-exported so downstream crates agree on one time and id type.
pub use time::OffsetDateTime;
pub use uuid::Uuid;
