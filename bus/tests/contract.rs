//! The one contract both bus backends keep. Every case runs against `MemoryBus` and against
//! `RedisBus` on a private `redis-server`; a few Redis-only cases follow.
//!
//! Timing: waits for something that must arrive are long (it arrives much sooner); waits for
//! something that must not arrive are short; only lower bounds on elapsed time are asserted,
//! so a slow machine cannot make a case fail.

// Helpers outside `#[test]` functions parse literals that are valid by construction.
#![allow(clippy::unwrap_used)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use ctpf_bus::{
    Bus, BusConfig, BusError, Delivery, JobEnvelope, MemoryBus, PublishedSnapshot, RedisBus,
    WorkerGrant,
};
use ctpf_common::{
    EventBody, JobSpec, Name, NewEvent, OffsetDateTime, Role, Uuid, WorkerHeartbeat, WorkerIdentity,
};
use ctpf_e2e::RedisServer;

/// How long to wait for something that must come.
const ARRIVES: Duration = Duration::from_secs(15);
/// How long to wait for something that must not come.
const STAYS_AWAY: Duration = Duration::from_millis(600);

/// A way to get buses that share one set of queues (several processes on one Redis, or
/// handles of one `MemoryBus`).
#[async_trait]
trait Backend: Send + Sync {
    async fn buses(&self, config: BusConfig, count: usize) -> Result<Vec<Arc<dyn Bus>>>;

    async fn bus(&self, config: BusConfig) -> Result<Arc<dyn Bus>> {
        self.buses(config, 1).await?.pop().context("no bus")
    }
}

struct MemoryBackend;

#[async_trait]
impl Backend for MemoryBackend {
    async fn buses(&self, config: BusConfig, count: usize) -> Result<Vec<Arc<dyn Bus>>> {
        let bus = MemoryBus::new(config);
        Ok((0..count).map(|_| Arc::new(bus.clone()) as Arc<dyn Bus>).collect())
    }
}

struct RedisBackend {
    server: RedisServer,
}

impl RedisBackend {
    fn start() -> Result<Self> {
        Ok(Self { server: RedisServer::start()? })
    }
}

#[async_trait]
impl Backend for RedisBackend {
    async fn buses(&self, config: BusConfig, count: usize) -> Result<Vec<Arc<dyn Bus>>> {
        let mut buses: Vec<Arc<dyn Bus>> = Vec::new();
        for _ in 0..count {
            let bus =
                RedisBus::connect_with_namespace(&self.server.url(), "contract", config.clone())
                    .await?;
            buses.push(Arc::new(bus));
        }
        Ok(buses)
    }
}

fn config(lease: Duration, max_deliveries: u32) -> BusConfig {
    BusConfig { lease, max_deliveries }
}

fn worker(id: &str, datacenter: &str, roles: &[Role]) -> WorkerIdentity {
    WorkerIdentity {
        id: id.to_owned(),
        datacenter: datacenter.parse().unwrap(),
        tags: Default::default(),
        roles: roles.to_vec(),
    }
}

fn job(selector: &str) -> JobEnvelope {
    JobEnvelope {
        job_id: Uuid::new_v4(),
        spec: JobSpec::Probe { sleep_ms: 0, fail: false },
        selector: selector.parse().unwrap(),
    }
}

fn event(worker: &str) -> NewEvent {
    NewEvent::new(None, EventBody::WorkerStarted { worker: worker.to_owned() })
}

async fn must_get(bus: &dyn Bus, worker: &WorkerIdentity) -> Result<Delivery> {
    bus.next_job(worker, ARRIVES).await?.with_context(|| format!("{} got no job", worker.id))
}

fn is_unknown_receipt<T: std::fmt::Debug>(result: Result<T, BusError>) -> bool {
    matches!(result, Err(BusError::UnknownReceipt(_)))
}

