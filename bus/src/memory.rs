//! The in-process bus of the all-in-one `ctpf up`: the semantics of [`crate::RedisBus`], kept
//! in a mutex. Nothing survives the process, so the manager re-enqueues unfinished jobs from
//! the state store at start-up.

use std::{
    collections::{BTreeMap, HashMap},
    pin::pin,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use ctpf_common::{Name, NewEvent, Uuid, WorkerHeartbeat, WorkerIdentity};
use tokio::{sync::Notify, time::Instant};

use crate::{
    Bus, BusConfig, BusError, CANCEL_REQUEST_TTL, DeadLetter, Delivery, JobEnvelope,
    PublishedSnapshot, QueuedJob, ReportDelivery, SeenWorker, WorkerGrant, dead_letter_reason,
    dead_letter_report, instant_after,
};

const JOB_RECEIPT_PREFIX: &str = "mem-job";
const REPORT_RECEIPT_PREFIX: &str = "mem-report";

/// In-process [`Bus`]. Cloning gives another handle to the same queues.
#[derive(Debug, Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: BusConfig,
    state: Mutex<State>,
    /// Woken when a job becomes available (enqueued or given back); lease expiry is waited
    /// for with a timer instead.
    jobs_changed: Notify,
    reports_added: Notify,
    snapshot_published: Notify,
}

#[derive(Debug, Default)]
struct State {
    next_job_slot: u64,
    /// Keyed by an increasing slot number, so iteration order is enqueue order.
    jobs: BTreeMap<u64, JobSlot>,
    dead: Vec<DeadLetter>,
    next_report_slot: u64,
    reports: BTreeMap<u64, ReportSlot>,
    /// Cancel requests by job, with when they are forgotten.
    cancels: HashMap<Uuid, Instant>,
    /// Heartbeats by (datacenter, worker id).
    workers: BTreeMap<(Name, String), SeenWorker>,
    snapshots: HashMap<Name, PublishedSnapshot>,
}

#[derive(Debug)]
struct JobSlot {
    job: JobEnvelope,
    deliveries: u32,
    /// Set from the first delivery on, like an entry in a consumer group's pending list: it
    /// stays (with an expired lease) until another worker takes the job over.
    holder: Option<Holder>,
}

#[derive(Debug)]
struct Holder {
    worker: String,
    lease_until: Instant,
}

#[derive(Debug)]
struct ReportSlot {
    event: NewEvent,
    /// The consumer that read it last and has not acknowledged it yet.
    reader: Option<String>,
}

