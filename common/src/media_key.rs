//! Media keys: named, reusable enrollment credentials that boot media (USB sticks, ISOs) carry
//! on the kernel command line (`ctpf.token=`). Unlike the one-time tokens of a network boot,
//! one key enrolls any number of machines into one datacenter until it expires or is revoked,
//! and its secret can be shown again, so an image rebuilt later embeds the same key.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::{Name, ParseError};

/// A media key's secret: `ctpf_mk_` and 64 lowercase hex digits (256 bits). The prefix tells
/// it apart from one-time tokens (`ctpf_` and 64 hex digits). `Debug` never shows it, so a
/// record logged by accident does not leak it; [`MediaKeySecret::expose`] is the only way out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MediaKeySecret(String);

impl MediaKeySecret {
    pub const PREFIX: &'static str = "ctpf_mk_";

    /// The secret made of these random bytes (the caller draws them; no I/O here).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(format!("{}{}", Self::PREFIX, hex::encode(bytes)))
    }

    /// Validates a secret. Errors never echo the value.
    pub fn parse(field: &str, value: &str) -> Result<Self, ParseError> {
        let hex = value.strip_prefix(Self::PREFIX).ok_or_else(|| {
            ParseError::new(field, "<redacted>", format!("must start with {}", Self::PREFIX))
        })?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ParseError::new(
                field,
                "<redacted>",
                format!("must be {} and 64 lowercase hex digits", Self::PREFIX),
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// Whether a bearer token is meant as a media key (it may still be unknown or malformed).
    pub fn is_media_key(token: &str) -> bool {
        token.starts_with(Self::PREFIX)
    }

    /// The key of the secret → name index: the SHA-256 (hex) of `token`, so enrollment finds
    /// the key in one lookup without the index holding secrets.
    pub fn index_key(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    /// The secret itself, for media and the operator who asked for it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for MediaKeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MediaKeySecret(<redacted>)")
    }
}

impl TryFrom<String> for MediaKeySecret {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse("secret", &s)
    }
}

impl From<MediaKeySecret> for String {
    fn from(value: MediaKeySecret) -> Self {
        value.0
    }
}

/// What an operator sends to create a media key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMediaKey {
    pub name: Name,
    /// The datacenter machines enrolling with the key join.
    pub datacenter: Name,
    /// Seconds the key stays valid: 1 to 31536000 (a year). Required: media outlive their
    /// purpose, so every key ends.
    pub ttl_seconds: u64,
}

impl NewMediaKey {
    /// The longest lifetime a key may have: 365 days.
    pub const MAX_TTL_SECONDS: u64 = 365 * 24 * 3600;

    pub fn validate(&self) -> Result<(), ParseError> {
        if !(1..=Self::MAX_TTL_SECONDS).contains(&self.ttl_seconds) {
            return Err(ParseError::new(
                "ttl_seconds",
                self.ttl_seconds.to_string(),
                format!("must be 1 to {} (365 days)", Self::MAX_TTL_SECONDS),
            ));
        }
        Ok(())
    }
}

/// A media key without its secret: what lists show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MediaKey {
    pub name: Name,
    pub datacenter: Name,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
    /// When it was revoked; a revoked key enrolls nothing, for good.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<OffsetDateTime>,
    /// Enrollments made with it (a machine enrolling again counts again).
    pub enrollments: u64,
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<OffsetDateTime>,
}

/// Whether a key enrolls machines at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MediaKeyStatus {
    Active,
    Expired,
    Revoked,
}

impl MediaKey {
    pub fn new(new: &NewMediaKey, now: OffsetDateTime) -> Self {
        let ttl = time::Duration::seconds(i64::try_from(new.ttl_seconds).unwrap_or(i64::MAX));
        Self {
            name: new.name.clone(),
            datacenter: new.datacenter.clone(),
            created_at: now,
            expires_at: now.saturating_add(ttl),
            revoked_at: None,
            enrollments: 0,
            last_used_at: None,
        }
    }

