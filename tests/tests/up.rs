//! `ctpf up` as a user runs it: the real binary on a fresh data dir, driven through its CLI
//! and API, stopped with SIGTERM or killed with SIGKILL, and started again.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{
    collections::HashSet,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use ctpf_e2e::{CtpfProcess, S3Server, ctpf_cli};
use serde_json::{Value, json};

fn start_up(data: &Path, log_name: &str) -> CtpfProcess {
    let log = data.parent().unwrap().join(log_name);
    CtpfProcess::start(
        &["up", "--data-dir", data.to_str().unwrap(), "--api", "http://127.0.0.1:0"],
        &[],
        log,
        "listening on",
    )
    .unwrap()
}

fn token(data: &Path) -> String {
    std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_owned()
}

/// Runs the CLI against `up`; returns stdout, failing with stderr on a non-zero exit.
fn cli(up: &CtpfProcess, data: &Path, args: &[&str]) -> String {
    let token = token(data);
    let out = ctpf_cli(args, &[("CTPF_API", up.api()), ("CTPF_TOKEN", &token)]).unwrap();
    assert!(
        out.status.success(),
        "ctpf {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        up.log_text()
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn datacenters_survive_a_sigterm_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut up = start_up(&data, "up1.log");

    // First start creates the admin token, private to its owner.
    let meta = std::fs::metadata(data.join("admin.token")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);

    let out = cli(&up, &data, &["datacenter", "add", "home", "--tag", "site=flat"]);
    assert!(out.contains("datacenter home added"), "{out}");
    let table = cli(&up, &data, &["datacenter", "list"]);
    assert!(
        table.contains("NAME") && table.contains("home") && table.contains("site=flat"),
        "{table}"
    );
    assert!(up.terminate().unwrap(), "ctpf up did not exit cleanly:\n{}", up.log_text());

    let up = start_up(&data, "up2.log");
    let list: Value =
        serde_json::from_str(&cli(&up, &data, &["datacenter", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["name"], "home");
    assert_eq!(list[0]["tags"], json!(["site=flat"]));
    // The token survived too: the same file still works (cli() used it above).
}

#[test]
fn cli_reports_bad_input_and_missing_tokens_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = start_up(&data, "up.log");
    let api = up.api().to_owned();

    let out =
        ctpf_cli(&["datacenter", "list"], &[("CTPF_API", &api), ("CTPF_TOKEN", "wrong")]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("token"), "{err}");

    let token = token(&data);
    let env = [("CTPF_API", api.as_str()), ("CTPF_TOKEN", token.as_str())];
    let out = ctpf_cli(&["datacenter", "add", "home", "--tag", "site"], &env).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid tag \"site\""), "{err}");

    // Keys are read from a file; a private key by mistake is refused before anything is sent.
    let key = dir.path().join("laptop.pub");
    std::fs::write(&key, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl admin@laptop\n").unwrap();
    let out = cli(&up, &data, &["keys", "add", key.to_str().unwrap()]);
    assert!(out.contains("key laptop added (SHA256:"), "{out}");
    let private = dir.path().join("id_ed25519");
    std::fs::write(&private, "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n")
        .unwrap();
    let out = ctpf_cli(&["keys", "add", private.to_str().unwrap()], &env).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid public_key"));
    let keys = cli(&up, &data, &["keys", "list"]);
    assert!(keys.contains("laptop") && keys.contains("ssh-ed25519"), "{keys}");

    // A second ctpf on the same data dir is told why it cannot start.
    let second = CtpfProcess::start(
        &["up", "--data-dir", data.to_str().unwrap(), "--listen", "127.0.0.1:0"],
        &[],
        dir.path().join("second.log"),
        "listening on",
    );
    let err = second.unwrap_err().to_string();
    assert!(err.contains("another ctpf"), "{err}");
}

#[test]
fn the_built_in_worker_runs_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = start_up(&data, "up.log");
    let out = cli(&up, &data, &["jobs", "probe", "--sleep-ms", "50", "--json"]);
    let job: Value = serde_json::from_str(&out).unwrap();
    let failing = cli(&up, &data, &["jobs", "probe", "--fail", "--json"]);
    let failing: Value = serde_json::from_str(&failing).unwrap();
    let mut statuses = (String::new(), String::new());
    for _ in 0..100 {
        let jobs: Value =
            serde_json::from_str(&cli(&up, &data, &["jobs", "list", "--json"])).unwrap();
        let status = |id: &Value| {
            jobs.as_array().unwrap().iter().find(|j| &j["id"] == id).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        statuses = (status(&job["id"]), status(&failing["id"]));
        if statuses == ("succeeded".into(), "failed".into()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(statuses, ("succeeded".into(), "failed".into()), "{}", up.log_text());
    let events = cli(&up, &data, &["events"]);
    assert!(events.contains("job_succeeded") && events.contains("job_failed"), "{events}");
}

/// Every write the API acknowledged before a SIGKILL is there after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut up = start_up(&data, "up1.log");
    let api = up.api().to_owned();
    let token = token(&data);
    let http = reqwest::Client::new();

    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let mut writers = Vec::new();
    for w in 0..16 {
        let (http, api, token, acked) =
            (http.clone(), api.clone(), token.clone(), acknowledged.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("dc-{w}-{i}");
                let sent = http
                    .post(format!("{api}/v1/datacenters"))
                    .bearer_auth(&token)
                    .json(&json!({"name": name}))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == reqwest::StatusCode::CREATED => {
                        acked.lock().unwrap().insert(name);
                    }
                    // The server is gone: stop writing.
                    _ => break,
                }
            }
        }));
    }
    // Let writes pile up, then pull the plug while they are in flight.
    while acknowledged.lock().unwrap().len() < 1000 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    up.kill9().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acknowledged.lock().unwrap().clone();

    let up = start_up(&data, "up2.log");
    let list: Vec<Value> = http
        .get(format!("{}/v1/datacenters", up.api()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stored: HashSet<String> =
        list.iter().map(|d| d["name"].as_str().unwrap().to_owned()).collect();
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    // Each record's event is there as well (they are committed together).
    let events: Vec<Value> = http
        .get(format!("{}/v1/events?limit=1000", up.api()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(events.len() >= stored.len().min(1000));
}

/// SIGTERM while the built-in worker runs a job: the job finishes, its result is recorded
/// before exit, and nothing runs twice after the restart.
#[test]
fn sigterm_lets_a_running_job_finish_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut up = start_up(&data, "up1.log");
    let job: Value =
        serde_json::from_str(&cli(&up, &data, &["jobs", "probe", "--sleep-ms", "1500", "--json"]))
            .unwrap();
    let job_id = job["id"].as_str().unwrap().to_owned();
    let status = |up: &CtpfProcess| {
        let jobs: Value =
            serde_json::from_str(&cli(up, &data, &["jobs", "list", "--json"])).unwrap();
        let job = jobs.as_array().unwrap().iter().find(|j| j["id"] == job_id.as_str()).cloned();
        job.unwrap()
    };
    for _ in 0..100 {
        if status(&up)["status"] == "running" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status(&up)["status"], "running");
    assert!(up.terminate().unwrap(), "{}", up.log_text());

    let up = start_up(&data, "up2.log");
    let job = status(&up);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    std::thread::sleep(Duration::from_millis(500));
    let events = cli(&up, &data, &["events", "--json"]);
    let started = events.lines().filter(|l| l.contains("job_started")).count();
    assert_eq!(started, 1, "the job ran again after the restart:\n{events}");
}

/// `ctpf up --s3` keeps artifacts in an S3 server (s3s-fs here, MinIO in production): an
/// upload through the API lands in the bucket and streams back byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_s3_stores_artifacts_in_the_bucket() {
    let s3 = S3Server::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let endpoint = s3.endpoint();
    let up = CtpfProcess::start(
        &["up", "--data-dir", data.to_str().unwrap(), "--api", "127.0.0.1:0", "--s3", &endpoint],
        &[
            ("AWS_ACCESS_KEY_ID", S3Server::ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3Server::SECRET_KEY),
            ("CTPF_S3_BUCKET", "boot"),
        ],
        dir.path().join("up.log"),
        "listening on",
    )
    .unwrap();
    let token = token(&data);
    let http = reqwest::Client::new();
    // Larger than one multipart part, so the streaming multipart path is exercised.
    let body: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let url = format!("{}/v1/artifacts/vmlinuz?kind=kernel", up.api());
    let put = http.put(url).bearer_auth(&token).body(body.clone()).send().await.unwrap();
    assert_eq!(put.status(), reqwest::StatusCode::CREATED, "{}", up.log_text());
    let art: Value = put.json().await.unwrap();
    assert_eq!(art["size"], body.len());
    // Nothing of it went to the local disk.
    assert!(!data.join("artifacts").exists());
    let url = format!("{}/v1/artifacts/vmlinuz/content", up.api());
    let got = http.get(url).bearer_auth(&token).send().await.unwrap().bytes().await.unwrap();
    assert!(got.as_ref() == body.as_slice());
}

/// `ctpf artifacts push` streams a file in, `pull` streams it back out and checks the digest.
#[test]
fn artifacts_push_and_pull_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = start_up(&data, "up.log");
    let file = dir.path().join("vmlinuz-6.1");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();

    let out = cli(&up, &data, &["artifacts", "push", file.to_str().unwrap(), "--kind", "kernel"]);
    assert!(out.contains("artifact vmlinuz-6.1 stored: 3000000 bytes, sha256:"), "{out}");
    let list = cli(&up, &data, &["artifacts", "list", "--json"]);
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["kind"], "kernel");

    let pulled = dir.path().join("pulled");
    let out =
        cli(&up, &data, &["artifacts", "pull", "vmlinuz-6.1", "-o", pulled.to_str().unwrap()]);
    assert!(out.contains("verified"), "{out}");
    assert!(std::fs::read(&pulled).unwrap() == bytes);

    // Unknown names and hostile names fail clearly and write nothing.
    let token = token(&data);
    let env = [("CTPF_API", up.api()), ("CTPF_TOKEN", token.as_str())];
    let missing = dir.path().join("missing");
    let out =
        ctpf_cli(&["artifacts", "pull", "nope", "-o", missing.to_str().unwrap()], &env).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    assert!(!missing.exists());
    let out = ctpf_cli(&["artifacts", "pull", "../etc/passwd"], &env).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid name"));
}

