//! OpenAPI schemas for the validated string types: each is a JSON string with a pattern, so the
//! checked-in API document tells clients exactly what the server accepts.

use utoipa::{
    PartialSchema, ToSchema,
    openapi::{
        ArrayBuilder, ObjectBuilder, RefOr,
        schema::{Schema, Type},
    },
};

use crate::{
    ArtifactName, MacAddr, MediaKeySecret, Name, Sha256Digest, SshPublicKey, Tag, TagSelector, Tags,
};

macro_rules! string_schema {
    ($ty:ty, $pattern:expr, $example:expr, $doc:expr) => {
        impl PartialSchema for $ty {
            fn schema() -> RefOr<Schema> {
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some($pattern))
                    .examples([serde_json::json!($example)])
                    .description(Some($doc))
                    .into()
            }
        }
        impl ToSchema for $ty {}
    };
}

string_schema!(Name, "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", "home", "A lowercase DNS label.");
string_schema!(
    ArtifactName,
    "^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}$",
    "ipxe.efi",
    "A file name without any path separator."
);
string_schema!(
    MacAddr,
    "^[0-9a-f]{2}(:[0-9a-f]{2}){5}$",
    "52:54:00:12:34:56",
    "An Ethernet MAC address (input also accepts '-' separators, no separators and upper case)."
);
string_schema!(
    Sha256Digest,
    "^sha256:[0-9a-f]{64}$",
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "A SHA-256 content digest."
);
string_schema!(
    Tag,
    "^[a-z0-9][a-z0-9._/-]{0,62}=[A-Za-z0-9._-]{1,63}$",
    "site=flat",
    "A key=value tag."
);
string_schema!(
    TagSelector,
    "^([a-z0-9][a-z0-9._/-]{0,62}=[A-Za-z0-9._-]{1,63}(,[a-z0-9][a-z0-9._/-]{0,62}=[A-Za-z0-9._-]{1,63})*)?$",
    "datacenter=home,role=builder",
    "Tags a worker must all carry to receive the job; empty matches every worker."
);
string_schema!(
    SshPublicKey,
    "^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh.com|sk-ecdsa-sha2-nistp256@openssh.com) [A-Za-z0-9+/]+=* ?.*$",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl admin@laptop",
    "An OpenSSH public key line: algorithm, base64 key and optional comment."
);

string_schema!(
    MediaKeySecret,
    "^ctpf_mk_[0-9a-f]{64}$",
    "ctpf_mk_3f1c6e0a9b5d4c2e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e",
    "A media key's secret, for a medium's kernel command line (ctpf.token=)."
);

impl PartialSchema for Tags {
    fn schema() -> RefOr<Schema> {
        ArrayBuilder::new()
            .items(<Tag as PartialSchema>::schema())
            .description(Some("key=value tags, at most one value per key."))
            .into()
    }
}
impl ToSchema for Tags {}