async fn routes_jobs_by_selector(backend: &dyn Backend) -> Result<()> {
    let bus = backend.bus(config(Duration::from_secs(60), 3)).await?;
    let home_builder = worker("home-builder", "home", &[Role::Builder]);
    let home_packager = worker("home-packager", "home", &[Role::Packager]);
    let away_builder = worker("away-builder", "away", &[Role::Builder]);
    let for_home = job("datacenter=home,role=builder");
    let for_mars = job("datacenter=mars");
    bus.enqueue_job(&for_home).await?;
    bus.enqueue_job(&for_mars).await?;

    assert_eq!(bus.next_job(&away_builder, STAYS_AWAY).await?, None);
    assert_eq!(bus.next_job(&home_packager, STAYS_AWAY).await?, None);
    let delivery = must_get(&*bus, &home_builder).await?;
    assert_eq!((&delivery.job, delivery.attempt), (&for_home, 1));
    assert_eq!(bus.next_job(&home_builder, STAYS_AWAY).await?, None, "the mars job matches nobody");

    let queued = bus.queued_jobs().await?;
    assert_eq!(queued.len(), 2, "{queued:?}");
    assert_eq!(queued[0].job, for_home);
    assert_eq!(queued[0].held_by.as_deref(), Some("home-builder"));
    assert_eq!(queued[0].deliveries, 1);
    assert_eq!((&queued[1].job, &queued[1].held_by, queued[1].deliveries), (&for_mars, &None, 0));

    bus.ack_job(&delivery).await?;
    let queued = bus.queued_jobs().await?;
    assert_eq!(queued.iter().map(|q| &q.job).collect::<Vec<_>>(), [&for_mars]);

    // An empty selector matches every worker.
    let for_anyone = job("");
    bus.enqueue_job(&for_anyone).await?;
    assert_eq!(must_get(&*bus, &away_builder).await?.job, for_anyone);
    Ok(())
}

async fn delivers_in_order_and_ack_removes(backend: &dyn Backend) -> Result<()> {
    let bus = backend.bus(config(Duration::from_secs(60), 3)).await?;
    let builder = worker("b1", "home", &[Role::Builder]);
    let jobs: Vec<JobEnvelope> = (0..5).map(|_| job("role=builder")).collect();
    for job in &jobs {
        bus.enqueue_job(job).await?;
    }
    for expected in &jobs {
        let delivery = must_get(&*bus, &builder).await?;
        assert_eq!((&delivery.job, delivery.attempt), (expected, 1));
        bus.ack_job(&delivery).await?;
        assert!(is_unknown_receipt(bus.ack_job(&delivery).await), "acked twice");
    }
    assert_eq!(bus.queued_jobs().await?, []);
    assert_eq!(bus.next_job(&builder, STAYS_AWAY).await?, None);
    Ok(())
}

async fn expired_lease_goes_to_another_worker(backend: &dyn Backend) -> Result<()> {
    let lease = Duration::from_millis(300);
    let buses = backend.buses(config(lease, 3), 2).await?;
    let (first, second) = (worker("w1", "home", &[Role::Builder]), worker("w2", "home", &[]));
    let sent = job("datacenter=home");
    buses[0].enqueue_job(&sent).await?;

    let lost = must_get(&*buses[0], &first).await?;
    let taken_at = Instant::now();
    let redelivered = must_get(&*buses[1], &second).await?;
    assert!(taken_at.elapsed() >= lease - Duration::from_millis(50), "redelivered before expiry");
    assert_eq!((&redelivered.job, redelivered.attempt), (&sent, 2));

    // The first holder lost the job: its receipt no longer counts.
    assert!(is_unknown_receipt(buses[0].extend_job(&lost).await));
    assert!(is_unknown_receipt(buses[0].ack_job(&lost).await));
    let queued = buses[0].queued_jobs().await?;
    assert_eq!(queued.len(), 1);
    assert_eq!((queued[0].held_by.as_deref(), queued[0].deliveries), (Some("w2"), 2));

    buses[1].ack_job(&redelivered).await?;
    assert_eq!(buses[0].queued_jobs().await?, []);
    Ok(())
}

async fn extend_keeps_the_lease(backend: &dyn Backend) -> Result<()> {
    let buses = backend.buses(config(Duration::from_millis(1500), 3), 2).await?;
    let (first, second) = (worker("w1", "home", &[]), worker("w2", "home", &[]));
    let sent = job("");
    buses[0].enqueue_job(&sent).await?;
    let held = must_get(&*buses[0], &first).await?;

    let extender = {
        let (bus, held) = (buses[0].clone(), held.clone());
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_millis(4500);
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(150)).await;
                bus.extend_job(&held).await?;
            }
            Ok::<_, BusError>(())
        })
    };
    assert_eq!(buses[1].next_job(&second, Duration::from_secs(3)).await?, None);
    extender.await??;

    // Once the extensions stop, the lease runs out.
    let redelivered = must_get(&*buses[1], &second).await?;
    assert_eq!((&redelivered.job, redelivered.attempt), (&sent, 2));
    Ok(())
}

