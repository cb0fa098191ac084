//! The bus over Redis Streams, for distributed sites.
//!
//! Layout (every key carries the hash tag `{NS}` so a cluster keeps them in one slot):
//! - `{NS}:jobs:SELECTOR`: one stream per canonical selector text (`*` for the empty one), with
//!   the consumer group `workers`; each entry has a field `job` (JSON of [`JobEnvelope`]). A
//!   worker's consumer name is its `WorkerIdentity::id`; a delivered entry stays in the group's
//!   pending list (the lease) until acknowledged, and the pending list's idle time and delivery
//!   counter are the lease clock and the attempt number.
//! - `{NS}:selectors`: the set of selectors that have a job stream.
//! - `{NS}:dead`: dead-lettered jobs (fields `job`, `reason`, `deliveries`).
//! - `{NS}:reports`: worker reports, consumer group `manager`, field `event` (JSON of
//!   [`NewEvent`]).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use ctpf_common::{NewEvent, TagSelector, Uuid, WorkerIdentity};
use redis::{
    AsyncConnectionConfig, Client, Cmd, RedisError, Script, Value,
    aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    streams::{StreamPendingCountReply, StreamPendingId},
};
use tokio::time::Instant;

use crate::{
    Bus, BusConfig, BusError, CANCEL_REQUEST_TTL, DeadLetter, Delivery, JobEnvelope, QueuedJob,
    ReportDelivery, dead_letter_reason, dead_letter_report, instant_after,
};

const DEFAULT_NAMESPACE: &str = "ctpf";
const JOB_GROUP: &str = "workers";
const REPORT_GROUP: &str = "manager";
const JOB_FIELD: &str = "job";
const EVENT_FIELD: &str = "event";
/// Selector-set member and stream-key suffix of the empty selector (an empty member would be
/// invisible in `SMEMBERS` output).
const ANY_SELECTOR: &str = "*";
/// Longest single blocking read: a waiting worker re-reads the selector set and looks for
/// expired leases at least this often.
const MAX_BLOCK: Duration = Duration::from_secs(1);
/// Workers re-read the selector set at most this often, so new selectors show up quickly
/// without a round trip on every `next_job`.
const SELECTOR_CACHE_TTL: Duration = Duration::from_millis(500);
/// Approximate cap of the report stream, so a manager that is down for long cannot fill
/// Redis's memory.
const REPORTS_MAX_LEN: u64 = 1_000_000;
/// Bounds the expired entries one `next_job` pass inspects per stream (each may turn out to
/// be dead-lettered, malformed or taken by a faster worker).
const MAX_RECLAIMS_PER_PASS: usize = 32;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Acknowledges, extends or gives back a job, but only while the delivery named by the
/// receipt is still the current one (same holder, same delivery count), so a worker whose
/// lease was taken over cannot disturb the new holder.
///
/// KEYS[1] job stream; ARGV: group, entry id, worker, delivery count, action, idle ms.
const RECEIPT_SCRIPT: &str = r"
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if pending.err then return 0 end
local entry = pending[1]
if not entry or entry[2] ~= ARGV[3] or entry[4] ~= tonumber(ARGV[4]) then
  return 0
end
local action = ARGV[5]
if action == 'ack' then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
elseif action == 'extend' then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
elseif action == 'retry' then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', ARGV[6], 'JUSTID')
else
  return redis.error_reply('unknown receipt action ' .. action)
end
return 1
";

/// [`Bus`] over Redis Streams with consumer groups.
///
/// Let `next_job` and `next_reports` run to completion: an entry that a cancelled blocking
/// read had already taken stays pending under the reader until its lease runs out (a job
/// then counts one delivery more) or, for reports, until the same consumer reads again.
pub struct RedisBus {
    config: BusConfig,
    keys: Keys,
    client: Client,
    /// Shared by every non-blocking command; reconnects by itself after Redis restarts.
    conn: ConnectionManager,
    /// Connections for blocking reads, one read at a time each, so a blocked `XREADGROUP`
    /// never holds up the commands on `conn`.
    blocking_pool: Mutex<Vec<MultiplexedConnection>>,
    selector_cache: Mutex<Option<CachedSelectors>>,
    /// Job streams this process already created the consumer group for.
    streams_with_group: Mutex<HashSet<String>>,
    report_group_ready: AtomicBool,
    receipt_script: Script,
}

