//! The worker's job loop: take a job the bus routes to this worker, run it while renewing its
//! lease, report how it went, acknowledge it. A worker that dies mid-job simply stops renewing;
//! the bus hands the job to another matching worker when the lease runs out.

use std::{sync::Arc, time::Duration};

use ctpf_builders::{BuildError, BuildLog, Builder};
use ctpf_bus::{Bus, BusError, Delivery};
use ctpf_common::{
    BuildLogLine, BuildManifest, EventBody, JobSpec, Name, NewEvent, PackageManifest, Uuid,
    WorkerIdentity,
};
use ctpf_packagers::service::{PackageError, PackageLog, Packager};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often a running job checks whether someone asked for it to stop.
const CANCEL_POLL: Duration = Duration::from_millis(500);

/// Log lines go to the manager in batches of at most this many lines...
const LOG_BATCH_LINES: usize = 200;
/// ...or whatever arrived within this long.
const LOG_BATCH_WAIT: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub identity: WorkerIdentity,
    /// The bus's lease; the worker renews at a third of it.
    pub lease: Duration,
    /// How long one `next_job` call waits before checking for shutdown again.
    pub poll: Duration,
    /// Runs build jobs (workers with the `builder` role).
    pub builder: Option<Builder>,
    /// Runs packaging jobs (workers with the `packager` role).
    pub packager: Option<Packager>,
    /// Jobs run at the same time (at least 1). A job is only taken from the bus when there
    /// is room for it, so a busy worker leaves jobs to its peers.
    pub concurrency: usize,
}

impl WorkerConfig {
    /// One job at a time per CPU.
    pub fn new(identity: WorkerIdentity, lease: Duration, builder: Option<Builder>) -> Self {
        let concurrency = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self { identity, lease, poll: Duration::from_secs(1), builder, packager: None, concurrency }
    }
}

/// What a succeeded job made, for its report.
#[derive(Debug, Default)]
struct JobOutput {
    build: Option<BuildManifest>,
    package: Option<PackageManifest>,
}

/// Why a job did not succeed, and whether another attempt could.
#[derive(Debug)]
enum JobFailure {
    Failed {
        message: String,
        retryable: bool,
    },
    /// Stopped because a cancel was requested.
    Cancelled,
}

impl JobFailure {
    fn failed(message: impl Into<String>, retryable: bool) -> Self {
        JobFailure::Failed { message: message.into(), retryable }
    }

    fn is_retryable(&self) -> bool {
        matches!(self, JobFailure::Failed { retryable: true, .. })
    }
}

/// Runs jobs until `shutdown` is cancelled. Jobs already running when shutdown comes are
/// finished first (their leases are kept alive meanwhile).
pub async fn run(config: WorkerConfig, bus: Arc<dyn Bus>, shutdown: CancellationToken) {
    let config = Arc::new(config);
    let worker = &config.identity;
    let slots = Arc::new(tokio::sync::Semaphore::new(config.concurrency.max(1)));
    let mut running = tokio::task::JoinSet::new();
    tracing::info!(worker = %worker.id, datacenter = %worker.datacenter, tags = %worker.tags, "worker taking jobs");
    let started = NewEvent::new(
        Some(worker.datacenter.clone()),
        EventBody::WorkerStarted { worker: worker.id.clone() },
    );
    report(&*bus, &started).await;
    while !shutdown.is_cancelled() {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
        // Reap finished jobs so the set does not grow.
        while running.try_join_next().is_some() {}
        let delivery = tokio::select! {
            next = bus.next_job(worker, config.poll) => next,
            () = shutdown.cancelled() => break,
        };
        match delivery {
            Ok(Some(delivery)) => {
                let (config, bus) = (config.clone(), bus.clone());
                running.spawn(async move {
                    run_one(&config, &*bus, delivery).await;
                    drop(slot);
                });
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the bus; retrying in 1 s");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => break,
                }
            }
        }
    }
    while running.join_next().await.is_some() {}
    tracing::info!(worker = %worker.id, "worker stopped");
}

