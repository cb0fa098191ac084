//! The bus between the manager and its workers.
//!
//! Two flows, both at-least-once:
//! - **jobs** go from the manager to workers. Each job carries a [`TagSelector`]; a worker only
//!   receives jobs its [`WorkerIdentity`] accepts. A worker holds a job under a lease; if the
//!   worker dies the lease runs out and another matching worker gets the job again. After
//!   `max_deliveries` the job is dead-lettered with a reason instead.
//! - **reports** go from workers to the manager: job progress and, later, boot events and host
//!   callbacks. The manager acknowledges a report only after it has applied it to the state
//!   store, so a report is never lost between the two.
//!
//! [`MemoryBus`] serves the all-in-one `ctpf up`; [`RedisBus`] (Redis Streams with consumer
//! groups) serves distributed sites. Both pass the same contract suite in `tests/contract.rs`.

use std::{fmt::Debug, time::Duration};

use async_trait::async_trait;
use ctpf_common::{JobSpec, Name, NewEvent, TagSelector, Uuid, WorkerHeartbeat, WorkerIdentity};
use serde::{Deserialize, Serialize};

mod lazy;
mod memory;
mod redis_bus;

pub use lazy::LazyBus;
pub use memory::MemoryBus;
pub use redis_bus::RedisBus;

/// A job as it travels on the bus: enough for a worker to run it, nothing more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEnvelope {
    pub job_id: Uuid,
    pub spec: JobSpec,
    pub selector: TagSelector,
}

/// A job handed to one worker. Pass it back to `ack_job`, `retry_job` or `extend_job`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub job: JobEnvelope,
    /// 1 on the first delivery, 2 after one redelivery, ...
    pub attempt: u32,
    /// Backend-specific handle (stream and entry id for Redis, a slot id in memory).
    pub receipt: String,
}

/// A job given up on, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub job: JobEnvelope,
    pub reason: String,
    pub deliveries: u32,
}

/// A job still on the bus: waiting for a matching worker, or held by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    pub job: JobEnvelope,
    /// The worker currently holding it, if any.
    pub held_by: Option<String>,
    pub deliveries: u32,
}

/// A report as read by the manager; `ack_reports` with its receipt once applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportDelivery {
    pub event: NewEvent,
    pub receipt: String,
    /// The datacenter whose credentials sent it, when a site worker did: such a report may
    /// only concern that datacenter. `None`: sent by a trusted process (the manager's own
    /// worker, or a worker using the manager's Redis user).
    pub datacenter: Option<Name>,
}

/// A datacenter's desired state as the bus carries it: the generation, and the encoded
/// snapshot, which the bus does not look into (workers validate it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedSnapshot {
    pub generation: u64,
    pub body: Vec<u8>,
}

/// A worker's last heartbeat, with when the bus received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenWorker {
    pub heartbeat: WorkerHeartbeat,
    /// Unix milliseconds on the bus's clock (Redis's `TIME`), so skewed worker clocks do not
    /// make a live worker look lost.
    pub seen_at_ms: u64,
}

/// A worker credential: which datacenter it may read and act for, and the SHA-256 of its
/// secret (the plaintext is only ever in the worker's hands).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerGrant {
    pub credential_id: String,
    pub datacenter: Name,
    pub secret_sha256: [u8; 32],
}

#[derive(Debug, Clone)]
pub struct BusConfig {
    /// How long a worker may hold a job without `extend_job` before it counts as dead.
    pub lease: Duration,
    /// Deliveries after which a job is dead-lettered instead of handed out again.
    pub max_deliveries: u32,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self { lease: Duration::from_secs(30), max_deliveries: 3 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(redis::RedisError),
    #[error("malformed bus message {id}: {reason}")]
    Malformed { id: String, reason: String },
    #[error("unknown or expired delivery receipt {0}")]
    UnknownReceipt(String),
    /// The credentials in use do not allow this (a site worker reaching outside its
    /// datacenter, or a revoked credential).
    #[error("not allowed with these credentials: {0}")]
    Denied(String),
    /// Not connected (yet): Redis could not be reached.
    #[error("the bus is unreachable: {0}")]
    Unreachable(String),
}

impl From<redis::RedisError> for BusError {
    fn from(error: redis::RedisError) -> Self {
        let refused = matches!(error.code(), Some("NOPERM" | "WRONGPASS"))
            || error.kind() == redis::ErrorKind::AuthenticationFailed;
        if refused { BusError::Denied(error.to_string()) } else { BusError::Redis(error) }
    }
}

/// How long a cancel request is remembered: far longer than any job stays on the bus.
pub const CANCEL_REQUEST_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// `from + duration`, saturating a century ahead instead of panicking on absurd durations.
pub(crate) fn instant_after(
    from: tokio::time::Instant,
    duration: Duration,
) -> tokio::time::Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    from.checked_add(duration.min(CENTURY)).unwrap_or(from)
}

