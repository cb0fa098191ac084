//! Datacenters as sites: `ctpf manager` on a real redis-server and one `ctpf worker` per
//! datacenter, each with its own credential and its own boot network (a veth whose far end is
//! in a namespace of the test's, where busybox udhcpc plays the booting machine).
//!
//! - A reservation added to dc-a reaches only dc-a's worker: its DHCP answers the MAC with the
//!   reserved address, dc-b's hands the same MAC an ordinary one.
//! - A dc-a credential does not work for dc-b.
//! - A PXE bundle chosen for dc-a is served by dc-a's worker (by its paths, over TFTP and
//!   HTTP, offline too); dc-b's snapshot names none. dc-a's worker fetches it through the
//!   manager with its own credential, which serves no other datacenter's files.
//! - Each worker's DHCP answers show up in its own datacenter's events.
//! - With the manager and Redis stopped, a restarted dc-a worker serves DHCP and HTTP boot
//!   from the snapshot on its disk and takes a machine's callback; the callback reaches the
//!   registries once Redis and the manager are back, and so do the DHCP, TFTP and HTTP events
//!   of the outage (held by the worker meanwhile).
//!
//! Needs root, iproute2 and busybox (`.ci/run` installs them).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ctpf_e2e::{CtpfProcess, Netns, RedisServer, S3Server, UpAdmin, free_port, unique_suffix};
use serde_json::Value;

/// One site's boot network: a veth whose worker end is in the root namespace (the worker
/// binds it by device, as on a real site's LAN port) and whose machine end is in a namespace
/// of the test's own.
struct BootNet {
    client: Netns,
    server_if: String,
    client_if: String,
    prefix: String,
}

impl BootNet {
    fn create(subnet: u8, mac: &str) -> Self {
        let suffix = unique_suffix();
        let (server_if, client_if) = (format!("vsw{suffix}"), format!("vsc{suffix}"));
        let client = Netns::create("ctpf-site").unwrap();
        // Created inside the client namespace, then the server end is moved out to the root
        // namespace: deleting the namespace deletes both ends.
        client
            .ip(&["link", "add", &client_if, "type", "veth", "peer", "name", &server_if])
            .unwrap();
        client.ip(&["link", "set", "dev", &client_if, "address", mac]).unwrap();
        client.ip(&["link", "set", &server_if, "netns", "1"]).unwrap();
        let prefix = format!("10.79.{subnet}");
        run(Command::new("ip").args(["addr", "add", &format!("{prefix}.1/24"), "dev", &server_if]));
        run(Command::new("ip").args(["link", "set", &server_if, "up"]));
        client.ip(&["link", "set", &client_if, "up"]).unwrap();
        // For HTTP from the machine's side (udhcpc's script only records its lease).
        client.ip(&["addr", "add", &format!("{prefix}.200/24"), "dev", &client_if]).unwrap();
        Self { client, server_if, client_if, prefix }
    }

