//! The manager API through its real router, backed by the embedded stores: auth, input
//! errors that name the field, round trips of every resource, tag filters, and the
//! OpenAPI drift check.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::sync::Arc;

use axum::{
    Router,
    body::Body,
    http::{Method, Request, StatusCode, header},
};
use ctpf_bus::{BusConfig, MemoryBus};
use ctpf_manager::api::{AppState, router_and_spec};
use ctpf_registries::{Registry, TokenRole, generate_token};
use ctpf_store::{artifacts::FsArtifactStore, state::RedbStateStore};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

struct Api {
    router: Router,
    spec: utoipa::openapi::OpenApi,
    token: String,
    _dir: tempfile::TempDir,
}

async fn api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(RedbStateStore::open(&dir.path().join("state.redb")).unwrap());
    let artifacts = Arc::new(FsArtifactStore::open(dir.path().join("artifacts")).await.unwrap());
    let registry = Registry::new(state, Arc::new(MemoryBus::new(BusConfig::default())));
    let token = generate_token();
    registry.register_token(&token, "test", TokenRole::Admin).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let boot = ctpf_manager::api::boot::BootSettings {
        base_url: ctpf_scripts::BaseUrl::parse("base_url", "http://10.77.0.1:7480").unwrap(),
        datacenter: "local".parse().unwrap(),
        discovery_cmdline: String::new(),
    };
    let (router, spec) = router_and_spec(AppState {
        registry,
        artifacts,
        shutdown,
        boot,
        sites: Default::default(),
        boot_events: Default::default(),
    });
    Api { router, spec, token, _dir: dir }
}

impl Api {
    async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let (status, bytes) = self.raw(req.body(body).unwrap()).await;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        (status, value)
    }

    async fn raw(&self, req: Request<Body>) -> (StatusCode, Vec<u8>) {
        let response = self.router.clone().oneshot(req).await.unwrap();
        let status = response.status();
        (status, response.into_body().collect().await.unwrap().to_bytes().to_vec())
    }

    fn get(&self, uri: &str) -> Request<Body> {
        Request::get(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Body::empty())
            .unwrap()
    }

    /// An unauthenticated GET, as a booting machine makes it; the body as text.
    async fn get_text(&self, uri: String) -> (StatusCode, String) {
        let (status, bytes) = self.raw(Request::get(uri).body(Body::empty()).unwrap()).await;
        (status, String::from_utf8(bytes).unwrap())
    }

    /// `POST /v1/enroll` with an enrollment token instead of the admin token.
    async fn enroll(&self, token: String, report: Value) -> (StatusCode, Value) {
        let req = Request::post("/v1/enroll")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(report.to_string()))
            .unwrap();
        let (status, bytes) = self.raw(req).await;
        (status, serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null))
    }

    async fn upload(&self, name: &str, query: &str, data: &[u8]) -> (StatusCode, Value) {
        let req = Request::put(format!("/v1/artifacts/{name}{query}"))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Body::from(data.to_vec()))
            .unwrap();
        let (status, bytes) = self.raw(req).await;
        (status, serde_json::from_slice(&bytes).unwrap())
    }
}

/// Asserts a 400 whose error names `field`.
fn assert_invalid(got: (StatusCode, Value), field: &str) {
    assert_eq!(got.0, StatusCode::BAD_REQUEST, "{}", got.1);
    assert_eq!(got.1["error"]["code"], "invalid_input", "{}", got.1);
    assert_eq!(got.1["error"]["field"], field, "{}", got.1);
}

fn names(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap().to_owned()).collect()
}

fn count(v: &Value) -> usize {
    v.as_array().unwrap().len()
}

