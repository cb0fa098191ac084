//! Builds through the API of a real `ctpf up` (the release binary, embedded storage, its
//! in-process builder), as a client sees them:
//!
//! - **cache hit latency**: `POST /v1/builds?wait=60` for a GRUB image built before, 200
//!   times: the request is validated, recorded, routed over the bus to the builder, which
//!   hashes the inputs, finds the manifest by its ref and reports; the answer is the finished
//!   job. Target: p99 under 50 ms.
//! - **cold GRUB builds**: a new config each time (so no cache), per target: the builder's
//!   own build time (grub-mkimage and storing) and submit-to-finished through the API.
//! - **two builds on 2 cores**: two discovery images (different agents, so different keys)
//!   one after the other, then both submitted at once.
//!
//! Run: `cargo build --release -p ctpf && cargo bench -p ctpf-e2e --bench builds`. The
//! discovery part needs the unpacked kernel `.ci/run` prepares and the musl target.
//! `CTPF_BIN` overrides the ctpf binary.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ctpf_e2e::CtpfProcess;
use serde_json::{Value, json};

const CACHE_HITS: usize = 200;
const COLD_ROUNDS: usize = 5;

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    /// Submits a build and waits for it; returns the finished job and the wall time.
    async fn build(&self, request: Value) -> Result<(Value, Duration)> {
        let started = Instant::now();
        let response = self
            .http
            .post(format!("{}/v1/builds?wait=600", self.base))
            .bearer_auth(&self.token)
            .json(&json!({ "request": request }))
            .send()
            .await?;
        let status = response.status();
        let job: Value = response.json().await?;
        let elapsed = started.elapsed();
        if !status.is_success() || job["status"] != "succeeded" {
            bail!("build failed ({status}): {job}");
        }
        Ok((job, elapsed))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let discovery = discovery_inputs();
    if discovery.is_none() {
        println!("(no discovery inputs: the two-build comparison is skipped)");
    }
    println!("binary: {}", ctpf_e2e::ctpf_binary()?.display());
    let args = ["up", "--data-dir", data.to_str().context("path")?, "--api", "127.0.0.1:0"];
    let env = [("SOURCE_DATE_EPOCH", "1700000000")];
    let up = CtpfProcess::start(&args, &env, dir.path().join("up.log"), "listening on")?;
    let token = std::fs::read_to_string(data.join("admin.token"))?.trim().to_owned();
    let api = Api { base: up.api().to_owned(), token, http: reqwest::Client::new() };

    cold_grub(&api).await?;
    cache_hits(&api).await?;
    if let Some((linux, agent)) = discovery {
        two_builds(&api, dir.path(), &linux, &agent).await?;
    }
    Ok(())
}

async fn cold_grub(api: &Api) -> Result<()> {
    println!("\ncold GRUB image builds (new config each round, {COLD_ROUNDS} rounds, median):");
    println!("{:<18} {:>14} {:>16}", "target", "builder", "submit-to-done");
    for target in ["x86_64-efi", "i386-pc-pxe", "i386-pc-eltorito", "arm64-efi"] {
        let mut build_ms = Vec::new();
        let mut wall = Vec::new();
        for round in 0..COLD_ROUNDS {
            let config = format!("echo cold round {round} {}\n", std::process::id());
            let request = json!({"recipe": "grub", "target": target, "config": config});
            match api.build(request).await {
                Ok((job, elapsed)) => {
                    if job["manifest"]["cached"] == true {
                        bail!("round {round} of {target} was a cache hit");
                    }
                    build_ms.push(job["manifest"]["duration_ms"].as_u64().unwrap_or(0));
                    wall.push(elapsed);
                }
                Err(e) if target == "arm64-efi" => {
                    println!("{target:<18} skipped: {e}");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if wall.is_empty() {
            continue;
        }
        build_ms.sort_unstable();
        wall.sort_unstable();
        println!(
            "{target:<18} {:>11} ms {:>16}",
            build_ms[build_ms.len() / 2],
            ms(wall[wall.len() / 2])
        );
    }
    Ok(())
}

async fn cache_hits(api: &Api) -> Result<()> {
    let request = json!({"recipe": "grub", "target": "x86_64-efi", "config": "echo cached\n"});
    api.build(request.clone()).await?;
    let mut latencies = Vec::with_capacity(CACHE_HITS);
    for _ in 0..CACHE_HITS {
        let (job, elapsed) = api.build(request.clone()).await?;
        if job["manifest"]["cached"] != true {
            bail!("expected a cache hit: {job}");
        }
        latencies.push(elapsed);
    }
    latencies.sort_unstable();
    let p99 = percentile(&latencies, 0.99);
    println!(
        "\ncache hit through the API ({CACHE_HITS} requests, one at a time): p50 {}, p90 {}, p99 {}, max {} (target p99 < 50 ms: {})",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.9)),
        ms(p99),
        ms(*latencies.last().unwrap_or(&Duration::ZERO)),
        if p99 < Duration::from_millis(50) { "met" } else { "MISSED" }
    );
    Ok(())
}

/// The kernel tree and the static agent, when this machine has them.
fn discovery_inputs() -> Option<(String, PathBuf)> {
    let linux = ctpf_e2e::qemu::discovery_linux().ok()?;
    let agent = ctpf_e2e::qemu::discovery_agent().ok()?;
    Some((linux.display().to_string(), agent))
}

async fn two_builds(api: &Api, dir: &Path, linux: &str, agent: &Path) -> Result<()> {
    let request = |agent: &str| json!({"recipe": "discovery", "linux": linux, "busybox": "/bin/busybox", "agent": agent});
    // Four agents that differ in a trailing byte: four keys, so every build is cold.
    let bytes = std::fs::read(agent)?;
    let mut variants = [Vec::new(), Vec::new()];
    for (n, pair) in variants.iter_mut().enumerate() {
        for i in 0..2 {
            let path = dir.join(format!("agent-{n}-{i}"));
            let mut variant = bytes.clone();
            variant.push((2 * n + i) as u8);
            std::fs::write(&path, variant)?;
            pair.push(path.display().to_string());
        }
    }
    let sequential = Instant::now();
    let mut builder_ms = 0;
    for agent in &variants[0] {
        let (job, _) = api.build(request(agent)).await?;
        builder_ms += job["manifest"]["duration_ms"].as_u64().unwrap_or(0);
    }
    let sequential = sequential.elapsed();
    let parallel = Instant::now();
    let (a, b) =
        tokio::join!(api.build(request(&variants[1][0])), api.build(request(&variants[1][1])));
    let (a, b) = (a?, b?);
    let parallel = parallel.elapsed();
    println!(
        "\ntwo cold discovery image builds on {} cores: one after the other {} (builder {builder_ms} ms), both at once {} (builders {} + {} ms): {:.2}x",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        ms(sequential),
        ms(parallel),
        a.0["manifest"]["duration_ms"],
        b.0["manifest"]["duration_ms"],
        sequential.as_secs_f64() / parallel.as_secs_f64()
    );
    Ok(())
}