    /// One DHCP exchange from the machine's side; the address it was offered, or `None`.
    fn dhcp(&self, dir: &Path) -> Option<String> {
        let result = dir.join(format!("lease-{}", self.client_if));
        let _ = std::fs::remove_file(&result);
        let script = dir.join("udhcpc.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\nprintf '%s' \"$ip\" > \"$LEASE_FILE\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let status = Command::new("timeout")
            .arg("60")
            .args(["ip", "netns", "exec", self.client.name(), "busybox", "udhcpc"])
            .args(["-i", &self.client_if, "-f", "-q", "-n", "-t", "4", "-T", "1"])
            .arg("-s")
            .arg(&script)
            .env("LEASE_FILE", &result)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        status.success().then(|| std::fs::read_to_string(&result).unwrap())
    }

    /// An HTTP request from the machine's side (busybox wget); the body, or `None`.
    fn http_get(&self, url: &str) -> Option<String> {
        let out = Command::new("timeout")
            .arg("30")
            .args([
                "ip",
                "netns",
                "exec",
                self.client.name(),
                "busybox",
                "wget",
                "-q",
                "-O",
                "-",
                url,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

struct Manager {
    dir: tempfile::TempDir,
    redis: RedisServer,
    s3: S3Server,
    admin: UpAdmin,
}

const S3_CREDENTIALS: [(&str, &str); 2] =
    [("AWS_ACCESS_KEY_ID", S3Server::ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", S3Server::SECRET_KEY)];

impl Manager {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let redis = RedisServer::start().unwrap();
        let s3 = S3Server::start().unwrap();
        let process = Self::spawn(&dir, &redis, &s3, "manager.log");
        let admin = UpAdmin::new(process, &dir.path().join("data")).unwrap();
        Self { dir, redis, s3, admin }
    }

    fn spawn(
        dir: &tempfile::TempDir,
        redis: &RedisServer,
        s3: &S3Server,
        log: &str,
    ) -> CtpfProcess {
        let data = dir.path().join("data");
        let (url, endpoint) = (redis.url(), s3.endpoint());
        let args =
            ["manager", "--redis", &url, "--s3", &endpoint, "--data-dir", data.to_str().unwrap()];
        let args = [&args[..], &["--listen", "127.0.0.1:0", "--worker-lost-after", "6"]].concat();
        CtpfProcess::start(&args, &S3_CREDENTIALS, dir.path().join(log), "listening on").unwrap()
    }

    fn restart(&mut self) {
        let process = Self::spawn(&self.dir, &self.redis, &self.s3, "manager-2.log");
        self.admin = UpAdmin::new(process, &self.dir.path().join("data")).unwrap();
    }

    fn text(&self, args: &[&str]) -> String {
        String::from_utf8(self.admin.cli(args)).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.admin.cli(&all);
        serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!("ctpf {all:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out))
        })
    }

    /// A worker of `datacenter` with its boot interface on `net`, and its HTTP boot URL;
    /// returns once its boot service is bound (it has a snapshot).
    fn worker(
        &self,
        id: &str,
        datacenter: &str,
        token: &str,
        net: &BootNet,
    ) -> (CtpfProcess, String) {
        let data = self.dir.path().join(format!("{id}-data"));
        let listen = format!("{}.1:{}", net.prefix, free_port().unwrap());
        // dc-a's worker fetches its files through the manager with its credential (no S3
        // credentials on the site); dc-b's straight from S3.
        let url = self.redis.url();
        let origin = match datacenter {
            "dc-a" => ["--manager-url".to_owned(), self.admin.process.api().to_owned()],
            _ => ["--s3".to_owned(), self.s3.endpoint()],
        };
        let args = [
            "worker",
            "--redis",
            &url,
            &origin[0],
            &origin[1],
            "--datacenter",
            datacenter,
            "--id",
            id,
            "--role",
            "distributor",
            "--worker-token",
            token,
            "--boot-interface",
            &net.server_if,
            "--http-listen",
            &listen,
            "--data-dir",
            data.to_str().unwrap(),
        ];
        let log = self.dir.path().join(format!("{id}.log"));
        let credentials: &[(&str, &str)] = if datacenter == "dc-a" { &[] } else { &S3_CREDENTIALS };
        let mut worker = CtpfProcess::start(&args, credentials, log, "ready").unwrap();
        worker.wait_for_output("(tftp)", Duration::from_secs(60)).unwrap();
        (worker, format!("http://{listen}"))
    }

    /// Waits until every listed worker reports serving at least `generation` of its
    /// datacenter's snapshot.
    fn wait_for_generation(&self, datacenter: &str, generation: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let workers = self.json(&["workers", "list", "--datacenter", datacenter]);
            let served = workers.as_array().unwrap().iter().all(|w| {
                w["state"] == "alive" && w["generation"].as_u64().is_some_and(|g| g >= generation)
            });
            if served && !workers.as_array().unwrap().is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{datacenter} never served generation {generation}: {workers}\n{}",
                self.worker_log_tails()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The events of `datacenter` after `after`, waiting up to a minute until one matches
    /// `wanted`; returns that one.
    fn wait_for_event(
        &self,
        datacenter: &str,
        after: u64,
        wanted: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let after = after.to_string();
            let listed =
                self.text(&["--json", "events", "--datacenter", datacenter, "--after", &after]);
            let events: Vec<Value> =
                listed.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            if let Some(found) = events.iter().find(|e| wanted(e)) {
                return found.clone();
            }
            assert!(Instant::now() < deadline, "no such event in {datacenter}: {listed}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn last_event_seq(&self) -> u64 {
        let listed = self.text(&["--json", "events"]);
        let last = listed.lines().last().map(|l| serde_json::from_str::<Value>(l).unwrap());
        last.and_then(|e| e["seq"].as_u64()).unwrap_or(0)
    }

    /// The last lines of every worker's log, for failure messages.
    fn worker_log_tails(&self) -> String {
        let mut tails = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("worker-") && name.ends_with(".log") {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                tails.push_str(&format!("--- {name}\n{tail}\n"));
            }
        }
        tails
    }

    fn generation(&self, datacenter: &str) -> u64 {
        self.json(&["datacenter", "snapshot", datacenter])["generation"].as_u64().unwrap()
    }
}

const MAC: &str = "52:54:00:79:00:01";

#[test]
fn each_datacenter_gets_its_own_state_and_a_worker_serves_offline() {
    let mut manager = Manager::start();
    let net_a = BootNet::create(1 + (free_port().unwrap() % 120) as u8, MAC);
    let net_b = BootNet::create(130 + (free_port().unwrap() % 120) as u8, MAC);
    let mut tokens = BTreeMap::new();
    for (dc, net) in [("dc-a", &net_a), ("dc-b", &net_b)] {
        manager.text(&["datacenter", "add", dc, "--tag", &format!("site={dc}")]);
        let range = format!("{0}.100-{0}.150", net.prefix);
        manager.text(&["datacenter", "dhcp", dc, "--mode", "authoritative", "--range", &range]);
        let token = manager.text(&["worker", "token", "create", "--datacenter", dc]);
        tokens.insert(dc, token.trim().to_owned());
    }

    // A dc-a credential is no use for dc-b: the worker stops at start, naming why.
    let url = manager.redis.url();
    let wrong = ctpf_e2e::ctpf_cli(
        &[
            "worker",
            "--redis",
            &url,
            "--datacenter",
            "dc-b",
            "--worker-token",
            &tokens["dc-a"],
            "--role",
            "distributor",
            "--public-url",
            "http://127.0.0.1:1",
            "--data-dir",
            manager.dir.path().join("wrong").to_str().unwrap(),
        ],
        &[],
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success() && stderr.contains("not valid for datacenter dc-b"),
        "{stderr}"
    );

    let (mut worker_a, _) = manager.worker("worker-a", "dc-a", &tokens["dc-a"], &net_a);
    let _worker_b = manager.worker("worker-b", "dc-b", &tokens["dc-b"], &net_b);

    // The reservation goes to dc-a only.
    let reserved = format!("{}.42", net_a.prefix);
    manager.text(&["datacenter", "reserve", "dc-a", MAC, &reserved]);
    let generation = manager.generation("dc-a");
    manager.wait_for_generation("dc-a", generation);
    assert_eq!(net_a.dhcp(manager.dir.path()).as_deref(), Some(reserved.as_str()));
    let lease_b = net_b.dhcp(manager.dir.path()).expect("dc-b's worker answers too");
    let last: u8 = lease_b.rsplit('.').next().unwrap().parse().unwrap();
    assert!(lease_b.starts_with(&net_b.prefix) && (100..=150).contains(&last), "{lease_b}");
    assert_eq!(
        manager.json(&["datacenter", "snapshot", "dc-b"])["reservations"],
        serde_json::json!([])
    );

    // A PXE bundle chosen for dc-a: its files are fetched into dc-a's worker cache and served
    // by their paths; dc-b's snapshot names none. Only a pxe_bundle artifact can be chosen.
    let tree = manager.dir.path().join("bundle");
    std::fs::create_dir_all(tree.join("custom")).unwrap();
    std::fs::write(tree.join("custom/hello.txt"), "from the bundle\n").unwrap();
    std::fs::write(tree.join("top.bin"), vec![5u8; 2000]).unwrap();
    let bundle = manager.dir.path().join("bundle.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-cf")
        .arg(&bundle)
        .args(["top.bin", "custom/hello.txt"]));
    let bundle = bundle.to_str().unwrap();
    manager.text(&["artifacts", "push", bundle, "--name", "site-bundle", "--kind", "pxe_bundle"]);
    manager.text(&["artifacts", "push", bundle, "--name", "not-a-bundle"]);
    let refused = manager.admin.refused(&["datacenter", "pxe-bundle", "dc-a", "not-a-bundle"]);
    assert!(refused.contains("not pxe_bundle"), "{refused}");
    let refused = manager.admin.refused(&[
        "datacenter",
        "discovery",
        "dc-a",
        "--kernel",
        "site-bundle",
        "--initrd",
        "site-bundle",
    ]);
    assert!(refused.contains("not kernel"), "{refused}");
    manager.text(&["datacenter", "pxe-bundle", "dc-a", "site-bundle"]);
    let generation = manager.generation("dc-a");
    manager.wait_for_generation("dc-a", generation);
    assert_eq!(
        manager.json(&["datacenter", "snapshot", "dc-a"])["boot"]["pxe_bundle"]["name"],
        "site-bundle"
    );
    assert!(manager.json(&["datacenter", "snapshot", "dc-b"])["boot"]["pxe_bundle"].is_null());
    // The manager hands a worker only its own datacenter's files, and only for its credential.
    let digest = manager.json(&["datacenter", "snapshot", "dc-a"])["boot"]["pxe_bundle"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let file_url = format!("{}/v1/worker-files/{digest}", manager.admin.process.api());
    let fetch_as = |token: Option<&str>| {
        let mut curl = Command::new("curl");
        curl.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &file_url]);
        if let Some(token) = token {
            curl.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        String::from_utf8(curl.output().unwrap().stdout).unwrap()
    };
    assert_eq!(fetch_as(Some(&tokens["dc-a"])), "200");
    assert_eq!(fetch_as(Some(&tokens["dc-b"])), "404", "not a file of dc-b's snapshot");
    assert_eq!(fetch_as(None), "401");
    assert_eq!(fetch_as(Some(&manager.admin.token)), "401", "admin tokens are not worker tokens");

    // Both workers are listed per datacenter, and filters by tag work.
    let listed = manager.json(&["workers", "list", "--tag", "site=dc-b"]);
    let ids: Vec<&str> =
        listed.as_array().unwrap().iter().map(|w| w["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["worker-b"]);
    // One JSON object per line.
    let events = manager.text(&["--json", "events", "--datacenter", "dc-a"]);
    let events: Vec<Value> = events.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(events.iter().all(|e| e["datacenter"] == "dc-a"), "{events:?}");
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(types.contains(&"worker_joined") && types.contains(&"snapshot_published"), "{types:?}");
    let refused = manager.admin.refused(&["datacenter", "delete", "dc-a"]);
    assert!(refused.contains("worker"), "{refused}");

    // Each worker's DHCP answers reach the event stream, in its own datacenter.
    let acked = |worker: &'static str, ip: Option<String>| {
        move |e: &Value| {
            e["type"] == "dhcp_replied"
                && e["worker"] == worker
                && e["mac"] == MAC
                && e["reply"] == "ack"
                && ip.as_ref().is_none_or(|ip| e["ip"] == ip.as_str())
        }
    };
    manager.wait_for_event("dc-a", 0, acked("worker-a", Some(reserved.clone())));
    manager.wait_for_event("dc-b", 0, acked("worker-b", Some(lease_b.clone())));
    let before_outage = manager.last_event_seq();

    // Manager and Redis down; dc-a's worker restarts and serves from its disk alone.
    manager.admin.process.terminate().unwrap();
    manager.redis.stop();
    worker_a.terminate().unwrap();
    let (worker_a, site_url) = manager.worker("worker-a", "dc-a", &tokens["dc-a"], &net_a);
    assert_eq!(net_a.dhcp(manager.dir.path()).as_deref(), Some(reserved.as_str()));
    let entry =
        net_a.http_get(&format!("{site_url}/boot.ipxe")).expect("the entry script is served");
    assert!(entry.starts_with("#!ipxe"), "{entry}");
    let script = net_a
        .http_get(&format!("{site_url}/boot/ipxe?mac={MAC}&arch=x86_64&platform=efi"))
        .expect("the machine script is served");
    assert!(script.contains("ctpf.token=ctpf_site_"), "{script}");

    // The bundle's files, offline, over HTTP and TFTP.
    let hello = net_a.http_get(&format!("{site_url}/custom/hello.txt"));
    assert_eq!(hello.as_deref(), Some("from the bundle\n"));
    let fetched = manager.dir.path().join("fetched-top.bin");
    run(Command::new("ip")
        .args(["netns", "exec", net_a.client.name(), "busybox", "tftp", "-g", "-r", "top.bin"])
        .arg("-l")
        .arg(&fetched)
        .arg(format!("{}.1", net_a.prefix)));
    assert_eq!(std::fs::read(&fetched).unwrap(), vec![5u8; 2000]);

    // TFTP serves from the worker's root too (busybox tftp plays a PXE ROM).
    let tftp_file = manager.dir.path().join("worker-a-data/tftp/loader.bin");
    std::fs::write(&tftp_file, vec![7u8; 3000]).unwrap();
    let fetched = manager.dir.path().join("fetched.bin");
    run(Command::new("ip")
        .args(["netns", "exec", net_a.client.name(), "busybox", "tftp", "-g", "-r", "loader.bin"])
        .arg("-l")
        .arg(&fetched)
        .arg(format!("{}.1", net_a.prefix)));
    assert_eq!(std::fs::read(&fetched).unwrap().len(), 3000);

    // The machine's callback is taken while everything upstream is down...
    let token_file = manager.dir.path().join("worker-a-data/site-enroll.token");
    let site_token = std::fs::read_to_string(token_file).unwrap();
    let report = serde_json::json!({"macs": [MAC], "arch": "x86_64"});
    let out = Command::new("timeout")
        .arg("30")
        .args([
            "ip",
            "netns",
            "exec",
            net_a.client.name(),
            "curl",
            "-sS",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .args(["-H", &format!("Authorization: Bearer {}", site_token.trim())])
        .args(["-H", "Content-Type: application/json", "--data", &report.to_string()])
        .arg(format!("{site_url}/v1/enroll"))
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.trim_end().ends_with("202"), "{answer}{}", String::from_utf8_lossy(&out.stderr));

    // ...and reaches the registries once Redis and the manager are back.
    manager.redis.restart().unwrap();
    manager.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hosts = manager.json(&["hosts", "list", "--datacenter", "dc-a"]);
        if hosts.as_array().unwrap().iter().any(|h| h["macs"][0] == MAC) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the queued callback never arrived: {hosts}\n{}",
            worker_a.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        manager.json(&["hosts", "list", "--datacenter", "dc-b"]).as_array().unwrap().is_empty(),
        "the host joined dc-a only"
    );

    // What the worker did for the machine during the outage was held and is reported now,
    // stamped with when it happened.
    let lease = manager.wait_for_event("dc-a", before_outage, acked("worker-a", Some(reserved)));
    assert!(lease["seq"].as_u64().unwrap() > before_outage, "{lease}");
    let boot = manager.wait_for_event("dc-a", before_outage, |e| {
        e["type"] == "http_boot" && e["path"] == "/boot/ipxe" && e["mac"] == MAC
    });
    assert_eq!(boot["status"], 200, "{boot}");
    assert_eq!(boot["client"], format!("{}.200", net_a.prefix), "{boot}");
    let sent = manager.wait_for_event("dc-a", before_outage, |e| {
        e["type"] == "tftp_transfer" && e["file"] == "loader.bin"
    });
    assert_eq!((sent["outcome"].as_str(), sent["bytes"].as_u64()), (Some("completed"), Some(3000)));
    let bundle_fetch = manager.wait_for_event("dc-a", before_outage, |e| {
        e["type"] == "http_boot" && e["path"] == "/custom/hello.txt"
    });
    assert_eq!(bundle_fetch["status"], 200, "{bundle_fetch}");
}
