//! Dispatch throughput and latency on `RedisBus` (a private `redis-server`, one bus per
//! worker) and on `MemoryBus`, with 10 concurrent workers that ack what they get:
//! - `backlog`: 10,000 probe jobs enqueued, then drained. Latency (from `enqueue_job` to the
//!   worker holding the delivery) includes the time a job waits behind the backlog.
//! - `one at a time`: 1,000 jobs, each enqueued once the previous one is acked, so latency
//!   is the bare hand-over to an idle, waiting worker.
//!
//! The peer is the simplest job queue Redis offers: one list, `LPUSH` to enqueue and
//! `BRPOP` to take, with no leases, acknowledgements, redelivery or routing. Its figures are
//! what the bus's at-least-once bookkeeping (consumer groups, pending lists, receipts) is
//! measured against, in the same run and on the same server.
//!
//! Run with `cargo bench -p ctpf-bus`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ctpf_bus::{Bus, BusConfig, JobEnvelope, MemoryBus, RedisBus};
use ctpf_common::{JobSpec, TagSelector, Uuid, WorkerIdentity};
use ctpf_e2e::RedisServer;
use tokio::{sync::Notify, task::JoinHandle};

const BACKLOG_JOBS: usize = 10_000;
const PACED_JOBS: usize = 1_000;
const WORKERS: usize = 10;
/// Gives up on a backend after this long, so the bench always ends.
const DEADLINE: Duration = Duration::from_secs(50);

type EnqueuedAt = Arc<Mutex<HashMap<Uuid, Instant>>>;

#[derive(Default)]
struct Progress {
    done: AtomicUsize,
    acked: Notify,
    /// When the last job was acked (workers may idle in `next_job` a little longer).
    finished_at: Mutex<Option<Instant>>,
}

fn worker(n: usize) -> Result<WorkerIdentity> {
    Ok(WorkerIdentity {
        id: format!("bench-worker-{n}"),
        datacenter: "bench".parse()?,
        tags: Default::default(),
        roles: Vec::new(),
    })
}

async fn run_worker(
    bus: Arc<dyn Bus>,
    identity: WorkerIdentity,
    enqueued_at: EnqueuedAt,
    progress: Arc<Progress>,
    jobs: usize,
    deadline: Instant,
) -> Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    while progress.done.load(Ordering::Relaxed) < jobs && Instant::now() < deadline {
        let Some(delivery) = bus.next_job(&identity, Duration::from_millis(200)).await? else {
            continue;
        };
        let received = Instant::now();
        let sent = enqueued_at.lock().ok().and_then(|map| map.get(&delivery.job.job_id).copied());
        latencies.push(received.duration_since(sent.context("job not enqueued by the bench")?));
        bus.ack_job(&delivery).await?;
        if progress.done.fetch_add(1, Ordering::Relaxed) + 1 == jobs
            && let Ok(mut finished_at) = progress.finished_at.lock()
        {
            *finished_at = Some(Instant::now());
        }
        progress.acked.notify_one();
    }
    Ok(latencies)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// All jobs are enqueued first, then the workers start: drain throughput, and latency
    /// that includes the wait behind the backlog.
    Backlog,
    /// Each job is enqueued once the one before is acked: the bare hand-over to an idle,
    /// waiting worker.
    OneAtATime,
}

fn spawn_workers(
    workers: &[Arc<dyn Bus>],
    enqueued_at: &EnqueuedAt,
    progress: &Arc<Progress>,
    jobs: usize,
    deadline: Instant,
) -> Result<Vec<JoinHandle<Result<Vec<Duration>>>>> {
    let mut tasks = Vec::new();
    for (n, bus) in workers.iter().enumerate() {
        tasks.push(tokio::spawn(run_worker(
            bus.clone(),
            worker(n)?,
            enqueued_at.clone(),
            progress.clone(),
            jobs,
            deadline,
        )));
    }
    Ok(tasks)
}