async fn retry_redelivers_at_once(backend: &dyn Backend) -> Result<()> {
    let lease = Duration::from_secs(120);
    let buses = backend.buses(config(lease, 5), 2).await?;
    let (first, second) = (worker("w1", "home", &[]), worker("w2", "home", &[]));
    let sent = job("datacenter=home");
    buses[0].enqueue_job(&sent).await?;

    let failed = must_get(&*buses[0], &first).await?;
    buses[0].retry_job(&failed).await?;
    let retried_at = Instant::now();
    let again = must_get(&*buses[1], &second).await?;
    assert!(retried_at.elapsed() < lease / 2, "waited for the lease instead");
    assert_eq!((&again.job, again.attempt), (&sent, 2));
    assert!(is_unknown_receipt(buses[0].retry_job(&failed).await), "stale retry");

    buses[1].retry_job(&again).await?;
    let third = must_get(&*buses[0], &first).await?;
    assert_eq!(third.attempt, 3);
    buses[0].ack_job(&third).await?;
    assert_eq!(buses[0].queued_jobs().await?, []);
    Ok(())
}

async fn dead_letters_after_max_deliveries(backend: &dyn Backend) -> Result<()> {
    let bus = backend.bus(config(Duration::from_secs(120), 3)).await?;
    let builder = worker("w1", "home", &[]);
    let sent = job("");
    bus.enqueue_job(&sent).await?;
    let mut last = None;
    for attempt in 1..=3 {
        let delivery = must_get(&*bus, &builder).await?;
        assert_eq!(delivery.attempt, attempt);
        bus.retry_job(&delivery).await?;
        last = Some(delivery);
    }
    assert_eq!(bus.next_job(&builder, STAYS_AWAY).await?, None);
    assert_eq!(bus.queued_jobs().await?, []);
    let dead = bus.dead_letters().await?;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((&dead[0].job, dead[0].deliveries), (&sent, 3));
    assert!(dead[0].reason.contains("delivered 3 times"), "{}", dead[0].reason);
    assert!(dead[0].reason.contains("w1"), "{}", dead[0].reason);
    assert!(is_unknown_receipt(bus.ack_job(&last.context("no delivery")?).await));
    assert_dead_letter_reported(&*bus, &sent).await
}

async fn dead_letters_after_lost_holders(backend: &dyn Backend) -> Result<()> {
    let bus = backend.bus(config(Duration::from_millis(300), 2)).await?;
    let workers = [worker("w1", "home", &[]), worker("w2", "home", &[]), worker("w3", "home", &[])];
    let sent = job("datacenter=home");
    bus.enqueue_job(&sent).await?;
    assert_eq!(must_get(&*bus, &workers[0]).await?.attempt, 1);
    assert_eq!(must_get(&*bus, &workers[1]).await?.attempt, 2);
    // Waits past w2's lease: the job is given up on rather than delivered a third time.
    assert_eq!(bus.next_job(&workers[2], Duration::from_secs(2)).await?, None);
    let dead = bus.dead_letters().await?;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((&dead[0].job, dead[0].deliveries), (&sent, 2));
    assert!(dead[0].reason.contains("delivered 2 times"), "{}", dead[0].reason);
    assert!(dead[0].reason.contains("w2"), "{}", dead[0].reason);
    assert_dead_letter_reported(&*bus, &sent).await
}

