//! ctpf's shared vocabulary: validated identifiers and the records every service exchanges.
//! No I/O lives here; every constructor that takes text validates it and, on failure, returns
//! a [`ParseError`] naming the field and the bad value.

/// Text conversions for a type validated by `Type::parse(field, text)` and printed by
/// `Display`: `FromStr` (errors name `$field`), and the `TryFrom<String>`/`Into<String>` pair
/// that `#[serde(try_from = "String", into = "String")]` uses, so deserializing validates too.
macro_rules! text_conversions {
    ($ty:ty, $field:literal) => {
        impl std::str::FromStr for $ty {
            type Err = $crate::ParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse($field, s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = $crate::ParseError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl From<$ty> for String {
            fn from(value: $ty) -> Self {
                value.to_string()
            }
        }
    };
}
pub(crate) use text_conversions;

mod artifact;
mod build;
mod datacenter;
mod digest;
mod enroll;
mod error;
mod event;
mod host;
mod image;
mod job;
mod mac;
mod media_key;
mod name;
mod package;
mod schema;
mod snapshot;
mod ssh_key;
mod tag;
mod worker;

pub use artifact::{Artifact, ArtifactKind};
pub use build::{BuildLogLine, BuildManifest, BuildOutput, BuildRequest, LogStream, NewBuild};
pub use datacenter::{Datacenter, DatacenterPatch, DiscoveryChoice, NewDatacenter};
pub use digest::Sha256Digest;
pub use enroll::{Disk, HostReport, Inventory};
pub use error::ParseError;
pub use event::{Event, EventBody, NewEvent};
pub use host::{Arch, Host, HostPatch, HostState, NewHost};
pub use image::{ArtifactsSection, BootSection, ImageDefinition, RaspiSection};
pub use job::{Job, JobSpec, JobStatus, NewJob};
pub use mac::MacAddr;
pub use media_key::{MediaKey, MediaKeySecret, MediaKeyStatus, MediaKeyWithSecret, NewMediaKey};
pub use name::{ArtifactName, Name};
pub use package::{
    BootMode, InputArtifact, MediaEntry, MediaFormat, NewPackage, PackageManifest, PackageRequest,
};
pub use snapshot::{
    BootAction, BootFiles, BundleFile, DatacenterSnapshot, DesiredState, DhcpMode, DhcpSettings,
    DiscoveryFiles, HostAssignment, Reservation, SnapshotError, SnapshotFile,
};
pub use ssh_key::{NewSshKey, SshKey, SshPublicKey};
pub use tag::{Tag, TagSelector, Tags};
pub use worker::{
    Role, WorkerCredential, WorkerHeartbeat, WorkerIdentity, WorkerState, WorkerStatus, WorkerToken,
};

/// Re-exported so downstream crates agree on one time and id type.
pub use time::OffsetDateTime;
pub use uuid::Uuid;

/// Compares two secrets without an early exit, so the time taken does not reveal how much of
/// a guess was right.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod secret_tests {
    #[test]
    fn secrets_match_only_when_equal() {
        assert!(super::same_secret("abc", "abc"));
        assert!(!super::same_secret("abc", "abd"));
        assert!(!super::same_secret("abc", "abcd"));
    }
}