#[tokio::test]
async fn every_route_but_health_needs_a_token() {
    let api = api().await;
    let zero_token = format!("Bearer ctpf_{}", "0".repeat(64));
    let mut checked = 0;
    for (path, item) in &api.spec.paths.paths {
        let uri = path
            .replace("{name}", "x")
            .replace("{id}", "01a1fe3a-fc16-7299-afa0-4bbd2fcb22e5")
            .replace("{digest}", &ctpf_common::Sha256Digest::of(b"").to_string());
        let methods = [
            (Method::GET, item.get.is_some()),
            (Method::POST, item.post.is_some()),
            (Method::PUT, item.put.is_some()),
            (Method::DELETE, item.delete.is_some()),
            (Method::PATCH, item.patch.is_some()),
        ];
        for (method, present) in methods {
            if !present {
                continue;
            }
            for auth in [None, Some("Bearer nope"), Some(zero_token.as_str()), Some("Basic YTpi")] {
                let mut req = Request::builder().method(method.clone()).uri(&uri);
                if let Some(auth) = auth {
                    req = req.header(header::AUTHORIZATION, auth);
                }
                let (status, body) = api.raw(req.body(Body::empty()).unwrap()).await;
                if path == "/healthz" || path.starts_with("/boot") {
                    // Booting machines have no token; these routes never need one.
                    assert_ne!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
                } else if path == "/v1/enroll" && auth.is_some_and(|a| a.starts_with("Bearer")) {
                    // Enrollment tokens are refused as such: 403 (no token at all is 401).
                    assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path} with {auth:?}");
                } else {
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} with {auth:?}");
                    let body: Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(body["error"]["code"], "unauthorized");
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 60, "only {checked} route checks");
}

#[tokio::test]
async fn bad_input_names_the_field() {
    let api = api().await;
    let post = |uri: &'static str, v: Value| api.call(Method::POST, uri, Some(v));
    assert_invalid(post("/v1/datacenters", json!({"name": "Home"})).await, "name");
    assert_invalid(
        post("/v1/datacenters", json!({"name": "home", "tags": ["site"]})).await,
        "tags[0]",
    );
    assert_invalid(post("/v1/datacenters", json!({"name": "home", "extra": 1})).await, "extra");
    assert_invalid(api.call(Method::GET, "/v1/datacenters?tag=nope", None).await, "tag");
    assert_invalid(api.call(Method::GET, "/v1/datacenters?colour=red", None).await, "colour");
    post("/v1/datacenters", json!({"name": "home"})).await;
    let host = json!({"datacenter": "home", "macs": ["52:54:00:00:00:01", "not-a-mac"]});
    let (status, body) = post("/v1/hosts", host).await;
    assert_invalid((status, body.clone()), "macs[1]");
    assert!(body["error"]["message"].as_str().unwrap().contains("not-a-mac"));
    assert_invalid(post("/v1/hosts", json!({"datacenter": "home", "macs": []})).await, "macs");
    assert_invalid(api.call(Method::GET, "/v1/hosts/not-a-uuid", None).await, "id");
    let key = json!({"name": "k", "public_key": "ssh-ed25519 !!"});
    assert_invalid(post("/v1/keys", key).await, "public_key");
    assert_invalid(post("/v1/jobs", json!({"spec": {"kind": "rm-rf"}})).await, "spec.kind");
    let job = json!({"spec": {"kind": "probe"}, "selector": "a=1,a=2"});
    assert_invalid(post("/v1/jobs", job).await, "selector");
    assert_invalid(api.call(Method::GET, "/v1/events?after=-1", None).await, "after");
    assert_invalid(api.upload("..%2Fetc", "", b"x").await, "name");
    assert_invalid(api.upload("ok.bin", "?digest=sha256:00", b"x").await, "digest");
    // Not JSON at all, and the wrong content type.
    let req = Request::post("/v1/datacenters")
        .header(header::AUTHORIZATION, format!("Bearer {}", api.token))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{"))
        .unwrap();
    assert_eq!(api.raw(req).await.0, StatusCode::BAD_REQUEST);
    let req = Request::post("/v1/datacenters")
        .header(header::AUTHORIZATION, format!("Bearer {}", api.token))
        .body(Body::from(r#"{"name":"x"}"#))
        .unwrap();
    assert_eq!(api.raw(req).await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn datacenters_round_trip_with_tag_filters() {
    let api = api().await;
    let new = json!({"name": "home", "tags": ["site=flat", "tier=lab"]});
    let (status, dc) = api.call(Method::POST, "/v1/datacenters", Some(new)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(dc["tags"], json!(["site=flat", "tier=lab"]));
    let rack = json!({"name": "rack", "tags": ["site=dc1", "tier=lab"]});
    api.call(Method::POST, "/v1/datacenters", Some(rack)).await;
    let again = api.call(Method::POST, "/v1/datacenters", Some(json!({"name": "home"}))).await;
    assert_eq!(again.0, StatusCode::CONFLICT);

    let list = |q: &'static str| api.call(Method::GET, q, None);
    assert_eq!(names(&list("/v1/datacenters").await.1), ["home", "rack"]);
    assert_eq!(names(&list("/v1/datacenters?tag=site=flat").await.1), ["home"]);
    assert_eq!(names(&list("/v1/datacenters?tag=tier=lab").await.1), ["home", "rack"]);
    assert_eq!(names(&list("/v1/datacenters?tag=tier=lab&tag=site=dc1").await.1), ["rack"]);
    assert!(names(&list("/v1/datacenters?tag=site=mars").await.1).is_empty());
    assert_eq!(list("/v1/datacenters/home").await.1, dc);
    assert_eq!(list("/v1/datacenters/nowhere").await.0, StatusCode::NOT_FOUND);

    // A datacenter with hosts is only deleted by force, and takes its hosts with it.
    let host = json!({"datacenter": "home", "macs": ["52:54:00:00:00:01"]});
    let (status, host) = api.call(Method::POST, "/v1/hosts", Some(host)).await;
    assert_eq!(status, StatusCode::CREATED);
    let delete = |q: &'static str| api.call(Method::DELETE, q, None);
    assert_eq!(delete("/v1/datacenters/home").await.0, StatusCode::CONFLICT);
    assert_eq!(delete("/v1/datacenters/home?force=true").await.0, StatusCode::NO_CONTENT);
    let uri = format!("/v1/hosts/{}", host["id"].as_str().unwrap());
    assert_eq!(api.call(Method::GET, &uri, None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(delete("/v1/datacenters/rack").await.0, StatusCode::NO_CONTENT);
    assert_eq!(delete("/v1/datacenters/rack").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn hosts_round_trip_and_keep_one_identity() {
    let api = api().await;
    let post = |uri: &'static str, v: Value| api.call(Method::POST, uri, Some(v));
    post("/v1/datacenters", json!({"name": "home", "tags": ["site=flat"]})).await;
    post("/v1/datacenters", json!({"name": "cloud", "tags": ["site=hetzner"]})).await;
    let uuid = "4c4c4544-0042-3510-8051-b3c04f333231";
    let new = json!({"datacenter": "home", "hostname": "t410", "macs": ["52-54-00-AA-00-01"],
        "arch": "x86_64", "smbios_uuid": uuid, "addresses": ["10.0.0.5"], "labels": ["gpu=no"]});
    let (status, host) = post("/v1/hosts", new).await;
    assert_eq!(status, StatusCode::CREATED, "{host}");
    assert_eq!(host["macs"], json!(["52:54:00:aa:00:01"]));
    assert_eq!(host["state"], "discovered");
    let uri = format!("/v1/hosts/{}", host["id"].as_str().unwrap());
    assert_eq!(api.call(Method::GET, &uri, None).await.1, host);

    // The same MAC or SMBIOS UUID cannot become a second host; an unknown datacenter is 404.
    let same_mac = json!({"datacenter": "home", "macs": ["52:54:00:aa:00:01"]});
    assert_eq!(post("/v1/hosts", same_mac).await.0, StatusCode::CONFLICT);
    let same_uuid = json!({"datacenter": "home", "smbios_uuid": uuid});
    assert_eq!(post("/v1/hosts", same_uuid).await.0, StatusCode::CONFLICT);
    let nowhere = json!({"datacenter": "mars", "macs": ["52:54:00:aa:00:09"]});
    assert_eq!(post("/v1/hosts", nowhere).await.0, StatusCode::NOT_FOUND);
    post("/v1/hosts", json!({"datacenter": "cloud", "macs": ["52:54:00:bb:00:01"]})).await;

    // Filters: a host matches its own labels and its datacenter's tags.
    let list = |q: &'static str| api.call(Method::GET, q, None);
    assert_eq!(count(&list("/v1/hosts").await.1), 2);
    assert_eq!(count(&list("/v1/hosts?tag=site=flat").await.1), 1);
    assert_eq!(count(&list("/v1/hosts?tag=gpu=no").await.1), 1);
    assert_eq!(count(&list("/v1/hosts?tag=site=flat&tag=gpu=yes").await.1), 0);
    assert_eq!(count(&list("/v1/hosts?datacenter=cloud").await.1), 1);

    assert_eq!(api.call(Method::DELETE, &uri, None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.call(Method::GET, &uri, None).await.0, StatusCode::NOT_FOUND);
}

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl admin@laptop";

#[tokio::test]
async fn keys_round_trip() {
    let api = api().await;
    let dc = json!({"name": "home", "tags": ["site=flat"]});
    api.call(Method::POST, "/v1/datacenters", Some(dc)).await;
    let new = json!({"name": "admin", "public_key": KEY, "datacenter": "home"});
    let (status, key) = api.call(Method::POST, "/v1/keys", Some(new)).await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    assert!(key["fingerprint"].as_str().unwrap().starts_with("SHA256:"));
    assert_eq!(key["public_key"], KEY);
    assert_eq!(api.call(Method::GET, "/v1/keys/admin", None).await.1, key);
    let dup = json!({"name": "admin", "public_key": KEY});
    assert_eq!(api.call(Method::POST, "/v1/keys", Some(dup)).await.0, StatusCode::CONFLICT);
    assert_eq!(count(&api.call(Method::GET, "/v1/keys?tag=site=flat", None).await.1), 1);
    assert_eq!(count(&api.call(Method::GET, "/v1/keys?tag=site=moon", None).await.1), 0);
    assert_eq!(api.call(Method::DELETE, "/v1/keys/admin", None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.call(Method::GET, "/v1/keys/admin", None).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn artifacts_upload_download_and_verify() {
    let api = api().await;
    let data = b"#!ipxe\necho hello\n".repeat(1000);
    let (status, art) = api.upload("hello.ipxe", "?kind=script&tag=arch=x86_64", &data).await;
    assert_eq!(status, StatusCode::CREATED, "{art}");
    let digest = ctpf_common::Sha256Digest::of(&data).to_string();
    assert_eq!(art["digest"], digest);
    assert_eq!(art["size"], data.len());
    assert_eq!(art["kind"], "script");

    let response = api.router.clone().oneshot(api.get("/v1/artifacts/hello.ipxe/content")).await;
    let response = response.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::ETAG], format!("\"{digest}\""));
    assert_eq!(response.headers()[header::CONTENT_LENGTH], data.len().to_string());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.as_ref(), data.as_slice());
    let (status, bytes) = api.raw(api.get(&format!("/v1/blobs/{digest}"))).await;
    assert_eq!((status, bytes.as_slice()), (StatusCode::OK, data.as_slice()));

    // A wrong expected digest stores nothing and keeps the old version of the name.
    let wrong = ctpf_common::Sha256Digest::of(b"other").to_string();
    let query = format!("?digest={wrong}");
    assert_invalid(api.upload("hello.ipxe", &query, b"new content").await, "digest");
    let current = api.call(Method::GET, "/v1/artifacts/hello.ipxe", None).await.1;
    assert_eq!(current["digest"], digest);
    // The right one is accepted.
    let new = ctpf_common::Sha256Digest::of(b"new content").to_string();
    let query = format!("?digest={new}&tag=arch=x86_64");
    assert_eq!(api.upload("hello.ipxe", &query, b"new content").await.1["digest"], new);

    api.upload("vmlinuz", "?kind=kernel", b"kernel").await;
    let list = |q: &'static str| api.call(Method::GET, q, None);
    assert_eq!(names(&list("/v1/artifacts").await.1), ["hello.ipxe", "vmlinuz"]);
    assert_eq!(names(&list("/v1/artifacts?kind=kernel").await.1), ["vmlinuz"]);
    assert_eq!(names(&list("/v1/artifacts?tag=arch=x86_64").await.1), ["hello.ipxe"]);
    assert_invalid(list("/v1/artifacts?kind=floppy").await, "kind");
    assert_eq!(
        api.call(Method::DELETE, "/v1/artifacts/vmlinuz", None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(api.raw(api.get("/v1/artifacts/vmlinuz/content")).await.0, StatusCode::NOT_FOUND);
    // Content stays addressable by digest after its name is gone.
    let kernel = format!("/v1/blobs/{}", ctpf_common::Sha256Digest::of(b"kernel"));
    assert_eq!(api.raw(api.get(&kernel)).await.0, StatusCode::OK);
}

#[tokio::test]
async fn jobs_and_events_round_trip() {
    let api = api().await;
    let dc = json!({"name": "home", "tags": ["site=flat"]});
    api.call(Method::POST, "/v1/datacenters", Some(dc)).await;
    let new = json!({"spec": {"kind": "probe", "sleep_ms": 5}, "selector": "datacenter=home"});
    let (status, job) = api.call(Method::POST, "/v1/jobs", Some(new)).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    assert_eq!(job["status"], "queued");
    let uri = format!("/v1/jobs/{}", job["id"].as_str().unwrap());
    // No worker heartbeats in this test: the job says what it waits for.
    let (_, mut shown) = api.call(Method::GET, &uri, None).await;
    assert_eq!(shown["waiting_for"], "no live worker matches datacenter=home");
    shown.as_object_mut().unwrap().remove("waiting_for");
    assert_eq!(shown, job);
    api.call(Method::POST, "/v1/jobs", Some(json!({"spec": {"kind": "probe"}}))).await;
    let list = |q: &'static str| api.call(Method::GET, q, None);
    assert_eq!(count(&list("/v1/jobs").await.1), 2);
    assert_eq!(count(&list("/v1/jobs?tag=site=flat").await.1), 1);
    assert_eq!(count(&list("/v1/jobs?datacenter=home").await.1), 1);

    let (_, events) = list("/v1/events").await;
    let types: Vec<_> =
        events.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect();
    assert_eq!(types, ["datacenter_created", "job_queued", "job_queued"]);
    assert_eq!(count(&list("/v1/events?tag=site=flat").await.1), 2);
    assert_eq!(count(&list("/v1/events?after=2").await.1), 1);
    assert_eq!(count(&list("/v1/events?after=3&wait=1").await.1), 0);
}

#[tokio::test]
async fn datacenters_carry_dhcp_settings_reservations_and_worker_credentials() {
    let api = api().await;
    api.call(Method::POST, "/v1/datacenters", Some(json!({"name": "dc-a"}))).await;
    let dhcp = json!({"dhcp": {"mode": "authoritative", "range": ["10.9.0.100", "10.9.0.199"]}});
    let (status, dc) = api.call(Method::PATCH, "/v1/datacenters/dc-a", Some(dhcp)).await;
    assert_eq!(status, StatusCode::OK, "{dc}");
    assert_eq!(dc["dhcp"]["mode"], "authoritative");
    let backwards = json!({"dhcp": {"mode": "authoritative", "range": ["10.9.0.9", "10.9.0.1"]}});
    assert_invalid(
        api.call(Method::PATCH, "/v1/datacenters/dc-a", Some(backwards)).await,
        "dhcp.range",
    );
    let typo = json!({"dhcp": {"mode": "authoritative", "rnage": []}});
    assert_eq!(
        api.call(Method::PATCH, "/v1/datacenters/dc-a", Some(typo)).await.0,
        StatusCode::BAD_REQUEST
    );

    let reserve = |mac: &str, ip: &str| json!({"mac": mac, "ip": ip});
    let uri = "/v1/datacenters/dc-a/reservations";
    let (status, _) =
        api.call(Method::POST, uri, Some(reserve("52:54:00:00:00:01", "10.9.0.5"))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, taken) =
        api.call(Method::POST, uri, Some(reserve("52:54:00:00:00:02", "10.9.0.5"))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{taken}");
    assert_invalid(api.call(Method::POST, uri, Some(reserve("nope", "10.9.0.6"))).await, "mac");
    assert_eq!(count(&api.call(Method::GET, uri, None).await.1), 1);
    let one = "/v1/datacenters/dc-a/reservations/52:54:00:00:00:01";
    assert_eq!(api.call(Method::DELETE, one, None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.call(Method::DELETE, one, None).await.0, StatusCode::NOT_FOUND);
    // Published by the manager's publisher, which this router-only test does not run.
    assert_eq!(
        api.call(Method::GET, "/v1/datacenters/dc-a/snapshot", None).await.0,
        StatusCode::NOT_FOUND
    );

    let (status, issued) =
        api.call(Method::POST, "/v1/worker-credentials", Some(json!({"datacenter": "dc-a"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    assert!(issued["token"].as_str().unwrap().starts_with("ctpf_wk_"));
    let (_, listed) = api.call(Method::GET, "/v1/worker-credentials?datacenter=dc-a", None).await;
    assert_eq!(count(&listed), 1);
    assert!(listed.to_string().find("token").is_none(), "listing never shows the secret: {listed}");
    let ghost = json!({"datacenter": "nowhere"});
    assert_eq!(
        api.call(Method::POST, "/v1/worker-credentials", Some(ghost)).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, _) = api.call(Method::DELETE, "/v1/datacenters/dc-a", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "a live credential keeps the datacenter");
    let revoke = format!("/v1/worker-credentials/{}/revoke", issued["id"].as_str().unwrap());
    let (status, revoked) = api.call(Method::POST, &revoke, None).await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert!(revoked["revoked_at"].is_string());
    assert_eq!(api.call(Method::GET, "/v1/workers", None).await.1, json!([]));
    assert_eq!(
        api.call(Method::DELETE, "/v1/datacenters/dc-a", None).await.0,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn a_queued_job_is_cancelled_at_once_and_only_once() {
    let api = api().await;
    // No worker runs in this test, so the job stays queued.
    let new = json!({"spec": {"kind": "probe", "sleep_ms": 60000}});
    let (_, job) = api.call(Method::POST, "/v1/jobs", Some(new)).await;
    let cancel = format!("/v1/jobs/{}/cancel", job["id"].as_str().unwrap());
    let (status, cancelled) = api.call(Method::POST, &cancel, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["cancel_requested"], true);
    let (status, again) = api.call(Method::POST, &cancel, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert!(again["error"]["message"].as_str().unwrap().contains("already cancelled"), "{again}");
    let unknown = format!("/v1/jobs/{}/cancel", ctpf_common::Uuid::nil());
    assert_eq!(api.call(Method::POST, &unknown, None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        api.call(Method::POST, "/v1/jobs/nope/cancel", None).await.0,
        StatusCode::BAD_REQUEST
    );
    let (_, events) = api.call(Method::GET, "/v1/events", None).await;
    let last = events.as_array().unwrap().last().unwrap();
    assert_eq!(last["type"], "job_cancel_requested");
}

/// The checked-in OpenAPI document must match what the router implements. After an
/// intended API change, regenerate it with `UPDATE_OPENAPI=1 cargo test -p ctpf --test api`.
#[tokio::test]
async fn openapi_document_matches_the_routes() {
    let api = api().await;
    let generated = serde_json::to_string_pretty(&api.spec).unwrap() + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "manager/openapi.json is out of date with the routes; run \
         UPDATE_OPENAPI=1 cargo test -p ctpf --test api and review the diff"
    );
    // And the router serves the same document.
    let req = Request::get("/openapi.json").body(Body::empty()).unwrap();
    let (status, body) = api.raw(req).await;
    assert_eq!(status, StatusCode::OK);
    let served: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(served, serde_json::from_str::<Value>(&generated).unwrap());
}

#[tokio::test]
async fn downloads_support_head_ranges_and_conditionals() {
    let api = api().await;
    let data: Vec<u8> = (0..100u8).collect();
    api.upload("initrd", "?kind=initrd", &data).await;
    let digest = ctpf_common::Sha256Digest::of(&data);
    let etag = format!("\"{digest}\"");
    let request = |method: Method, headers: &[(header::HeaderName, &str)]| {
        let mut req = Request::builder()
            .method(method)
            .uri("/v1/artifacts/initrd/content")
            .header(header::AUTHORIZATION, format!("Bearer {}", api.token));
        for (name, value) in headers {
            req = req.header(name, *value);
        }
        req.body(Body::empty()).unwrap()
    };
    let send = |req: Request<Body>| async {
        let response = api.router.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes().to_vec();
        (status, headers, body)
    };

    // A single range, a suffix range and an open-ended one.
    let (status, headers, body) =
        send(request(Method::GET, &[(header::RANGE, "bytes=10-19")])).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(headers[header::CONTENT_RANGE], "bytes 10-19/100");
    assert_eq!(headers[header::CONTENT_LENGTH], "10");
    assert_eq!(body, data[10..20]);
    let (_, headers, body) = send(request(Method::GET, &[(header::RANGE, "bytes=-5")])).await;
    assert_eq!(
        (headers[header::CONTENT_RANGE].to_str().unwrap(), &body[..]),
        ("bytes 95-99/100", &data[95..])
    );
    let (_, _, body) = send(request(Method::GET, &[(header::RANGE, "bytes=98-")])).await;
    assert_eq!(body, data[98..]);

    // Outside the blob: 416 with the size; malformed: the whole blob.
    let (status, headers, _) = send(request(Method::GET, &[(header::RANGE, "bytes=100-")])).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(headers[header::CONTENT_RANGE], "bytes */100");
    let (status, _, body) = send(request(Method::GET, &[(header::RANGE, "bytes=oops")])).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 100));

    // Conditionals against the digest ETag.
    let (status, _, body) = send(request(Method::GET, &[(header::IF_NONE_MATCH, &etag)])).await;
    assert_eq!((status, body.len()), (StatusCode::NOT_MODIFIED, 0));
    let stale = [(header::RANGE, "bytes=0-9"), (header::IF_RANGE, "\"sha256:old\"")];
    let (status, _, body) = send(request(Method::GET, &stale)).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 100));
    let fresh = [(header::RANGE, "bytes=0-9"), (header::IF_RANGE, etag.as_str())];
    let (status, _, body) = send(request(Method::GET, &fresh)).await;
    assert_eq!((status, body.len()), (StatusCode::PARTIAL_CONTENT, 10));

    // HEAD: the headers of a GET, no body.
    let (status, headers, body) = send(request(Method::HEAD, &[])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_LENGTH], "100");
    assert_eq!(headers[header::ACCEPT_RANGES], "bytes");
    assert_eq!(headers[header::ETAG], etag.as_str());
    assert!(body.is_empty());
}

#[tokio::test]
async fn machines_enroll_with_one_time_tokens_and_keep_one_identity() {
    let api = api().await;
    api.call(Method::POST, "/v1/datacenters", Some(json!({"name": "home"}))).await;
    let issue = |uses: u32| {
        let body = json!({"datacenter": "home", "ttl_seconds": 600, "uses": uses});
        api.call(Method::POST, "/v1/enrollment-tokens", Some(body))
    };
    let enroll = |token: String, report: Value| api.enroll(token, report);
    let uuid = "4c4c4544-0042-3510-8051-b3c04f333231";
    let laptop = json!({"macs": ["52:54:00:aa:00:01"], "smbios_uuid": uuid, "arch": "x86_64",
        "addresses": ["10.77.0.50"],
        "inventory": {"serial": "PF0ABC", "cpu_cores": 4, "memory_bytes": 8589934592u64,
                      "disks": [{"name": "sda", "size_bytes": 256060514304u64}]}});

    let (status, issued) = issue(1).await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    let token = issued["token"].as_str().unwrap().to_owned();
    // An enrollment token is no admin token.
    let req = Request::get("/v1/hosts").header(header::AUTHORIZATION, format!("Bearer {token}"));
    assert_eq!(api.raw(req.body(Body::empty()).unwrap()).await.0, StatusCode::UNAUTHORIZED);

    let (status, host) = enroll(token.clone(), laptop.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{host}");
    assert_eq!(
        (host["datacenter"].as_str(), host["arch"].as_str()),
        (Some("home"), Some("x86_64"))
    );
    assert_eq!(host["macs"], json!(["52:54:00:aa:00:01"]));
    assert_eq!(host["inventory"]["serial"], "PF0ABC");
    let (_, hosts) = api.call(Method::GET, "/v1/hosts", None).await;
    assert_eq!(hosts.as_array().unwrap().len(), 1);

    // The token was one-time; unknown tokens and missing ones are refused too.
    let (status, body) = enroll(token, laptop.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("already used"));
    let (status, _) = enroll(format!("ctpf_{}", "1".repeat(64)), laptop.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let req = Request::post("/v1/enroll").header(header::CONTENT_TYPE, "application/json");
    let req = req.body(Body::from(laptop.to_string())).unwrap();
    assert_eq!(api.raw(req).await.0, StatusCode::UNAUTHORIZED);

    // The same machine again (a reboot, now with its second NIC up): same host, MACs merged.
    let (_, issued) = issue(1).await;
    let mut rebooted = laptop.clone();
    rebooted["macs"] = json!(["52:54:00:aa:00:02", "52:54:00:aa:00:01"]);
    let (status, again) = enroll(issued["token"].as_str().unwrap().to_owned(), rebooted).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["id"], host["id"]);
    assert_eq!(again["macs"], json!(["52:54:00:aa:00:01", "52:54:00:aa:00:02"]));

    // Placeholder UUIDs (all zeros) do not merge different machines; a token for two
    // machines takes exactly two.
    let (_, media) = issue(2).await;
    let media = media["token"].as_str().unwrap().to_owned();
    for i in 0..3 {
        let nil = json!({"macs": [format!("52:54:00:bb:00:0{i}")],
            "smbios_uuid": "00000000-0000-0000-0000-000000000000", "arch": "arm64"});
        let (status, _) = enroll(media.clone(), nil).await;
        let want = if i < 2 { StatusCode::CREATED } else { StatusCode::FORBIDDEN };
        assert_eq!(status, want, "machine {i}");
    }
    let (_, hosts) = api.call(Method::GET, "/v1/hosts", None).await;
    assert_eq!(hosts.as_array().unwrap().len(), 3);

    // Bad input: the field is named.
    assert_invalid(
        api.call(
            Method::POST,
            "/v1/enrollment-tokens",
            Some(json!({"datacenter": "home", "ttl_seconds": 0})),
        )
        .await,
        "ttl_seconds",
    );
    let (_, issued) = issue(1).await;
    let bad = json!({"macs": ["52:54:00:cc:00:01"], "arch": "x86_64", "inventory": {"serial": "a\u{7}b"}});
    assert_invalid(
        enroll(issued["token"].as_str().unwrap().to_owned(), bad).await,
        "inventory.serial",
    );

    // Every enrollment and refusal is in the event log.
    let (_, events) = api.call(Method::GET, "/v1/events?limit=1000", None).await;
    let count =
        |kind: &str| events.as_array().unwrap().iter().filter(|e| e["type"] == kind).count();
    assert_eq!(count("host_enrolled"), 4);
    assert_eq!(count("enrollment_refused"), 3);
}

#[tokio::test]
async fn expired_enrollment_tokens_are_refused() {
    let api = api().await;
    api.call(Method::POST, "/v1/datacenters", Some(json!({"name": "home"}))).await;
    let body = json!({"datacenter": "home", "ttl_seconds": 1});
    let (_, issued) = api.call(Method::POST, "/v1/enrollment-tokens", Some(body)).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let req = Request::post("/v1/enroll")
        .header(header::AUTHORIZATION, format!("Bearer {}", issued["token"].as_str().unwrap()))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"macs": ["52:54:00:aa:00:01"], "arch": "x86_64"}).to_string()))
        .unwrap();
    let (status, body) = api.raw(req).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(String::from_utf8_lossy(&body).contains("expired"));
}

/// The HTTP side of a network boot, as iPXE walks it: entry script, per-machine script with a
/// one-time token, enrollment, and after installation the local disk instead of a loop.
#[tokio::test]
async fn boot_scripts_follow_the_machine_life_cycle() {
    let api = api().await;
    let get = |uri: String| api.get_text(uri);
    let (status, entry) = get("/boot.ipxe".into()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(entry.starts_with("#!ipxe") && entry.contains("http://10.77.0.1:7480/boot/ipxe?mac="));

    let machine = "/boot/ipxe?mac=52-54-00-77-00-10&uuid=8b5ba9c6-3c4c-4a5d-9d7e-2a4c1c9d0a11&arch=x86_64&platform=efi";
    let (status, first) = get(machine.into()).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert!(first.contains("/boot/discovery/x86_64/vmlinuz initrd=initrd"), "{first}");
    let token =
        first.split_whitespace().find_map(|w| w.strip_prefix("ctpf.token=")).unwrap().to_owned();
    // Each discovery boot gets its own one-time token.
    let (_, second) = get(machine.into()).await;
    assert!(!second.contains(&token));

    // The discovery environment enrolls with it: the host lands in the boot datacenter.
    let report = json!({"macs": ["52:54:00:77:00:10"], "arch": "x86_64",
        "smbios_uuid": "8b5ba9c6-3c4c-4a5d-9d7e-2a4c1c9d0a11"});
    let (status, host) = api.enroll(token, report).await;
    assert_eq!(status, StatusCode::CREATED, "{host}");
    assert_eq!(host["datacenter"], "local");

    // Known but not installed: discovery again. Installed: the local disk, no token.
    let (_, again) = get(machine.into()).await;
    assert!(again.contains("discovery"), "{again}");
    let uri = format!("/v1/hosts/{}", host["id"].as_str().unwrap());
    let (status, patched) =
        api.call(Method::PATCH, &uri, Some(json!({"state": "installed"}))).await;
    assert_eq!((status, patched["state"].as_str()), (StatusCode::OK, Some("installed")));
    let (_, local) = get(machine.into()).await;
    assert!(local.contains("exit 1") && !local.contains("ctpf.token"), "{local}");
    assert!(!local.contains("vmlinuz"), "{local}");
    // Recognised by its UUID even from another NIC.
    let other_nic = "/boot/ipxe?mac=52-54-00-77-00-11&uuid=8b5ba9c6-3c4c-4a5d-9d7e-2a4c1c9d0a11&arch=i386&platform=pcbios";
    let (_, bios) = get(other_nic.into()).await;
    assert!(bios.contains("sanboot --no-describe --drive 0x80"), "{bios}");
    // The same decisions in GRUB's language, from what a ctpf-built GRUB image sends (GRUB
    // reports MACs with colons).
    let grub_bios = "/boot/grub?arch=i386&platform=pcbios&mac=52:54:00:77:00:11&uuid=8b5ba9c6-3c4c-4a5d-9d7e-2a4c1c9d0a11";
    let (status, grub) = get(grub_bios.into()).await;
    assert_eq!(status, StatusCode::OK, "{grub}");
    assert!(grub.contains("chainloader +1") && !grub.contains("ctpf.token"), "{grub}");
    let unknown = "/boot/grub?arch=x86_64&platform=efi&mac=52:54:00:77:00:99&uuid=";
    let (status, grub) = get(unknown.into()).await;
    assert_eq!(status, StatusCode::OK, "{grub}");
    assert!(grub.contains("linux '(http,10.77.0.1:7480)/boot/discovery/x86_64/vmlinuz'"), "{grub}");
    assert!(grub.contains("ctpf.token="), "{grub}");

    // Hostile or broken queries: 400 naming the field, never a script.
    let (status, body) =
        get("/boot/ipxe?mac=52-54-00-77-00-10%0Ashell&arch=x86_64&platform=efi".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("\"field\":\"mac\""), "{body}");
    let (status, _) = get("/boot/ipxe?mac=52-54-00-77-00-10&arch=mips&platform=efi".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = get("/boot/ipxe?mac=52-54-00-77-00-10".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The discovery image is served from the artifact store, with ranges.
    let (status, _) = get("/boot/discovery/x86_64/vmlinuz".into()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    api.upload("discovery-x86_64-vmlinuz", "?kind=kernel", b"kernel bytes").await;
    let (status, kernel) = get("/boot/discovery/x86_64/vmlinuz".into()).await;
    assert_eq!((status, kernel.as_str()), (StatusCode::OK, "kernel bytes"));
    let (status, _) = get("/boot/discovery/x86_64/..%2Fsecret".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// Media keys: created with a secret, listed without one, shown again with the same one;
/// machines enroll with it (each its own host, in the key's datacenter) until it is revoked.
#[tokio::test]
async fn media_keys_round_trip_and_enroll_until_revoked() {
    let api = api().await;
    api.call(Method::POST, "/v1/datacenters", Some(json!({"name": "lab"}))).await;
    api.call(Method::POST, "/v1/datacenters", Some(json!({"name": "home"}))).await;
    let create = |body: Value| api.call(Method::POST, "/v1/media-keys", Some(body));

    let (status, usb) =
        create(json!({"name": "usb", "datacenter": "lab", "ttl_seconds": 2592000})).await;
    assert_eq!(status, StatusCode::CREATED, "{usb}");
    let secret = usb["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("ctpf_mk_") && secret.len() == 72, "{secret}");
    assert_eq!((usb["datacenter"].as_str(), usb["enrollments"].as_u64()), (Some("lab"), Some(0)));
    assert_eq!(usb["revoked_at"], Value::Null);

    // Duplicate names, unknown datacenters and bad input.
    let (status, body) =
        create(json!({"name": "usb", "datacenter": "home", "ttl_seconds": 60})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) =
        create(json!({"name": "x", "datacenter": "nowhere", "ttl_seconds": 60})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_invalid(
        create(json!({"name": "USB", "datacenter": "lab", "ttl_seconds": 60})).await,
        "name",
    );
    assert_invalid(create(json!({"name": "x", "datacenter": "lab"})).await, "body");
    assert_invalid(
        create(json!({"name": "x", "datacenter": "lab", "ttl_seconds": 0})).await,
        "ttl_seconds",
    );
    let year_and_a_day = json!({"name": "x", "datacenter": "lab", "ttl_seconds": 366 * 86400});
    assert_invalid(create(year_and_a_day).await, "ttl_seconds");
    assert_invalid(api.call(Method::GET, "/v1/media-keys/Bad_Name", None).await, "name");
    assert_invalid(api.call(Method::GET, "/v1/media-keys?tag=a=b", None).await, "tag");
    let (status, _) = api.call(Method::GET, "/v1/media-keys/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Show gives the same secret; lists never carry one and filter by datacenter.
    let (status, shown) = api.call(Method::GET, "/v1/media-keys/usb", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["secret"], secret.as_str());
    create(json!({"name": "iso", "datacenter": "home", "ttl_seconds": 60})).await;
    let (status, all) = api.call(Method::GET, "/v1/media-keys", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(names(&all), ["iso", "usb"]);
    assert!(all.as_array().unwrap().iter().all(|k| k.get("secret").is_none()), "{all}");
    let (_, lab) = api.call(Method::GET, "/v1/media-keys?datacenter=lab", None).await;
    assert_eq!(names(&lab), ["usb"]);

    // A media key is no admin token.
    let req = Request::get("/v1/hosts").header(header::AUTHORIZATION, format!("Bearer {secret}"));
    assert_eq!(api.raw(req.body(Body::empty()).unwrap()).await.0, StatusCode::UNAUTHORIZED);

    // Two machines, one key: two hosts in lab. The first one again: the same host.
    let machine = |mac: &str| json!({"macs": [mac], "arch": "x86_64"});
    let (status, first) = api.enroll(secret.clone(), machine("52:54:00:dd:00:01")).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(
        (first["datacenter"].as_str(), first["media_key"].as_str()),
        (Some("lab"), Some("usb"))
    );
    let (status, second) = api.enroll(secret.clone(), machine("52:54:00:dd:00:02")).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_ne!(first["id"], second["id"]);
    let (status, again) = api.enroll(secret.clone(), machine("52:54:00:dd:00:01")).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["id"], first["id"]);
    let (_, hosts) = api.call(Method::GET, "/v1/hosts?datacenter=lab", None).await;
    assert_eq!(count(&hosts), 2);
    let (_, shown) = api.call(Method::GET, "/v1/media-keys/usb", None).await;
    assert_eq!(shown["enrollments"], 3);

    // Revoked: 403 from then on; revoking again is fine; unknown keys are 404.
    let (status, revoked) = api.call(Method::POST, "/v1/media-keys/usb/revoke", None).await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert!(revoked["revoked_at"].is_string() && revoked.get("secret").is_none(), "{revoked}");
    let (status, again) = api.call(Method::POST, "/v1/media-keys/usb/revoke", None).await;
    assert_eq!((status, &again["revoked_at"]), (StatusCode::OK, &revoked["revoked_at"]));
    let (status, _) = api.call(Method::POST, "/v1/media-keys/nope/revoke", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = api.enroll(secret.clone(), machine("52:54:00:dd:00:03")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("revoked"), "{body}");
    let (status, _) =
        api.enroll(format!("ctpf_mk_{}", "0".repeat(64)), machine("52:54:00:dd:00:03")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Events name the key, never the secret.
    let (_, events) = api.call(Method::GET, "/v1/events?limit=1000", None).await;
    let kinds: Vec<&str> =
        events.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "media_key_created").count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == "media_key_revoked").count(), 1);
    let enrolled: Vec<&Value> =
        events.as_array().unwrap().iter().filter(|e| e["type"] == "host_enrolled").collect();
    assert!(enrolled.iter().all(|e| e["media_key"] == "usb"), "{enrolled:?}");
    assert!(!events.to_string().contains(&secret));
}

#[tokio::test]
async fn packaging_requests_name_missing_and_unknown_inputs() {
    let api = api().await;
    let (_, stored) = api.upload("vmlinuz", "?kind=kernel", b"kernel bytes").await;
    let kernel = json!({"digest": stored["digest"], "size": 12});
    let absent = json!({"digest": format!("sha256:{}", "ab".repeat(32)), "size": 5});
    let package = |inputs: Value| json!({"request": {"format": "usb", "label": "CTPF", "inputs": inputs}, "name": "x.img"});
    // An input that is not stored (or not at that size) is named; nothing is queued.
    let missing = package(json!({"kernel": kernel, "initrd": absent, "efi_x86_64": kernel}));
    let got = api.call(Method::POST, "/v1/packages", Some(missing)).await;
    assert!(got.1["error"]["message"].as_str().unwrap().contains("initrd"), "{}", got.1);
    assert_invalid(got, "request.inputs");
    let resized = json!({"digest": stored["digest"], "size": 13});
    let wrong_size = package(json!({"kernel": resized, "initrd": kernel, "efi_x86_64": kernel}));
    assert_invalid(
        api.call(Method::POST, "/v1/packages", Some(wrong_size)).await,
        "request.inputs",
    );
    // A role the format does not take is named with the valid ones.
    let unknown = package(json!({"kernel": kernel, "initrd": kernel, "isolinux_bin": kernel}));
    let got = api.call(Method::POST, "/v1/packages", Some(unknown)).await;
    let message = got.1["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("isolinux_bin") && message.contains("valid inputs"), "{message}");
    assert_invalid(got, "request");
    assert_eq!(count(&api.call(Method::GET, "/v1/packages", None).await.1), 0);
}