#[derive(Clone)]
struct CachedSelectors {
    read_at: Instant,
    /// (stream key, selector), sorted by key.
    streams: Vec<(String, TagSelector)>,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("namespace", &self.keys.tag)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
struct Keys {
    /// `{NS}`
    tag: String,
}

impl Keys {
    fn selectors(&self) -> String {
        format!("{}:selectors", self.tag)
    }

    fn dead(&self) -> String {
        format!("{}:dead", self.tag)
    }

    fn reports(&self) -> String {
        format!("{}:reports", self.tag)
    }

    fn cancel(&self, job_id: Uuid) -> String {
        format!("{}:cancel:{job_id}", self.tag)
    }

    fn jobs_prefix(&self) -> String {
        format!("{}:jobs:", self.tag)
    }

    fn job_stream(&self, selector_member: &str) -> String {
        format!("{}{selector_member}", self.jobs_prefix())
    }
}

fn selector_member(selector: &TagSelector) -> String {
    let text = selector.to_string();
    if text.is_empty() { ANY_SELECTOR.to_owned() } else { text }
}

fn parse_selector_member(member: &str) -> Result<TagSelector, ctpf_common::ParseError> {
    if member == ANY_SELECTOR { Ok(TagSelector::any()) } else { member.parse() }
}

/// Which delivery a job receipt names: `STREAM\nENTRY\nATTEMPT\nWORKER`.
struct JobReceipt<'a> {
    stream: &'a str,
    entry_id: &'a str,
    attempt: u32,
    worker: &'a str,
}

impl<'a> JobReceipt<'a> {
    fn format(stream: &str, entry_id: &str, attempt: u32, worker: &str) -> String {
        format!("{stream}\n{entry_id}\n{attempt}\n{worker}")
    }

    fn parse(receipt: &'a str, keys: &Keys) -> Option<Self> {
        let mut parts = receipt.splitn(4, '\n');
        let stream = parts.next()?;
        let entry_id = parts.next()?;
        let attempt = parts.next()?.parse().ok()?;
        let worker = parts.next()?;
        (stream.starts_with(&keys.jobs_prefix()) && parse_entry_id(entry_id).is_some())
            .then_some(Self { stream, entry_id, attempt, worker })
    }
}

