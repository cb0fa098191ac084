//! The agent against a tiny HTTP server on 127.0.0.1:0 that plays ctpf's `POST /v1/enroll`.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use ctpf_common::{HostReport, MacAddr};
use ctpf_discovery_agent::enroll::{EnrollError, RetryPolicy};
use ctpf_discovery_agent::inventory::Root;
use ctpf_discovery_agent::{AgentError, Config, run};

const HOST_ID: &str = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b";
const TOKEN: &str = "tok_0123456789abcdef";

/// A request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    request_line: String,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Answers each request with the next of `answers` (the last one repeats) and records it.
struct Server {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Server {
    fn start(answers: Vec<(u16, String)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let n = seen.lock().unwrap().len();
                            let (status, body) = &answers[n.min(answers.len() - 1)];
                            let request = read_request(&stream);
                            // Recorded before answering, so the agent never returns first.
                            seen.lock().unwrap().push(request);
                            respond(stream, *status, body);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Self { url, seen, stop, thread: Some(thread) }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// Reads one request: headers, then a `Content-Length` body.
fn read_request(stream: &TcpStream) -> Seen {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .expect("the agent sends a Content-Length");
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    Seen { request_line: request_line.trim_end().to_owned(), headers, body }
}

fn respond(mut stream: TcpStream, status: u16, body: &str) {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        403 => "Forbidden",
        _ => "Service Unavailable",
    };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
}

/// A `Host` as the real server returns it.
fn host_json() -> String {
    serde_json::json!({
        "id": HOST_ID,
        "datacenter": "fra1",
        "hostname": null,
        "macs": ["52:54:00:12:34:56"],
        "smbios_uuid": "4c4c4544-0035-3010-8052-b4c04f4b4d32",
        "arch": "x86_64",
        "state": "discovered",
        "addresses": [],
        "labels": {},
        "inventory": {},
        "created_at": "2026-05-01T10:00:00Z",
        "updated_at": "2026-05-01T10:00:00Z"
    })
    .to_string()
}

fn write(root: &Path, rel: &str, content: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// A machine with one NIC plus `lo`, and a kernel command line pointing at `url`.
fn machine(url: &str) -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
    write(root, "sys/class/net/eth0/address", "52:54:00:12:34:56\n");
    std::fs::create_dir_all(root.join("sys/class/net/eth0/device")).unwrap();
    write(root, "sys/class/dmi/id/product_uuid", "4C4C4544-0035-3010-8052-B4C04F4B4D32\n");
    write(root, "proc/cpuinfo", "processor\t: 0\nmodel name\t: QEMU Virtual CPU\n");
    write(root, "proc/meminfo", "MemTotal:        2000000 kB\n");
    write(root, "sys/block/vda/size", "20971520\n");
    write(
        root,
        "cmdline",
        &format!("initrd=initrd ctpf.url={url}/ ctpf.token={TOKEN} ctpf.mac=52:54:00:12:34:56\n"),
    );
    let config = Config {
        root: Root::new(root),
        cmdline: root.join("cmdline"),
        once: true,
        retry: RetryPolicy {
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
            give_up_after: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        },
    };
    (dir, config)
}

#[test]
fn enrolls_and_prints_the_host() {
    let server = Server::start(vec![(201, host_json())]);
    let (_dir, config) = machine(&server.url);
    let mut out = Vec::new();
    run(&config, &mut out).unwrap();

    let out = String::from_utf8(out).unwrap();
    assert!(out.lines().all(|l| l.starts_with("ctpf-agent: ")), "{out}");
    let enrolled = format!("ctpf-agent: enrolled host {HOST_ID} in datacenter fra1");
    assert_eq!(out.lines().filter(|l| l.starts_with("ctpf-agent: enrolled host")).count(), 1);
    assert_eq!(out.lines().last(), Some(enrolled.as_str()), "{out}");
    assert!(!out.contains(TOKEN), "the token is never printed: {out}");

    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.request_line, "POST /v1/enroll HTTP/1.1");
    assert_eq!(request.header("authorization"), Some(format!("Bearer {TOKEN}").as_str()));
    assert_eq!(request.header("content-type"), Some("application/json"));
    let report: HostReport = serde_json::from_slice(&request.body).unwrap();
    report.validate().unwrap();
    assert_eq!(report.macs, ["52:54:00:12:34:56".parse::<MacAddr>().unwrap()]);
    assert_eq!(report.smbios_uuid.unwrap().to_string(), "4c4c4544-0035-3010-8052-b4c04f4b4d32");
    assert_eq!(report.inventory.cpu_model.as_deref(), Some("QEMU Virtual CPU"));
    assert_eq!(report.inventory.memory_bytes, Some(2_000_000 * 1024));
    assert_eq!(report.inventory.disks[0].size_bytes, 20_971_520 * 512);
}

#[test]
fn forbidden_is_final() {
    let body = r#"{"error":{"code":"forbidden","message":"enrollment token is used up"}}"#;
    let server = Server::start(vec![(403, body.to_owned())]);
    let (_dir, config) = machine(&server.url);
    let mut out = Vec::new();
    let err = run(&config, &mut out).unwrap_err();

    match &err {
        AgentError::Enroll(EnrollError::Rejected { status: 403, message }) => {
            assert_eq!(message, "forbidden: enrollment token is used up");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("HTTP 403"), "{err}");
    // A retry would have come after 10 ms; give it ample time to show up.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(server.seen().len(), 1);
    assert!(!String::from_utf8(out).unwrap().contains("enrolled host"));
}

#[test]
fn server_errors_are_retried() {
    let unavailable = r#"{"error":{"code":"unavailable","message":"state store busy"}}"#;
    let server = Server::start(vec![(503, unavailable.to_owned()), (200, host_json())]);
    let (_dir, config) = machine(&server.url);
    let mut out = Vec::new();
    run(&config, &mut out).unwrap();

    assert_eq!(server.seen().len(), 2);
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("attempt 1 failed: HTTP 503: unavailable: state store busy"), "{out}");
    assert!(out.contains("already knew this machine"), "{out}");
    assert!(out.contains(&format!("ctpf-agent: enrolled host {HOST_ID} in datacenter fra1")));
}

#[test]
fn gives_up_when_the_server_stays_away() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (_dir, mut config) = machine(&format!("http://127.0.0.1:{port}"));
    config.retry.give_up_after = Duration::from_millis(100);
    let err = run(&config, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(err, AgentError::Enroll(EnrollError::GaveUp { attempts, .. }) if attempts > 1),
        "{err:?}"
    );
}

#[test]
fn missing_settings_stop_the_agent() {
    let (dir, config) = machine("http://127.0.0.1:9");
    write(dir.path(), "cmdline", "quiet console=ttyS0\n");
    let err = run(&config, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("ctpf.url"), "{err}");

    let config = Config { cmdline: dir.path().join("absent"), ..config };
    let err = run(&config, &mut Vec::new()).unwrap_err();
    assert!(matches!(err, AgentError::ReadCmdline { .. }), "{err:?}");
}