async fn run_one(config: &WorkerConfig, bus: &dyn Bus, delivery: Delivery) {
    let worker = &config.identity;
    let job_id = delivery.job.job_id;
    let datacenter: Option<Name> = Some(worker.datacenter.clone());
    tracing::info!(%job_id, kind = delivery.job.spec.kind(), attempt = delivery.attempt, "job started");
    report(
        bus,
        &NewEvent::new(
            datacenter.clone(),
            EventBody::JobStarted { job_id, worker: worker.id.clone(), attempt: delivery.attempt },
        ),
    )
    .await;

    let cancel = CancellationToken::new();
    let outcome = match bus.cancel_requested(job_id).await {
        Ok(true) => Err(JobFailure::Cancelled),
        // Unknown (the bus is down): run it; the watch below keeps asking.
        Ok(false) | Err(_) => {
            let work =
                execute(config, bus, job_id, datacenter.clone(), &delivery.job.spec, &cancel);
            tokio::pin!(work);
            let mut renew = tokio::time::interval(config.lease / 3);
            renew.tick().await;
            let mut watch = tokio::time::interval(CANCEL_POLL);
            loop {
                tokio::select! {
                    outcome = &mut work => break outcome,
                    _ = renew.tick() => {
                        if let Err(e) = bus.extend_job(&delivery).await {
                            tracing::warn!(%job_id, error = %e, "could not renew the job's lease");
                        }
                    }
                    _ = watch.tick(), if !cancel.is_cancelled() => {
                        if let Ok(true) = bus.cancel_requested(job_id).await {
                            tracing::info!(%job_id, "cancel requested; stopping the job");
                            cancel.cancel();
                        }
                    }
                }
            }
        }
    };

    let worker_id = worker.id.clone();
    let body = match &outcome {
        Ok(output) => EventBody::JobSucceeded {
            job_id,
            worker: worker_id,
            manifest: output.build.clone().map(Box::new),
            package: output.package.clone().map(Box::new),
        },
        Err(JobFailure::Cancelled) => EventBody::JobCancelled { job_id, worker: worker_id },
        Err(JobFailure::Failed { message, retryable }) => EventBody::JobFailed {
            job_id,
            worker: worker_id,
            error: message.clone(),
            will_retry: *retryable,
        },
    };
    // Report before acknowledging: if we die in between, the job is redelivered and reported
    // again (at least once), never finished without a report.
    report(bus, &NewEvent::new(datacenter, body)).await;
    let settled = match outcome {
        Err(f) if f.is_retryable() => bus.retry_job(&delivery).await,
        _ => bus.ack_job(&delivery).await,
    };
    if let Err(e) = settled {
        tracing::warn!(%job_id, error = %e, "could not settle the job on the bus; it will be redelivered");
    }
}

async fn execute(
    config: &WorkerConfig,
    bus: &dyn Bus,
    job_id: Uuid,
    datacenter: Option<Name>,
    spec: &JobSpec,
    cancel: &CancellationToken,
) -> Result<JobOutput, JobFailure> {
    match spec {
        JobSpec::Probe { sleep_ms, fail } => {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(*sleep_ms)) => {}
                () = cancel.cancelled() => return Err(JobFailure::Cancelled),
            }
            if *fail {
                return Err(JobFailure::failed("probe asked to fail", false));
            }
            Ok(JobOutput::default())
        }
        JobSpec::Build { request, .. } => {
            let Some(builder) = &config.builder else {
                return Err(JobFailure::failed("this worker has no builder role", true));
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let build = builder.build(request, cancel.clone(), BuildLog::new(tx));
            let manifest = with_streamed_log(bus, job_id, datacenter, rx, build).await.map_err(
                |e| match e {
                    BuildError::Cancelled => JobFailure::Cancelled,
                    e => JobFailure::failed(e.to_string(), e.is_retryable()),
                },
            )?;
            Ok(JobOutput { build: Some(manifest), package: None })
        }
        JobSpec::Package { request, no_cache, .. } => {
            let Some(packager) = &config.packager else {
                return Err(JobFailure::failed("this worker has no packager role", true));
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let package = packager.package(request, *no_cache, cancel.clone(), PackageLog::new(tx));
            let manifest = with_streamed_log(bus, job_id, datacenter, rx, package).await.map_err(
                |e| match e {
                    PackageError::Cancelled => JobFailure::Cancelled,
                    e => JobFailure::failed(e.to_string(), e.is_retryable()),
                },
            )?;
            Ok(JobOutput { build: None, package: Some(manifest) })
        }
    }
}

/// Runs `work`, sending the log lines it writes to `rx`'s sender to the manager as they
/// come (in batches), all of them before the job's final report.
async fn with_streamed_log<T>(
    bus: &dyn Bus,
    job_id: Uuid,
    datacenter: Option<Name>,
    mut rx: mpsc::UnboundedReceiver<BuildLogLine>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let build = work;
    tokio::pin!(build);
    let mut batch: Vec<BuildLogLine> = Vec::new();
    let mut flush_at = tokio::time::Instant::now() + LOG_BATCH_WAIT;
    let result = loop {
        tokio::select! {
            result = &mut build => break result,
            Some(line) = rx.recv() => {
                if batch.is_empty() {
                    flush_at = tokio::time::Instant::now() + LOG_BATCH_WAIT;
                }
                batch.push(line);
                if batch.len() >= LOG_BATCH_LINES {
                    send_log(bus, job_id, &datacenter, &mut batch).await;
                }
            }
            () = tokio::time::sleep_until(flush_at), if !batch.is_empty() => {
                send_log(bus, job_id, &datacenter, &mut batch).await;
            }
        }
    };
    while let Ok(line) = rx.try_recv() {
        batch.push(line);
        if batch.len() >= LOG_BATCH_LINES {
            send_log(bus, job_id, &datacenter, &mut batch).await;
        }
    }
    send_log(bus, job_id, &datacenter, &mut batch).await;
    result
}

async fn send_log(
    bus: &dyn Bus,
    job_id: Uuid,
    datacenter: &Option<Name>,
    batch: &mut Vec<BuildLogLine>,
) {
    if batch.is_empty() {
        return;
    }
    let lines = std::mem::take(batch);
    report(bus, &NewEvent::new(datacenter.clone(), EventBody::BuildLog { job_id, lines })).await;
}

/// Reports are retried until the bus takes them: losing one would leave a job's state wrong.
async fn report(bus: &dyn Bus, event: &NewEvent) {
    let mut delay = Duration::from_millis(100);
    loop {
        match bus.report(event).await {
            Ok(()) => return,
            Err(e @ BusError::Malformed { .. }) => {
                tracing::error!(error = %e, "report refused by the bus");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot send a report; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