/// The same wording from both backends, for operators and the manager's event log.
/// The report that tells the manager a job was given up on, so its record stops showing it
/// as queued or running.
pub(crate) fn dead_letter_report(job: &JobEnvelope, reason: &str) -> NewEvent {
    let datacenter = job.selector.datacenter();
    NewEvent::new(
        datacenter,
        ctpf_common::EventBody::JobDeadLettered { job_id: job.job_id, reason: reason.to_owned() },
    )
}

pub(crate) fn dead_letter_reason(deliveries: u32, last_holder: &str) -> String {
    format!("delivered {deliveries} times without completion (last holder: {last_holder})")
}

#[async_trait]
pub trait Bus: Send + Sync + Debug {
    /// Puts a job on the bus. Idempotent per `job_id` is not required: the manager enqueues a
    /// job once, when it is created (or when recovering a non-durable bus).
    async fn enqueue_job(&self, job: &JobEnvelope) -> Result<(), BusError>;

    /// The next job `worker` may take: first a job whose holder's lease ran out (redelivery),
    /// else a fresh one. Waits up to `wait`; `None` when nothing came.
    async fn next_job(
        &self,
        worker: &WorkerIdentity,
        wait: Duration,
    ) -> Result<Option<Delivery>, BusError>;

    /// The job is finished (succeeded, or failed for good): remove it from the bus.
    async fn ack_job(&self, delivery: &Delivery) -> Result<(), BusError>;

    /// Gives the job back for another delivery now (it counts toward `max_deliveries`).
    async fn retry_job(&self, delivery: &Delivery) -> Result<(), BusError>;

    /// Renews the lease of a job the worker is still running.
    async fn extend_job(&self, delivery: &Delivery) -> Result<(), BusError>;

    /// Asks whoever runs (or will run) job `job_id` to stop it. The request outlives the job's
    /// time on the bus by [`CANCEL_REQUEST_TTL`], so a redelivery also sees it.
    async fn request_cancel(&self, job_id: Uuid) -> Result<(), BusError>;

    /// Whether a cancel was requested for `job_id`. Workers ask before starting a job and
    /// then every few hundred milliseconds while it runs.
    async fn cancel_requested(&self, job_id: Uuid) -> Result<bool, BusError>;

    /// Every job still on the bus, oldest first.
    async fn queued_jobs(&self) -> Result<Vec<QueuedJob>, BusError>;

    /// Every dead-lettered job, oldest first.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BusError>;

    /// Sends a report from a worker to the manager.
    async fn report(&self, event: &NewEvent) -> Result<(), BusError>;

    /// Reads up to `max` reports not yet acknowledged by `consumer`'s group: first those read
    /// before but never acknowledged (a manager that died mid-apply), then new ones. Waits up
    /// to `wait` when there are none.
    async fn next_reports(
        &self,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReportDelivery>, BusError>;

    /// Marks reports as applied.
    async fn ack_reports(&self, receipts: &[String]) -> Result<(), BusError>;

    /// Worker side: announces the worker (again) and marks it seen now.
    async fn heartbeat(&self, heartbeat: &WorkerHeartbeat) -> Result<(), BusError>;

    /// Manager side: the last heartbeat of every worker that announced itself, of every
    /// datacenter, in no particular order.
    async fn workers(&self) -> Result<Vec<SeenWorker>, BusError>;

    /// Forgets the heartbeats of `datacenter`'s workers (the datacenter was deleted).
    async fn forget_workers(&self, datacenter: &Name) -> Result<(), BusError>;

    /// Manager side: makes `snapshot` the one `datacenter`'s workers get, unless the bus
    /// already holds that generation or a newer one (then nothing changes and the answer is
    /// `false`), so generations seen by workers only ever grow.
    async fn publish_snapshot(
        &self,
        datacenter: &Name,
        snapshot: &PublishedSnapshot,
    ) -> Result<bool, BusError>;

    /// Worker side: `datacenter`'s current snapshot if its generation is above `after`;
    /// otherwise waits up to `wait` for one to be published.
    async fn snapshot_after(
        &self,
        datacenter: &Name,
        after: u64,
        wait: Duration,
    ) -> Result<Option<PublishedSnapshot>, BusError>;

    /// Manager side: the complete set of site worker credentials. Each may read its own
    /// datacenter's jobs and snapshot and send reports as that datacenter, nothing of other
    /// datacenters; credentials not in `grants` stop working. Redis enforces this with one
    /// ACL user per credential; the in-process bus has no remote workers to restrict.
    async fn authorize_workers(&self, grants: &[WorkerGrant]) -> Result<(), BusError>;

    /// Whether queued jobs survive a restart of this process (Redis: yes; memory: no, so the
    /// manager re-enqueues unfinished jobs from the state store at start-up).
    fn is_durable(&self) -> bool;
}