/// The manager hears about a dead-lettered job through a report, so the job's record can
/// say so instead of staying "running".
async fn assert_dead_letter_reported(bus: &dyn Bus, sent: &JobEnvelope) -> Result<()> {
    let reports = bus.next_reports("manager", 10, Duration::from_secs(2)).await?;
    let dead: Vec<_> = reports
        .iter()
        .filter_map(|r| match &r.event.body {
            EventBody::JobDeadLettered { job_id, reason } => Some((*job_id, reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(dead.len(), 1, "{reports:?}");
    assert_eq!(dead[0].0, sent.job_id);
    assert!(dead[0].1.contains("delivered"), "{}", dead[0].1);
    Ok(())
}

async fn waiting_worker_wakes_on_enqueue(backend: &dyn Backend) -> Result<()> {
    let bus = backend.bus(config(Duration::from_secs(60), 3)).await?;
    let waiter = {
        let bus = bus.clone();
        tokio::spawn(async move { bus.next_job(&worker("w1", "home", &[]), ARRIVES).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = job("datacenter=home");
    bus.enqueue_job(&sent).await?;
    let delivery = waiter.await??.context("the waiting worker got nothing")?;
    assert_eq!(delivery.job, sent);
    Ok(())
}

async fn reports_are_at_least_once(backend: &dyn Backend) -> Result<()> {
    let bus = backend.bus(config(Duration::from_secs(60), 3)).await?;
    let sent = [event("a"), event("b"), event("c")];
    for event in &sent {
        bus.report(event).await?;
    }
    let events = |reports: &[ctpf_bus::ReportDelivery]| {
        reports.iter().map(|r| r.event.clone()).collect::<Vec<_>>()
    };
    let receipts = |reports: &[ctpf_bus::ReportDelivery]| {
        reports.iter().map(|r| r.receipt.clone()).collect::<Vec<_>>()
    };

    let read = bus.next_reports("manager-1", 2, ARRIVES).await?;
    assert_eq!(events(&read), sent[..2]);
    // Not acknowledged (the manager died mid-apply): the same reports come back.
    let again = bus.next_reports("manager-1", 10, ARRIVES).await?;
    assert_eq!(events(&again), sent[..2]);
    assert_eq!(receipts(&again), receipts(&read));
    bus.ack_reports(&receipts(&again)).await?;
    bus.ack_reports(&receipts(&again)).await?; // twice is harmless

    let rest = bus.next_reports("manager-1", 10, ARRIVES).await?;
    assert_eq!(events(&rest), sent[2..]);
    bus.ack_reports(&receipts(&rest)).await?;
    assert_eq!(bus.next_reports("manager-1", 10, STAYS_AWAY).await?, []);

    // A report sent while the manager waits wakes it.
    let late = event("d");
    let reporter = {
        let (bus, late) = (bus.clone(), late.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            bus.report(&late).await
        })
    };
    let read = bus.next_reports("manager-1", 10, ARRIVES).await?;
    reporter.await??;
    assert_eq!(events(&read), [late]);
    bus.ack_reports(&receipts(&read)).await?;
    assert!(is_unknown_receipt(bus.ack_reports(&["not a receipt".to_owned()]).await));
    Ok(())
}

async fn cancel_requests_reach_every_handle(backend: &dyn Backend) -> Result<()> {
    let buses = backend.buses(config(Duration::from_secs(60), 3), 2).await?;
    let (cancelled, other) = (job(""), job(""));
    buses[0].enqueue_job(&cancelled).await?;
    assert!(!buses[1].cancel_requested(cancelled.job_id).await?);
    buses[0].request_cancel(cancelled.job_id).await?;
    // Asking twice is harmless.
    buses[0].request_cancel(cancelled.job_id).await?;
    assert!(buses[1].cancel_requested(cancelled.job_id).await?);
    assert!(!buses[1].cancel_requested(other.job_id).await?);
    // A job never enqueued can be cancelled too (the manager may ask before it is on the bus).
    buses[1].request_cancel(other.job_id).await?;
    assert!(buses[0].cancel_requested(other.job_id).await?);
    Ok(())
}

async fn rejects_unknown_receipts(backend: &dyn Backend) -> Result<()> {
    let bus = backend.bus(config(Duration::from_secs(60), 3)).await?;
    for receipt in ["", "garbage", "1-0", "mem-job:7:1", "{contract}:jobs:*\n1-0\n1\nw1"] {
        let fake = Delivery { job: job(""), attempt: 1, receipt: receipt.to_owned() };
        assert!(is_unknown_receipt(bus.ack_job(&fake).await), "ack {receipt:?}");
        assert!(is_unknown_receipt(bus.retry_job(&fake).await), "retry {receipt:?}");
        assert!(is_unknown_receipt(bus.extend_job(&fake).await), "extend {receipt:?}");
    }
    Ok(())
}

fn heartbeat(worker: &WorkerIdentity, generation: Option<u64>) -> WorkerHeartbeat {
    WorkerHeartbeat {
        identity: worker.clone(),
        version: "test".into(),
        addresses: vec!["192.0.2.1".into()],
        generation,
        started_at: OffsetDateTime::now_utc(),
    }
}

fn snapshot(generation: u64) -> PublishedSnapshot {
    PublishedSnapshot { generation, body: format!("{{\"generation\":{generation}}}").into_bytes() }
}

fn dc(name: &str) -> Name {
    name.parse().unwrap()
}

async fn heartbeats_list_workers_per_datacenter(backend: &dyn Backend) -> Result<()> {
    let buses = backend.buses(config(Duration::from_secs(60), 3), 2).await?;
    let (home, away) =
        (worker("w-home", "home", &[Role::Distributor]), worker("w-away", "away", &[]));
    let before_ms = OffsetDateTime::now_utc().unix_timestamp() as u64 * 1000;
    buses[0].heartbeat(&heartbeat(&home, Some(1))).await?;
    buses[1].heartbeat(&heartbeat(&away, None)).await?;
    let latest = heartbeat(&home, Some(2));
    buses[0].heartbeat(&latest).await?; // replaces the first
    let mut seen = buses[1].workers().await?;
    seen.sort_by(|a, b| a.heartbeat.identity.id.cmp(&b.heartbeat.identity.id));
    let ids: Vec<_> = seen.iter().map(|s| s.heartbeat.identity.id.as_str()).collect();
    assert_eq!(ids, ["w-away", "w-home"]);
    assert_eq!(seen[1].heartbeat, latest);
    assert!(seen.iter().all(|s| s.seen_at_ms >= before_ms), "{seen:?}");

    buses[0].forget_workers(&dc("home")).await?;
    let left: Vec<_> =
        buses[0].workers().await?.into_iter().map(|s| s.heartbeat.identity.id).collect();
    assert_eq!(left, ["w-away"]);
    Ok(())
}

async fn snapshots_only_move_forward(backend: &dyn Backend) -> Result<()> {
    let buses = backend.buses(config(Duration::from_secs(60), 3), 2).await?;
    let (manager, worker_bus) = (&buses[0], &buses[1]);
    let home = dc("home");
    assert_eq!(worker_bus.snapshot_after(&home, 0, Duration::ZERO).await?, None);
    assert!(manager.publish_snapshot(&home, &snapshot(1)).await?);
    assert_eq!(worker_bus.snapshot_after(&home, 0, ARRIVES).await?, Some(snapshot(1)));
    assert!(!manager.publish_snapshot(&home, &snapshot(1)).await?, "same generation again");
    assert!(manager.publish_snapshot(&home, &snapshot(3)).await?);
    assert!(!manager.publish_snapshot(&home, &snapshot(2)).await?, "an older generation");
    assert_eq!(worker_bus.snapshot_after(&home, 1, ARRIVES).await?, Some(snapshot(3)));
    assert_eq!(worker_bus.snapshot_after(&home, 3, STAYS_AWAY).await?, None);
    // Datacenters do not see each other's snapshots.
    assert_eq!(worker_bus.snapshot_after(&dc("away"), 0, Duration::ZERO).await?, None);

    // A worker waiting for the next generation wakes when it is published.
    let waiter = {
        let (bus, home) = (worker_bus.clone(), home.clone());
        tokio::spawn(async move { bus.snapshot_after(&home, 3, ARRIVES).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(manager.publish_snapshot(&home, &snapshot(4)).await?);
    assert_eq!(waiter.await??, Some(snapshot(4)));
    Ok(())
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod memory_bus {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    super::$case(&super::MemoryBackend).await
                }
            )*
        }
        mod redis_bus {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let backend = super::RedisBackend::start()?;
                    super::$case(&backend).await
                }
            )*
        }
    };
}

contract!(
    routes_jobs_by_selector,
    delivers_in_order_and_ack_removes,
    expired_lease_goes_to_another_worker,
    extend_keeps_the_lease,
    retry_redelivers_at_once,
    dead_letters_after_max_deliveries,
    dead_letters_after_lost_holders,
    waiting_worker_wakes_on_enqueue,
    reports_are_at_least_once,
    cancel_requests_reach_every_handle,
    rejects_unknown_receipts,
    heartbeats_list_workers_per_datacenter,
    snapshots_only_move_forward,
);

#[test]
fn memory_is_not_durable_and_redis_is() -> Result<()> {
    assert!(!MemoryBus::new(BusConfig::default()).is_durable());
    let server = RedisServer::start()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let bus = runtime.block_on(RedisBus::connect(&server.url(), BusConfig::default()))?;
    assert!(bus.is_durable());
    Ok(())
}

/// Retries `op` while Redis comes back from a restart (the first commands on a dropped
/// connection fail while it reconnects).
async fn after_reconnect<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BusError>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for redis to come back: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("redis did not come back: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_keeps_queued_jobs() -> Result<()> {
    let mut server = RedisServer::start()?;
    let lease = Duration::from_millis(300);
    let bus = RedisBus::connect_with_namespace(&server.url(), "restart", config(lease, 3)).await?;
    let builder = worker("w1", "home", &[Role::Builder]);
    let jobs: Vec<JobEnvelope> = (0..3).map(|_| job("role=builder")).collect();
    for job in &jobs {
        bus.enqueue_job(job).await?;
    }
    let held = must_get(&bus, &builder).await?;
    assert_eq!(held.job, jobs[0]);

    server.restart()?;

    let queued = after_reconnect(|| bus.queued_jobs()).await?;
    assert_eq!(queued.iter().map(|q| &q.job).collect::<Vec<_>>(), jobs.iter().collect::<Vec<_>>());
    assert_eq!(queued[0].deliveries, 1);
    // The held job's lease survives too: it runs out and the job comes back as attempt 2.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let delivery = after_reconnect(|| bus.next_job(&builder, ARRIVES))
            .await?
            .context("a queued job was lost in the restart")?;
        seen.push((delivery.job.job_id, delivery.attempt));
        bus.ack_job(&delivery).await?;
    }
    seen.sort();
    let mut expected = vec![(jobs[0].job_id, 2), (jobs[1].job_id, 1), (jobs[2].job_id, 1)];
    expected.sort();
    assert_eq!(seen, expected);
    assert_eq!(bus.queued_jobs().await?, []);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_skips_malformed_entries() -> Result<()> {
    let server = RedisServer::start()?;
    let bus =
        RedisBus::connect_with_namespace(&server.url(), "junk", config(Duration::from_secs(60), 3))
            .await?;
    let client = redis::Client::open(server.url())?;
    let mut raw = client.get_multiplexed_async_connection().await?;
    let stream = "{junk}:jobs:*";
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("workers")
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<()>(&mut raw)
        .await?;
    redis::cmd("SADD").arg("{junk}:selectors").arg("*").query_async::<()>(&mut raw).await?;
    redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("job")
        .arg("{not json")
        .query_async::<()>(&mut raw)
        .await?;
    redis::cmd("SADD")
        .arg("{junk}:selectors")
        .arg("Not A Selector")
        .query_async::<()>(&mut raw)
        .await?;
    redis::cmd("XADD")
        .arg("{junk}:reports")
        .arg("*")
        .arg("event")
        .arg("[]")
        .query_async::<()>(&mut raw)
        .await?;

    let good = job("");
    bus.enqueue_job(&good).await?;
    assert_eq!(bus.queued_jobs().await?.len(), 1, "the malformed entry is not listed");
    let delivery = must_get(&bus, &worker("w1", "home", &[])).await?;
    assert_eq!(delivery.job, good);
    bus.ack_job(&delivery).await?;
    // Moved aside for inspection, not listed as a dead job.
    let dead_entries: u64 = redis::cmd("XLEN").arg("{junk}:dead").query_async(&mut raw).await?;
    assert_eq!(dead_entries, 1);
    assert_eq!(bus.dead_letters().await?, []);

    let sent = event("w1");
    bus.report(&sent).await?;
    let read = bus.next_reports("manager-1", 10, ARRIVES).await?;
    assert_eq!(read.iter().map(|r| &r.event).collect::<Vec<_>>(), [&sent]);
    Ok(())
}

fn grant(id: &str, datacenter: &str, secret: &str) -> WorkerGrant {
    use sha2::Digest as _;
    WorkerGrant {
        credential_id: id.to_owned(),
        datacenter: dc(datacenter),
        secret_sha256: sha2::Sha256::digest(secret.as_bytes()).into(),
    }
}

fn is_denied<T: std::fmt::Debug>(result: &Result<T, BusError>) -> bool {
    matches!(result, Err(BusError::Denied(_)))
}

/// Redis ACL users confine a site worker's credential to its datacenter: it takes that
/// datacenter's jobs and shared ones, reads its snapshot, reports as that datacenter, and
/// Redis refuses everything of another datacenter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_worker_credentials_confine_a_worker_to_its_datacenter() -> Result<()> {
    let server = RedisServer::start()?;
    let lease = config(Duration::from_secs(60), 3);
    let manager = RedisBus::connect_with_namespace(&server.url(), "acl", lease.clone()).await?;
    manager
        .authorize_workers(&[grant("a1", "dc-a", "secret-a"), grant("b1", "dc-b", "secret-b")])
        .await?;
    let (a, b) = (dc("dc-a"), dc("dc-b"));
    manager.publish_snapshot(&a, &snapshot(1)).await?;
    manager.publish_snapshot(&b, &snapshot(1)).await?;
    let (for_a, for_b, for_anyone) =
        (job("datacenter=dc-a"), job("datacenter=dc-b"), job("role=distributor"));
    for job in [&for_a, &for_b, &for_anyone] {
        manager.enqueue_job(job).await?;
    }

    let url = server.url();
    let worker_a =
        RedisBus::connect_as_worker(&url, "acl", &a, "a1", "secret-a", lease.clone()).await?;
    let identity_a = worker("wa", "dc-a", &[Role::Distributor]);
    assert_eq!(worker_a.snapshot_after(&a, 0, ARRIVES).await?, Some(snapshot(1)));
    assert!(is_denied(&worker_a.snapshot_after(&b, 0, Duration::ZERO).await));

    let mut taken = Vec::new();
    for _ in 0..2 {
        let delivery = must_get(&worker_a, &identity_a).await?;
        worker_a.extend_job(&delivery).await?;
        worker_a.ack_job(&delivery).await?;
        taken.push(delivery.job.job_id);
    }
    taken.sort();
    let mut expected = vec![for_a.job_id, for_anyone.job_id];
    expected.sort();
    assert_eq!(taken, expected);
    // Claiming to be a dc-b worker does not get it dc-b's job.
    let forged = worker("wa", "dc-b", &[Role::Distributor]);
    assert!(is_denied(&worker_a.next_job(&forged, STAYS_AWAY).await));
    assert!(is_denied(&worker_a.heartbeat(&heartbeat(&forged, None)).await));
    assert!(is_denied(&worker_a.queued_jobs().await), "workers cannot list every job");

    // Reports and heartbeats arrive as dc-a's.
    worker_a.heartbeat(&heartbeat(&identity_a, Some(1))).await?;
    worker_a.report(&event("wa")).await?;
    let reports = manager.next_reports("manager-1", 10, ARRIVES).await?;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].datacenter, Some(a.clone()));
    manager.ack_reports(&[reports[0].receipt.clone()]).await?;
    let seen = manager.workers().await?;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].heartbeat.identity, identity_a);

    // A credential used for the wrong datacenter is refused at connect, by name.
    let wrong = RedisBus::connect_as_worker(&url, "acl", &b, "a1", "secret-a", lease.clone()).await;
    let message = wrong.map(|_| ()).unwrap_err().to_string();
    assert!(message.contains("a1") && message.contains("dc-b"), "{message}");
    let bad_secret =
        RedisBus::connect_as_worker(&url, "acl", &a, "a1", "guess", lease.clone()).await;
    assert!(is_denied(&bad_secret), "{bad_secret:?}");

    // Revoking (leaving the grant out) disconnects and locks the worker out.
    manager.authorize_workers(&[grant("b1", "dc-b", "secret-b")]).await?;
    let revoked = RedisBus::connect_as_worker(&url, "acl", &a, "a1", "secret-a", lease).await;
    assert!(is_denied(&revoked), "{revoked:?}");
    assert!(worker_a.snapshot_after(&a, 0, Duration::ZERO).await.is_err());
    Ok(())
}