impl MemoryBus {
    pub fn new(config: BusConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(State::default()),
                jobs_changed: Notify::new(),
                reports_added: Notify::new(),
                snapshot_published: Notify::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than refusing all further work would, so carry on with the data.
        self.inner.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn max_deliveries(&self) -> u32 {
        self.inner.config.max_deliveries.max(1)
    }

    /// Hands a job to `worker` if one is available now; otherwise returns when the earliest
    /// lease `worker` could take over runs out.
    fn try_take(&self, worker: &WorkerIdentity, now: Instant) -> TakeOutcome {
        let max_deliveries = self.max_deliveries();
        let mut state = self.state();

        // Redeliveries first: jobs whose holder's lease ran out or that were given back.
        let expired: Vec<u64> = state
            .jobs
            .iter()
            .filter(|(_, slot)| {
                slot.holder.as_ref().is_some_and(|h| h.lease_until <= now)
                    && worker.accepts(&slot.job.selector)
            })
            .map(|(&id, _)| id)
            .collect();
        for slot_id in expired {
            let Some(slot) = state.jobs.get(&slot_id) else { continue };
            if slot.deliveries >= max_deliveries {
                if let Some(slot) = state.jobs.remove(&slot_id) {
                    let last_holder = slot.holder.map(|h| h.worker).unwrap_or_default();
                    let letter = DeadLetter {
                        reason: dead_letter_reason(slot.deliveries, &last_holder),
                        deliveries: slot.deliveries,
                        job: slot.job,
                    };
                    tracing::warn!(job_id = %letter.job.job_id, reason = %letter.reason, "dead-lettered job");
                    let report = dead_letter_report(&letter.job, &letter.reason);
                    let report_slot = state.next_report_slot;
                    state.next_report_slot += 1;
                    state.reports.insert(report_slot, ReportSlot { event: report, reader: None });
                    self.inner.reports_added.notify_waiters();
                    state.dead.push(letter);
                }
                continue;
            }
            return TakeOutcome::Taken(self.deliver(&mut state, slot_id, worker, now));
        }

        let fresh = state
            .jobs
            .iter()
            .find(|(_, slot)| slot.holder.is_none() && worker.accepts(&slot.job.selector))
            .map(|(&id, _)| id);
        if let Some(slot_id) = fresh {
            return TakeOutcome::Taken(self.deliver(&mut state, slot_id, worker, now));
        }

        let next_expiry = state
            .jobs
            .values()
            .filter(|slot| worker.accepts(&slot.job.selector))
            .filter_map(|slot| slot.holder.as_ref().map(|h| h.lease_until))
            .min();
        TakeOutcome::Nothing { next_expiry }
    }

    fn deliver(
        &self,
        state: &mut State,
        slot_id: u64,
        worker: &WorkerIdentity,
        now: Instant,
    ) -> Option<Delivery> {
        let slot = state.jobs.get_mut(&slot_id)?;
        slot.deliveries += 1;
        slot.holder = Some(Holder {
            worker: worker.id.clone(),
            lease_until: instant_after(now, self.inner.config.lease),
        });
        Some(Delivery {
            job: slot.job.clone(),
            attempt: slot.deliveries,
            receipt: format!("{JOB_RECEIPT_PREFIX}:{slot_id}:{}", slot.deliveries),
        })
    }

    /// Runs `apply` on the job `delivery` refers to, if that delivery is still the current one.
    fn with_held_job(
        &self,
        delivery: &Delivery,
        apply: impl FnOnce(&mut State, u64, &BusConfig),
    ) -> Result<(), BusError> {
        let unknown = || BusError::UnknownReceipt(delivery.receipt.clone());
        let (slot_id, deliveries) = parse_job_receipt(&delivery.receipt).ok_or_else(unknown)?;
        let mut state = self.state();
        let current = state
            .jobs
            .get(&slot_id)
            .is_some_and(|slot| slot.holder.is_some() && slot.deliveries == deliveries);
        if !current {
            return Err(unknown());
        }
        apply(&mut state, slot_id, &self.inner.config);
        Ok(())
    }

    fn try_read_reports(&self, consumer: &str, max: usize) -> Vec<ReportDelivery> {
        let mut state = self.state();
        let receipt = |slot_id: u64| format!("{REPORT_RECEIPT_PREFIX}:{slot_id}");
        // What this consumer read before but never acknowledged comes back first.
        let pending: Vec<ReportDelivery> = state
            .reports
            .iter()
            .filter(|(_, slot)| slot.reader.as_deref() == Some(consumer))
            .take(max)
            .map(|(&id, slot)| ReportDelivery {
                event: slot.event.clone(),
                receipt: receipt(id),
                datacenter: None,
            })
            .collect();
        if !pending.is_empty() {
            return pending;
        }
        state
            .reports
            .iter_mut()
            .filter(|(_, slot)| slot.reader.is_none())
            .take(max)
            .map(|(&id, slot)| {
                slot.reader = Some(consumer.to_owned());
                ReportDelivery { event: slot.event.clone(), receipt: receipt(id), datacenter: None }
            })
            .collect()
    }
}

enum TakeOutcome {
    Taken(Option<Delivery>),
    Nothing { next_expiry: Option<Instant> },
}

fn parse_job_receipt(receipt: &str) -> Option<(u64, u32)> {
    let mut parts = receipt.split(':');
    if parts.next()? != JOB_RECEIPT_PREFIX {
        return None;
    }
    let slot_id = parts.next()?.parse().ok()?;
    let deliveries = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((slot_id, deliveries))
}

fn parse_report_receipt(receipt: &str) -> Option<u64> {
    let (prefix, slot_id) = receipt.split_once(':')?;
    if prefix != REPORT_RECEIPT_PREFIX {
        return None;
    }
    slot_id.parse().ok()
}

#[async_trait]
impl Bus for MemoryBus {
    async fn enqueue_job(&self, job: &JobEnvelope) -> Result<(), BusError> {
        {
            let mut state = self.state();
            let slot_id = state.next_job_slot;
            state.next_job_slot += 1;
            state.jobs.insert(slot_id, JobSlot { job: job.clone(), deliveries: 0, holder: None });
        }
        self.inner.jobs_changed.notify_waiters();
        Ok(())
    }

