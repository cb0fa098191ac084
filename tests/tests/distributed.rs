//! The distributed mode: `ctpf manager` and separate `ctpf worker` processes talking through a
//! real redis-server. A worker killed mid-job loses the job to another worker with matching
//! tags, the job completes exactly once, jobs nobody matches stay queued, and jobs survive a
//! Redis restart.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::{Duration, Instant};

use ctpf_e2e::{CtpfProcess, RedisServer, S3Server};
use serde_json::{Value, json};

struct Site {
    dir: tempfile::TempDir,
    redis: RedisServer,
    /// Where builder workers store what they build.
    s3: S3Server,
    manager: CtpfProcess,
    token: String,
    http: reqwest::Client,
}

const S3_CREDENTIALS: [(&str, &str); 2] =
    [("AWS_ACCESS_KEY_ID", S3Server::ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", S3Server::SECRET_KEY)];

impl Site {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let redis = RedisServer::start().unwrap();
        let s3 = S3Server::start().unwrap();
        let manager = Self::start_manager(&dir, &redis, &s3, "manager.log");
        let token = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
        Self {
            dir,
            redis,
            s3,
            manager,
            token: token.trim().to_owned(),
            http: reqwest::Client::new(),
        }
    }

    fn start_manager(
        dir: &tempfile::TempDir,
        redis: &RedisServer,
        s3: &S3Server,
        log: &str,
    ) -> CtpfProcess {
        let data = dir.path().join("data");
        let (url, endpoint) = (redis.url(), s3.endpoint());
        let args =
            ["manager", "--redis", &url, "--s3", &endpoint, "--data-dir", data.to_str().unwrap()];
        let args = [&args[..], &["--listen", "127.0.0.1:0"]].concat();
        CtpfProcess::start(&args, &S3_CREDENTIALS, dir.path().join(log), "listening on").unwrap()
    }

    fn worker(&self, id: &str, datacenter: &str, tags: &[&str]) -> CtpfProcess {
        let (url, s3) = (self.redis.url(), self.s3.endpoint());
        let data = self.dir.path().join(format!("{id}-data"));
        let mut args = vec!["worker", "--redis", &url, "--datacenter", datacenter];
        args.extend(["--id", id, "--role", "builder,packager", "--job-lease", "2", "--s3", &s3]);
        args.extend(["--data-dir", data.to_str().unwrap()]);
        for t in tags {
            args.extend(["--tag", t]);
        }
        let log = self.dir.path().join(format!("{id}.log"));
        CtpfProcess::start(&args, &S3_CREDENTIALS, log, "ready").unwrap()
    }

    async fn submit(&self, selector: &str, sleep_ms: u64) -> String {
        let job: Value = self
            .http
            .post(format!("{}/v1/jobs", self.manager.api()))
            .bearer_auth(&self.token)
            .json(&json!({"spec": {"kind": "probe", "sleep_ms": sleep_ms}, "selector": selector}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        job["id"].as_str().unwrap_or_else(|| panic!("no job id in {job}")).to_owned()
    }

    async fn get(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.manager.api());
        self.http.get(url).bearer_auth(&self.token).send().await.unwrap().json().await.unwrap()
    }

    async fn job_events(&self, job_id: &str) -> Vec<Value> {
        let events = self.get("/v1/events?limit=1000").await;
        events.as_array().unwrap().iter().filter(|e| e["job_id"] == job_id).cloned().collect()
    }

    /// Waits until `check` holds for the job's record, failing with the logs after `limit`.
    async fn wait_for_job(
        &self,
        job_id: &str,
        limit: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let job = self.get(&format!("/v1/jobs/{job_id}")).await;
            if check(&job) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job never reached the state: {job}\n{}",
                self.manager.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_dies_is_redelivered_and_completes_once() {
    let site = Site::start().await;
    let mut first = site.worker("w1", "dc-a", &["pool=x"]);
    let mut second = site.worker("w2", "dc-a", &["pool=x"]);
    // A worker of another datacenter must never take dc-a's job.
    let _other = site.worker("w3", "dc-b", &["pool=x"]);

    let job = site.submit("datacenter=dc-a,pool=x,role=builder", 4000).await;
    let unmatched = site.submit("datacenter=dc-z", 0).await;

    // Whoever takes it first is killed mid-job.
    let running =
        site.wait_for_job(&job, Duration::from_secs(30), |j| j["status"] == "running").await;
    let holder = running["worker"].as_str().unwrap().to_owned();
    let (victim, survivor) = if holder == "w1" { (&mut first, "w2") } else { (&mut second, "w1") };
    victim.kill9().unwrap();

    let done =
        site.wait_for_job(&job, Duration::from_secs(60), |j| j["status"] == "succeeded").await;
    assert_eq!(done["worker"], survivor, "{done}");
    assert_eq!(done["attempts"], 2, "{done}");

    let events = site.job_events(&job).await;
    let started: Vec<_> = events
        .iter()
        .filter(|e| e["type"] == "job_started")
        .map(|e| (e["worker"].as_str().unwrap(), e["attempt"].as_u64().unwrap()))
        .collect();
    assert_eq!(started, [(holder.as_str(), 1), (survivor, 2)], "{events:?}");
    let succeeded = events.iter().filter(|e| e["type"] == "job_succeeded").count();
    assert_eq!(succeeded, 1, "{events:?}");
    assert!(
        events.iter().all(|e| e["worker"] != "w3"),
        "dc-b's worker took dc-a's job: {events:?}"
    );

    // Nobody serves dc-z: that job is still queued, untouched.
    let waiting = site.get(&format!("/v1/jobs/{unmatched}")).await;
    assert_eq!(waiting["status"], "queued", "{waiting}");
    assert_eq!(waiting["attempts"], 0, "{waiting}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_survive_a_redis_restart() {
    let mut site = Site::start().await;
    // No worker yet: the jobs wait in Redis.
    let mut jobs = Vec::new();
    for _ in 0..20 {
        jobs.push(site.submit("datacenter=dc-a", 0).await);
    }
    site.redis.restart().unwrap();
    let _worker = site.worker("w1", "dc-a", &[]);
    for job in &jobs {
        site.wait_for_job(job, Duration::from_secs(60), |j| j["status"] == "succeeded").await;
    }
    for job in &jobs {
        let events = site.job_events(job).await;
        assert_eq!(events.iter().filter(|e| e["type"] == "job_succeeded").count(), 1, "{events:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_wait_for_a_stopped_manager() {
    let mut site = Site::start().await;
    let _worker = site.worker("w1", "dc-a", &[]);
    let job = site.submit("datacenter=dc-a", 1500).await;
    site.wait_for_job(&job, Duration::from_secs(30), |j| j["status"] == "running").await;
    // The manager goes away while the job runs; the worker's report waits in Redis.
    assert!(site.manager.terminate().unwrap());
    tokio::time::sleep(Duration::from_secs(3)).await;
    site.manager = Site::start_manager(&site.dir, &site.redis, &site.s3, "manager2.log");
    let done =
        site.wait_for_job(&job, Duration::from_secs(30), |j| j["status"] == "succeeded").await;
    assert_eq!(done["worker"], "w1");
}

/// With Redis down the API answers 503 with a generic message (details stay in the log), the
/// manager keeps running, and it serves again once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_is_a_clean_503_and_the_manager_recovers() {
    let mut site = Site::start().await;
    let url = format!("{}/v1/datacenters", site.manager.api());
    let create = |name: &str| {
        site.http.post(&url).bearer_auth(&site.token).json(&json!({"name": name})).send()
    };
    assert_eq!(create("before").await.unwrap().status(), reqwest::StatusCode::CREATED);

    let port = site.redis.port();
    site.redis.stop();
    let response = create("during").await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(!message.contains(&port.to_string()) && !message.contains("redis://"), "{message}");

    site.redis.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match create("after").await {
            Ok(r) if r.status() == reqwest::StatusCode::CREATED => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("manager did not recover: {other:?}\n{}", site.manager.log_text()),
        }
    }
    let names: Vec<String> = site
        .get("/v1/datacenters")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["after", "before"]);
}

/// A build submitted to the manager runs on a separate builder worker, which stores the
/// image in S3; the manager serves it by name. The same request again is a cache hit. A
/// packaging job over that output runs on the worker too (its packager role), and the
/// medium it writes to S3 is served by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_runs_on_a_builder_worker_and_its_output_is_served_by_the_manager() {
    let site = Site::start().await;
    let _builder = site.worker("builder-1", "dc-a", &[]);
    let build = |config: &str| json!({"request": {"recipe": "grub", "target": "x86_64-efi", "config": config}, "name": "dist"});
    let submit = |body: Value| {
        let request = site
            .http
            .post(format!("{}/v1/builds?wait=120", site.manager.api()))
            .bearer_auth(&site.token)
            .json(&body);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let job = submit(build("echo distributed\n")).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", site.manager.log_text());
    assert_eq!(job["worker"], "builder-1");
    assert_eq!(job["manifest"]["cached"], false);
    let digest = job["manifest"]["outputs"][0]["digest"].as_str().unwrap().to_owned();

    let url = format!("{}/v1/artifacts/dist-grubx64.efi/content", site.manager.api());
    let image = site.http.get(url).bearer_auth(&site.token).send().await.unwrap();
    assert!(image.status().is_success(), "{}", image.status());
    let bytes = image.bytes().await.unwrap();
    assert_eq!(&bytes[..2], b"MZ");
    assert!(bytes.windows(17).any(|w| w == b"echo distributed\n"));

    let again = submit(build("echo distributed\n")).await;
    assert_eq!(again["manifest"]["cached"], true, "{again}");
    assert_eq!(again["manifest"]["outputs"][0]["digest"], digest.as_str());
    // Its log came back through Redis.
    let id = job["id"].as_str().unwrap();
    let log = site.get(&format!("/v1/builds/{id}/logs")).await;
    assert_eq!(log["finished"], true, "{log}");
    assert!(
        log["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["text"].as_str().unwrap().contains("grub-mkimage")),
        "{log}"
    );

    let size = job["manifest"]["outputs"][0]["size"].as_u64().unwrap();
    let package = json!({
        "request": {
            "format": "pxe_bundle",
            "label": "DIST",
            "inputs": {"grubx64.efi": {"digest": digest, "size": size}},
            "source_date_epoch": 1_700_000_000u64,
        },
        "name": "dist.tar",
    });
    let packaged = site
        .http
        .post(format!("{}/v1/packages?wait=120", site.manager.api()))
        .bearer_auth(&site.token)
        .json(&package)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(packaged["status"], "succeeded", "{packaged}");
    assert_eq!(packaged["worker"], "builder-1");
    assert_eq!(packaged["package"]["boot_modes"], json!(["pxe_uefi_x86_64"]));
    let url = format!("{}/v1/artifacts/dist.tar/content", site.manager.api());
    let tar = site.http.get(url).bearer_auth(&site.token).send().await.unwrap();
    assert!(tar.status().is_success(), "{}", tar.status());
    let tar = tar.bytes().await.unwrap();
    let tar_digest = ctpf_common::Sha256Digest::of(&tar).to_string();
    assert_eq!(packaged["package"]["digest"], tar_digest.as_str());
    assert_eq!(&tar[..11], b"grubx64.efi");
}
