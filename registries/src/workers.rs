//! Site workers: the credentials they connect with and what the manager knows of their
//! health.
//!
//! A credential belongs to one datacenter. The manager keeps only its secret's SHA-256 and
//! hands the set of live credentials to the bus ([`Bus::authorize_workers`]), which on Redis
//! makes one ACL user per credential confined to its datacenter's keys. Health comes from the
//! workers' heartbeats on the bus; a silent worker is shown as lost, and nothing of its
//! datacenter is deleted.

use std::time::Duration;

use ctpf_bus::WorkerGrant;
use ctpf_common::{
    EventBody, Name, NewEvent, OffsetDateTime, WorkerCredential, WorkerState, WorkerStatus,
    WorkerToken,
};
use ctpf_store::state::{Commit, Precondition, StateError, Table, Write};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};

use crate::{Filter, Registry, RegistryError, encode, now};

/// A credential as stored: the listing plus its secret's SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredCredential {
    #[serde(flatten)]
    credential: WorkerCredential,
    secret_sha256: String,
}

/// What the manager concluded about a worker last, so it records each change once.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KnownWorker {
    state: WorkerState,
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

fn worker_key(datacenter: &Name, id: &str) -> String {
    format!("{datacenter}/{id}")
}

impl Registry {
    /// Issues a credential for a worker of `datacenter`. The token (with the secret) exists
    /// only in the answer.
    pub async fn create_worker_credential(
        &self,
        datacenter: &Name,
    ) -> Result<(WorkerCredential, WorkerToken), RegistryError> {
        let Some((_, dc_version)) =
            self.get::<ctpf_common::Datacenter>(Table::Datacenters, datacenter.as_str()).await?
        else {
            return Err(RegistryError::NotFound { kind: "datacenter", id: datacenter.to_string() });
        };
        let token = WorkerToken { id: random_hex(8), secret: random_hex(32) };
        let credential = WorkerCredential {
            id: token.id.clone(),
            datacenter: datacenter.clone(),
            created_at: now(),
            revoked_at: None,
        };
        let stored = StoredCredential {
            credential: credential.clone(),
            secret_sha256: hex::encode(token.secret_sha256()),
        };
        let event = NewEvent::new(
            Some(datacenter.clone()),
            EventBody::WorkerCredentialCreated { id: credential.id.clone() },
        );
        // Conditional on the datacenter's version, so a credential is never issued for a
        // datacenter being deleted at the same moment.
        let commit = Commit::new()
            .write(Write::check(
                Table::Datacenters,
                datacenter.as_str(),
                Precondition::Version(dc_version),
            ))
            .write(Write::put(
                Table::WorkerCredentials,
                &credential.id,
                encode(&stored)?,
                Precondition::Absent,
            ))
            .event(event);
        match self.state.commit(commit).await {
            Ok(_) => Ok((credential, token)),
            Err(StateError::Conflict { .. }) => Err(RegistryError::Refused(format!(
                "datacenter {datacenter} changed while the credential was issued; try again"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// The live credential `token` proves (its secret matches and it is not revoked); any
    /// other token is [`RegistryError::Forbidden`], without saying which check failed.
    pub async fn verify_worker_token(
        &self,
        token: &WorkerToken,
    ) -> Result<WorkerCredential, RegistryError> {
        let refused = || RegistryError::Forbidden("unknown or revoked worker credential".into());
        let Some((stored, _)) =
            self.get::<StoredCredential>(Table::WorkerCredentials, &token.id).await?
        else {
            return Err(refused());
        };
        let presented = hex::encode(token.secret_sha256());
        let same = ctpf_common::same_secret(&presented, &stored.secret_sha256);
        if !same || stored.credential.revoked_at.is_some() {
            return Err(refused());
        }
        Ok(stored.credential)
    }

    /// Every worker credential, revoked ones included, filtered by datacenter and its tags.
    pub async fn worker_credentials(
        &self,
        filter: &Filter,
    ) -> Result<Vec<WorkerCredential>, RegistryError> {
        let dcs = self.all(Table::Datacenters).await?;
        let stored: Vec<StoredCredential> = self.all(Table::WorkerCredentials).await?;
        let mut list: Vec<WorkerCredential> = stored
            .into_iter()
            .map(|s| s.credential)
            .filter(|c| filter.matches(Some(&c.datacenter), &Default::default(), &dcs))
            .collect();
        list.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(list)
    }

    /// Revokes a credential: the bus stops accepting it at the next
    /// [`Registry::authorize_workers`]. Revoking twice is harmless.
    pub async fn revoke_worker_credential(
        &self,
        id: &str,
    ) -> Result<WorkerCredential, RegistryError> {
        loop {
            let Some((mut stored, version)) =
                self.get::<StoredCredential>(Table::WorkerCredentials, id).await?
            else {
                return Err(RegistryError::NotFound { kind: "worker credential", id: id.into() });
            };
            if stored.credential.revoked_at.is_some() {
                return Ok(stored.credential);
            }
            stored.credential.revoked_at = Some(now());
            let event = NewEvent::new(
                Some(stored.credential.datacenter.clone()),
                EventBody::WorkerCredentialRevoked { id: id.to_owned() },
            );
            let commit = Commit::new()
                .write(Write::put(
                    Table::WorkerCredentials,
                    id,
                    encode(&stored)?,
                    Precondition::Version(version),
                ))
                .event(event);
            match self.state.commit(commit).await {
                Ok(_) => return Ok(stored.credential),
                Err(StateError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Hands the live credentials to the bus; the revoked ones, and those whose datacenter is
    /// gone, stop working.
    pub async fn authorize_workers(&self) -> Result<usize, RegistryError> {
        let dcs: Vec<ctpf_common::Datacenter> = self.all(Table::Datacenters).await?;
        let stored: Vec<StoredCredential> = self.all(Table::WorkerCredentials).await?;
        let mut grants = Vec::new();
        for s in stored {
            let c = &s.credential;
            if c.revoked_at.is_some() || !dcs.iter().any(|d| d.name == c.datacenter) {
                continue;
            }
            let mut secret_sha256 = [0u8; 32];
            if hex::decode_to_slice(&s.secret_sha256, &mut secret_sha256).is_err() {
                tracing::warn!(credential = %c.id, "skipping a credential with a corrupt hash");
                continue;
            }
            grants.push(WorkerGrant {
                credential_id: c.id.clone(),
                datacenter: c.datacenter.clone(),
                secret_sha256,
            });
        }
        self.bus.authorize_workers(&grants).await?;
        Ok(grants.len())
    }

    /// Every worker that heartbeated, newest first per datacenter, marked lost when silent for
    /// longer than `lost_after`.
    pub async fn workers(
        &self,
        filter: &Filter,
        lost_after: Duration,
    ) -> Result<Vec<WorkerStatus>, RegistryError> {
        let dcs = self.all(Table::Datacenters).await?;
        let now = now();
        let mut list: Vec<WorkerStatus> = self
            .bus
            .workers()
            .await?
            .into_iter()
            .filter(|seen| {
                let identity = &seen.heartbeat.identity;
                filter.matches(Some(&identity.datacenter), &identity.tags, &dcs)
            })
            .map(|seen| {
                let last_seen = OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(seen.seen_at_ms) * 1_000_000,
                )
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                let silent = (now - last_seen).try_into().unwrap_or(Duration::ZERO);
                let state =
                    if silent > lost_after { WorkerState::Lost } else { WorkerState::Alive };
                WorkerStatus { heartbeat: seen.heartbeat, last_seen, state }
            })
            .collect();
        list.sort_by(|a, b| {
            let (a, b) = (&a.heartbeat.identity, &b.heartbeat.identity);
            a.datacenter.cmp(&b.datacenter).then(a.id.cmp(&b.id))
        });
        Ok(list)
    }

    /// Records what changed in the workers' health since the last call: `worker_joined`,
    /// `worker_lost` and `worker_back` events, each once. Returns the current statuses.
    pub async fn observe_workers(
        &self,
        lost_after: Duration,
    ) -> Result<Vec<WorkerStatus>, RegistryError> {
        let statuses = self.workers(&Filter::default(), lost_after).await?;
        for status in &statuses {
            let identity = &status.heartbeat.identity;
            let key = worker_key(&identity.datacenter, &identity.id);
            let known = self.get::<KnownWorker>(Table::Workers, &key).await?;
            let body = match (&known, status.state) {
                (None, WorkerState::Alive) => {
                    EventBody::WorkerJoined { worker: identity.id.clone() }
                }
                (None, WorkerState::Lost) => EventBody::WorkerLost { worker: identity.id.clone() },
                (Some((k, _)), now) if k.state == now => continue,
                (Some(_), WorkerState::Lost) => {
                    EventBody::WorkerLost { worker: identity.id.clone() }
                }
                (Some(_), WorkerState::Alive) => {
                    EventBody::WorkerBack { worker: identity.id.clone() }
                }
            };
            let expect = match known {
                Some((_, version)) => Precondition::Version(version),
                None => Precondition::Absent,
            };
            let record = encode(&KnownWorker { state: status.state })?;
            let commit = Commit::new()
                .write(Write::put(Table::Workers, &key, record, expect))
                .event(NewEvent::new(Some(identity.datacenter.clone()), body));
            match self.state.commit(commit).await {
                // Another manager recorded the same change first.
                Ok(_) | Err(StateError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            if status.state == WorkerState::Lost {
                tracing::warn!(worker = %identity.id, datacenter = %identity.datacenter, "worker lost");
            }
        }
        Ok(statuses)
    }

    /// Fills in `waiting_for` on queued jobs that no live worker would take, so a job stuck
    /// for want of a matching worker says so.
    pub async fn annotate_waiting(
        &self,
        jobs: &mut [ctpf_common::Job],
        lost_after: Duration,
    ) -> Result<(), RegistryError> {
        if !jobs.iter().any(|j| j.status == ctpf_common::JobStatus::Queued) {
            return Ok(());
        }
        let alive: Vec<WorkerStatus> = self
            .workers(&Filter::default(), lost_after)
            .await?
            .into_iter()
            .filter(|w| w.state == WorkerState::Alive)
            .collect();
        for job in jobs.iter_mut().filter(|j| j.status == ctpf_common::JobStatus::Queued) {
            let taken = alive.iter().any(|w| w.heartbeat.identity.accepts(&job.selector));
            job.waiting_for = (!taken).then(|| {
                if job.selector.tags().is_empty() {
                    "no live worker".to_owned()
                } else {
                    format!("no live worker matches {}", job.selector)
                }
            });
        }
        Ok(())
    }

    /// Forgets `datacenter`'s workers and revokes its credentials (its forced deletion).
    pub(crate) async fn retire_datacenter_workers(
        &self,
        datacenter: &Name,
    ) -> Result<(), RegistryError> {
        let stored: Vec<StoredCredential> = self.all(Table::WorkerCredentials).await?;
        for s in stored.iter().filter(|s| &s.credential.datacenter == datacenter) {
            self.revoke_worker_credential(&s.credential.id).await?;
        }
        let prefix = format!("{datacenter}/");
        let mut commit = Commit::new();
        for (key, _) in self.state.list(Table::Workers).await? {
            if key.starts_with(&prefix) {
                commit = commit.write(Write::delete(Table::Workers, key, Precondition::Any));
            }
        }
        self.state.commit(commit).await?;
        self.bus.forget_workers(datacenter).await?;
        self.authorize_workers().await?;
        Ok(())
    }

    /// How many live credentials and known workers `datacenter` has.
    pub(crate) async fn datacenter_workers(
        &self,
        datacenter: &Name,
    ) -> Result<(usize, usize), RegistryError> {
        let stored: Vec<StoredCredential> = self.all(Table::WorkerCredentials).await?;
        let credentials = stored
            .iter()
            .filter(|s| &s.credential.datacenter == datacenter && s.credential.revoked_at.is_none())
            .count();
        let workers = self
            .bus
            .workers()
            .await?
            .iter()
            .filter(|seen| &seen.heartbeat.identity.datacenter == datacenter)
            .count();
        Ok((credentials, workers))
    }
}
