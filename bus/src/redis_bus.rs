//! The bus over Redis Streams, for distributed sites.
//!
//! Layout (every key carries the hash tag `{NS}` so a cluster keeps them in one slot). A
//! *scope* is either shared (`{NS}`) or one datacenter's (`{NS}:dc:NAME`): jobs whose selector
//! names a datacenter, and everything a site worker sends, live in that datacenter's scope, so
//! a Redis ACL user per worker credential can be confined to it (see [`worker_acl_rules`]).
//! - `SCOPE:jobs:SELECTOR`: one stream per canonical selector text (`*` for the empty one),
//!   with the consumer group `workers`; each entry has a field `job` (JSON of [`JobEnvelope`]).
//!   A worker's consumer name is its `WorkerIdentity::id`; a delivered entry stays in the
//!   group's pending list (the lease) until acknowledged, and the pending list's idle time and
//!   delivery counter are the lease clock and the attempt number.
//! - `SCOPE:selectors`: the set of selectors that have a job stream in the scope.
//! - `SCOPE:dead`: dead-lettered jobs (fields `job`, `reason`, `deliveries`).
//! - `SCOPE:reports`: worker reports, consumer group `manager`, field `event` (JSON of
//!   [`NewEvent`]). A site worker can only write its datacenter's, so the manager knows which
//!   datacenter a report speaks for.
//! - `{NS}:datacenters`: the datacenters that have a scope.
//! - `{NS}:dc:NAME:workers` and `…:workers-seen`: each worker's last heartbeat (JSON of
//!   [`WorkerHeartbeat`]) and when Redis received it (unix ms, Redis's clock).
//! - `{NS}:dc:NAME:snapshot`: a stream of at most one entry, the datacenter's current snapshot,
//!   with the entry id `GENERATION-1`; Redis refuses ids that do not grow, so a generation
//!   never goes back, and workers wait for the next one with a blocking `XREAD`.
//! - `{NS}:cancel:JOB`: cancel requests.

use std::{
    collections::{HashMap, HashSet},
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use async_trait::async_trait;
use ctpf_common::{Name, NewEvent, TagSelector, Uuid, WorkerHeartbeat, WorkerIdentity};
use redis::{
    AsyncConnectionConfig, Client, Cmd, RedisError, Script, Value,
    aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    streams::{StreamPendingCountReply, StreamPendingId},
};
use tokio::time::Instant;

use crate::{
    Bus, BusConfig, BusError, CANCEL_REQUEST_TTL, DeadLetter, Delivery, JobEnvelope,
    PublishedSnapshot, QueuedJob, ReportDelivery, SeenWorker, WorkerGrant, dead_letter_reason,
    dead_letter_report, instant_after,
};

const DEFAULT_NAMESPACE: &str = "ctpf";
const JOB_GROUP: &str = "workers";
const REPORT_GROUP: &str = "manager";
const JOB_FIELD: &str = "job";
const EVENT_FIELD: &str = "event";
const GENERATION_FIELD: &str = "generation";
const BODY_FIELD: &str = "body";
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

/// Stores a worker's heartbeat and the time Redis received it.
///
/// KEYS[1] heartbeats hash, KEYS[2] seen-at hash; ARGV: worker id, heartbeat JSON.
const HEARTBEAT_SCRIPT: &str = r"
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ms)
return ms
";
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
    /// The datacenter this connection's credentials speak for (a site worker's), or `None`
    /// for the manager's own user.
    scope: Option<Name>,
    client: Client,
    /// Shared by every non-blocking command; reconnects by itself after Redis restarts.
    conn: ConnectionManager,
    /// Connections for blocking reads, one read at a time each, so a blocked `XREADGROUP`
    /// never holds up the commands on `conn`.
    blocking_pool: Mutex<Vec<MultiplexedConnection>>,
    /// Per scope (`None`: shared), the selectors read last.
    selector_cache: Mutex<HashMap<Option<String>, CachedSelectors>>,
    /// Job streams this process already created the consumer group for.
    streams_with_group: Mutex<HashSet<String>>,
    /// Report streams with the manager's group, as of the last read.
    report_streams: Mutex<Option<CachedReportStreams>>,
    receipt_script: Script,
    heartbeat_script: Script,
    /// ACL rules this process last applied, per user, so unchanged users are not rewritten.
    applied_acl: Mutex<HashMap<String, String>>,
}