/// `MS-SEQ` as numbers, for ordering entries of different streams.
fn parse_entry_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data are caches and a pool; a panic elsewhere leaves them usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_no_group(error: &RedisError) -> bool {
    error.code() == Some("NOGROUP")
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

type Fields = HashMap<String, Vec<u8>>;

/// A stream entry as read; `fields` is `None` when the entry was deleted while still pending.
struct RawEntry {
    id: String,
    fields: Option<Fields>,
}

impl RedisBus {
    /// Connects with the default namespace `ctpf`.
    pub async fn connect(url: &str, config: BusConfig) -> Result<Self, BusError> {
        Self::connect_with_namespace(url, DEFAULT_NAMESPACE, config).await
    }

    /// Connects with every key under `{namespace}:`, so several buses (or test cases) can
    /// share one Redis.
    pub async fn connect_with_namespace(
        url: &str,
        namespace: &str,
        config: BusConfig,
    ) -> Result<Self, BusError> {
        if namespace.is_empty() || namespace.contains(['{', '}', '\n']) {
            return Err(BusError::Malformed {
                id: namespace.to_owned(),
                reason: "a bus namespace must be non-empty, without braces or newlines".into(),
            });
        }
        let client = Client::open(url)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT));
        let conn = ConnectionManager::new_with_config(client.clone(), manager_config).await?;
        Ok(Self {
            config,
            keys: Keys { tag: format!("{{{namespace}}}") },
            client,
            conn,
            blocking_pool: Mutex::new(Vec::new()),
            selector_cache: Mutex::new(None),
            streams_with_group: Mutex::new(HashSet::new()),
            report_group_ready: AtomicBool::new(false),
            receipt_script: Script::new(RECEIPT_SCRIPT),
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn lease_ms(&self) -> u64 {
        millis(self.config.lease).max(1)
    }

    fn max_deliveries(&self) -> u32 {
        self.config.max_deliveries.max(1)
    }

    async fn create_group(&self, stream: &str, group: &str) -> Result<(), BusError> {
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Runs a blocking command on a connection of its own.
    async fn query_blocking(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        let pooled = lock(&self.blocking_pool).pop();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(MAX_BLOCK + COMMAND_TIMEOUT));
                self.client.get_multiplexed_async_connection_with_config(&config).await?
            }
        };
        let result = cmd.query_async(&mut conn).await;
        // A server error leaves the connection fine; anything else (I/O, timeout) may not.
        if result.as_ref().map_or_else(|e| e.code().is_some(), |_| true) {
            lock(&self.blocking_pool).push(conn);
        }
        result
    }

    /// The job streams whose selector `worker` accepts.
    async fn matching_streams(&self, worker: &WorkerIdentity) -> Result<Vec<String>, BusError> {
        let cached = lock(&self.selector_cache)
            .clone()
            .filter(|cache| cache.read_at.elapsed() < SELECTOR_CACHE_TTL);
        let streams = match cached {
            Some(cache) => cache.streams,
            None => {
                let streams = self.read_selectors().await?;
                *lock(&self.selector_cache) =
                    Some(CachedSelectors { read_at: Instant::now(), streams: streams.clone() });
                streams
            }
        };
        Ok(streams
            .into_iter()
            .filter(|(_, selector)| worker.accepts(selector))
            .map(|(stream, _)| stream)
            .collect())
    }

    async fn read_selectors(&self) -> Result<Vec<(String, TagSelector)>, BusError> {
        let members: Vec<String> =
            redis::cmd("SMEMBERS").arg(self.keys.selectors()).query_async(&mut self.conn()).await?;
        let mut streams: Vec<(String, TagSelector)> = members
            .into_iter()
            .filter_map(|member| match parse_selector_member(&member) {
                Ok(selector) => Some((self.keys.job_stream(&member), selector)),
                Err(e) => {
                    tracing::warn!(%member, error = %e, "skipping malformed selector in the bus");
                    None
                }
            })
            .collect();
        streams.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(streams)
    }

    /// Takes over the oldest entry of `stream` whose lease ran out, dead-lettering it instead
    /// when it has been delivered `max_deliveries` times already.
    async fn reclaim_expired(
        &self,
        stream: &str,
        worker: &WorkerIdentity,
    ) -> Result<Option<Delivery>, BusError> {
        let lease_ms = self.lease_ms();
        for _ in 0..MAX_RECLAIMS_PER_PASS {
            let pending: Result<StreamPendingCountReply, RedisError> = redis::cmd("XPENDING")
                .arg(stream)
                .arg(JOB_GROUP)
                .arg("IDLE")
                .arg(lease_ms)
                .arg("-")
                .arg("+")
                .arg(1)
                .query_async(&mut self.conn())
                .await;
            let pending = match pending {
                Ok(pending) => pending,
                Err(e) if is_no_group(&e) => {
                    self.create_group(stream, JOB_GROUP).await?;
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            };
            let Some(expired) = pending.ids.into_iter().next() else { return Ok(None) };

            // XCLAIM with the lease as minimum idle time: of several workers racing for the
            // entry only one gets it. It counts a delivery.
            let claimed: Value = redis::cmd("XCLAIM")
                .arg(stream)
                .arg(JOB_GROUP)
                .arg(&worker.id)
                .arg(lease_ms)
                .arg(&expired.id)
                .query_async(&mut self.conn())
                .await?;
            // Empty: another worker was faster, or the entry is gone (Redis 7 then drops it
            // from the pending list itself).
            let Some(entry) = parse_entries(claimed)?.into_iter().next() else { continue };
            let Some(fields) = entry.fields else {
                self.forget_deleted(stream, JOB_GROUP, &entry.id).await?;
                continue;
            };
            let deliveries = match self.delivery_count(stream, &entry.id).await? {
                Some(count) => count,
                None => to_u32(expired.times_delivered).saturating_add(1),
            };
            if deliveries > self.max_deliveries() {
                let delivered = deliveries - 1;
                let reason = dead_letter_reason(delivered, &expired.consumer);
                self.dead_letter(stream, &entry.id, fields.get(JOB_FIELD), &reason, delivered)
                    .await?;
                continue;
            }
            if let Some(job) = self.decode_job(stream, &entry.id, &fields, deliveries).await? {
                return Ok(Some(delivery(stream, &entry.id, job, deliveries, worker)));
            }
        }
        Ok(None)
    }

    async fn delivery_count(&self, stream: &str, entry_id: &str) -> Result<Option<u32>, BusError> {
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(stream)
            .arg(JOB_GROUP)
            .arg(entry_id)
            .arg(entry_id)
            .arg(1)
            .query_async(&mut self.conn())
            .await?;
        Ok(pending.ids.first().map(|p| to_u32(p.times_delivered)))
    }

    /// One never-delivered entry of `stream`, without waiting.
    async fn read_fresh(
        &self,
        stream: &str,
        worker: &WorkerIdentity,
    ) -> Result<Option<Delivery>, BusError> {
        let read: Result<Value, RedisError> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(JOB_GROUP)
            .arg(&worker.id)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut self.conn())
            .await;
        match read {
            Ok(reply) => self.take_fresh(worker, parse_read_reply(reply)?).await,
            Err(e) if is_no_group(&e) => {
                self.create_group(stream, JOB_GROUP).await?;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Waits up to `block` for a never-delivered entry on any of `streams`.
    async fn read_fresh_blocking(
        &self,
        streams: &[String],
        worker: &WorkerIdentity,
        block: Duration,
    ) -> Result<Option<Delivery>, BusError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(JOB_GROUP)
            .arg(&worker.id)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(millis(block).max(1))
            .arg("STREAMS")
            .arg(streams)
            .arg(vec![">"; streams.len()]);
        match self.query_blocking(&cmd).await {
            Ok(reply) => self.take_fresh(worker, parse_read_reply(reply)?).await,
            Err(e) if is_no_group(&e) => {
                for stream in streams {
                    self.create_group(stream, JOB_GROUP).await?;
                }
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Turns freshly read entries into one delivery. A read over several streams can return
    /// one entry from each; all but the first go back to the end of their stream as new
    /// entries, so they are not stuck under this worker until its lease runs out.
    async fn take_fresh(
        &self,
        worker: &WorkerIdentity,
        read: Vec<(String, Vec<RawEntry>)>,
    ) -> Result<Option<Delivery>, BusError> {
        let mut chosen = None;
        for (stream, entries) in read {
            for entry in entries {
                let Some(fields) = entry.fields else {
                    self.forget_deleted(&stream, JOB_GROUP, &entry.id).await?;
                    continue;
                };
                if chosen.is_some() {
                    self.requeue(&stream, &entry.id, &fields).await?;
                } else if let Some(job) = self.decode_job(&stream, &entry.id, &fields, 1).await? {
                    chosen = Some(delivery(&stream, &entry.id, job, 1, worker));
                }
            }
        }
        Ok(chosen)
    }

    /// The job of an entry, or `None` after dead-lettering an entry that holds no valid job.
    async fn decode_job(
        &self,
        stream: &str,
        entry_id: &str,
        fields: &Fields,
        deliveries: u32,
    ) -> Result<Option<JobEnvelope>, BusError> {
        let raw = fields.get(JOB_FIELD);
        let error = match raw.map(|raw| serde_json::from_slice::<JobEnvelope>(raw)) {
            Some(Ok(job)) => return Ok(Some(job)),
            Some(Err(e)) => e.to_string(),
            None => format!("no `{JOB_FIELD}` field"),
        };
        let reason = format!("malformed job entry: {error}");
        tracing::warn!(%stream, %entry_id, %reason, "dead-lettering malformed job entry");
        self.dead_letter(stream, entry_id, raw, &reason, deliveries).await?;
        Ok(None)
    }

    async fn dead_letter(
        &self,
        stream: &str,
        entry_id: &str,
        raw_job: Option<&Vec<u8>>,
        reason: &str,
        deliveries: u32,
    ) -> Result<(), BusError> {
        tracing::warn!(%stream, %entry_id, %reason, "dead-lettering job");
        let mut pipe = redis::pipe();
        pipe.atomic();
        // Tell the manager in the same transaction, so the job's record cannot stay "running".
        let envelope = raw_job.and_then(|raw| serde_json::from_slice::<JobEnvelope>(raw).ok());
        if let Some(job) = envelope {
            let report = serde_json::to_vec(&dead_letter_report(&job, reason)).map_err(|e| {
                BusError::Malformed { id: entry_id.to_owned(), reason: e.to_string() }
            })?;
            pipe.cmd("XADD")
                .arg(self.keys.reports())
                .arg("MAXLEN")
                .arg("~")
                .arg(REPORTS_MAX_LEN)
                .arg("*")
                .arg(EVENT_FIELD)
                .arg(report)
                .ignore();
        }
        pipe.cmd("XADD")
            .arg(self.keys.dead())
            .arg("*")
            .arg(JOB_FIELD)
            .arg(raw_job.map_or(&[][..], Vec::as_slice))
            .arg("reason")
            .arg(reason)
            .arg("deliveries")
            .arg(deliveries)
            .ignore()
            .cmd("XACK")
            .arg(stream)
            .arg(JOB_GROUP)
            .arg(entry_id)
            .ignore()
            .cmd("XDEL")
            .arg(stream)
            .arg(entry_id)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn requeue(&self, stream: &str, entry_id: &str, fields: &Fields) -> Result<(), BusError> {
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("XADD").arg(stream).arg("*");
        for (name, value) in fields {
            pipe.arg(name).arg(value.as_slice());
        }
        pipe.ignore()
            .cmd("XACK")
            .arg(stream)
            .arg(JOB_GROUP)
            .arg(entry_id)
            .ignore()
            .cmd("XDEL")
            .arg(stream)
            .arg(entry_id)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Drops a pending entry whose data is gone (deleted or trimmed from the stream).
    async fn forget_deleted(
        &self,
        stream: &str,
        group: &str,
        entry_id: &str,
    ) -> Result<(), BusError> {
        tracing::warn!(%stream, %entry_id, "dropping pending entry deleted from its stream");
        redis::cmd("XACK")
            .arg(stream)
            .arg(group)
            .arg(entry_id)
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn apply_receipt(
        &self,
        delivery: &Delivery,
        action: &str,
        idle_ms: u64,
    ) -> Result<(), BusError> {
        let unknown = || BusError::UnknownReceipt(delivery.receipt.clone());
        let receipt = JobReceipt::parse(&delivery.receipt, &self.keys).ok_or_else(unknown)?;
        let applied: i64 = self
            .receipt_script
            .key(receipt.stream)
            .arg(JOB_GROUP)
            .arg(receipt.entry_id)
            .arg(receipt.worker)
            .arg(receipt.attempt)
            .arg(action)
            .arg(idle_ms)
            .invoke_async(&mut self.conn())
            .await?;
        if applied == 1 { Ok(()) } else { Err(unknown()) }
    }

    async fn ensure_report_group(&self) -> Result<(), BusError> {
        if !self.report_group_ready.load(Ordering::Relaxed) {
            self.create_group(&self.keys.reports(), REPORT_GROUP).await?;
            self.report_group_ready.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// One `XREADGROUP` on the report stream: `from` is `0` for this consumer's pending
    /// reports, `>` for new ones.
    async fn read_reports(
        &self,
        consumer: &str,
        max: usize,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Vec<ReportDelivery>, BusError> {
        let stream = self.keys.reports();
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(REPORT_GROUP).arg(consumer).arg("COUNT").arg(max);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(millis(block).max(1));
        }
        cmd.arg("STREAMS").arg(&stream).arg(from);
        let read = match block {
            Some(_) => self.query_blocking(&cmd).await,
            None => cmd.query_async(&mut self.conn()).await,
        };
        let reply = match read {
            Ok(reply) => reply,
            Err(e) if is_no_group(&e) => {
                // The group vanished with the data (a Redis restarted without persistence).
                self.report_group_ready.store(false, Ordering::Relaxed);
                self.ensure_report_group().await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        let mut reports = Vec::new();
        for (_, entries) in parse_read_reply(reply)? {
            for entry in entries {
                let Some(fields) = entry.fields else {
                    self.forget_deleted(&stream, REPORT_GROUP, &entry.id).await?;
                    continue;
                };
                let event = match fields.get(EVENT_FIELD) {
                    Some(raw) => serde_json::from_slice::<NewEvent>(raw).map_err(|e| e.to_string()),
                    None => Err(format!("no `{EVENT_FIELD}` field")),
                };
                match event {
                    Ok(event) => reports.push(ReportDelivery { event, receipt: entry.id }),
                    Err(error) => {
                        tracing::warn!(entry_id = %entry.id, %error, "dropping malformed report");
                        self.ack_reports(std::slice::from_ref(&entry.id)).await?;
                    }
                }
            }
        }
        Ok(reports)
    }
}

fn delivery(
    stream: &str,
    entry_id: &str,
    job: JobEnvelope,
    attempt: u32,
    worker: &WorkerIdentity,
) -> Delivery {
    Delivery { job, attempt, receipt: JobReceipt::format(stream, entry_id, attempt, &worker.id) }
}

#[async_trait]
impl Bus for RedisBus {
    async fn enqueue_job(&self, job: &JobEnvelope) -> Result<(), BusError> {
        let member = selector_member(&job.selector);
        let stream = self.keys.job_stream(&member);
        let json = serde_json::to_vec(job).map_err(|e| BusError::Malformed {
            id: job.job_id.to_string(),
            reason: e.to_string(),
        })?;
        let known = lock(&self.streams_with_group).contains(&stream);
        if !known {
            // Before the first entry, so workers never read the stream without the group
            // (they would recreate it, but only on their next pass).
            self.create_group(&stream, JOB_GROUP).await?;
            lock(&self.streams_with_group).insert(stream.clone());
            // Workers sharing this bus see the new selector at once.
            *lock(&self.selector_cache) = None;
        }
        // SADD every time (a no-op write when the selector is known), so a selector set lost
        // with a Redis that had no persistence is rebuilt by the next enqueue.
        redis::pipe()
            .cmd("SADD")
            .arg(self.keys.selectors())
            .arg(&member)
            .ignore()
            .cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(JOB_FIELD)
            .arg(json)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn next_job(
        &self,
        worker: &WorkerIdentity,
        wait: Duration,
    ) -> Result<Option<Delivery>, BusError> {
        let deadline = instant_after(Instant::now(), wait);
        loop {
            let streams = self.matching_streams(worker).await?;
            for stream in &streams {
                if let Some(delivery) = self.reclaim_expired(stream, worker).await? {
                    return Ok(Some(delivery));
                }
            }
            // One stream at a time: a read over several would take one entry from each.
            for stream in &streams {
                if let Some(delivery) = self.read_fresh(stream, worker).await? {
                    return Ok(Some(delivery));
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining < Duration::from_millis(1) {
                return Ok(None);
            }
            let block = remaining.min(MAX_BLOCK);
            if streams.is_empty() {
                tokio::time::sleep(block.min(SELECTOR_CACHE_TTL)).await;
            } else if let Some(delivery) = self.read_fresh_blocking(&streams, worker, block).await?
            {
                return Ok(Some(delivery));
            }
        }
    }

    async fn ack_job(&self, delivery: &Delivery) -> Result<(), BusError> {
        self.apply_receipt(delivery, "ack", 0).await
    }

    async fn retry_job(&self, delivery: &Delivery) -> Result<(), BusError> {
        // Idle well past the lease, so the next look for expired leases takes it at once.
        self.apply_receipt(delivery, "retry", self.lease_ms().saturating_mul(10)).await
    }

    async fn extend_job(&self, delivery: &Delivery) -> Result<(), BusError> {
        self.apply_receipt(delivery, "extend", 0).await
    }

    async fn request_cancel(&self, job_id: Uuid) -> Result<(), BusError> {
        let () = redis::cmd("SET")
            .arg(self.keys.cancel(job_id))
            .arg(1)
            .arg("EX")
            .arg(CANCEL_REQUEST_TTL.as_secs())
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn cancel_requested(&self, job_id: Uuid) -> Result<bool, BusError> {
        let exists: bool = redis::cmd("EXISTS")
            .arg(self.keys.cancel(job_id))
            .query_async(&mut self.conn())
            .await?;
        Ok(exists)
    }

    async fn queued_jobs(&self) -> Result<Vec<QueuedJob>, BusError> {
        let lease_ms = self.lease_ms();
        let mut queued = Vec::new();
        for (stream, _) in self.read_selectors().await? {
            let range: Value = redis::cmd("XRANGE")
                .arg(&stream)
                .arg("-")
                .arg("+")
                .query_async(&mut self.conn())
                .await?;
            let entries = parse_entries(range)?;
            if entries.is_empty() {
                continue;
            }
            let pending: Result<StreamPendingCountReply, RedisError> = redis::cmd("XPENDING")
                .arg(&stream)
                .arg(JOB_GROUP)
                .arg("-")
                .arg("+")
                .arg(entries.len() + 1000)
                .query_async(&mut self.conn())
                .await;
            let pending: HashMap<String, StreamPendingId> = match pending {
                Ok(reply) => reply.ids.into_iter().map(|p| (p.id.clone(), p)).collect(),
                Err(e) if is_no_group(&e) => HashMap::new(),
                Err(e) => return Err(e.into()),
            };
            for entry in entries {
                let Some(raw) = entry.fields.as_ref().and_then(|f| f.get(JOB_FIELD)) else {
                    continue;
                };
                let job = match serde_json::from_slice::<JobEnvelope>(raw) {
                    Ok(job) => job,
                    Err(e) => {
                        tracing::warn!(%stream, entry_id = %entry.id, error = %e, "skipping malformed job entry");
                        continue;
                    }
                };
                let pending = pending.get(&entry.id);
                let order = parse_entry_id(&entry.id).unwrap_or((u64::MAX, u64::MAX));
                queued.push((
                    order,
                    QueuedJob {
                        job,
                        held_by: pending
                            .filter(|p| (p.last_delivered_ms as u64) < lease_ms)
                            .map(|p| p.consumer.clone()),
                        deliveries: pending.map_or(0, |p| to_u32(p.times_delivered)),
                    },
                ));
            }
        }
        queued.sort_by_key(|(order, _)| *order);
        Ok(queued.into_iter().map(|(_, job)| job).collect())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BusError> {
        let range: Value = redis::cmd("XRANGE")
            .arg(self.keys.dead())
            .arg("-")
            .arg("+")
            .query_async(&mut self.conn())
            .await?;
        let mut letters = Vec::new();
        for entry in parse_entries(range)? {
            let Some(fields) = entry.fields else { continue };
            let text =
                |name: &str| fields.get(name).map(|raw| String::from_utf8_lossy(raw).into_owned());
            let job = fields.get(JOB_FIELD).and_then(|raw| serde_json::from_slice(raw).ok());
            let Some(job) = job else {
                // Dead-lettered because it was malformed; kept in Redis for inspection.
                tracing::debug!(entry_id = %entry.id, "skipping dead letter without a valid job");
                continue;
            };
            letters.push(DeadLetter {
                job,
                reason: text("reason").unwrap_or_default(),
                deliveries: text("deliveries").and_then(|d| d.parse().ok()).unwrap_or_default(),
            });
        }
        Ok(letters)
    }

    async fn report(&self, event: &NewEvent) -> Result<(), BusError> {
        let json = serde_json::to_vec(event).map_err(|e| BusError::Malformed {
            id: event.body.type_name().to_owned(),
            reason: e.to_string(),
        })?;
        redis::cmd("XADD")
            .arg(self.keys.reports())
            .arg("MAXLEN")
            .arg("~")
            .arg(REPORTS_MAX_LEN)
            .arg("*")
            .arg(EVENT_FIELD)
            .arg(json)
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn next_reports(
        &self,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReportDelivery>, BusError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        self.ensure_report_group().await?;
        let pending = self.read_reports(consumer, max, "0", None).await?;
        if !pending.is_empty() {
            return Ok(pending);
        }
        let deadline = instant_after(Instant::now(), wait);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let block = (remaining >= Duration::from_millis(1)).then(|| remaining.min(MAX_BLOCK));
            let reports = self.read_reports(consumer, max, ">", block).await?;
            if !reports.is_empty() || block.is_none() {
                return Ok(reports);
            }
        }
    }

    async fn ack_reports(&self, receipts: &[String]) -> Result<(), BusError> {
        if let Some(bad) = receipts.iter().find(|r| parse_entry_id(r).is_none()) {
            return Err(BusError::UnknownReceipt(bad.clone()));
        }
        if receipts.is_empty() {
            return Ok(());
        }
        let stream = self.keys.reports();
        redis::pipe()
            .atomic()
            .cmd("XACK")
            .arg(&stream)
            .arg(REPORT_GROUP)
            .arg(receipts)
            .ignore()
            .cmd("XDEL")
            .arg(&stream)
            .arg(receipts)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    fn is_durable(&self) -> bool {
        true
    }
}

fn malformed_reply(what: &str, value: &Value) -> BusError {
    BusError::Malformed { id: what.to_owned(), reason: format!("unexpected reply {value:?}") }
}

fn value_bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) | Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        Value::Int(n) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

fn value_string(value: Value) -> Option<String> {
    String::from_utf8(value_bytes(value)?).ok()
}

/// Entries as `XRANGE`, `XCLAIM` and one stream of `XREADGROUP` return them.
fn parse_entries(value: Value) -> Result<Vec<RawEntry>, BusError> {
    let items = match value {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(items) | Value::Set(items) => items,
        other => return Err(malformed_reply("stream entries", &other)),
    };
    items
        .into_iter()
        // Redis 6.2's XCLAIM answers nil for entries deleted from the stream.
        .filter(|item| !matches!(item, Value::Nil))
        .map(parse_entry)
        .collect()
}

fn parse_entry(value: Value) -> Result<RawEntry, BusError> {
    let Value::Array(parts) = value else { return Err(malformed_reply("stream entry", &value)) };
    let mut parts = parts.into_iter();
    let id = parts
        .next()
        .and_then(value_string)
        .ok_or_else(|| malformed_reply("stream entry id", &Value::Nil))?;
    let pairs: Vec<(Value, Value)> = match parts.next() {
        None | Some(Value::Nil) => return Ok(RawEntry { id, fields: None }),
        Some(Value::Array(flat)) => {
            let mut flat = flat.into_iter();
            let mut pairs = Vec::new();
            while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
                pairs.push((name, value));
            }
            pairs
        }
        Some(Value::Map(pairs)) => pairs,
        Some(other) => return Err(malformed_reply(&id, &other)),
    };
    let mut fields = Fields::new();
    for (name, value) in pairs {
        if let (Some(name), Some(value)) = (value_string(name), value_bytes(value)) {
            fields.insert(name, value);
        }
    }
    Ok(RawEntry { id, fields: Some(fields) })
}

/// `XREADGROUP`'s reply: per stream, its entries. Nil when the read timed out.
fn parse_read_reply(value: Value) -> Result<Vec<(String, Vec<RawEntry>)>, BusError> {
    let pairs: Vec<(Value, Value)> = match value {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(pairs) => pairs,
        Value::Array(streams) => streams
            .into_iter()
            .map(|stream| match stream {
                Value::Array(parts) => {
                    let mut parts = parts.into_iter();
                    Ok((parts.next().unwrap_or_default(), parts.next().unwrap_or_default()))
                }
                other => Err(malformed_reply("XREADGROUP stream", &other)),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(malformed_reply("XREADGROUP", &other)),
    };
    pairs
        .into_iter()
        .map(|(stream, entries)| {
            let stream =
                value_string(stream).ok_or_else(|| malformed_reply("stream name", &Value::Nil))?;
            Ok((stream, parse_entries(entries)?))
        })
        .collect()
}