/// A client following the event stream does not hold up a SIGTERM.
#[test]
fn a_following_client_does_not_delay_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut up = start_up(&data, "up.log");
    let token = token(&data);
    let mut follower = std::process::Command::new(ctpf_e2e::ctpf_binary().unwrap())
        .args(["events", "--follow"])
        .env("CTPF_API", up.api())
        .env("CTPF_TOKEN", &token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Let the follower reach its long poll.
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    assert!(up.terminate().unwrap(), "{}", up.log_text());
    let took = started.elapsed();
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(took < Duration::from_secs(10), "shutdown took {took:?} with a follower attached");
}

/// The path a booted machine takes: an operator issues a token (`ctpf tokens create`), the
/// machine posts its report with it, and appears in `ctpf hosts list --json`; the token does
/// not work twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_enrolls_with_a_token_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = start_up(&data, "up.log");
    cli(&up, &data, &["datacenter", "add", "home"]);
    let token = cli(&up, &data, &["tokens", "create", "--datacenter", "home"]).trim().to_owned();
    assert!(token.starts_with("ctpf_"), "{token}");

    let report = json!({"macs": ["52:54:00:77:00:10"], "arch": "x86_64",
        "smbios_uuid": "8b5ba9c6-3c4c-4a5d-9d7e-2a4c1c9d0a11", "addresses": ["10.77.0.100"]});
    let http = reqwest::Client::new();
    let enroll =
        || http.post(format!("{}/v1/enroll", up.api())).bearer_auth(&token).json(&report).send();
    assert_eq!(enroll().await.unwrap().status(), reqwest::StatusCode::CREATED);
    assert_eq!(enroll().await.unwrap().status(), reqwest::StatusCode::FORBIDDEN);

    let hosts: Value =
        serde_json::from_str(&cli(&up, &data, &["hosts", "list", "--json"])).unwrap();
    assert_eq!(hosts.as_array().unwrap().len(), 1, "{hosts}");
    assert_eq!(hosts[0]["macs"], json!(["52:54:00:77:00:10"]));
    assert_eq!(hosts[0]["arch"], "x86_64");
    assert_eq!(hosts[0]["datacenter"], "home");
}