#[derive(Clone)]
struct CachedReportStreams {
    read_at: Instant,
    streams: Vec<String>,
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
            .field("scope", &self.scope)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
struct Keys {
    /// `{NS}`
    tag: String,
    /// `NS`, for ACL user names.
    namespace: String,
}

impl Keys {
    /// `{NS}` for the shared scope, `{NS}:dc:NAME` for a datacenter's.
    fn scope(&self, datacenter: Option<&str>) -> String {
        match datacenter {
            None => self.tag.clone(),
            Some(dc) => format!("{}:dc:{dc}", self.tag),
        }
    }

    /// The datacenter scope a key lives in, if any.
    fn datacenter_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(self.tag.as_str())?.strip_prefix(":dc:")?;
        rest.split_once(':').map(|(dc, _)| dc)
    }

    fn datacenters(&self) -> String {
        format!("{}:datacenters", self.tag)
    }

    fn selectors(&self, datacenter: Option<&str>) -> String {
        format!("{}:selectors", self.scope(datacenter))
    }

    fn dead(&self, datacenter: Option<&str>) -> String {
        format!("{}:dead", self.scope(datacenter))
    }

    fn reports(&self, datacenter: Option<&str>) -> String {
        format!("{}:reports", self.scope(datacenter))
    }

    fn workers(&self, datacenter: &str) -> String {
        format!("{}:workers", self.scope(Some(datacenter)))
    }

    fn workers_seen(&self, datacenter: &str) -> String {
        format!("{}:workers-seen", self.scope(Some(datacenter)))
    }

    fn snapshot(&self, datacenter: &str) -> String {
        format!("{}:snapshot", self.scope(Some(datacenter)))
    }

    fn cancel(&self, job_id: Uuid) -> String {
        format!("{}:cancel:{job_id}", self.tag)
    }

    fn job_stream(&self, datacenter: Option<&str>, selector_member: &str) -> String {
        format!("{}:jobs:{selector_member}", self.scope(datacenter))
    }

    fn is_job_stream(&self, key: &str) -> bool {
        key.starts_with(self.tag.as_str()) && key.contains(":jobs:")
    }

    fn is_report_stream(&self, key: &str) -> bool {
        key == self.reports(None)
            || self.datacenter_of(key).is_some_and(|dc| key == self.reports(Some(dc)))
    }
}

/// The ACL user name of worker credential `credential_id` in `namespace`.
pub fn worker_acl_user(namespace: &str, credential_id: &str) -> String {
    format!("ctpf-worker.{namespace}.{credential_id}")
}

