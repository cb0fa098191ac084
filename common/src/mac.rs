use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ParseError;

/// An Ethernet MAC address. Accepts `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` and
/// `aabb.ccdd.eeff` in any case; always printed lowercase with colons, the form iPXE's
/// `${net0/mac}` and Linux use, so lookups by MAC never miss on spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    pub const fn new(octets: [u8; 6]) -> Self {
        Self(octets)
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    pub fn parse(field: &str, text: &str) -> Result<Self, ParseError> {
        let bad = |reason: &str| ParseError::new(field, text, reason);
        let hex: String = text.chars().filter(|c| !matches!(c, ':' | '-' | '.')).collect();
        let separators = text.len() - hex.len();
        let well_formed = match separators {
            0 => text.len() == 12,
            2 => text.len() == 14 && text.as_bytes()[4] == b'.' && text.as_bytes()[9] == b'.',
            5 => {
                text.len() == 17
                    && (2..17).step_by(3).all(|i| matches!(text.as_bytes()[i], b':' | b'-'))
            }
            _ => false,
        };
        if !well_formed || hex.len() != 12 {
            return Err(bad("expected six hex octets like 52:54:00:12:34:56"));
        }
        let mut octets = [0u8; 6];
        hex::decode_to_slice(&hex, &mut octets).map_err(|_| bad("contains a non-hex digit"))?;
        Ok(Self(octets))
    }
}

crate::text_conversions!(MacAddr, "mac");

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3], o[4], o[5])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_common_spellings() {
        let want = MacAddr::new([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
        for s in ["52:54:00:ab:cd:ef", "52-54-00-AB-CD-EF", "525400abcdef", "5254.00ab.cdef"] {
            assert_eq!(s.parse::<MacAddr>().unwrap(), want, "{s}");
        }
        assert_eq!(want.to_string(), "52:54:00:ab:cd:ef");
    }

    #[test]
    fn rejects_and_names_the_value() {
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:eg",
            "52:54:00:ab:cd:ef:00",
            "5:254:00:ab:cd:ef",
            "zz",
        ] {
            let err = MacAddr::parse("macs[0]", bad).unwrap_err();
            assert_eq!(err.field, "macs[0]");
            assert_eq!(err.value, bad);
        }
    }
}
