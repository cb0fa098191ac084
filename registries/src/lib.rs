//! Registries: what ctpf knows. Datacenters with their tags, hosts, SSH keys, artifact names,
//! jobs, API tokens, media keys and the event log, kept in a [`StateStore`] as JSON records.
//!
//! Every change is one atomic commit that also appends its event, so the event log never
//! claims something the records do not show. Jobs are recorded here first and then put on
//! the [`Bus`]; workers' reports come back through [`Registry::apply_report`].

use std::sync::Arc;

use ctpf_bus::{Bus, BusError, JobEnvelope};
use ctpf_common::{
    Artifact, BuildLogLine, BuildManifest, Datacenter, Event, EventBody, Host, HostPatch,
    HostState, Job, JobSpec, JobStatus, Name, NewBuild, NewDatacenter, NewEvent, NewHost, NewJob,
    NewPackage, NewSshKey, OffsetDateTime, PackageManifest, ParseError, SshKey, Tag, TagSelector,
    Tags, Uuid,
};
use ctpf_store::state::{Commit, Precondition, Record, StateError, StateStore, Table, Write};
use serde::{Serialize, de::DeserializeOwned};

mod enroll;
mod media_keys;
mod network;
mod snapshots;
mod tokens;
mod workers;

pub use snapshots::SnapshotSettings;

pub use tokens::generate_token;

pub use tokens::{TokenRecord, TokenRole};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} {id} already exists")]
    AlreadyExists { kind: &'static str, id: String },
    #[error(transparent)]
    Invalid(#[from] ParseError),
    #[error("{0}")]
    Refused(String),
    /// A credential was refused (e.g. an unknown, used or expired enrollment token).
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("corrupt {table} record {key}: {reason}")]
    Corrupt { table: Table, key: String, reason: String },
}

/// Which records a list returns: all the given tags must match, and the datacenter if given.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tags: Vec<Tag>,
    pub datacenter: Option<Name>,
}

impl Filter {
    fn matches(&self, datacenter: Option<&Name>, own: &Tags, dcs: &[Datacenter]) -> bool {
        if self.datacenter.is_some() && self.datacenter.as_ref() != datacenter {
            return false;
        }
        // A resource carries its own tags plus those of its datacenter.
        let dc_tags = datacenter.and_then(|n| dcs.iter().find(|d| &d.name == n)).map(|d| &d.tags);
        self.tags.iter().all(|t| own.contains(t) || dc_tags.is_some_and(|d| d.contains(t)))
    }
}

#[derive(Debug, Clone)]
pub struct Registry {
    state: Arc<dyn StateStore>,
    bus: Arc<dyn Bus>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

/// The state store as the registry uses it: every successful commit bumps a counter, so the
/// snapshot publisher reacts to a change at once instead of polling.
#[derive(Debug)]
struct Watched {
    inner: Arc<dyn StateStore>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

#[async_trait::async_trait]
impl StateStore for Watched {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Record>, StateError> {
        self.inner.get(table, key).await
    }

    async fn list(&self, table: Table) -> Result<Vec<(String, Record)>, StateError> {
        self.inner.list(table).await
    }

    async fn commit(&self, commit: Commit) -> Result<ctpf_store::state::Committed, StateError> {
        let done = self.inner.commit(commit).await?;
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(done)
    }

    async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StateError> {
        self.inner.events_after(after, limit).await
    }