/// A Redis glob pattern matching `literal` exactly.
fn glob_literal(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The commands a site worker uses, and nothing else (no KEYS, SCAN, CONFIG, FLUSH*, ACL…).
const WORKER_COMMANDS: &[&str] = &[
    "ping",
    "echo",
    "hello",
    "auth",
    "select",
    "client|setname",
    "client|id",
    "client|getname",
    "time",
    "multi",
    "exec",
    "discard",
    "eval",
    "evalsha",
    "script|load",
    "xreadgroup",
    "xread",
    "xack",
    "xclaim",
    "xpending",
    "xadd",
    "xdel",
    "xrange",
    "xrevrange",
    "xgroup|create",
    "smembers",
    "exists",
    "get",
    "hset",
    "hgetall",
];

/// The ACL rules (after `reset on #SECRET_SHA256`) for a worker of `datacenter`: its
/// datacenter's job streams and reports (read-write), its selectors and snapshot
/// (read-only), its heartbeat hashes; of the shared scope, the job streams (jobs that name no
/// datacenter are anyone's), the selector set and cancel requests (read-only) and the dead
/// letters (write-only). No pub/sub channels.
pub fn worker_acl_rules(namespace: &str, datacenter: &Name) -> Vec<String> {
    let keys = Keys { tag: format!("{{{namespace}}}"), namespace: namespace.to_owned() };
    let dc = Some(datacenter.as_str());
    let pattern = |access: &str, key: String| format!("{access}~{}", glob_literal(&key));
    let wildcard = |access: &str, prefix: String| format!("{access}~{}*", glob_literal(&prefix));
    let mut rules = vec![
        wildcard("", keys.job_stream(dc, "")),
        wildcard("", keys.job_stream(None, "")),
        pattern("", keys.reports(dc)),
        pattern("", keys.dead(dc)),
        pattern("%W", keys.dead(None)),
        pattern("", keys.workers(datacenter.as_str())),
        pattern("", keys.workers_seen(datacenter.as_str())),
        pattern("%R", keys.selectors(dc)),
        pattern("%R", keys.selectors(None)),
        pattern("%R", keys.snapshot(datacenter.as_str())),
        wildcard("%R", format!("{}:cancel:", keys.tag)),
        "resetchannels".to_owned(),
        "-@all".to_owned(),
    ];
    rules.extend(WORKER_COMMANDS.iter().map(|c| format!("+{c}")));
    rules
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
        (keys.is_job_stream(stream) && parse_entry_id(entry_id).is_some()).then_some(Self {
            stream,
            entry_id,
            attempt,
            worker,
        })
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
        Self::open(url, namespace, None, config).await
    }

    /// Connects as a site worker of `datacenter` with the credential `credential_id` and its
    /// `secret` (issued by the manager, see [`Bus::authorize_workers`]): Redis then lets this
    /// connection see only that datacenter's part of the bus.
    pub async fn connect_as_worker(
        url: &str,
        namespace: &str,
        datacenter: &Name,
        credential_id: &str,
        secret: &str,
        config: BusConfig,
    ) -> Result<Self, BusError> {
        let user = worker_acl_user(namespace, credential_id);
        let denied = |reason: &dyn std::fmt::Display| {
            BusError::Denied(format!(
                "the worker credential {credential_id} is not valid for datacenter {datacenter} \
                 (wrong secret, revoked, or issued for another datacenter): {reason}"
            ))
        };
        let bus = match Self::open(url, namespace, Some((datacenter, &user, secret)), config).await
        {
            Ok(bus) => bus,
            Err(BusError::Denied(reason)) => return Err(denied(&reason)),
            Err(e) => return Err(e),
        };
        // Fail now, with a clear message, rather than on the first job: a credential of
        // another datacenter authenticates but may not read this one's keys.
        let probe: Result<bool, RedisError> = redis::cmd("EXISTS")
            .arg(bus.keys.snapshot(datacenter.as_str()))
            .query_async(&mut bus.conn())
            .await;
        match probe.map_err(BusError::from) {
            Ok(_) => Ok(bus),
            Err(BusError::Denied(reason)) => Err(denied(&reason)),
            Err(e) => Err(e),
        }
    }

    async fn open(
        url: &str,
        namespace: &str,
        worker: Option<(&Name, &str, &str)>,
        config: BusConfig,
    ) -> Result<Self, BusError> {
        if namespace.is_empty()
            || namespace.contains(['{', '}'])
            || namespace.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(BusError::Malformed {
                id: namespace.to_owned(),
                reason: "a bus namespace must be non-empty, without braces or white space".into(),
            });
        }
        let mut info = redis::IntoConnectionInfo::into_connection_info(url)?;
        if let Some((_, user, secret)) = worker {
            let settings = info.redis_settings().clone().set_username(user).set_password(secret);
            info = info.set_redis_settings(settings);
        }
        let client = Client::open(info)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT));
        let conn = ConnectionManager::new_with_config(client.clone(), manager_config).await?;
        Ok(Self {
            config,
            keys: Keys { tag: format!("{{{namespace}}}"), namespace: namespace.to_owned() },
            scope: worker.map(|(datacenter, _, _)| datacenter.clone()),
            client,
            conn,
            blocking_pool: Mutex::new(Vec::new()),
            selector_cache: Mutex::new(HashMap::new()),
            streams_with_group: Mutex::new(HashSet::new()),
            report_streams: Mutex::new(None),
            receipt_script: Script::new(RECEIPT_SCRIPT),
            heartbeat_script: Script::new(HEARTBEAT_SCRIPT),
            applied_acl: Mutex::new(HashMap::new()),
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The datacenter this connection speaks for, as a key part.
    fn scope_str(&self) -> Option<&str> {
        self.scope.as_ref().map(Name::as_str)
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

    /// The job streams whose selector `worker` accepts: shared ones and those of its
    /// datacenter.
    async fn matching_streams(&self, worker: &WorkerIdentity) -> Result<Vec<String>, BusError> {
        let mut streams = Vec::new();
        for scope in [None, Some(worker.datacenter.as_str().to_owned())] {
            let cached = lock(&self.selector_cache)
                .get(&scope)
                .filter(|cache| cache.read_at.elapsed() < SELECTOR_CACHE_TTL)
                .cloned();
            let scoped = match cached {
                Some(cache) => cache.streams,
                None => {
                    let scoped = self.read_selectors(scope.as_deref()).await?;
                    let cache =
                        CachedSelectors { read_at: Instant::now(), streams: scoped.clone() };
                    lock(&self.selector_cache).insert(scope, cache);
                    scoped
                }
            };
            streams.extend(
                scoped
                    .into_iter()
                    .filter(|(_, selector)| worker.accepts(selector))
                    .map(|(stream, _)| stream),
            );
        }
        Ok(streams)
    }

    /// The job streams of one scope with their selectors, sorted by stream key.
    async fn read_selectors(
        &self,
        datacenter: Option<&str>,
    ) -> Result<Vec<(String, TagSelector)>, BusError> {
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.selectors(datacenter))
            .query_async(&mut self.conn())
            .await?;
        let mut streams: Vec<(String, TagSelector)> = members
            .into_iter()
            .filter_map(|member| match parse_selector_member(&member) {
                Ok(selector) => Some((self.keys.job_stream(datacenter, &member), selector)),
                Err(e) => {
                    tracing::warn!(%member, error = %e, "skipping malformed selector in the bus");
                    None
                }
            })
            .collect();
        streams.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(streams)
    }

    /// Every datacenter with a scope on the bus.
    async fn datacenters(&self) -> Result<Vec<String>, BusError> {
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.datacenters())
            .query_async(&mut self.conn())
            .await?;
        names.retain(|name| Name::parse("datacenter", name).is_ok());
        names.sort();
        Ok(names)
    }

    /// The shared scope and every datacenter's.
    async fn all_scopes(&self) -> Result<Vec<Option<String>>, BusError> {
        let mut scopes = vec![None];
        scopes.extend(self.datacenters().await?.into_iter().map(Some));
        Ok(scopes)
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
                .arg(self.keys.reports(self.scope_str()))
                .arg("MAXLEN")
                .arg("~")
                .arg(REPORTS_MAX_LEN)
                .arg("*")
                .arg(EVENT_FIELD)
                .arg(report)
                .ignore();
        }
        pipe.cmd("XADD")
            .arg(self.keys.dead(self.keys.datacenter_of(stream)))
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

    /// The report streams the manager reads (shared, then each datacenter's), each with the
    /// manager's consumer group.
    async fn report_streams(&self) -> Result<Vec<String>, BusError> {
        let cached = lock(&self.report_streams)
            .clone()
            .filter(|cache| cache.read_at.elapsed() < SELECTOR_CACHE_TTL);
        if let Some(cache) = cached {
            return Ok(cache.streams);
        }
        let mut streams = Vec::new();
        for scope in self.all_scopes().await? {
            let stream = self.keys.reports(scope.as_deref());
            self.create_group(&stream, REPORT_GROUP).await?;
            streams.push(stream);
        }
        *lock(&self.report_streams) =
            Some(CachedReportStreams { read_at: Instant::now(), streams: streams.clone() });
        Ok(streams)
    }

    /// One `XREADGROUP` over the report streams: `from` is `0` for this consumer's pending
    /// reports, `>` for new ones.
    async fn read_reports(
        &self,
        consumer: &str,
        max: usize,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Vec<ReportDelivery>, BusError> {
        let streams = self.report_streams().await?;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(REPORT_GROUP).arg(consumer).arg("COUNT").arg(max);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(millis(block).max(1));
        }
        cmd.arg("STREAMS").arg(&streams).arg(vec![from; streams.len()]);
        let read = match block {
            Some(_) => self.query_blocking(&cmd).await,
            None => cmd.query_async(&mut self.conn()).await,
        };
        let reply = match read {
            Ok(reply) => reply,
            Err(e) if is_no_group(&e) => {
                // A group vanished with the data (a Redis restarted without persistence).
                *lock(&self.report_streams) = None;
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        let mut reports = Vec::new();
        for (stream, entries) in parse_read_reply(reply)? {
            let datacenter = self.keys.datacenter_of(&stream).and_then(|dc| dc.parse().ok());
            for entry in entries {
                let receipt = report_receipt(&stream, &entry.id);
                let Some(fields) = entry.fields else {
                    self.forget_deleted(&stream, REPORT_GROUP, &entry.id).await?;
                    continue;
                };
                let event = match fields.get(EVENT_FIELD) {
                    Some(raw) => serde_json::from_slice::<NewEvent>(raw).map_err(|e| e.to_string()),
                    None => Err(format!("no `{EVENT_FIELD}` field")),
                };
                match event {
                    Ok(event) => reports.push(ReportDelivery {
                        event,
                        receipt,
                        datacenter: datacenter.clone(),
                    }),
                    Err(error) => {
                        tracing::warn!(%stream, entry_id = %entry.id, %error, "dropping malformed report");
                        self.ack_reports(std::slice::from_ref(&receipt)).await?;
                    }
                }
            }
        }
        Ok(reports)
    }
}

/// A report's receipt: `STREAM\nENTRY`.
fn report_receipt(stream: &str, entry_id: &str) -> String {
    format!("{stream}\n{entry_id}")
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
        let datacenter = job.selector.datacenter();
        let scope = datacenter.as_ref().map(Name::as_str);
        let stream = self.keys.job_stream(scope, &member);
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
            lock(&self.selector_cache).clear();
        }
        // SADD every time (a no-op write when the selector is known), so a selector set lost
        // with a Redis that had no persistence is rebuilt by the next enqueue.
        let mut pipe = redis::pipe();
        if let Some(dc) = scope {
            pipe.cmd("SADD").arg(self.keys.datacenters()).arg(dc).ignore();
        }
        pipe.cmd("SADD")
            .arg(self.keys.selectors(scope))
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
        let mut streams = Vec::new();
        for scope in self.all_scopes().await? {
            streams.extend(self.read_selectors(scope.as_deref()).await?);
        }
        for (stream, _) in streams {
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
        let mut entries = Vec::new();
        for scope in self.all_scopes().await? {
            let range: Value = redis::cmd("XRANGE")
                .arg(self.keys.dead(scope.as_deref()))
                .arg("-")
                .arg("+")
                .query_async(&mut self.conn())
                .await?;
            entries.extend(parse_entries(range)?);
        }
        entries.sort_by_key(|entry| parse_entry_id(&entry.id).unwrap_or((u64::MAX, u64::MAX)));
        let mut letters = Vec::new();
        for entry in entries {
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
            .arg(self.keys.reports(self.scope_str()))
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
        let mut by_stream: HashMap<&str, Vec<&str>> = HashMap::new();
        for receipt in receipts {
            let parsed = receipt.split_once('\n').filter(|(stream, entry_id)| {
                self.keys.is_report_stream(stream) && parse_entry_id(entry_id).is_some()
            });
            let Some((stream, entry_id)) = parsed else {
                return Err(BusError::UnknownReceipt(receipt.clone()));
            };
            by_stream.entry(stream).or_default().push(entry_id);
        }
        if by_stream.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (stream, ids) in by_stream {
            pipe.cmd("XACK").arg(stream).arg(REPORT_GROUP).arg(&ids).ignore();
            pipe.cmd("XDEL").arg(stream).arg(&ids).ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await?;
        Ok(())
    }

    async fn heartbeat(&self, heartbeat: &WorkerHeartbeat) -> Result<(), BusError> {
        let datacenter = heartbeat.identity.datacenter.as_str();
        let json = serde_json::to_vec(heartbeat).map_err(|e| BusError::Malformed {
            id: heartbeat.identity.id.clone(),
            reason: e.to_string(),
        })?;
        if self.scope.is_none() {
            // A site worker's datacenter was registered with its credential.
            redis::cmd("SADD")
                .arg(self.keys.datacenters())
                .arg(datacenter)
                .query_async::<()>(&mut self.conn())
                .await?;
        }
        let _seen_ms: i64 = self
            .heartbeat_script
            .key(self.keys.workers(datacenter))
            .key(self.keys.workers_seen(datacenter))
            .arg(&heartbeat.identity.id)
            .arg(json)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<SeenWorker>, BusError> {
        let mut workers = Vec::new();
        for datacenter in self.datacenters().await? {
            let (beats, seen): (HashMap<String, Vec<u8>>, HashMap<String, u64>) = redis::pipe()
                .cmd("HGETALL")
                .arg(self.keys.workers(&datacenter))
                .cmd("HGETALL")
                .arg(self.keys.workers_seen(&datacenter))
                .query_async(&mut self.conn())
                .await?;
            for (id, raw) in beats {
                match serde_json::from_slice::<WorkerHeartbeat>(&raw) {
                    // Only its own datacenter's hash counts: a heartbeat claiming another is
                    // not believed.
                    Ok(heartbeat) if heartbeat.identity.datacenter.as_str() == datacenter => {
                        let seen_at_ms = seen.get(&id).copied().unwrap_or(0);
                        workers.push(SeenWorker { heartbeat, seen_at_ms });
                    }
                    Ok(_) => {
                        tracing::warn!(%datacenter, worker = %id, "skipping a heartbeat naming another datacenter")
                    }
                    Err(error) => {
                        tracing::warn!(%datacenter, worker = %id, %error, "skipping a malformed heartbeat");
                    }
                }
            }
        }
        Ok(workers)
    }

    async fn forget_workers(&self, datacenter: &Name) -> Result<(), BusError> {
        redis::cmd("DEL")
            .arg(self.keys.workers(datacenter.as_str()))
            .arg(self.keys.workers_seen(datacenter.as_str()))
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn publish_snapshot(
        &self,
        datacenter: &Name,
        snapshot: &PublishedSnapshot,
    ) -> Result<bool, BusError> {
        if snapshot.generation == 0 {
            return Err(BusError::Malformed {
                id: datacenter.to_string(),
                reason: "snapshot generations start at 1".into(),
            });
        }
        redis::cmd("SADD")
            .arg(self.keys.datacenters())
            .arg(datacenter.as_str())
            .query_async::<()>(&mut self.conn())
            .await?;
        let added: Result<Value, RedisError> = redis::cmd("XADD")
            .arg(self.keys.snapshot(datacenter.as_str()))
            .arg("MAXLEN")
            .arg(1)
            .arg(format!("{}-1", snapshot.generation))
            .arg(GENERATION_FIELD)
            .arg(snapshot.generation)
            .arg(BODY_FIELD)
            .arg(snapshot.body.as_slice())
            .query_async(&mut self.conn())
            .await;
        match added {
            Ok(_) => Ok(true),
            // Redis refuses an id not above the stream's last one: an older generation.
            Err(e) if e.to_string().contains("equal or smaller") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn snapshot_after(
        &self,
        datacenter: &Name,
        after: u64,
        wait: Duration,
    ) -> Result<Option<PublishedSnapshot>, BusError> {
        let key = self.keys.snapshot(datacenter.as_str());
        let deadline = instant_after(Instant::now(), wait);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let block = (remaining >= Duration::from_millis(1)).then(|| remaining.min(MAX_BLOCK));
            let mut cmd = redis::cmd("XREAD");
            if let Some(block) = block {
                cmd.arg("BLOCK").arg(millis(block).max(1));
            }
            cmd.arg("STREAMS").arg(&key).arg(format!("{after}-1"));
            let reply = match block {
                Some(_) => self.query_blocking(&cmd).await?,
                None => cmd.query_async(&mut self.conn()).await?,
            };
            let newest = parse_read_reply(reply)?
                .into_iter()
                .flat_map(|(_, entries)| entries)
                .filter_map(|entry| parse_snapshot(&key, entry))
                .max_by_key(|snapshot| snapshot.generation);
            if newest.is_some() || block.is_none() {
                return Ok(newest);
            }
        }
    }

    async fn authorize_workers(&self, grants: &[WorkerGrant]) -> Result<(), BusError> {
        let prefix = worker_acl_user(&self.keys.namespace, "");
        let existing: Vec<String> =
            redis::cmd("ACL").arg("USERS").query_async(&mut self.conn()).await?;
        let existing: HashSet<String> =
            existing.into_iter().filter(|user| user.starts_with(&prefix)).collect();
        let mut wanted = HashSet::new();
        for grant in grants {
            let valid_id = !grant.credential_id.is_empty()
                && grant.credential_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !valid_id {
                return Err(BusError::Malformed {
                    id: grant.credential_id.clone(),
                    reason: "a credential id is letters, digits and '-'".into(),
                });
            }
            let user = worker_acl_user(&self.keys.namespace, &grant.credential_id);
            let mut rules = vec![
                "reset".to_owned(),
                "on".to_owned(),
                format!("#{}", hex_lower(&grant.secret_sha256)),
            ];
            rules.extend(worker_acl_rules(&self.keys.namespace, &grant.datacenter));
            let text = rules.join(" ");
            let unchanged = existing.contains(&user)
                && lock(&self.applied_acl).get(&user).is_some_and(|applied| *applied == text);
            if !unchanged {
                redis::cmd("ACL")
                    .arg("SETUSER")
                    .arg(&user)
                    .arg(&rules)
                    .query_async::<()>(&mut self.conn())
                    .await?;
                lock(&self.applied_acl).insert(user.clone(), text);
            }
            wanted.insert(user);
        }
        if !grants.is_empty() {
            // The manager reads reports from, and lists workers of, every granted datacenter.
            let datacenters: HashSet<&str> = grants.iter().map(|g| g.datacenter.as_str()).collect();
            redis::cmd("SADD")
                .arg(self.keys.datacenters())
                .arg(datacenters.into_iter().collect::<Vec<_>>())
                .query_async::<()>(&mut self.conn())
                .await?;
        }
        for user in existing.difference(&wanted) {
            // Deleting a user also disconnects its clients.
            redis::cmd("ACL").arg("DELUSER").arg(user).query_async::<()>(&mut self.conn()).await?;
            lock(&self.applied_acl).remove(user);
            tracing::info!(%user, "revoked a worker's Redis user");
        }
        *lock(&self.report_streams) = None;
        Ok(())
    }

    fn is_durable(&self) -> bool {
        true
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A snapshot stream entry; `None` (logged) when it is not one.
fn parse_snapshot(key: &str, entry: RawEntry) -> Option<PublishedSnapshot> {
    let fields = entry.fields?;
    let generation = fields
        .get(GENERATION_FIELD)
        .and_then(|raw| std::str::from_utf8(raw).ok())
        .and_then(|text| text.parse().ok());
    match (generation, fields.get(BODY_FIELD)) {
        (Some(generation), Some(body)) => {
            Some(PublishedSnapshot { generation, body: body.clone() })
        }
        _ => {
            tracing::warn!(%key, entry_id = %entry.id, "skipping a malformed snapshot entry");
            None
        }
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
