//! Enrollment: a booted machine registers itself with a token it was handed (in its kernel
//! command line or on its boot medium): a one-time token, or a media key (`ctpf_mk_...`, see
//! `media_keys`). The token is consumed, or the media key's count raised, in the same commit
//! that writes the host, so a token can never enroll more machines than it allows and no
//! enrollment goes uncounted, even when used twice at once. A machine keeps one identity
//! across reboots: it is recognised by its SMBIOS UUID first, then by any of its MACs.

use ctpf_common::{
    Datacenter, EventBody, Host, HostReport, HostState, MediaKeySecret, Name, NewEvent, NewHost,
    OffsetDateTime, Uuid,
};
use ctpf_store::state::{Commit, Precondition, StateError, Table, Write};

use crate::{
    Registry, RegistryError, decode, encode, identity_keys,
    tokens::{TokenRecord, TokenRole, token_key},
};

/// Firmware that ships without a real UUID reports one of these; matching on them would
/// merge unrelated machines into one host.
fn meaningful_uuid(uuid: Option<Uuid>) -> Option<Uuid> {
    uuid.filter(|u| !u.is_nil() && !u.is_max())
}

/// What an enrollment's credential contributes to its commit: the compare-and-swap write that
/// uses it up (one-time token) or counts it (media key), the datacenter a new host joins, and
/// the media key's name.
#[derive(Debug)]
struct Claim {
    write: Option<Write>,
    datacenter: Name,
    media_key: Option<Name>,
}