    async fn last_event_seq(&self) -> Result<u64, StateError> {
        self.inner.last_event_seq().await
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(value).map_err(|e| RegistryError::Refused(format!("cannot encode: {e}")))
}

fn decode<T: DeserializeOwned>(
    table: Table,
    key: &str,
    record: &Record,
) -> Result<T, RegistryError> {
    serde_json::from_slice(&record.value).map_err(|e| RegistryError::Corrupt {
        table,
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl Registry {
    pub fn new(state: Arc<dyn StateStore>, bus: Arc<dyn Bus>) -> Self {
        let changes = Arc::new(tokio::sync::watch::Sender::new(0));
        let state = Arc::new(Watched { inner: state, changes: changes.clone() });
        Self { state, bus, changes }
    }

    /// Changes whenever this registry committed something (not other processes' commits).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn state(&self) -> &Arc<dyn StateStore> {
        &self.state
    }

    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    async fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<(T, u64)>, RegistryError> {
        match self.state.get(table, key).await? {
            Some(rec) => Ok(Some((decode(table, key, &rec)?, rec.version))),
            None => Ok(None),
        }
    }

    async fn all<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, RegistryError> {
        self.state.list(table).await?.iter().map(|(k, rec)| decode(table, k, rec)).collect()
    }

    /// Creates a record, refusing if the key is taken.
    async fn create<T: Serialize>(
        &self,
        table: Table,
        kind: &'static str,
        key: &str,
        value: &T,
        event: NewEvent,
    ) -> Result<(), RegistryError> {
        let commit = Commit::new()
            .write(Write::put(table, key, encode(value)?, Precondition::Absent))
            .event(event);
        match self.state.commit(commit).await {
            Ok(_) => Ok(()),
            Err(StateError::Conflict { .. }) => {
                Err(RegistryError::AlreadyExists { kind, id: key.to_owned() })
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn remove(
        &self,
        table: Table,
        kind: &'static str,
        key: &str,
        event: NewEvent,
    ) -> Result<(), RegistryError> {
        let commit = Commit::new().write(Write::delete(table, key, Precondition::Any)).event(event);
        let done = self.state.commit(commit).await?;
        if done.previous.first().copied().flatten().is_none() {
            return Err(RegistryError::NotFound { kind, id: key.to_owned() });
        }
        Ok(())
    }

    // ---- datacenters ----

    pub async fn create_datacenter(&self, new: NewDatacenter) -> Result<Datacenter, RegistryError> {
        let dc = Datacenter::new(new, now());
        let event = NewEvent::new(
            Some(dc.name.clone()),
            EventBody::DatacenterCreated { name: dc.name.clone() },
        );
        self.create(Table::Datacenters, "datacenter", dc.name.as_str(), &dc, event).await?;
        Ok(dc)
    }

    pub async fn datacenter(&self, name: &Name) -> Result<Datacenter, RegistryError> {
        self.get(Table::Datacenters, name.as_str())
            .await?
            .map(|(d, _)| d)
            .ok_or_else(|| RegistryError::NotFound { kind: "datacenter", id: name.to_string() })
    }

    pub async fn datacenters(&self, filter: &Filter) -> Result<Vec<Datacenter>, RegistryError> {
        let all: Vec<Datacenter> = self.all(Table::Datacenters).await?;
        Ok(all.iter().filter(|d| filter.matches(Some(&d.name), &d.tags, &[])).cloned().collect())
    }

    /// Deletes a datacenter. Refused while hosts, SSH keys, workers or live worker credentials
    /// still belong to it, unless `force`, which deletes the hosts, keys and reservations,
    /// revokes the credentials and forgets the workers. The delete is conditional on the
    /// datacenter's version: adding a host bumps it, so a host registered meanwhile makes
    /// this fail instead of leaving an orphan.
    pub async fn delete_datacenter(&self, name: &Name, force: bool) -> Result<(), RegistryError> {
        let Some((_, version)) = self.get::<Datacenter>(Table::Datacenters, name.as_str()).await?
        else {
            return Err(RegistryError::NotFound { kind: "datacenter", id: name.to_string() });
        };
        let hosts: Vec<Host> = self
            .all::<Host>(Table::Hosts)
            .await?
            .into_iter()
            .filter(|h| &h.datacenter == name)
            .collect();
        let keys: Vec<SshKey> = self
            .all::<SshKey>(Table::SshKeys)
            .await?
            .into_iter()
            .filter(|k| k.datacenter.as_ref() == Some(name))
            .collect();
        let (credentials, workers) = self.datacenter_workers(name).await?;
        let in_use = !hosts.is_empty() || !keys.is_empty() || credentials > 0 || workers > 0;
        if in_use && !force {
            return Err(RegistryError::Refused(format!(
                "datacenter {name} still has {} host(s), {} SSH key(s), {workers} worker(s) and \
                 {credentials} worker credential(s); delete them first or pass force=true",
                hosts.len(),
                keys.len()
            )));
        }
        let mut commit = self.reservation_removals(Commit::new(), name).await?;
        for host in &hosts {
            commit = host_removal(commit, host, Precondition::Any);
        }
        for key in &keys {
            commit = commit
                .write(Write::delete(Table::SshKeys, key.name.as_str(), Precondition::Any))
                .event(NewEvent::new(
                    Some(name.clone()),
                    EventBody::SshKeyDeleted { name: key.name.clone() },
                ));
        }
        let commit = commit
            .write(Write::delete(Table::Datacenters, name.as_str(), Precondition::Version(version)))
            .event(NewEvent::new(
                Some(name.clone()),
                EventBody::DatacenterDeleted { name: name.clone() },
            ));
        match self.state.commit(commit).await {
            // Only once the datacenter is gone, so a delete that fails revokes nothing.
            Ok(_) if force => self.retire_datacenter_workers(name).await,
            Ok(_) => Ok(()),
            Err(StateError::Conflict { .. }) => Err(RegistryError::Refused(format!(
                "datacenter {name} changed while it was being deleted (a host was added?); try again"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    // ---- hosts ----

    /// Registers a host. One identity per machine: the commit claims an index record for each
    /// MAC and the SMBIOS UUID, so a MAC or UUID already taken (even by a registration racing
    /// this one) fails the whole commit. It also bumps the datacenter's version, so the host
    /// cannot land in a datacenter deleted at the same moment.
    pub async fn create_host(&self, new: NewHost) -> Result<Host, RegistryError> {
        new.validate()?;
        let host = Host::new(Uuid::now_v7(), new, HostState::Discovered, now());
        let id = host.id.to_string();
        let index_value = id.clone().into_bytes();
        // Concurrent registrations in one datacenter race on its version; retry those.
        for _ in 0..16 {
            let Some((dc, dc_version)) =
                self.get::<Datacenter>(Table::Datacenters, host.datacenter.as_str()).await?
            else {
                return Err(RegistryError::NotFound {
                    kind: "datacenter",
                    id: host.datacenter.to_string(),
                });
            };
            let mut commit = Commit::new()
                .write(Write::put(
                    Table::Datacenters,
                    dc.name.as_str(),
                    encode(&dc)?,
                    Precondition::Version(dc_version),
                ))
                .write(Write::put(Table::Hosts, &id, encode(&host)?, Precondition::Absent));
            for key in identity_keys(&host) {
                commit = commit.write(Write::put(
                    Table::HostIndex,
                    key,
                    index_value.clone(),
                    Precondition::Absent,
                ));
            }
            let commit = commit.event(NewEvent::new(
                Some(host.datacenter.clone()),
                EventBody::HostRegistered { host_id: host.id },
            ));
            match self.state.commit(commit).await {
                Ok(_) => return Ok(host),
                Err(StateError::Conflict { table: Table::HostIndex, key, .. }) => {
                    let (kind, value) = match key.split_once(':') {
                        Some(("uuid", v)) => ("host with SMBIOS UUID", v),
                        Some((_, v)) => ("host with MAC", v),
                        None => ("host with", key.as_str()),
                    };
                    return Err(RegistryError::AlreadyExists { kind, id: value.to_owned() });
                }
                Err(StateError::Conflict { table: Table::Datacenters, .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RegistryError::Refused(format!(
            "datacenter {} is too busy; retry the registration",
            host.datacenter
        )))
    }

    pub async fn host(&self, id: Uuid) -> Result<Host, RegistryError> {
        self.get(Table::Hosts, &id.to_string())
            .await?
            .map(|(h, _)| h)
            .ok_or_else(|| RegistryError::NotFound { kind: "host", id: id.to_string() })
    }

    pub async fn hosts(&self, filter: &Filter) -> Result<Vec<Host>, RegistryError> {
        let dcs: Vec<Datacenter> = self.all(Table::Datacenters).await?;
        let hosts: Vec<Host> = self.all(Table::Hosts).await?;
        Ok(hosts
            .into_iter()
            .filter(|h| filter.matches(Some(&h.datacenter), &h.labels, &dcs))
            .collect())
    }

    /// Applies `patch` to a host (compare-and-swap on its record, retried on races).
    pub async fn update_host(&self, id: Uuid, patch: HostPatch) -> Result<Host, RegistryError> {
        let key = id.to_string();
        loop {
            let Some((mut host, version)) = self.get::<Host>(Table::Hosts, &key).await? else {
                return Err(RegistryError::NotFound { kind: "host", id: key });
            };
            if let Some(state) = patch.state {
                host.state = state;
            }
            if let Some(hostname) = &patch.hostname {
                host.hostname = Some(hostname.clone());
            }
            if let Some(labels) = &patch.labels {
                host.labels = labels.clone();
            }
            host.updated_at = now();
            let commit = Commit::new()
                .write(Write::put(
                    Table::Hosts,
                    &key,
                    encode(&host)?,
                    Precondition::Version(version),
                ))
                .event(NewEvent::new(
                    Some(host.datacenter.clone()),
                    EventBody::HostUpdated { host_id: id, state: host.state },
                ));
            match self.state.commit(commit).await {
                Ok(_) => return Ok(host),
                Err(StateError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub async fn delete_host(&self, id: Uuid) -> Result<(), RegistryError> {
        // Conditional on the version read, so the index entries removed are the host's own;
        // a concurrent change (e.g. a re-enrollment adding a MAC) means read again.
        loop {
            let Some((host, version)) = self.get::<Host>(Table::Hosts, &id.to_string()).await?
            else {
                return Err(RegistryError::NotFound { kind: "host", id: id.to_string() });
            };
            let commit = host_removal(Commit::new(), &host, Precondition::Version(version));
            match self.state.commit(commit).await {
                Ok(_) => return Ok(()),
                Err(StateError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    // ---- SSH keys ----

    /// Registers a key; one scoped to a datacenter is committed only if that datacenter
    /// still exists at that moment.
    pub async fn add_key(&self, new: NewSshKey) -> Result<SshKey, RegistryError> {
        let key = SshKey::new(new, now());
        let mut commit = Commit::new();
        if let Some(dc) = &key.datacenter {
            let Some((_, version)) =
                self.get::<Datacenter>(Table::Datacenters, dc.as_str()).await?
            else {
                return Err(RegistryError::NotFound { kind: "datacenter", id: dc.to_string() });
            };
            commit = commit.write(Write::check(
                Table::Datacenters,
                dc.as_str(),
                Precondition::Version(version),
            ));
        }
        let commit = commit
            .write(Write::put(
                Table::SshKeys,
                key.name.as_str(),
                encode(&key)?,
                Precondition::Absent,
            ))
            .event(NewEvent::new(
                key.datacenter.clone(),
                EventBody::SshKeyAdded {
                    name: key.name.clone(),
                    fingerprint: key.fingerprint.clone(),
                },
            ));
        match self.state.commit(commit).await {
            Ok(_) => Ok(key),
            Err(StateError::Conflict { table: Table::SshKeys, .. }) => {
                Err(RegistryError::AlreadyExists { kind: "SSH key", id: key.name.to_string() })
            }
            Err(StateError::Conflict { .. }) => Err(RegistryError::Refused(format!(
                "datacenter {} changed while the key was added; try again",
                key.datacenter.as_ref().map(Name::to_string).unwrap_or_default()
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn key(&self, name: &Name) -> Result<SshKey, RegistryError> {
        self.get(Table::SshKeys, name.as_str())
            .await?
            .map(|(k, _)| k)
            .ok_or_else(|| RegistryError::NotFound { kind: "SSH key", id: name.to_string() })
    }

    pub async fn keys(&self, filter: &Filter) -> Result<Vec<SshKey>, RegistryError> {
        let dcs: Vec<Datacenter> = self.all(Table::Datacenters).await?;
        let keys: Vec<SshKey> = self.all(Table::SshKeys).await?;
        Ok(keys
            .into_iter()
            .filter(|k| filter.matches(k.datacenter.as_ref(), &k.tags, &dcs))
            .collect())
    }

    pub async fn delete_key(&self, name: &Name) -> Result<(), RegistryError> {
        let key = self.key(name).await?;
        let event = NewEvent::new(key.datacenter, EventBody::SshKeyDeleted { name: name.clone() });
        self.remove(Table::SshKeys, "SSH key", name.as_str(), event).await
    }

    // ---- artifacts (names; the bytes live in the artifact store) ----

    /// Points `artifact.name` at its (already stored) content, replacing an older version.
    pub async fn record_artifact(&self, artifact: &Artifact) -> Result<(), RegistryError> {
        self.state.commit(put_artifact(Commit::new(), artifact)?).await?;
        Ok(())
    }

    pub async fn artifact(&self, name: &str) -> Result<Artifact, RegistryError> {
        self.get(Table::Artifacts, name)
            .await?
            .map(|(a, _)| a)
            .ok_or_else(|| RegistryError::NotFound { kind: "artifact", id: name.to_owned() })
    }

    pub async fn artifacts(&self, filter: &Filter) -> Result<Vec<Artifact>, RegistryError> {
        let all: Vec<Artifact> = self.all(Table::Artifacts).await?;
        Ok(all.into_iter().filter(|a| filter.matches(None, &a.tags, &[])).collect())
    }

    pub async fn delete_artifact(
        &self,
        name: &ctpf_common::ArtifactName,
    ) -> Result<(), RegistryError> {
        let event = NewEvent::new(None, EventBody::ArtifactDeleted { name: name.clone() });
        self.remove(Table::Artifacts, "artifact", name.as_str(), event).await
    }

    // ---- jobs ----

    /// Records a job, then puts it on the bus. If the bus is down the job stays recorded as
    /// queued and is re-sent by [`Registry::requeue_unfinished_jobs`].
    pub async fn submit_job(&self, new: NewJob) -> Result<Job, RegistryError> {
        let mut job = Job::new(Uuid::now_v7(), new, now());
        // Every event of this job comes after this one: where reading its log starts.
        job.first_event_seq = self.state.last_event_seq().await?;
        let datacenter = selector_datacenter(&job);
        let event = NewEvent::new(
            datacenter,
            EventBody::JobQueued { job_id: job.id, selector: job.selector.to_string() },
        );
        self.create(Table::Jobs, "job", &job.id.to_string(), &job, event).await?;
        self.bus.enqueue_job(&envelope(&job)).await?;
        Ok(job)
    }

    /// Submits a build job for a worker with the `builder` role (and the extra tags asked).
    pub async fn submit_build(&self, new: NewBuild) -> Result<Job, RegistryError> {
        if new.selector.tags().iter().any(|t| t.key() == "role") {
            return Err(RegistryError::Refused(
                "a build selector cannot name a role: builds go to role=builder".into(),
            ));
        }
        let role = Tag::new("role", "builder")?;
        let selector = TagSelector::new(new.selector.tags().iter().cloned().chain([role]))?;
        let spec = JobSpec::Build { request: Box::new(new.request), name: new.name };
        self.submit_job(NewJob { spec, selector }).await
    }

    /// Submits a packaging job for a worker with the `packager` role (and the extra tags).
    pub async fn submit_package(&self, new: NewPackage) -> Result<Job, RegistryError> {
        if new.selector.tags().iter().any(|t| t.key() == "role") {
            return Err(RegistryError::Refused(
                "a packaging selector cannot name a role: packaging goes to role=packager".into(),
            ));
        }
        let role = Tag::new("role", "packager")?;
        let selector = TagSelector::new(new.selector.tags().iter().cloned().chain([role]))?;
        let spec = JobSpec::Package {
            request: Box::new(new.request),
            name: new.name,
            no_cache: new.no_cache,
        };
        self.submit_job(NewJob { spec, selector }).await
    }

    /// Log lines of build `id` after line `after`, at most `limit`, scanning the event log
    /// from the job's first event; also the job as it is now.
    pub async fn build_log(
        &self,
        id: Uuid,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<BuildLogLine>, Job), RegistryError> {
        // The job first: a job that is final here has all its log events already stored
        // (they are reported before its final report), so a reader that sees the end stops.
        let job = self.job(id).await?;
        let mut lines = Vec::new();
        let mut cursor = job.first_event_seq;
        'scan: loop {
            let events = self.state.events_after(cursor, 1000).await?;
            let Some(last) = events.last() else { break };
            cursor = last.seq;
            for event in events {
                let EventBody::BuildLog { job_id, lines: batch } = event.body else { continue };
                if job_id != id {
                    continue;
                }
                for line in batch.into_iter().filter(|l| l.seq > after) {
                    lines.push(line);
                    if lines.len() >= limit {
                        break 'scan;
                    }
                }
            }
        }
        // Redelivered builds report their lines again; keep one of each number.
        lines.sort_by_key(|l| l.seq);
        lines.dedup_by_key(|l| l.seq);
        Ok((lines, job))
    }

    /// The job once it is final, or as it is when `deadline` passes. It is read again after
    /// each of this registry's commits (the job's final report is one, so a cache-hit build
    /// is seen the moment it is recorded), and at least every 50 ms for commits made by
    /// another process on the same store.
    pub async fn wait_until_final(
        &self,
        id: Uuid,
        deadline: tokio::time::Instant,
    ) -> Result<Job, RegistryError> {
        let mut changes = self.changes();
        loop {
            // Marked seen before the read, so a commit landing during it wakes the next wait.
            changes.borrow_and_update();
            let job = self.job(id).await?;
            let now = tokio::time::Instant::now();
            if job.status.is_final() || now >= deadline {
                return Ok(job);
            }
            let wake = deadline.min(now + std::time::Duration::from_millis(50));
            // The sender lives as long as this registry, so `changed` cannot fail here.
            let _ = tokio::time::timeout_at(wake, changes.changed()).await;
        }
    }

    /// Asks for job `id` to stop. The request goes on the bus first, so a worker that takes or
    /// holds the job sees it; a job no worker has taken yet is final at once (a worker that
    /// takes it later only drops it). A finished job cannot be cancelled.
    pub async fn cancel_job(&self, id: Uuid) -> Result<Job, RegistryError> {
        let key = id.to_string();
        loop {
            let Some((mut job, version)) = self.get::<Job>(Table::Jobs, &key).await? else {
                return Err(RegistryError::NotFound { kind: "job", id: key });
            };
            if job.status.is_final() {
                return Err(RegistryError::Refused(format!(
                    "job {id} is already {} and cannot be cancelled",
                    job.status.label()
                )));
            }
            self.bus.request_cancel(id).await?;
            if job.status == JobStatus::Queued {
                job.status = JobStatus::Cancelled;
                job.error = Some("cancelled before a worker started it".into());
            }
            job.cancel_requested = true;
            job.updated_at = now();
            let event = NewEvent::new(
                selector_datacenter(&job),
                EventBody::JobCancelRequested { job_id: id },
            );
            let commit = Commit::new()
                .write(Write::put(Table::Jobs, &key, encode(&job)?, Precondition::Version(version)))
                .event(event);
            match self.state.commit(commit).await {
                Ok(_) => return Ok(job),
                Err(StateError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub async fn job(&self, id: Uuid) -> Result<Job, RegistryError> {
        self.get(Table::Jobs, &id.to_string())
            .await?
            .map(|(j, _)| j)
            .ok_or_else(|| RegistryError::NotFound { kind: "job", id: id.to_string() })
    }

    pub async fn jobs(&self, filter: &Filter) -> Result<Vec<Job>, RegistryError> {
        let dcs: Vec<Datacenter> = self.all(Table::Datacenters).await?;
        let jobs: Vec<Job> = self.all(Table::Jobs).await?;
        Ok(jobs
            .into_iter()
            .filter(|j| {
                let sel: Tags = j.selector.tags().iter().cloned().collect();
                filter.matches(selector_datacenter(j).as_ref(), &sel, &dcs)
            })
            .collect())
    }

    /// For a bus that forgets on restart (in-process): puts every unfinished job back on it.
    pub async fn requeue_unfinished_jobs(&self) -> Result<usize, RegistryError> {
        let mut n = 0;
        for job in self.all::<Job>(Table::Jobs).await? {
            if !job.status.is_final() {
                self.bus.enqueue_job(&envelope(&job)).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Applies a report from a trusted worker (the manager's own, or one using the manager's
    /// Redis user); see [`Registry::apply_report_from`].
    pub async fn apply_report(&self, report: NewEvent) -> Result<Option<Event>, RegistryError> {
        self.apply_report_from(report, None).await
    }

    /// Applies a worker's report: updates the job it concerns and appends the event, or, for a
    /// forwarded host callback, enrolls the host. Reports arrive at least once and possibly
    /// late, so a finished job never changes again.
    ///
    /// `source` is the datacenter whose credentials sent it (a site worker's): such a report
    /// may only speak for that datacenter. Events naming another datacenter, or jobs routed
    /// to another one, are dropped and recorded as `report_refused`.
    pub async fn apply_report_from(
        &self,
        mut report: NewEvent,
        source: Option<&Name>,
    ) -> Result<Option<Event>, RegistryError> {
        if let Some(site) = source {
            if let Some(reason) = self.oversteps(&report, site).await? {
                tracing::warn!(datacenter = %site, %reason, "report refused");
                let refused =
                    NewEvent::new(Some(site.clone()), EventBody::ReportRefused { reason });
                let done = self.state.commit(Commit::new().event(refused)).await?;
                return Ok(done.events.into_iter().next());
            }
            // Everything a site worker says concerns its datacenter.
            report.datacenter = Some(site.clone());
        }
        if let EventBody::HostCallbackForwarded { report: host_report, worker, .. } = report.body {
            let Some(site) = report.datacenter.clone() else {
                let reason = format!("worker {worker} forwarded a callback naming no datacenter");
                let refused = NewEvent::new(None, EventBody::ReportRefused { reason });
                let done = self.state.commit(Commit::new().event(refused)).await?;
                return Ok(done.events.into_iter().next());
            };
            return match self.enroll_forwarded(&site, *host_report).await {
                Ok(_) => Ok(None),
                // Refused and recorded (host of another datacenter) or invalid: retrying
                // cannot help, so the report counts as applied.
                Err(e @ (RegistryError::Forbidden(_) | RegistryError::Invalid(_))) => {
                    tracing::warn!(%worker, error = %e, "forwarded callback not enrolled");
                    Ok(None)
                }
                Err(e) => Err(e),
            };
        }
        let (job_id, status, worker, error, attempt) = match &report.body {
            EventBody::JobStarted { job_id, worker, attempt } => {
                (*job_id, JobStatus::Running, Some(worker.clone()), None, Some(*attempt))
            }
            EventBody::JobSucceeded { job_id, worker, .. } => {
                (*job_id, JobStatus::Succeeded, Some(worker.clone()), None, None)
            }
            EventBody::JobFailed { job_id, worker, error, will_retry } => {
                let status = if *will_retry { JobStatus::Queued } else { JobStatus::Failed };
                (*job_id, status, Some(worker.clone()), Some(error.clone()), None)
            }
            EventBody::JobDeadLettered { job_id, reason } => {
                (*job_id, JobStatus::DeadLettered, None, Some(reason.clone()), None)
            }
            EventBody::JobCancelled { job_id, worker } => (
                *job_id,
                JobStatus::Cancelled,
                Some(worker.clone()),
                Some("cancelled on request".into()),
                None,
            ),
            _ => {
                let done = self.state.commit(Commit::new().event(report)).await?;
                return Ok(done.events.into_iter().next());
            }
        };
        loop {
            let key = job_id.to_string();
            let Some((mut job, version)) = self.get::<Job>(Table::Jobs, &key).await? else {
                tracing::warn!(%job_id, "report for an unknown job dropped");
                return Ok(None);
            };
            if job.status.is_final() {
                return Ok(None);
            }
            job.status = status;
            if let Some(w) = &worker {
                job.worker = Some(w.clone());
            }
            if let Some(a) = attempt {
                job.attempts = job.attempts.max(a);
            }
            if error.is_some() {
                job.error = error.clone();
            }
            job.updated_at = now();
            let mut commit = Commit::new();
            if let EventBody::JobSucceeded { manifest: Some(manifest), .. } = &report.body {
                job.manifest = Some((**manifest).clone());
                if let JobSpec::Build { name: Some(name), .. } = &job.spec {
                    commit = self.name_outputs(commit, name, manifest).await?;
                }
            }
            if let EventBody::JobSucceeded { package: Some(package), .. } = &report.body {
                job.package = Some((**package).clone());
                if let JobSpec::Package { name: Some(name), .. } = &job.spec {
                    commit = self.name_medium(commit, name, package).await?;
                }
            }
            let commit = commit
                .write(Write::put(Table::Jobs, &key, encode(&job)?, Precondition::Version(version)))
                .event(report.clone());
            match self.state.commit(commit).await {
                Ok(done) => return Ok(done.events.into_iter().next()),
                Err(StateError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Adds artifact records `NAME-FILE` for each output of a named build to `commit`; names
    /// that already point at the same content are left alone (a cache hit changes nothing).
    async fn name_outputs(
        &self,
        mut commit: Commit,
        name: &ctpf_common::ArtifactName,
        manifest: &BuildManifest,
    ) -> Result<Commit, RegistryError> {
        let key_tag = Tag::new("build-key", &manifest.key.hex()[..32])?;
        for output in &manifest.outputs {
            // Outputs may sit in directories (`overlays/x.dtbo`); names are flat.
            let file_name = format!("{name}-{}", output.file.replace('/', "-"));
            if let Some((current, _)) = self.get::<Artifact>(Table::Artifacts, &file_name).await?
                && current.digest == output.digest
            {
                continue;
            }
            let artifact = Artifact {
                name: ctpf_common::ArtifactName::parse("name", &file_name)?,
                digest: output.digest,
                kind: output.kind,
                size: output.size,
                tags: [key_tag.clone()].into_iter().collect(),
                created_at: now(),
            };
            commit = put_artifact(commit, &artifact)?;
        }
        Ok(commit)
    }

    /// Adds the artifact record `name` for a packaged medium to `commit`, unless the name
    /// already points at the same content.
    async fn name_medium(
        &self,
        commit: Commit,
        name: &ctpf_common::ArtifactName,
        package: &PackageManifest,
    ) -> Result<Commit, RegistryError> {
        if let Some((current, _)) = self.get::<Artifact>(Table::Artifacts, name.as_str()).await?
            && current.digest == package.digest
        {
            return Ok(commit);
        }
        let artifact = Artifact {
            name: name.clone(),
            digest: package.digest,
            kind: package.format.artifact_kind(),
            size: package.size,
            tags: [Tag::new("package-key", &package.key.hex()[..32])?].into_iter().collect(),
            created_at: now(),
        };
        put_artifact(commit, &artifact)
    }

    // ---- events ----

    /// Events after `after` that pass `filter`, from a window of at most `limit` events, and
    /// the last sequence number looked at (so a caller can move past rejected events).
    pub async fn events(
        &self,
        after: u64,
        limit: usize,
        filter: &Filter,
    ) -> Result<(Vec<Event>, Option<u64>), RegistryError> {
        let dcs: Vec<Datacenter> =
            if filter.tags.is_empty() { Vec::new() } else { self.all(Table::Datacenters).await? };
        let events = self.state.events_after(after, limit).await?;
        let scanned_to = events.last().map(|e| e.seq);
        let matching = events
            .into_iter()
            .filter(|e| filter.matches(e.datacenter.as_ref(), &Tags::new(), &dcs))
            .collect();
        Ok((matching, scanned_to))
    }
}

/// Adds the artifact record (replacing the name's earlier target) and its event to `commit`.
fn put_artifact(commit: Commit, artifact: &Artifact) -> Result<Commit, RegistryError> {
    let event = NewEvent::new(
        None,
        EventBody::ArtifactStored {
            name: artifact.name.clone(),
            digest: artifact.digest,
            size: artifact.size,
        },
    );
    let record = encode(artifact)?;
    Ok(commit
        .write(Write::put(Table::Artifacts, artifact.name.as_str(), record, Precondition::Any))
        .event(event))
}

/// The index keys that claim a host's identity.
fn identity_keys(host: &Host) -> Vec<String> {
    let macs = host.macs.iter().map(|m| format!("mac:{m}"));
    macs.chain(host.smbios_uuid.map(|u| format!("uuid:{u}"))).collect()
}

/// Adds the removal of `host` (if its record meets `expect`), its identity index entries and
/// its event to `commit`.
fn host_removal(commit: Commit, host: &Host, expect: Precondition) -> Commit {
    let mut commit = commit.write(Write::delete(Table::Hosts, host.id.to_string(), expect));
    for key in identity_keys(host) {
        commit = commit.write(Write::delete(Table::HostIndex, key, Precondition::Any));
    }
    commit.event(NewEvent::new(
        Some(host.datacenter.clone()),
        EventBody::HostDeleted { host_id: host.id },
    ))
}

impl Registry {
    /// Why a report from a site worker of `site` oversteps it, if it does.
    async fn oversteps(
        &self,
        report: &NewEvent,
        site: &Name,
    ) -> Result<Option<String>, RegistryError> {
        if let Some(named) = &report.datacenter
            && named != site
        {
            return Ok(Some(format!(
                "a worker of datacenter {site} sent a {} event for datacenter {named}",
                report.body.type_name()
            )));
        }
        if !site_workers_report(&report.body) {
            return Ok(Some(format!(
                "a worker of datacenter {site} sent a {} event, which only the manager records",
                report.body.type_name()
            )));
        }
        let job_id = match &report.body {
            EventBody::JobStarted { job_id, .. }
            | EventBody::JobSucceeded { job_id, .. }
            | EventBody::JobFailed { job_id, .. }
            | EventBody::JobDeadLettered { job_id, .. }
            | EventBody::JobCancelled { job_id, .. }
            | EventBody::BuildLog { job_id, .. } => *job_id,
            _ => return Ok(None),
        };
        let Some((job, _)) = self.get::<Job>(Table::Jobs, &job_id.to_string()).await? else {
            return Ok(None);
        };
        Ok(match job.selector.datacenter() {
            Some(dc) if &dc != site => Some(format!(
                "a worker of datacenter {site} reported on job {job_id}, which is routed to \
                 datacenter {dc}"
            )),
            _ => None,
        })
    }
}

/// What a site worker may report: its jobs, its boot activity and the callbacks it took.
/// Everything else (hosts, credentials, datacenters, ...) is the manager's own to record.
fn site_workers_report(body: &EventBody) -> bool {
    matches!(
        body,
        EventBody::JobStarted { .. }
            | EventBody::JobSucceeded { .. }
            | EventBody::JobFailed { .. }
            | EventBody::JobDeadLettered { .. }
            | EventBody::JobCancelled { .. }
            | EventBody::BuildLog { .. }
            | EventBody::WorkerStarted { .. }
            | EventBody::HostCallbackForwarded { .. }
            | EventBody::DhcpReplied { .. }
            | EventBody::TftpTransfer { .. }
            | EventBody::HttpBoot { .. }
            | EventBody::BootEventsDropped { .. }
    )
}

fn envelope(job: &Job) -> JobEnvelope {
    JobEnvelope { job_id: job.id, spec: job.spec.clone(), selector: job.selector.clone() }
}

fn selector_datacenter(job: &Job) -> Option<Name> {
    job.selector.datacenter()
}