    async fn next_job(
        &self,
        worker: &WorkerIdentity,
        wait: Duration,
    ) -> Result<Option<Delivery>, BusError> {
        let deadline = instant_after(Instant::now(), wait);
        loop {
            // Registered before looking, so an enqueue between the look and the wait still
            // wakes us.
            let mut changed = pin!(self.inner.jobs_changed.notified());
            changed.as_mut().enable();
            let now = Instant::now();
            let next_expiry = match self.try_take(worker, now) {
                TakeOutcome::Taken(delivery) => return Ok(delivery),
                TakeOutcome::Nothing { next_expiry } => next_expiry,
            };
            if now >= deadline {
                return Ok(None);
            }
            let wake_at = next_expiry.map_or(deadline, |expiry| expiry.min(deadline));
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    async fn ack_job(&self, delivery: &Delivery) -> Result<(), BusError> {
        self.with_held_job(delivery, |state, slot_id, _| {
            state.jobs.remove(&slot_id);
        })
    }

    async fn retry_job(&self, delivery: &Delivery) -> Result<(), BusError> {
        self.with_held_job(delivery, |state, slot_id, _| {
            if let Some(holder) = state.jobs.get_mut(&slot_id).and_then(|s| s.holder.as_mut()) {
                holder.lease_until = Instant::now();
            }
        })?;
        self.inner.jobs_changed.notify_waiters();
        Ok(())
    }

    async fn extend_job(&self, delivery: &Delivery) -> Result<(), BusError> {
        self.with_held_job(delivery, |state, slot_id, config| {
            if let Some(holder) = state.jobs.get_mut(&slot_id).and_then(|s| s.holder.as_mut()) {
                holder.lease_until = instant_after(Instant::now(), config.lease);
            }
        })
    }

    async fn request_cancel(&self, job_id: Uuid) -> Result<(), BusError> {
        let now = Instant::now();
        let mut state = self.state();
        state.cancels.retain(|_, forget_at| *forget_at > now);
        state.cancels.insert(job_id, instant_after(now, CANCEL_REQUEST_TTL));
        Ok(())
    }

    async fn cancel_requested(&self, job_id: Uuid) -> Result<bool, BusError> {
        let now = Instant::now();
        Ok(self.state().cancels.get(&job_id).is_some_and(|forget_at| *forget_at > now))
    }

    async fn queued_jobs(&self) -> Result<Vec<QueuedJob>, BusError> {
        let now = Instant::now();
        let state = self.state();
        Ok(state
            .jobs
            .values()
            .map(|slot| QueuedJob {
                job: slot.job.clone(),
                held_by: slot
                    .holder
                    .as_ref()
                    .filter(|h| h.lease_until > now)
                    .map(|h| h.worker.clone()),
                deliveries: slot.deliveries,
            })
            .collect())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BusError> {
        Ok(self.state().dead.clone())
    }

    async fn report(&self, event: &NewEvent) -> Result<(), BusError> {
        {
            let mut state = self.state();
            let slot_id = state.next_report_slot;
            state.next_report_slot += 1;
            state.reports.insert(slot_id, ReportSlot { event: event.clone(), reader: None });
        }
        self.inner.reports_added.notify_waiters();
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
        let deadline = instant_after(Instant::now(), wait);
        loop {
            let mut added = pin!(self.inner.reports_added.notified());
            added.as_mut().enable();
            let reports = self.try_read_reports(consumer, max);
            if !reports.is_empty() || Instant::now() >= deadline {
                return Ok(reports);
            }
            tokio::select! {
                () = added => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    async fn ack_reports(&self, receipts: &[String]) -> Result<(), BusError> {
        let slot_ids = receipts
            .iter()
            .map(|r| parse_report_receipt(r).ok_or_else(|| BusError::UnknownReceipt(r.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let mut state = self.state();
        // Acknowledging twice is harmless, as with XACK.
        for slot_id in slot_ids {
            state.reports.remove(&slot_id);
        }
        Ok(())
    }

    async fn heartbeat(&self, heartbeat: &WorkerHeartbeat) -> Result<(), BusError> {
        let key = (heartbeat.identity.datacenter.clone(), heartbeat.identity.id.clone());
        let seen = SeenWorker { heartbeat: heartbeat.clone(), seen_at_ms: unix_ms() };
        self.state().workers.insert(key, seen);
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<SeenWorker>, BusError> {
        Ok(self.state().workers.values().cloned().collect())
    }

    async fn forget_workers(&self, datacenter: &Name) -> Result<(), BusError> {
        self.state().workers.retain(|(dc, _), _| dc != datacenter);
        Ok(())
    }

    async fn publish_snapshot(
        &self,
        datacenter: &Name,
        snapshot: &PublishedSnapshot,
    ) -> Result<bool, BusError> {
        {
            let mut state = self.state();
            let current = state.snapshots.get(datacenter).map_or(0, |s| s.generation);
            if snapshot.generation <= current {
                return Ok(false);
            }
            state.snapshots.insert(datacenter.clone(), snapshot.clone());
        }
        self.inner.snapshot_published.notify_waiters();
        Ok(true)
    }

    async fn snapshot_after(
        &self,
        datacenter: &Name,
        after: u64,
        wait: Duration,
    ) -> Result<Option<PublishedSnapshot>, BusError> {
        let deadline = instant_after(Instant::now(), wait);
        loop {
            let mut published = pin!(self.inner.snapshot_published.notified());
            published.as_mut().enable();
            let newer =
                self.state().snapshots.get(datacenter).filter(|s| s.generation > after).cloned();
            if newer.is_some() || Instant::now() >= deadline {
                return Ok(newer);
            }
            tokio::select! {
                () = published => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    async fn authorize_workers(&self, _grants: &[WorkerGrant]) -> Result<(), BusError> {
        // Only this process can reach an in-process bus: there is nobody to restrict.
        Ok(())
    }

    fn is_durable(&self) -> bool {
        false
    }
}

fn unix_ms() -> u64 {
    let since_epoch =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}