    /// Revoked wins over expired: it is the operator's last word.
    pub fn status(&self, now: OffsetDateTime) -> MediaKeyStatus {
        if self.revoked_at.is_some() {
            MediaKeyStatus::Revoked
        } else if self.expires_at <= now {
            MediaKeyStatus::Expired
        } else {
            MediaKeyStatus::Active
        }
    }
}

/// A media key with its secret: what creating and showing one return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MediaKeyWithSecret {
    #[serde(flatten)]
    pub key: MediaKey,
    /// Goes on the medium's kernel command line as `ctpf.token=`.
    pub secret: MediaKeySecret,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_checked_and_never_echoed() {
        let secret = MediaKeySecret::from_bytes([0xab; 32]);
        assert_eq!(secret.expose().len(), 8 + 64);
        assert!(MediaKeySecret::is_media_key(secret.expose()));
        assert_eq!(MediaKeySecret::parse("s", secret.expose()).unwrap(), secret);
        assert_eq!(format!("{secret:?}"), "MediaKeySecret(<redacted>)");
        let one_time = format!("ctpf_{}", "ab".repeat(32));
        assert!(!MediaKeySecret::is_media_key(&one_time));
        let upper = format!("ctpf_mk_{}", "AB".repeat(32));
        for bad in [one_time.as_str(), "ctpf_mk_abc", upper.as_str()] {
            let err = MediaKeySecret::parse("secret", bad).unwrap_err();
            assert_eq!((err.field.as_str(), err.value.as_str()), ("secret", "<redacted>"));
        }
        assert_ne!(MediaKeySecret::index_key("a"), MediaKeySecret::index_key("b"));
        assert_eq!(MediaKeySecret::index_key("a").len(), 64);
    }

    #[test]
    fn ttl_is_required_and_bounded() {
        let new = |ttl: u64| NewMediaKey {
            name: "usb".parse().unwrap(),
            datacenter: "home".parse().unwrap(),
            ttl_seconds: ttl,
        };
        assert!(new(1).validate().is_ok());
        assert!(new(NewMediaKey::MAX_TTL_SECONDS).validate().is_ok());
        for bad in [0, NewMediaKey::MAX_TTL_SECONDS + 1, u64::MAX] {
            assert_eq!(new(bad).validate().unwrap_err().field, "ttl_seconds");
        }
        assert!(
            serde_json::from_str::<NewMediaKey>(r#"{"name":"usb","datacenter":"home"}"#).is_err()
        );
    }

    #[test]
    fn status_follows_expiry_and_revocation() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let new = NewMediaKey {
            name: "usb".parse().unwrap(),
            datacenter: "home".parse().unwrap(),
            ttl_seconds: 60,
        };
        let mut key = MediaKey::new(&new, now);
        assert_eq!(key.status(now), MediaKeyStatus::Active);
        assert_eq!(key.status(now + time::Duration::seconds(60)), MediaKeyStatus::Expired);
        key.revoked_at = Some(now);
        assert_eq!(key.status(now), MediaKeyStatus::Revoked);
    }

    #[test]
    fn the_secret_is_a_flat_field_next_to_the_key() {
        let key = MediaKeyWithSecret {
            key: MediaKey::new(
                &NewMediaKey {
                    name: "usb".parse().unwrap(),
                    datacenter: "home".parse().unwrap(),
                    ttl_seconds: 60,
                },
                OffsetDateTime::UNIX_EPOCH,
            ),
            secret: MediaKeySecret::from_bytes([1; 32]),
        };
        let json = serde_json::to_value(&key).unwrap();
        assert_eq!(json["name"], "usb");
        assert_eq!(json["secret"], key.secret.expose());
        assert_eq!(json["revoked_at"], serde_json::Value::Null);
        let back: MediaKeyWithSecret = serde_json::from_value(json).unwrap();
        assert_eq!(back, key);
        // Without the secret it is a plain MediaKey (what lists return).
        assert!(
            !serde_json::to_value(&key.key).unwrap().as_object().unwrap().contains_key("secret")
        );
    }
}
