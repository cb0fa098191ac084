use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ParseError;

/// A resource name: a lowercase DNS label (`[a-z0-9]([a-z0-9-]*[a-z0-9])?`, at most 63 bytes).
/// Datacenters, hosts and keys are named this way so a name is always safe in a hostname, a
/// URL path, a Redis key and a file name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    pub fn parse(field: &str, value: &str) -> Result<Self, ParseError> {
        let bad = |reason: &str| ParseError::new(field, value, reason);
        if value.is_empty() {
            return Err(bad("must not be empty"));
        }
        if value.len() > 63 {
            return Err(bad("must be at most 63 characters"));
        }
        if !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(bad("may contain only a-z, 0-9 and '-'"));
        }
        if value.starts_with('-') || value.ends_with('-') {
            return Err(bad("must start and end with a letter or digit"));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

crate::text_conversions!(Name, "name");

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A file-like name for an artifact (`ipxe.efi`, `vmlinuz-6.1`, `discovery.initrd.zst`):
/// `[A-Za-z0-9._+-]`, at most 128 bytes, not starting with a dot. Never contains a path
/// separator, so it is safe as a TFTP path component or a download file name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ArtifactName(String);

impl ArtifactName {
    pub fn parse(field: &str, value: &str) -> Result<Self, ParseError> {
        let bad = |reason: &str| ParseError::new(field, value, reason);
        if value.is_empty() {
            return Err(bad("must not be empty"));
        }
        if value.len() > 128 {
            return Err(bad("must be at most 128 characters"));
        }
        if value.starts_with('.') {
            return Err(bad("must not start with '.'"));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
        {
            return Err(bad("may contain only A-Z, a-z, 0-9, '.', '_', '-' and '+'"));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

crate::text_conversions!(ArtifactName, "artifact name");

impl fmt::Display for ArtifactName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_dns_labels() {
        for ok in ["a", "home", "dc-1", "x0", &"a".repeat(63)] {
            assert!(Name::parse("name", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn names_reject_and_explain() {
        let err = Name::parse("datacenter", "Home").unwrap_err();
        assert_eq!(err.field, "datacenter");
        assert_eq!(err.value, "Home");
        assert!(err.to_string().contains("datacenter"), "{err}");
        for bad in ["", "-a", "a-", "a_b", "a.b", "../x", &"a".repeat(64), "a b", "é"] {
            assert!(Name::parse("name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn artifact_names_refuse_paths() {
        assert!(ArtifactName::parse("n", "ipxe.efi").is_ok());
        assert!(ArtifactName::parse("n", "vmlinuz-6.1.0+deb").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "a\\b", "a\0b", "a b"] {
            assert!(ArtifactName::parse("n", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serde_validates() {
        let err = serde_json::from_str::<Name>("\"Bad Name\"").unwrap_err();
        assert!(err.to_string().contains("invalid name"), "{err}");
    }
}
