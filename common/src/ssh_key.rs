use std::fmt;

use base64::{
    Engine as _, engine::general_purpose::STANDARD, engine::general_purpose::STANDARD_NO_PAD,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::{Name, ParseError, Tags};

const ALGORITHMS: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// One OpenSSH public key line (`ALGORITHM BASE64 [COMMENT]`). authorized_keys options such as
/// `command="..."` are refused: ctpf writes keys into hosts' authorized_keys itself, so a key
/// must never smuggle options or extra lines into that file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SshPublicKey {
    algorithm: String,
    blob: Vec<u8>,
    comment: Option<String>,
}

impl SshPublicKey {
    pub fn parse(field: &str, text: &str) -> Result<Self, ParseError> {
        let bad = |reason: &str| ParseError::new(field, text, reason);
        let line = text.trim();
        if line.contains(['\n', '\r', '\0']) {
            return Err(bad("must be a single line"));
        }
        let mut parts = line.splitn(3, [' ', '\t']);
        let algorithm = parts.next().unwrap_or_default();
        if !ALGORITHMS.contains(&algorithm) {
            return Err(bad(&format!(
                "unknown key type; expected one of {}",
                ALGORITHMS.join(", ")
            )));
        }
        let encoded = parts.next().ok_or_else(|| bad("missing the base64 key"))?;
        let blob = STANDARD.decode(encoded).map_err(|_| bad("the key is not valid base64"))?;
        // The blob starts with its own algorithm name as an SSH string; a mismatch means a
        // mangled or mislabelled key.
        let inner_ok = blob.len() > 4 && {
            let n = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
            blob.get(4..4 + n) == Some(algorithm.as_bytes())
        };
        if !inner_ok {
            return Err(bad("the key data does not match its type"));
        }
        let comment = parts.next().map(str::trim).filter(|c| !c.is_empty());
        if let Some(c) = comment
            && (c.len() > 256 || c.chars().any(char::is_control))
        {
            return Err(bad("the comment must be printable and at most 256 characters"));
        }
        Ok(Self { algorithm: algorithm.to_owned(), blob, comment: comment.map(str::to_owned) })
    }

    pub fn algorithm(&self) -> &str {
        &self.algorithm
    }

    pub fn comment(&self) -> Option<&str> {
        self.comment.as_deref()
    }

    /// OpenSSH's `SHA256:...` fingerprint, as `ssh-keygen -lf` prints it.
    pub fn fingerprint(&self) -> String {
        format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(&self.blob)))
    }
}

crate::text_conversions!(SshPublicKey, "public_key");

impl fmt::Display for SshPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.algorithm, STANDARD.encode(&self.blob))?;
        if let Some(c) = &self.comment {
            write!(f, " {c}")?;
        }
        Ok(())
    }
}

/// What a client sends to register a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSshKey {
    pub name: Name,
    pub public_key: SshPublicKey,
    /// The datacenter whose hosts get this key; none means every datacenter.
    #[serde(default)]
    pub datacenter: Option<Name>,
    #[serde(default)]
    pub tags: Tags,
}

/// A registered SSH public key, deployed to hosts' authorized_keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SshKey {
    pub name: Name,
    pub public_key: SshPublicKey,
    pub fingerprint: String,
    pub datacenter: Option<Name>,
    pub tags: Tags,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

impl SshKey {
    pub fn new(new: NewSshKey, now: OffsetDateTime) -> Self {
        Self {
            fingerprint: new.public_key.fingerprint(),
            name: new.name,
            public_key: new.public_key,
            datacenter: new.datacenter,
            tags: new.tags,
            created_at: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A throwaway key generated for this test with ssh-keygen; fingerprint from `ssh-keygen -lf`.
    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl admin@laptop";

    #[test]
    fn parses_openssh_lines() {
        let key: SshPublicKey = KEY.parse().unwrap();
        assert_eq!(key.algorithm(), "ssh-ed25519");
        assert_eq!(key.comment(), Some("admin@laptop"));
        assert_eq!(key.to_string(), KEY);
        assert!(key.fingerprint().starts_with("SHA256:"));
        assert_eq!(key.fingerprint().len(), 7 + 43);
    }

    #[test]
    fn refuses_options_and_garbage() {
        let with_options = format!("command=\"rm -rf /\" {KEY}");
        let two_lines = format!("{KEY}\n{KEY}");
        let mislabelled = KEY.replace("ssh-ed25519 ", "ssh-rsa ");
        for bad in ["", "ssh-ed25519", "ssh-ed25519 !!!", &with_options, &two_lines, &mislabelled] {
            let err = SshPublicKey::parse("public_key", bad).unwrap_err();
            assert_eq!(err.field, "public_key");
        }
    }
}