/// `producer` enqueues `jobs` jobs; `workers[i]` serves worker `i` (the same bus or one
/// each).
async fn run(
    name: &str,
    producer: &Arc<dyn Bus>,
    workers: &[Arc<dyn Bus>],
    jobs: usize,
    mode: Mode,
) -> Result<()> {
    let enqueued_at: EnqueuedAt = Arc::default();
    let progress = Arc::new(Progress::default());
    let deadline = Instant::now() + DEADLINE;
    let mut tasks = match mode {
        Mode::OneAtATime => spawn_workers(workers, &enqueued_at, &progress, jobs, deadline)?,
        Mode::Backlog => Vec::new(),
    };

    let started = Instant::now();
    for sent in 1..=jobs {
        let job = JobEnvelope {
            job_id: Uuid::new_v4(),
            spec: JobSpec::Probe { sleep_ms: 0, fail: false },
            selector: TagSelector::any(),
        };
        // Recorded before enqueueing, so no worker can receive a job it has no time for.
        if let Ok(mut map) = enqueued_at.lock() {
            map.insert(job.job_id, Instant::now());
        }
        producer.enqueue_job(&job).await?;
        while mode == Mode::OneAtATime
            && progress.done.load(Ordering::Relaxed) < sent
            && Instant::now() < deadline
        {
            let _ =
                tokio::time::timeout(Duration::from_millis(100), progress.acked.notified()).await;
        }
    }
    let enqueued_in = started.elapsed();

    let drain_started = Instant::now();
    if mode == Mode::Backlog {
        tasks = spawn_workers(workers, &enqueued_at, &progress, jobs, deadline)?;
    }
    let mut latencies = Vec::with_capacity(jobs);
    for task in tasks {
        latencies.extend(task.await??);
    }
    if latencies.len() < jobs {
        bail!("{name}: only {} of {jobs} jobs done within {DEADLINE:?}", latencies.len());
    }
    let finished_at = progress.finished_at.lock().ok().and_then(|at| *at);
    let finished_at = finished_at.context("the last job was never acked")?;
    let drained_in = match mode {
        Mode::Backlog => finished_at - drain_started,
        Mode::OneAtATime => finished_at - started,
    };
    print_figures(name, jobs, enqueued_in, drained_in, latencies);
    Ok(())
}

