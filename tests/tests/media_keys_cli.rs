//! `ctpf media-keys` as an operator uses it against `ctpf up` (the real binary): create with
//! `--ttl 30d`, show the same secret again, list, enroll two machines with it, revoke, and
//! be refused after.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::Path;

use ctpf_e2e::{CtpfProcess, ctpf_cli};
use serde_json::{Value, json};

struct Up {
    process: CtpfProcess,
    token: String,
}

impl Up {
    fn start(data: &Path) -> Self {
        let log = data.parent().unwrap().join("up.log");
        let args = ["up", "--data-dir", data.to_str().unwrap(), "--api", "http://127.0.0.1:0"];
        let process = CtpfProcess::start(&args, &[], log, "listening on").unwrap();
        let token = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_owned();
        Self { process, token }
    }

    /// The CLI's output and whether it succeeded.
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let env = [("CTPF_API", self.process.api()), ("CTPF_TOKEN", self.token.as_str())];
        let out = ctpf_cli(args, &env).unwrap();
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        (out.status.success(), text(out.stdout), text(out.stderr))
    }

    /// stdout of a command that must succeed.
    fn cli(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.run(args);
        assert!(ok, "ctpf {args:?} failed: {stderr}\n{}", self.process.log_text());
        stdout
    }

    async fn enroll(&self, secret: &str, mac: &str) -> (reqwest::StatusCode, Value) {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/enroll", self.process.api()))
            .bearer_auth(secret)
            .json(&json!({"macs": [mac], "arch": "x86_64"}))
            .send()
            .await
            .unwrap();
        (response.status(), response.json().await.unwrap())
    }
}

#[tokio::test]
async fn media_keys_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(&dir.path().join("data"));
    up.cli(&["datacenter", "add", "lab"]);

    // The secret alone on stdout; show prints the same one again.
    let (ok, stdout, stderr) =
        up.run(&["media-keys", "create", "usb", "--datacenter", "lab", "--ttl", "30d"]);
    assert!(ok, "{stderr}");
    let secret = stdout.trim().to_owned();
    assert!(secret.starts_with("ctpf_mk_") && secret.len() == 72, "{stdout}");
    assert!(stderr.contains("media key usb created: datacenter lab"), "{stderr}");
    assert_eq!(up.cli(&["media-keys", "show", "usb"]).trim(), secret);
    let shown: Value =
        serde_json::from_str(&up.cli(&["media-keys", "show", "usb", "--json"])).unwrap();
    assert_eq!(shown["secret"], secret.as_str());

    // Bad input is refused before anything is sent, or by the server, with the reason.
    let (ok, _, err) =
        up.run(&["media-keys", "create", "x", "--datacenter", "lab", "--ttl", "400d"]);
    assert!(!ok && err.contains("365d"), "{err}");
    let (ok, _, err) = up.run(&["media-keys", "create", "x", "--datacenter", "lab", "--ttl", "1w"]);
    assert!(!ok && err.contains("s, m, h or d"), "{err}");
    let (ok, _, err) = up.run(&["media-keys", "create", "x", "--datacenter", "lab"]);
    assert!(!ok && err.contains("--ttl"), "{err}");
    let (ok, _, err) =
        up.run(&["media-keys", "create", "usb", "--datacenter", "lab", "--ttl", "60"]);
    assert!(!ok && err.contains("409"), "{err}");
    let (ok, _, err) =
        up.run(&["media-keys", "create", "x", "--datacenter", "nowhere", "--ttl", "1h"]);
    assert!(!ok && err.contains("404"), "{err}");

    // Two machines enroll with it: two hosts in lab, counted.
    for mac in ["52:54:00:ee:00:01", "52:54:00:ee:00:02"] {
        let (status, host) = up.enroll(&secret, mac).await;
        assert_eq!(status, reqwest::StatusCode::CREATED, "{host}");
        assert_eq!(host["datacenter"], "lab");
    }
    let table = up.cli(&["media-keys", "list"]);
    assert!(table.contains("ENROLLMENTS") && table.contains("REVOKED"), "{table}");
    let row = table.lines().find(|l| l.contains("usb")).unwrap();
    assert!(row.contains("lab") && row.trim_end().ends_with('2'), "{table}");
    assert!(!table.contains(&secret), "{table}");
    let listed: Value = serde_json::from_str(&up.cli(&["media-keys", "list", "--json"])).unwrap();
    assert!(listed[0].get("secret").is_none(), "{listed}");
    let other = up.cli(&["media-keys", "list", "--datacenter", "local"]);
    assert!(!other.contains("usb"), "{other}");

    // Revoked: refused from then on, and the list says so.
    let out = up.cli(&["media-keys", "revoke", "usb"]);
    assert!(out.contains("media key usb revoked"), "{out}");
    up.cli(&["media-keys", "revoke", "usb"]);
    let (status, body) = up.enroll(&secret, "52:54:00:ee:00:03").await;
    assert_eq!(status, reqwest::StatusCode::FORBIDDEN, "{body}");
    let row = up.cli(&["media-keys", "list"]);
    let row = row.lines().find(|l| l.contains("usb")).unwrap().to_owned();
    assert!(!row.contains(" - "), "{row}");
    // The secret is in no log line.
    assert!(!up.process.log_text().contains(&secret));
}
