//! Snapshot propagation: the time from an API change (a reservation posted to a real
//! `ctpf manager`) to each of 100 simulated site workers serving the new generation, that is,
//! having read it from Redis, checked it, stored it on disk (fsync) and swapped it in.
//!
//! The peer is the bare transport: the same 100 readers as plain blocking `XREAD`s on one
//! Redis stream and one `XADD`, with nothing checked or stored. The ratio says what the
//! manager's publisher, the validation and the durable store cost on top of Redis.
//!
//! All 100 workers share this machine's one disk and two cores, so their fsyncs queue behind
//! each other; a real site worker has its own.
//!
//! Run with `cargo bench -p ctpf-distributors --bench snapshots` (needs redis-server and a
//! built `ctpf` binary, see `ctpf_e2e::ctpf_binary`).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ctpf_bus::{Bus, BusConfig, RedisBus};
use ctpf_common::{Name, WorkerToken};
use ctpf_distributors::site::SnapshotHolder;
use ctpf_e2e::{CtpfProcess, RedisServer};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const WORKERS: usize = 100;
const ROUNDS: usize = 20;
const ROUND_LIMIT: Duration = Duration::from_secs(30);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    async fn post(&self, path: &str, body: Value) -> Result<Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("POST {path}: {status} {body}");
        }
        Ok(body)
    }
}

/// Waits until every holder serves at least `generation`; returns when each got there.
async fn wait_all(
    reached: &[Arc<Mutex<Option<Instant>>>],
    holders: &[Arc<SnapshotHolder>],
    generation: u64,
) -> Result<Vec<Instant>> {
    let deadline = Instant::now() + ROUND_LIMIT;
    loop {
        if holders.iter().all(|h| h.generation() >= generation) {
            return reached
                .iter()
                .map(|r| r.lock().ok().and_then(|r| *r).context("no arrival time"))
                .collect();
        }
        if Instant::now() > deadline {
            let behind = holders.iter().filter(|h| h.generation() < generation).count();
            bail!("{behind} workers never served generation {generation}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn ctpf_propagation(redis: &RedisServer) -> Result<Vec<Duration>> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("manager");
    let url = redis.url();
    let args = ["manager", "--redis", &url, "--listen", "127.0.0.1:0", "--data-dir"];
    let args = [&args[..], &[data.to_str().context("path")?]].concat();
    let manager = CtpfProcess::start(&args, &[], dir.path().join("manager.log"), "listening on")?;
    let api = Api {
        base: manager.api().to_owned(),
        token: std::fs::read_to_string(data.join("admin.token"))?.trim().to_owned(),
        http: reqwest::Client::new(),
    };
    api.post("/v1/datacenters", json!({"name": "bench"})).await?;
    let issued = api.post("/v1/worker-credentials", json!({"datacenter": "bench"})).await?;
    let token: WorkerToken = issued["token"].as_str().context("token")?.parse()?;
    let datacenter: Name = "bench".parse()?;

    let stop = CancellationToken::new();
    let mut holders = Vec::new();
    let mut reached = Vec::new();
    let target = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    for n in 0..WORKERS {
        let bus: Arc<dyn Bus> = Arc::new(
            RedisBus::connect_as_worker(
                &url,
                "ctpf",
                &datacenter,
                &token.id,
                &token.secret,
                BusConfig::default(),
            )
            .await?,
        );
        let holder = Arc::new(
            SnapshotHolder::open(datacenter.clone(), &dir.path().join(format!("w{n}")), None)
                .await?,
        );
        let arrival = Arc::new(Mutex::new(None));
        let mut changes = holder.subscribe();
        let (arrival_w, target_w) = (arrival.clone(), target.clone());
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let generation = changes.borrow().as_ref().map_or(0, |s| s.generation);
                if generation >= target_w.load(std::sync::atomic::Ordering::SeqCst)
                    && let Ok(mut a) = arrival_w.lock()
                    && a.is_none()
                {
                    *a = Some(Instant::now());
                }
            }
        });
        {
            let (holder, stop) = (holder.clone(), stop.clone());
            tokio::spawn(async move { holder.follow(bus, stop).await });
        }
        holders.push(holder);
        reached.push(arrival);
    }
    // Everyone on the current generation first.
    let deadline = Instant::now() + ROUND_LIMIT;
    while holders.iter().any(|h| h.generation() == 0) {
        if Instant::now() > deadline {
            bail!("workers never got the first snapshot:\n{}", manager.log_text());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut latencies = Vec::new();
    for round in 0..ROUNDS {
        let current = holders.iter().map(|h| h.generation()).max().unwrap_or(0);
        for r in &reached {
            if let Ok(mut r) = r.lock() {
                *r = None;
            }
        }
        target.store(current + 1, std::sync::atomic::Ordering::SeqCst);
        let mac = format!("52:54:00:be:00:{round:02x}");
        let ip = format!("10.200.0.{}", round + 10);
        let start = Instant::now();
        api.post("/v1/datacenters/bench/reservations", json!({"mac": mac, "ip": ip})).await?;
        let arrivals = wait_all(&reached, &holders, current + 1).await?;
        latencies.extend(arrivals.iter().map(|at| at.saturating_duration_since(start)));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    Ok(latencies)
}

/// The same fan-out on bare Redis: 100 blocking `XREAD`s woken by one `XADD`.
async fn bare_redis(redis: &RedisServer) -> Result<Vec<Duration>> {
    let client = redis::Client::open(redis.url())?;
    let mut writer = client.get_multiplexed_async_connection().await?;
    let key = "peer:snapshot";
    let mut latencies = Vec::new();
    for round in 0..ROUNDS {
        let mut readers = Vec::new();
        for _ in 0..WORKERS {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(
                    &redis::AsyncConnectionConfig::new().set_response_timeout(None),
                )
                .await?;
            let last: String = format!("{round}-1");
            readers.push(tokio::spawn(async move {
                let _: redis::Value = redis::cmd("XREAD")
                    .arg("BLOCK")
                    .arg(30_000)
                    .arg("STREAMS")
                    .arg(key)
                    .arg(&last)
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, redis::RedisError>(Instant::now())
            }));
        }
        // Let every reader block first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start = Instant::now();
        let _: String = redis::cmd("XADD")
            .arg(key)
            .arg("MAXLEN")
            .arg(1)
            .arg(format!("{}-1", round + 1))
            .arg("body")
            .arg(vec![b'x'; 2048])
            .query_async(&mut writer)
            .await?;
        for reader in readers {
            latencies.push(reader.await??.saturating_duration_since(start));
        }
    }
    Ok(latencies)
}

fn report(name: &str, mut latencies: Vec<Duration>) -> (Duration, Duration) {
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    println!(
        "{name:<32} {:>6} samples   p50 {:>8.2} ms   p99 {:>8.2} ms   max {:>8.2} ms",
        latencies.len(),
        ms(p50),
        ms(p99),
        ms(*latencies.last().unwrap_or(&Duration::ZERO)),
    );
    (p50, p99)
}

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let redis = RedisServer::start()?;
        println!("snapshot propagation to {WORKERS} workers, {ROUNDS} changes");
        let ours = report("ctpf (API change -> served)", ctpf_propagation(&redis).await?);
        let peer = report("bare Redis XADD -> XREAD", bare_redis(&redis).await?);
        println!(
            "ratio ctpf/bare: p50 {:.1}x   p99 {:.1}x",
            ms(ours.0) / ms(peer.0).max(1e-6),
            ms(ours.1) / ms(peer.1).max(1e-6)
        );
        Ok(())
    })
}
