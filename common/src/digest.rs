use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::ParseError;

/// A SHA-256 content digest, the name of every artifact. Text form: `sha256:` and 64 lowercase
/// hex digits (the OCI form); the bare 64 hex digits are accepted on input too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Digest([u8; 32]);

impl Sha256Digest {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Digest of an in-memory value (small inputs only; stores hash while streaming).
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// The 64 lowercase hex digits, without the `sha256:` prefix (used in file and object keys).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn parse(field: &str, text: &str) -> Result<Self, ParseError> {
        let hex_part = text.strip_prefix("sha256:").unwrap_or(text);
        if hex_part.len() != 64 {
            return Err(ParseError::new(field, text, "expected sha256: and 64 hex digits"));
        }
        if !hex_part.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(ParseError::new(field, text, "expected lowercase hex digits"));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes)
            .map_err(|_| ParseError::new(field, text, "expected lowercase hex digits"))?;
        Ok(Self(bytes))
    }
}

crate::text_conversions!(Sha256Digest, "digest");

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_of_empty_input() {
        let d = Sha256Digest::of(b"");
        assert_eq!(d.hex(), EMPTY);
        assert_eq!(d.to_string(), format!("sha256:{EMPTY}"));
        assert_eq!(format!("sha256:{EMPTY}").parse::<Sha256Digest>().unwrap(), d);
        assert_eq!(EMPTY.parse::<Sha256Digest>().unwrap(), d);
    }

    #[test]
    fn rejects_bad_digests() {
        let upper = EMPTY.to_uppercase();
        for bad in ["", "sha256:", "sha256:abc", "md5:abcd", &upper, &format!("{EMPTY}00")] {
            let err = Sha256Digest::parse("digest", bad).unwrap_err();
            assert_eq!(err.field, "digest");
        }
    }
}