/// What vouches for an enrollment.
#[derive(Debug, Clone, Copy)]
enum Credential<'a> {
    /// A one-time token or a media key's secret, from the machine.
    Token(&'a str),
    /// A site worker of this datacenter forwarded the callback.
    Site(&'a Name),
}

impl Registry {
    /// Enrolls the machine described by `report` with `token` (a one-time enrollment token
    /// or a media key's secret). Returns the host and whether it is new. A new host joins the
    /// credential's datacenter; a known one stays where it is. Unknown, used, expired and
    /// revoked credentials are refused with [`RegistryError::Forbidden`] and recorded as
    /// `enrollment_refused` events.
    pub async fn enroll(
        &self,
        token: &str,
        report: HostReport,
    ) -> Result<(Host, bool), RegistryError> {
        self.enroll_with(Credential::Token(token), report).await
    }

    /// Enrolls a machine whose callback a site worker of `datacenter` took and forwarded (the
    /// worker's Redis credentials vouch for the datacenter; the machine booted there). A new
    /// host joins `datacenter`; a known host of another datacenter is refused, since a worker
    /// may not act for other sites. Forwarded callbacks may arrive more than once: the second
    /// one finds the host and only updates it.
    pub async fn enroll_forwarded(
        &self,
        datacenter: &Name,
        report: HostReport,
    ) -> Result<(Host, bool), RegistryError> {
        self.enroll_with(Credential::Site(datacenter), report).await
    }

    async fn enroll_with(
        &self,
        credential: Credential<'_>,
        report: HostReport,
    ) -> Result<(Host, bool), RegistryError> {
        report.validate()?;
        // Conflicts mean another enrollment or registration raced this one; look again.
        for _ in 0..32 {
            let now = OffsetDateTime::now_utc();
            let claim = match credential {
                Credential::Token(token) => self.enrollment_claim(token, now).await?,
                Credential::Site(datacenter) => {
                    Claim { write: None, datacenter: datacenter.clone(), media_key: None }
                }
            };
            let mut commit = Commit::new();
            if let Some(write) = claim.write {
                commit = commit.write(write);
            }
            let media_key = claim.media_key.as_ref();
            let (commit, host, new) = match self.find_enrolling_host(&report).await? {
                Some((host, _)) if matches!(credential, Credential::Site(dc) if *dc != host.datacenter) =>
                {
                    return Err(self
                        .refuse(&format!(
                            "a worker of datacenter {} forwarded a callback of host {}, which \
                             belongs to datacenter {}",
                            claim.datacenter, host.id, host.datacenter
                        ))
                        .await);
                }
                Some((host, version)) => {
                    self.update_enrolled(commit, host, version, &report, media_key, now)?
                }
                None => match self
                    .create_enrolled(commit, &claim.datacenter, &report, media_key, now)
                    .await?
                {
                    Some(created) => created,
                    None => {
                        return Err(RegistryError::NotFound {
                            kind: "datacenter",
                            id: claim.datacenter.to_string(),
                        });
                    }
                },
            };
            let commit = commit.event(NewEvent::new(
                Some(host.datacenter.clone()),
                EventBody::HostEnrolled { host_id: host.id, new, media_key: claim.media_key },
            ));
            match self.state.commit(commit).await {
                Ok(_) => {
                    tracing::info!(host = %host.id, datacenter = %host.datacenter, new,
                        media_key = host.media_key.as_ref().map(Name::as_str), "host enrolled");
                    return Ok((host, new));
                }
                Err(StateError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RegistryError::Refused("enrollment kept conflicting with other changes; retry".into()))
    }

    /// The datacenter `token` (a one-time token or a media key) enrolls a new machine into,
    /// if it may enroll one now; otherwise [`RegistryError::Forbidden`] (logged and
    /// recorded). Changes nothing, so the API can check a credential before it even reads the
    /// request body.
    pub async fn check_enrollment(&self, token: &str) -> Result<Name, RegistryError> {
        if MediaKeySecret::is_media_key(token) {
            let (key, _) = self.usable_media_key(token).await?;
            return Ok(key.key.datacenter);
        }
        let (_, _, datacenter) = self.usable_enrollment_token(token).await?;
        Ok(datacenter)
    }

    /// Checks `token` and returns the write that uses it up (compare-and-swap on its record).
    async fn enrollment_claim(
        &self,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Claim, RegistryError> {
        if MediaKeySecret::is_media_key(token) {
            let (mut key, version) = self.usable_media_key(token).await?;
            key.key.enrollments = key.key.enrollments.saturating_add(1);
            key.key.last_used_at = Some(now);
            let write = Write::put(
                Table::MediaKeys,
                key.key.name.as_str(),
                encode(&key)?,
                Precondition::Version(version),
            );
            return Ok(Claim {
                write: Some(write),
                datacenter: key.key.datacenter,
                media_key: Some(key.key.name),
            });
        }
        let (record, version, datacenter) = self.usable_enrollment_token(token).await?;
        let mut consumed = record;
        consumed.uses_left = consumed.uses_left.map(|n| n - 1);
        let write = Write::put(
            Table::Tokens,
            token_key(token),
            encode(&consumed)?,
            Precondition::Version(version),
        );
        Ok(Claim { write: Some(write), datacenter, media_key: None })
    }

    /// The token's record, version and datacenter if it may enroll a machine now; otherwise
    /// [`RegistryError::Forbidden`] (logged and recorded). Changes nothing, so the API can
    /// check a token before it even reads the request body.
    pub async fn usable_enrollment_token(
        &self,
        token: &str,
    ) -> Result<(TokenRecord, u64, Name), RegistryError> {
        let key = token_key(token);
        let Some(stored) = self.state.get(Table::Tokens, &key).await? else {
            return Err(self.refuse("unknown enrollment token").await);
        };
        let record: TokenRecord = decode(Table::Tokens, &key, &stored)?;
        if record.role != TokenRole::Enrollment {
            return Err(self.refuse("not an enrollment token").await);
        }
        if record.expires_at.is_some_and(|at| at <= OffsetDateTime::now_utc()) {
            return Err(self.refuse("enrollment token expired").await);
        }
        if record.uses_left == Some(0) {
            return Err(self.refuse("enrollment token already used").await);
        }
        let Some(datacenter) = record.datacenter.clone() else {
            return Err(self.refuse("enrollment token names no datacenter").await);
        };
        Ok((record, stored.version, datacenter))
    }

    /// Logs and records a refused enrollment, and returns the error to answer with.
    pub(crate) async fn refuse(&self, reason: &str) -> RegistryError {
        tracing::warn!(reason, "enrollment refused");
        let event = NewEvent::new(None, EventBody::EnrollmentRefused { reason: reason.to_owned() });
        if let Err(e) = self.state.commit(Commit::new().event(event)).await {
            tracing::warn!(error = %e, "could not record a refused enrollment");
        }
        RegistryError::Forbidden(reason.to_owned())
    }

    /// The host this machine already is: by SMBIOS UUID first, then by any MAC.
    async fn find_enrolling_host(
        &self,
        report: &HostReport,
    ) -> Result<Option<(Host, u64)>, RegistryError> {
        self.host_by_identity(report.smbios_uuid, &report.macs).await
    }

    /// The host with this SMBIOS UUID, else with any of these MACs, and its record version.
    /// Placeholder UUIDs (all zeros or all ones) are not used for matching.
    pub async fn host_by_identity(
        &self,
        smbios_uuid: Option<Uuid>,
        macs: &[ctpf_common::MacAddr],
    ) -> Result<Option<(Host, u64)>, RegistryError> {
        let uuid_key = meaningful_uuid(smbios_uuid).map(|u| format!("uuid:{u}"));
        let mac_keys = macs.iter().map(|m| format!("mac:{m}"));
        for index_key in uuid_key.into_iter().chain(mac_keys) {
            let Some(entry) = self.state.get(Table::HostIndex, &index_key).await? else { continue };
            let host_id = String::from_utf8_lossy(&entry.value).into_owned();
            if let Some(found) = self.state.get(Table::Hosts, &host_id).await? {
                return Ok(Some((decode(Table::Hosts, &host_id, &found)?, found.version)));
            }
        }
        Ok(None)
    }

    /// Adds the update of a known host to `commit`: new MACs (and a first real UUID) are
    /// claimed in the index, the reported facts replace the old ones.
    fn update_enrolled(
        &self,
        mut commit: Commit,
        mut host: Host,
        version: u64,
        report: &HostReport,
        media_key: Option<&Name>,
        now: OffsetDateTime,
    ) -> Result<(Commit, Host, bool), RegistryError> {
        let id = host.id.to_string();
        for mac in &report.macs {
            if !host.macs.contains(mac) {
                host.macs.push(*mac);
                let claim = Write::put(
                    Table::HostIndex,
                    format!("mac:{mac}"),
                    id.clone().into_bytes(),
                    Precondition::Absent,
                );
                commit = commit.write(claim);
            }
        }
        if host.smbios_uuid.is_none()
            && let Some(uuid) = meaningful_uuid(report.smbios_uuid)
        {
            host.smbios_uuid = Some(uuid);
            let claim = Write::put(
                Table::HostIndex,
                format!("uuid:{uuid}"),
                id.clone().into_bytes(),
                Precondition::Absent,
            );
            commit = commit.write(claim);
        }
        host.arch = Some(report.arch);
        host.addresses = report.addresses.clone();
        host.inventory = report.inventory.clone();
        if let Some(key) = media_key {
            host.media_key = Some(key.clone());
        }
        host.updated_at = now;
        let commit = commit.write(Write::put(
            Table::Hosts,
            &id,
            encode(&host)?,
            Precondition::Version(version),
        ));
        Ok((commit, host, false))
    }

    /// Adds a new host in `datacenter` to `commit` (claiming its identity and bumping the
    /// datacenter's version, as [`Registry::create_host`] does). `None` when the datacenter
    /// is gone.
    async fn create_enrolled(
        &self,
        commit: Commit,
        datacenter: &Name,
        report: &HostReport,
        media_key: Option<&Name>,
        now: OffsetDateTime,
    ) -> Result<Option<(Commit, Host, bool)>, RegistryError> {
        let Some(stored) = self.state.get(Table::Datacenters, datacenter.as_str()).await? else {
            return Ok(None);
        };
        let dc: Datacenter = decode(Table::Datacenters, datacenter.as_str(), &stored)?;
        let new = NewHost {
            datacenter: datacenter.clone(),
            hostname: None,
            macs: report.macs.clone(),
            smbios_uuid: meaningful_uuid(report.smbios_uuid),
            arch: Some(report.arch),
            addresses: report.addresses.clone(),
            labels: Default::default(),
        };
        let mut host = Host::new(Uuid::now_v7(), new, HostState::Discovered, now);
        host.inventory = report.inventory.clone();
        host.media_key = media_key.cloned();
        let id = host.id.to_string();
        let mut commit = commit
            .write(Write::put(
                Table::Datacenters,
                dc.name.as_str(),
                encode(&dc)?,
                Precondition::Version(stored.version),
            ))
            .write(Write::put(Table::Hosts, &id, encode(&host)?, Precondition::Absent));
        for index_key in identity_keys(&host) {
            commit = commit.write(Write::put(
                Table::HostIndex,
                index_key,
                id.clone().into_bytes(),
                Precondition::Absent,
            ));
        }
        Ok(Some((commit, host, true)))
    }
}
