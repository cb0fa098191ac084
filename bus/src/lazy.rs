//! A bus that connects when it can: a site worker restarted while Redis is unreachable still
//! starts (and serves its last snapshot); every call fails with [`BusError::Unreachable`]
//! until a connection attempt succeeds, and callers retry as they do for any bus error.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use ctpf_common::{Name, NewEvent, Uuid, WorkerHeartbeat, WorkerIdentity};
use tokio::time::Instant;

use crate::{
    Bus, BusError, DeadLetter, Delivery, JobEnvelope, PublishedSnapshot, QueuedJob, ReportDelivery,
    SeenWorker, WorkerGrant,
};

type Connecting = Pin<Box<dyn Future<Output = Result<Arc<dyn Bus>, BusError>> + Send>>;
type Connect = Box<dyn Fn() -> Connecting + Send + Sync>;

/// Attempts to connect at most this often.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// See the module documentation.
pub struct LazyBus {
    connect: Connect,
    durable: bool,
    connected: tokio::sync::OnceCell<Arc<dyn Bus>>,
    /// One attempt at a time, and not more often than [`RETRY_EVERY`].
    attempt: tokio::sync::Mutex<Option<Instant>>,
    last_error: Mutex<String>,
}

impl std::fmt::Debug for LazyBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyBus").field("connected", &self.connected.get()).finish_non_exhaustive()
    }
}

impl LazyBus {
    /// `connect` makes a connected bus (it is called again after each failure); `durable`
    /// is what the connected bus will say.
    pub fn new<F, Fut>(connect: F, durable: bool) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn Bus>, BusError>> + Send + 'static,
    {
        Self {
            connect: Box::new(move || Box::pin(connect())),
            durable,
            connected: tokio::sync::OnceCell::new(),
            attempt: tokio::sync::Mutex::new(None),
            last_error: Mutex::new("not connected yet".into()),
        }
    }

    /// The connected bus, connecting first if it is time for another attempt.
    async fn bus(&self) -> Result<&Arc<dyn Bus>, BusError> {
        if let Some(bus) = self.connected.get() {
            return Ok(bus);
        }
        let mut attempt = self.attempt.lock().await;
        if let Some(bus) = self.connected.get() {
            return Ok(bus);
        }
        let unreachable = |last: &Mutex<String>| {
            BusError::Unreachable(last.lock().map(|e| e.clone()).unwrap_or_default())
        };
        if attempt.is_some_and(|at| at.elapsed() < RETRY_EVERY) {
            return Err(unreachable(&self.last_error));
        }
        *attempt = Some(Instant::now());
        match (self.connect)().await {
            Ok(bus) => {
                tracing::info!("connected to the bus");
                Ok(self.connected.get_or_init(|| async { bus }).await)
            }
            Err(e) => {
                if let Ok(mut last) = self.last_error.lock() {
                    *last = e.to_string();
                }
                Err(unreachable(&self.last_error))
            }
        }
    }
}

#[async_trait]
impl Bus for LazyBus {
    async fn enqueue_job(&self, job: &JobEnvelope) -> Result<(), BusError> {
        self.bus().await?.enqueue_job(job).await
    }

    async fn next_job(
        &self,
        worker: &WorkerIdentity,
        wait: Duration,
    ) -> Result<Option<Delivery>, BusError> {
        self.bus().await?.next_job(worker, wait).await
    }

    async fn ack_job(&self, delivery: &Delivery) -> Result<(), BusError> {
        self.bus().await?.ack_job(delivery).await
    }

    async fn retry_job(&self, delivery: &Delivery) -> Result<(), BusError> {
        self.bus().await?.retry_job(delivery).await
    }

    async fn extend_job(&self, delivery: &Delivery) -> Result<(), BusError> {
        self.bus().await?.extend_job(delivery).await
    }

    async fn request_cancel(&self, job_id: Uuid) -> Result<(), BusError> {
        self.bus().await?.request_cancel(job_id).await
    }

    async fn cancel_requested(&self, job_id: Uuid) -> Result<bool, BusError> {
        self.bus().await?.cancel_requested(job_id).await
    }

    async fn queued_jobs(&self) -> Result<Vec<QueuedJob>, BusError> {
        self.bus().await?.queued_jobs().await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BusError> {
        self.bus().await?.dead_letters().await
    }

    async fn report(&self, event: &NewEvent) -> Result<(), BusError> {
        self.bus().await?.report(event).await
    }

    async fn next_reports(
        &self,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReportDelivery>, BusError> {
        self.bus().await?.next_reports(consumer, max, wait).await
    }

    async fn ack_reports(&self, receipts: &[String]) -> Result<(), BusError> {
        self.bus().await?.ack_reports(receipts).await
    }

    async fn heartbeat(&self, heartbeat: &WorkerHeartbeat) -> Result<(), BusError> {
        self.bus().await?.heartbeat(heartbeat).await
    }

    async fn workers(&self) -> Result<Vec<SeenWorker>, BusError> {
        self.bus().await?.workers().await
    }

    async fn forget_workers(&self, datacenter: &Name) -> Result<(), BusError> {
        self.bus().await?.forget_workers(datacenter).await
    }

    async fn publish_snapshot(
        &self,
        datacenter: &Name,
        snapshot: &PublishedSnapshot,
    ) -> Result<bool, BusError> {
        self.bus().await?.publish_snapshot(datacenter, snapshot).await
    }

    async fn snapshot_after(
        &self,
        datacenter: &Name,
        after: u64,
        wait: Duration,
    ) -> Result<Option<PublishedSnapshot>, BusError> {
        self.bus().await?.snapshot_after(datacenter, after, wait).await
    }

    async fn authorize_workers(&self, grants: &[WorkerGrant]) -> Result<(), BusError> {
        self.bus().await?.authorize_workers(grants).await
    }

    fn is_durable(&self) -> bool {
        self.durable
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::{BusConfig, MemoryBus};

    #[tokio::test]
    async fn connects_once_it_can_and_retries_no_faster_than_once_a_second() {
        let attempts = Arc::new(AtomicU32::new(0));
        let counter = attempts.clone();
        let lazy = LazyBus::new(
            move || {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        Err(BusError::Unreachable("redis is down".into()))
                    } else {
                        Ok(Arc::new(MemoryBus::new(BusConfig::default())) as Arc<dyn Bus>)
                    }
                }
            },
            true,
        );
        let name: Name = "home".parse().unwrap();
        let first = lazy.workers().await.unwrap_err().to_string();
        assert!(first.contains("redis is down"), "{first}");
        assert!(matches!(lazy.forget_workers(&name).await, Err(BusError::Unreachable(_))));
        assert_eq!(attempts.load(Ordering::SeqCst), 1, "no second attempt within a second");
        tokio::time::sleep(RETRY_EVERY).await;
        assert!(lazy.workers().await.unwrap().is_empty());
        assert!(lazy.workers().await.is_ok());
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
    }
}
