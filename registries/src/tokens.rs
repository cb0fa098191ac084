//! API tokens. Only a token's SHA-256 is stored, so a leaked state store does not leak
//! credentials; the plaintext exists once, in the file or output it is handed to.

use ctpf_common::OffsetDateTime;
use ctpf_store::state::{Commit, Precondition, Table, Write};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{Registry, RegistryError, decode, encode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenRole {
    /// The whole manager API.
    Admin,
    /// Only `POST /v1/enroll`: a booted machine registering itself in one datacenter.
    Enrollment,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: TokenRole,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Enrollment tokens: the datacenter a machine enrolling with it joins.
    #[serde(default)]
    pub datacenter: Option<ctpf_common::Name>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Enrollments left; `None` is unlimited (admin tokens).
    #[serde(default)]
    pub uses_left: Option<u32>,
}

const PREFIX: &str = "ctpf_";

pub(crate) fn token_key(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token: `ctpf_` and 64 hex digits (256 bits).
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{PREFIX}{}", hex::encode(bytes))
}

impl Registry {
    /// Registers `token` (idempotent: registering the same token again keeps its record).
    pub async fn register_token(
        &self,
        token: &str,
        name: &str,
        role: TokenRole,
    ) -> Result<(), RegistryError> {
        let record = TokenRecord {
            name: name.to_owned(),
            role,
            created_at: OffsetDateTime::now_utc(),
            datacenter: None,
            expires_at: None,
            uses_left: None,
        };
        let commit = Commit::new().write(Write::put(
            Table::Tokens,
            token_key(token),
            encode(&record)?,
            Precondition::Absent,
        ));
        match self.state.commit(commit).await {
            Ok(_) | Err(ctpf_store::state::StateError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The token's record, or `None` for an unknown token.
    pub async fn verify_token(&self, token: &str) -> Result<Option<TokenRecord>, RegistryError> {
        if !token.starts_with(PREFIX) || token.len() != PREFIX.len() + 64 {
            return Ok(None);
        }
        let key = token_key(token);
        match self.state.get(Table::Tokens, &key).await? {
            Some(rec) => Ok(Some(decode(Table::Tokens, &key, &rec)?)),
            None => Ok(None),
        }
    }

    /// Issues a token a machine uses to enroll itself into `datacenter`: valid for `ttl`,
    /// `uses` times (1 for the one-time token of a rendered boot; more for boot media).
    pub async fn issue_enrollment_token(
        &self,
        datacenter: &ctpf_common::Name,
        ttl: std::time::Duration,
        uses: u32,
    ) -> Result<(String, TokenRecord), RegistryError> {
        self.datacenter(datacenter).await?;
        let token = generate_token();
        let now = OffsetDateTime::now_utc();
        let record = TokenRecord {
            name: format!("enroll-{datacenter}"),
            role: TokenRole::Enrollment,
            created_at: now,
            datacenter: Some(datacenter.clone()),
            expires_at: Some(now + ttl),
            uses_left: Some(uses),
        };
        let commit = Commit::new().write(Write::put(
            Table::Tokens,
            token_key(&token),
            encode(&record)?,
            Precondition::Absent,
        ));
        self.state.commit(commit).await?;
        Ok((token, record))
    }
}
