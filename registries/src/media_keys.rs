//! Media keys: named, reusable enrollment credentials for boot media (headscale's pre-auth
//! keys). One key enrolls any number of machines into its datacenter until it expires or is
//! revoked; each machine still gets its own host (matched by SMBIOS UUID, then MAC, as every
//! enrollment is).
//!
//! Unlike API and one-time tokens (stored as SHA-256 only), a media key's plaintext secret is
//! stored in its record: boot media are built to be byte-reproducible, so rebuilding an image
//! later must embed the very same key, and the only place to get it from again is here
//! (`GET /v1/media-keys/NAME`, admin only). The secret → name index holds only the secret's
//! SHA-256, so enrollment finds a key in one lookup without a second copy of the secret.
//! Events and logs carry key names, never secrets.

use ctpf_common::{
    Datacenter, EventBody, MediaKey, MediaKeySecret, MediaKeyStatus, MediaKeyWithSecret, Name,
    NewEvent, NewMediaKey, OffsetDateTime,
};
use ctpf_store::state::{Commit, Precondition, StateError, Table, Write};
use rand::RngCore as _;

use crate::{Registry, RegistryError, encode};

/// A new random secret (256 bits).
fn generate_secret() -> MediaKeySecret {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    MediaKeySecret::from_bytes(bytes)
}

fn not_found(name: &Name) -> RegistryError {
    RegistryError::NotFound { kind: "media key", id: name.to_string() }
}

impl Registry {
    /// Creates a media key for `new.datacenter`, valid for `new.ttl_seconds`. The commit
    /// writes the key, claims its index entry and checks the datacenter is still there (at
    /// the version read), with the `media_key_created` event.
    pub async fn create_media_key(
        &self,
        new: NewMediaKey,
    ) -> Result<MediaKeyWithSecret, RegistryError> {
        new.validate()?;
        // Conflicts on the datacenter mean it changed meanwhile (a host joined); look again.
        for _ in 0..16 {
            let Some((_, dc_version)) =
                self.get::<Datacenter>(Table::Datacenters, new.datacenter.as_str()).await?
            else {
                return Err(RegistryError::NotFound {
                    kind: "datacenter",
                    id: new.datacenter.to_string(),
                });
            };
            let key = MediaKeyWithSecret {
                key: MediaKey::new(&new, OffsetDateTime::now_utc()),
                secret: generate_secret(),
            };
            let commit = Commit::new()
                .write(Write::check(
                    Table::Datacenters,
                    new.datacenter.as_str(),
                    Precondition::Version(dc_version),
                ))
                .write(Write::put(
                    Table::MediaKeys,
                    new.name.as_str(),
                    encode(&key)?,
                    Precondition::Absent,
                ))
                .write(Write::put(
                    Table::MediaKeyIndex,
                    MediaKeySecret::index_key(key.secret.expose()),
                    new.name.as_str().as_bytes().to_vec(),
                    Precondition::Absent,
                ))
                .event(NewEvent::new(
                    Some(new.datacenter.clone()),
                    EventBody::MediaKeyCreated { name: new.name.clone() },
                ));
            match self.state.commit(commit).await {
                Ok(_) => {
                    tracing::info!(name = %new.name, datacenter = %new.datacenter, "media key created");
                    return Ok(key);
                }
                Err(StateError::Conflict { table: Table::MediaKeys, .. }) => {
                    return Err(RegistryError::AlreadyExists {
                        kind: "media key",
                        id: new.name.to_string(),
                    });
                }
                // The datacenter changed, or (never, at 256 bits) the secret was taken.
                Err(StateError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RegistryError::Refused(format!(
            "datacenter {} is too busy; retry creating the media key",
            new.datacenter
        )))
    }

    /// One key, with its secret.
    pub async fn media_key(&self, name: &Name) -> Result<MediaKeyWithSecret, RegistryError> {
        self.get(Table::MediaKeys, name.as_str())
            .await?
            .map(|(k, _)| k)
            .ok_or_else(|| not_found(name))
    }

    /// All keys (of `datacenter`, if given), by name, without their secrets.
    pub async fn media_keys(
        &self,
        datacenter: Option<&Name>,
    ) -> Result<Vec<MediaKey>, RegistryError> {
        let all: Vec<MediaKeyWithSecret> = self.all(Table::MediaKeys).await?;
        let mut keys: Vec<MediaKey> = all
            .into_iter()
            .map(|k| k.key)
            .filter(|k| datacenter.is_none_or(|dc| &k.datacenter == dc))
            .collect();
        keys.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(keys)
    }

    /// Revokes a key for good. Idempotent: revoking a revoked key changes nothing (and
    /// records no second event).
    pub async fn revoke_media_key(&self, name: &Name) -> Result<MediaKey, RegistryError> {
        loop {
            let Some((mut key, version)) =
                self.get::<MediaKeyWithSecret>(Table::MediaKeys, name.as_str()).await?
            else {
                return Err(not_found(name));
            };
            if key.key.revoked_at.is_some() {
                return Ok(key.key);
            }
            key.key.revoked_at = Some(OffsetDateTime::now_utc());
            let commit = Commit::new()
                .write(Write::put(
                    Table::MediaKeys,
                    name.as_str(),
                    encode(&key)?,
                    Precondition::Version(version),
                ))
                .event(NewEvent::new(
                    Some(key.key.datacenter.clone()),
                    EventBody::MediaKeyRevoked { name: name.clone() },
                ));
            match self.state.commit(commit).await {
                Ok(_) => {
                    tracing::info!(name = %name, "media key revoked");
                    return Ok(key.key);
                }
                // An enrollment counted meanwhile; read again.
                Err(StateError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The key a media secret belongs to and its record version, if it may enroll a machine
    /// now; otherwise [`RegistryError::Forbidden`] (logged and recorded, by key name only).
    /// Refused: an unknown secret, a revoked or expired key, and a key whose datacenter is
    /// gone, including one deleted and created again since the key was made (deleting a
    /// datacenter ends its keys).
    pub(crate) async fn usable_media_key(
        &self,
        secret: &str,
    ) -> Result<(MediaKeyWithSecret, u64), RegistryError> {
        let index_key = MediaKeySecret::index_key(secret);
        let Some(entry) = self.state.get(Table::MediaKeyIndex, &index_key).await? else {
            return Err(self.refuse("unknown media key").await);
        };
        let name = String::from_utf8_lossy(&entry.value).into_owned();
        let Some((key, version)) = self.get::<MediaKeyWithSecret>(Table::MediaKeys, &name).await?
        else {
            return Err(self.refuse("unknown media key").await);
        };
        // The index is keyed by a hash; the stored secret is the authority.
        if key.secret.expose() != secret {
            return Err(self.refuse("unknown media key").await);
        }
        match key.key.status(OffsetDateTime::now_utc()) {
            MediaKeyStatus::Active => {}
            MediaKeyStatus::Revoked => {
                return Err(self.refuse(&format!("media key {name} is revoked")).await);
            }
            MediaKeyStatus::Expired => {
                return Err(self.refuse(&format!("media key {name} expired")).await);
            }
        }
        let dc = self.get::<Datacenter>(Table::Datacenters, key.key.datacenter.as_str()).await?;
        if dc.is_none_or(|(dc, _)| dc.created_at > key.key.created_at) {
            let reason = format!("the datacenter of media key {name} is gone");
            return Err(self.refuse(&reason).await);
        }
        Ok((key, version))
    }
}