/// The peer: `LPUSH`/`BRPOP` on one list, 10 consumers, same modes and measures.
async fn run_list_peer(server: &RedisServer, name: &str, jobs: usize, mode: Mode) -> Result<()> {
    let client = redis::Client::open(server.url())?;
    let key = format!("peer:list:{name}");
    let mut producer = client.get_multiplexed_async_connection().await?;
    let enqueued_at: EnqueuedAt = Arc::default();
    let progress = Arc::new(Progress::default());
    let deadline = Instant::now() + DEADLINE;
    let spawn =
        |client: redis::Client, key: String, enqueued_at: EnqueuedAt, progress: Arc<Progress>| {
            tokio::spawn(async move {
                let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
                let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
                let mut latencies = Vec::new();
                while progress.done.load(Ordering::Relaxed) < jobs && Instant::now() < deadline {
                    let popped: Option<(String, Vec<u8>)> =
                        redis::cmd("BRPOP").arg(&key).arg(0.2).query_async(&mut conn).await?;
                    let Some((_, raw)) = popped else { continue };
                    let received = Instant::now();
                    let job: JobEnvelope = serde_json::from_slice(&raw)?;
                    let sent =
                        enqueued_at.lock().ok().and_then(|map| map.get(&job.job_id).copied());
                    latencies.push(received.duration_since(sent.context("job not enqueued")?));
                    if progress.done.fetch_add(1, Ordering::Relaxed) + 1 == jobs
                        && let Ok(mut finished_at) = progress.finished_at.lock()
                    {
                        *finished_at = Some(Instant::now());
                    }
                    progress.acked.notify_one();
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        };
    let mut tasks = Vec::new();
    if mode == Mode::OneAtATime {
        for _ in 0..WORKERS {
            tasks.push(spawn(client.clone(), key.clone(), enqueued_at.clone(), progress.clone()));
        }
    }
    let started = Instant::now();
    for sent in 1..=jobs {
        let job = JobEnvelope {
            job_id: Uuid::new_v4(),
            spec: JobSpec::Probe { sleep_ms: 0, fail: false },
            selector: TagSelector::any(),
        };
        if let Ok(mut map) = enqueued_at.lock() {
            map.insert(job.job_id, Instant::now());
        }
        let () = redis::cmd("LPUSH")
            .arg(&key)
            .arg(serde_json::to_vec(&job)?)
            .query_async(&mut producer)
            .await?;
        while mode == Mode::OneAtATime
            && progress.done.load(Ordering::Relaxed) < sent
            && Instant::now() < deadline
        {
            let _ =
                tokio::time::timeout(Duration::from_millis(100), progress.acked.notified()).await;
        }
    }
    let enqueued_in = started.elapsed();
    let drain_started = Instant::now();
    if mode == Mode::Backlog {
        for _ in 0..WORKERS {
            tasks.push(spawn(client.clone(), key.clone(), enqueued_at.clone(), progress.clone()));
        }
    }
    let mut latencies = Vec::with_capacity(jobs);
    for task in tasks {
        latencies.extend(task.await??);
    }
    if latencies.len() < jobs {
        bail!("{name}: only {} of {jobs} jobs done within {DEADLINE:?}", latencies.len());
    }
    let finished_at = progress.finished_at.lock().ok().and_then(|at| *at);
    let finished_at = finished_at.context("the last job was never taken")?;
    let drained_in = match mode {
        Mode::Backlog => finished_at - drain_started,
        Mode::OneAtATime => finished_at - started,
    };
    print_figures(name, jobs, enqueued_in, drained_in, latencies);
    Ok(())
}

fn print_figures(
    name: &str,
    jobs: usize,
    enqueued_in: Duration,
    drained_in: Duration,
    mut latencies: Vec<Duration>,
) {
    latencies.sort();
    let percentile = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!(
        "{name}: {jobs} jobs, {WORKERS} workers: enqueued in {:.2} s ({:.0} jobs/s), \
         drained in {:.2} s ({:.0} jobs/s)",
        enqueued_in.as_secs_f64(),
        jobs as f64 / enqueued_in.as_secs_f64(),
        drained_in.as_secs_f64(),
        jobs as f64 / drained_in.as_secs_f64(),
    );
    println!(
        "{name}: dispatch latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(50).as_secs_f64() * 1e3,
        percentile(99).as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3,
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let config = BusConfig { lease: Duration::from_secs(30), max_deliveries: 3 };

    let server = RedisServer::start()?;
    // The test server fsyncs every write; a production site would run `everysec`, and
    // per-write fsyncs would measure the disk, not the bus.
    let client = redis::Client::open(server.url())?;
    let mut admin = client.get_multiplexed_async_connection().await?;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg("everysec")
        .query_async::<()>(&mut admin)
        .await?;
    let producer: Arc<dyn Bus> = Arc::new(RedisBus::connect(&server.url(), config.clone()).await?);
    let mut workers: Vec<Arc<dyn Bus>> = Vec::new();
    for _ in 0..WORKERS {
        workers.push(Arc::new(RedisBus::connect(&server.url(), config.clone()).await?));
    }
    run("redis backlog", &producer, &workers, BACKLOG_JOBS, Mode::Backlog).await?;
    run("redis one at a time", &producer, &workers, PACED_JOBS, Mode::OneAtATime).await?;
    run_list_peer(&server, "peer LPUSH/BRPOP backlog", BACKLOG_JOBS, Mode::Backlog).await?;
    run_list_peer(&server, "peer LPUSH/BRPOP one at a time", PACED_JOBS, Mode::OneAtATime).await?;

    let memory: Arc<dyn Bus> = Arc::new(MemoryBus::new(config));
    let workers: Vec<Arc<dyn Bus>> = (0..WORKERS).map(|_| memory.clone()).collect();
    run("memory backlog", &memory, &workers, BACKLOG_JOBS, Mode::Backlog).await?;
    run("memory one at a time", &memory, &workers, PACED_JOBS, Mode::OneAtATime).await?;
    Ok(())
}
