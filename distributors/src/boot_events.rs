//! Boot activity for the manager's event stream: DHCP replies, TFTP transfers and HTTP boot
//! requests, so `ctpf events --follow --datacenter X` shows a machine booting at any site.
//!
//! The socket loops must never wait for this. [`BootEvents::record`] is a rate check and a
//! `try_send`; what a flood (or a full channel) pushes past the limit is only counted. The
//! [`forward`] task reports what got through over the bus, keeping a bounded backlog while
//! the bus is unreachable, and later reports how many were dropped (`boot_events_dropped`).
//! Unlike host callbacks (see [`crate::site::local::Outbox`]) boot events are telemetry:
//! they are not kept on disk, and a worker restarted during an outage loses its backlog.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::{
    body::HttpBody,
    extract::{ConnectInfo, Query, Request, State},
    http::header,
    middleware::Next,
    response::Response,
};
use ctpf_bus::Bus;
use ctpf_common::{EventBody, Name, NewEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Events per second a worker sends at most, sustained; a machine booting makes about ten.
pub const RATE_PER_SEC: u32 = 50;
/// Events sent at once after a quiet spell (a rack powering on together).
pub const BURST: u32 = 500;
/// Events held while the bus is unreachable; the oldest go first beyond this.
pub const BACKLOG: usize = 5_000;
/// Longest text field kept (file names and paths come from the network).
const MAX_TEXT: usize = 256;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where the boot service and the HTTP boot server record what they did. Cheap to clone;
/// [`BootEvents::off`] records nothing (benchmarks, tests, a worker without a bus).
#[derive(Debug, Clone, Default)]
pub struct BootEvents {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    worker: String,
    datacenter: Option<Name>,
    sender: mpsc::Sender<NewEvent>,
    limiter: Mutex<TokenBucket>,
    /// Refused by the limiter or the channel since the forwarder last reported them.
    dropped: Arc<AtomicU64>,
}

/// The receiving end, for [`forward`].
#[derive(Debug)]
pub struct BootEventReceiver {
    worker: String,
    datacenter: Option<Name>,
    receiver: mpsc::Receiver<NewEvent>,
    dropped: Arc<AtomicU64>,
}

impl BootEvents {
    /// Records nothing.
    pub fn off() -> Self {
        Self { inner: None }
    }

    /// A recorder for `worker` and the receiver to [`forward`] its events from; they are
    /// reported for `datacenter` (a site worker's own; `None` for a trusted worker).
    pub fn channel(worker: &str, datacenter: Option<Name>) -> (Self, BootEventReceiver) {
        let (sender, receiver) = mpsc::channel(BURST as usize);
        let dropped = Arc::new(AtomicU64::new(0));
        let inner = Inner {
            worker: worker.to_owned(),
            datacenter: datacenter.clone(),
            sender,
            limiter: Mutex::new(TokenBucket::new(RATE_PER_SEC, BURST, Instant::now())),
            dropped: dropped.clone(),
        };
        let receiver =
            BootEventReceiver { worker: worker.to_owned(), datacenter, receiver, dropped };
        (Self { inner: Some(Arc::new(inner)) }, receiver)
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Records the event `make` builds from the worker's name (if it builds one); `make`
    /// runs only within the rate limit. Never blocks.
    pub fn record(&self, make: impl FnOnce(String) -> Option<EventBody>) {
        let Some(inner) = &self.inner else { return };
        let admitted =
            inner.limiter.lock().unwrap_or_else(PoisonError::into_inner).take(Instant::now());
        if !admitted {
            inner.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Stamped now: the event may wait in the backlog for a long time.
        if let Some(body) = make(inner.worker.clone())
            && inner.sender.try_send(NewEvent::new(inner.datacenter.clone(), body)).is_err()
        {
            inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The `mac` a boot script request names, if it is one.
#[derive(serde::Deserialize)]
struct MacParam {
    mac: Option<String>,
}

/// Whether `path` is something a booting machine fetches: everything the boot servers serve
/// (scripts, `/boot/...`, loaders, PXE bundle files) but the API under `/v1/` (callbacks
/// are events of their own) and the health and API documents.
pub fn is_boot_path(path: &str) -> bool {
    path.len() > 1 && !path.starts_with("/v1/") && !matches!(path, "/healthz" | "/openapi.json")
}

/// axum middleware (`from_fn_with_state(events, record_http)`) recording every boot request
/// with its client, status, size and the MAC it names. The client address comes from
/// `ConnectInfo<SocketAddr>`, which the server must provide.
pub async fn record_http(
    State(events): State<BootEvents>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if !events.is_on() || !is_boot_path(path) {
        return next.run(request).await;
    }
    let path = clip(path);
    let client = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let mac = Query::<MacParam>::try_from_uri(request.uri())
        .ok()
        .and_then(|q| q.0.mac)
        .and_then(|mac| ctpf_common::MacAddr::parse("mac", &mac).ok());
    let response = next.run(request).await;
    // Files carry a Content-Length; scripts are whole strings whose size the body knows.
    let bytes = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .or_else(|| response.body().size_hint().exact());
    let status = response.status().as_u16();
    events.record(|worker| {
        Some(EventBody::HttpBoot {
            worker,
            client: client.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string()),
            path,
            status,
            mac,
            bytes,
        })
    });
    response
}

/// Cuts text from the network to [`MAX_TEXT`] characters for an event.
pub fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_TEXT) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// Admits `rate` events a second on average and up to `burst` at once.
#[derive(Debug, Clone)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self { rate: f64::from(rate), burst, tokens: burst, last: now }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Events waiting for the bus, oldest first, at most `capacity`; pushing beyond drops the
/// oldest and counts it.
#[derive(Debug)]
struct Backlog {
    events: VecDeque<NewEvent>,
    capacity: usize,
    dropped: u64,
}

impl Backlog {
    fn new(capacity: usize) -> Self {
        Self { events: VecDeque::new(), capacity: capacity.max(1), dropped: 0 }
    }

    fn push(&mut self, event: NewEvent) {
        if self.events.len() == self.capacity {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(event);
    }
}

/// Reports recorded events over `bus` until `stop`, in the order recorded, each stamped with
/// the time it happened (not the time it was sent). While the bus fails, events wait in a
/// backlog of [`BACKLOG`] and sending is retried with a growing pause.
pub async fn forward(mut events: BootEventReceiver, bus: Arc<dyn Bus>, stop: CancellationToken) {
    let mut backlog = Backlog::new(BACKLOG);
    let mut backoff = FIRST_BACKOFF;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let idle = backlog.events.is_empty();
        let retry = async move {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None if idle => std::future::pending().await,
                None => {}
            }
        };
        tokio::select! {
            received = events.receiver.recv() => match received {
                Some(event) => {
                    backlog.push(event);
                    // Take what else is queued before going to the bus.
                    while let Ok(event) = events.receiver.try_recv() {
                        backlog.push(event);
                    }
                }
                None => return,
            },
            () = retry => {}
            () = stop.cancelled() => return,
        }
        if retry_at.is_some_and(|at| at > tokio::time::Instant::now()) {
            continue;
        }
        match send_backlog(&mut backlog, &mut events, bus.as_ref()).await {
            Ok(()) => {
                backoff = FIRST_BACKOFF;
                retry_at = None;
            }
            Err(e) => {
                if retry_at.is_none() {
                    tracing::warn!(error = %e, held = backlog.events.len(),
                        "cannot report boot events; holding them until the bus is back");
                }
                retry_at = Some(tokio::time::Instant::now() + backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Sends the backlog front to back, then the count of dropped events if any; stops at the
/// first failure with the unsent events still in the backlog.
async fn send_backlog(
    backlog: &mut Backlog,
    events: &mut BootEventReceiver,
    bus: &dyn Bus,
) -> Result<(), ctpf_bus::BusError> {
    while let Some(event) = backlog.events.front() {
        bus.report(event).await?;
        backlog.events.pop_front();
    }
    let at_the_source = events.dropped.load(Ordering::Relaxed);
    let count = backlog.dropped + at_the_source;
    if count > 0 {
        let body = EventBody::BootEventsDropped { worker: events.worker.clone(), count };
        bus.report(&NewEvent::new(events.datacenter.clone(), body)).await?;
        tracing::warn!(count, "boot events dropped (rate limit or backlog)");
        backlog.dropped = 0;
        events.dropped.fetch_sub(at_the_source, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_bucket_admits_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 5, start);
        assert_eq!((0..8).filter(|_| bucket.take(start)).count(), 5);
        // A tenth of a second later one more token has come in, not more.
        let later = start + Duration::from_millis(100);
        assert!(bucket.take(later));
        assert!(!bucket.take(later));
        // It refills up to the burst only.
        let much_later = start + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| bucket.take(much_later)).count(), 5);
    }

    #[test]
    fn a_full_backlog_drops_the_oldest_and_counts_them() {
        let mut backlog = Backlog::new(2);
        for n in 0..5 {
            let body = EventBody::WorkerStarted { worker: format!("w{n}") };
            backlog.push(NewEvent::new(None, body));
        }
        let kept: Vec<_> = backlog
            .events
            .iter()
            .map(|e| match &e.body {
                EventBody::WorkerStarted { worker } => worker.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(kept, ["w3", "w4"]);
        assert_eq!(backlog.dropped, 3);
    }

    #[test]
    fn boot_paths_are_what_machines_fetch() {
        for path in [
            "/boot.ipxe",
            "/boot/ipxe",
            "/boot/discovery/x86_64/vmlinuz",
            "/ipxe.efi",
            "/custom/hello.txt",
        ] {
            assert!(is_boot_path(path), "{path}");
        }
        for path in ["/healthz", "/openapi.json", "/v1/enroll", "/v1/hosts", "/"] {
            assert!(!is_boot_path(path), "{path}");
        }
    }

    #[test]
    fn long_text_from_the_network_is_clipped() {
        assert_eq!(clip("undionly.kpxe"), "undionly.kpxe");
        let long = "é".repeat(1000);
        let clipped = clip(&long);
        assert_eq!(clipped.chars().count(), MAX_TEXT + 1);
        assert!(clipped.ends_with('…'));
    }

    #[tokio::test]
    async fn recorded_events_reach_the_bus_in_order_stamped_when_they_happened() {
        let bus: Arc<dyn Bus> = Arc::new(ctpf_bus::MemoryBus::new(Default::default()));
        let dc: Name = "dc-a".parse().unwrap();
        let (events, receiver) = BootEvents::channel("w1", Some(dc.clone()));
        let before = ctpf_common::OffsetDateTime::now_utc();
        for n in 0..3 {
            events.record(|worker| {
                Some(EventBody::WorkerStarted { worker: format!("{worker}-{n}") })
            });
        }
        // More than the burst at once: the rest is counted, not queued.
        for _ in 0..BURST {
            events.record(|worker| Some(EventBody::WorkerStarted { worker }));
        }
        let stop = CancellationToken::new();
        let forwarder = tokio::spawn(forward(receiver, bus.clone(), stop.clone()));
        let mut seen = Vec::new();
        while seen.len() < BURST as usize + 1 {
            let batch = bus.next_reports("test", 1000, Duration::from_secs(5)).await.unwrap();
            assert!(!batch.is_empty(), "only {} reports arrived", seen.len());
            seen.extend(batch.into_iter().map(|d| d.event));
        }
        stop.cancel();
        forwarder.await.unwrap();
        let names: Vec<_> = seen[..3]
            .iter()
            .map(|e| match &e.body {
                EventBody::WorkerStarted { worker } => worker.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["w1-0", "w1-1", "w1-2"]);
        assert!(seen.iter().all(|e| e.datacenter.as_ref() == Some(&dc) && e.at >= before));
        match &seen.last().unwrap().body {
            EventBody::BootEventsDropped { worker, count } => {
                assert_eq!((worker.as_str(), *count), ("w1", 3));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn off_records_nothing_and_a_closed_channel_counts_drops() {
        let mut built = false;
        BootEvents::off().record(|worker| {
            built = true;
            Some(EventBody::WorkerStarted { worker })
        });
        assert!(!built, "an event is not even built when recording is off");
        let (events, receiver) = BootEvents::channel("w1", None);
        drop(receiver.receiver);
        events.record(|worker| Some(EventBody::WorkerStarted { worker }));
        assert_eq!(receiver.dropped.load(Ordering::Relaxed), 1);
    }
}
