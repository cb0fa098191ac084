//! Issue 6's offline acceptance with a real machine: a site worker keeps network-booting
//! machines from its last snapshot while the manager and Redis are down.
//!
//! `ctpf manager` (Redis, S3) has the discovery image built by a separate builder worker; a
//! site worker of datacenter `site`, with its own credential, serves DHCP, TFTP and HTTP boot
//! on a veth into the LAN's bridge. With the snapshot (and the discovery image it names) in
//! the worker's cache, the manager and Redis are stopped; a QEMU machine (SeaBIOS, TCG) then
//! PXE-boots through the worker alone into the discovery image, whose callback the worker
//! queues. Once Redis and the manager are back, the host appears in the registries.
//!
//! Needs root, qemu-system-x86, ipxe, and the unpacked kernel package `.ci/run` prepares.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use ctpf_e2e::{
    CtpfProcess, RedisServer, S3Server, UpAdmin, free_port,
    qemu::{BootLan, Firmware, Vm, VmSpec, discovery_agent, discovery_linux},
    unique_suffix,
};
use serde_json::Value;

const BOOT_TIMEOUT: Duration = Duration::from_secs(420);
const S3_CREDENTIALS: [(&str, &str); 2] =
    [("AWS_ACCESS_KEY_ID", S3Server::ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", S3Server::SECRET_KEY)];

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn manager(dir: &tempfile::TempDir, redis: &RedisServer, s3: &S3Server, log: &str) -> UpAdmin {
    let data = dir.path().join("manager");
    let (linux, agent) = (discovery_linux().unwrap(), discovery_agent().unwrap());
    let (url, endpoint) = (redis.url(), s3.endpoint());
    let args = [
        "manager",
        "--redis",
        &url,
        "--s3",
        &endpoint,
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--discovery-linux",
        linux.to_str().unwrap(),
        "--discovery-agent",
        agent.to_str().unwrap(),
        "--discovery-cmdline",
        "console=ttyS0",
    ];
    let process =
        CtpfProcess::start(&args, &S3_CREDENTIALS, dir.path().join(log), "listening on").unwrap();
    UpAdmin::new(process, &data).unwrap()
}

fn json(admin: &UpAdmin, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_slice(&admin.cli(&all)).unwrap()
}

fn wait_until(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> bool,
    logs: impl Fn() -> String,
) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what} did not happen within {limit:?}\n{}", logs());
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_site_worker_pxe_boots_a_machine_with_the_manager_and_redis_down() {
    let mut lan = BootLan::create().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start().unwrap();
    let s3 = S3Server::start().unwrap();
    let mut admin = manager(&dir, &redis, &s3, "manager.log");

    // The builder (trusted: the manager's Redis user) makes the discovery image into S3.
    let (url, endpoint) = (redis.url(), s3.endpoint());
    let builder_data = dir.path().join("builder");
    let _builder = CtpfProcess::start(
        &[
            "worker",
            "--redis",
            &url,
            "--s3",
            &endpoint,
            "--datacenter",
            "builders",
            "--role",
            "builder",
            "--id",
            "builder",
            "--data-dir",
            builder_data.to_str().unwrap(),
        ],
        &S3_CREDENTIALS,
        dir.path().join("builder.log"),
        "ready",
    )
    .unwrap();

    // The site's worker reaches the LAN's bridge through a veth of its own.
    let worker_if = format!("vsq{}", unique_suffix());
    run(Command::new("ip")
        .args(["link", "add", &worker_if, "type", "veth", "peer", "name", "wlan"])
        .args(["netns", lan.netns.name()]));
    lan.netns.ip(&["link", "set", "wlan", "master", "br0", "up"]).unwrap();
    let worker_ip = format!("10.78.{}.2", lan.subnet);
    run(Command::new("ip").args(["addr", "add", &format!("{worker_ip}/24"), "dev", &worker_if]));
    run(Command::new("ip").args(["link", "set", &worker_if, "up"]));

    admin.cli(&["datacenter", "add", "site"]);
    admin.cli(&[
        "datacenter",
        "dhcp",
        "site",
        "--mode",
        "authoritative",
        "--range",
        &lan.range(100, 150),
    ]);
    let token =
        String::from_utf8(admin.cli(&["worker", "token", "create", "--datacenter", "site"]))
            .unwrap();
    let listen = format!("{worker_ip}:{}", free_port().unwrap());
    let site_data = dir.path().join("site-worker");
    let mut worker = CtpfProcess::start(
        &[
            "worker",
            "--redis",
            &url,
            "--s3",
            &endpoint,
            "--datacenter",
            "site",
            "--role",
            "distributor",
            "--id",
            "site-worker",
            "--worker-token",
            token.trim(),
            "--boot-interface",
            &worker_if,
            "--ipv6-ra",
            "--http-listen",
            &listen,
            "--tftp-root",
            "/usr/lib/ipxe",
            "--data-dir",
            site_data.to_str().unwrap(),
        ],
        &S3_CREDENTIALS,
        dir.path().join("site-worker.log"),
        "ready",
    )
    .unwrap();

    // The worker serves a snapshot naming the discovery image once the builder made it.
    let mut generation = 0;
    wait_until(
        "a snapshot with the discovery image",
        Duration::from_secs(900),
        || {
            let out = admin.run(&["--json", "datacenter", "snapshot", "site"]).unwrap();
            let snapshot: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            generation = snapshot["generation"].as_u64().unwrap_or(0);
            !snapshot["boot"]["discovery"]["x86_64"].is_null()
        },
        || admin.process.log_text(),
    );
    wait_until(
        "the worker serving it",
        Duration::from_secs(120),
        || {
            let workers = json(&admin, &["workers", "list", "--datacenter", "site"]);
            workers[0]["generation"].as_u64().is_some_and(|g| g >= generation)
        },
        || worker.log_text(),
    );
    worker.wait_for_output("(tftp)", Duration::from_secs(60)).unwrap();

    // Everything upstream goes down; the machine boots through the worker alone.
    admin.process.terminate().unwrap();
    redis.stop();
    let machine = VmSpec {
        firmware: Firmware::Bios,
        nic: "virtio-net-pci",
        mac: "52:54:00:78:06:01".into(),
        uuid: "7c0a3f52-1b9e-4d55-8a61-000000000601".into(),
        nic_rom: true,
    };
    let mut vm = Vm::start(&mut lan, &machine, dir.path().join("vm.serial.log")).unwrap();
    let queued = vm.wait_for("the queued callback", BOOT_TIMEOUT, |vm| {
        vm.serial_text().contains("callback queued by the site's worker").then_some(())
    });
    if let Err(e) = queued {
        let log = worker.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!("{e}\nworker log (newest first):\n{}", tail.join("\n"));
    }
    println!("power-on to queued callback: {:.1} s", vm.started.elapsed().as_secs_f64());
    vm.stop();

    // Redis and the manager are back: the callback reaches the registries.
    redis.restart().unwrap();
    let admin = manager(&dir, &redis, &s3, "manager-2.log");
    wait_until(
        "the host record",
        Duration::from_secs(60),
        || {
            let hosts = json(&admin, &["hosts", "list", "--datacenter", "site"]);
            hosts.as_array().unwrap().iter().any(|h| {
                h["macs"][0] == machine.mac.as_str() && h["smbios_uuid"] == machine.uuid.as_str()
            })
        },
        || worker.log_text(),
    );

    // Every stage of that boot (DHCP, scripts, kernel), held by the worker through the
    // outage, is in the events.
    let seen = std::cell::RefCell::new(Vec::new());
    wait_until(
        "the boot's DHCP and HTTP events",
        Duration::from_secs(60),
        || {
            let out = admin.run(&["--json", "events", "--datacenter", "site"]).unwrap();
            let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|e| {
                    ["dhcp_replied", "tftp_transfer", "http_boot"]
                        .contains(&e["type"].as_str().unwrap_or(""))
                })
                .collect();
            let acked = events.iter().any(|e| {
                e["type"] == "dhcp_replied"
                    && e["mac"] == machine.mac.as_str()
                    && e["reply"] == "ack"
            });
            // QEMU's NIC ROM is iPXE, so DHCP sends it straight to the HTTP script (no TFTP;
            // `sites.rs` covers TFTP events).
            let script = events.iter().any(|e| {
                e["type"] == "http_boot"
                    && e["path"] == "/boot/ipxe"
                    && e["mac"] == machine.mac.as_str()
            });
            let kernel = events.iter().any(|e| {
                e["type"] == "http_boot"
                    && e["path"] == "/boot/discovery/x86_64/vmlinuz"
                    && e["status"] == 200
            });
            *seen.borrow_mut() = events;
            acked && script && kernel
        },
        || format!("{:#?}", seen.borrow()),
    );
    for e in seen.borrow().iter() {
        let what = match e["type"].as_str().unwrap_or("") {
            "dhcp_replied" => format!("dhcp {} {} {}", e["reply"], e["ip"], e["boot_file"]),
            "tftp_transfer" => format!("tftp {} {} bytes {}", e["file"], e["bytes"], e["outcome"]),
            _ => format!("http {} {} {} bytes", e["path"], e["status"], e["bytes"]),
        };
        println!("{} {what}", e["at"].as_str().unwrap_or("?"));
    }
}
