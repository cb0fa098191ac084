//! The site worker's HTTP boot server: the same routes machines use on the manager
//! (`/boot.ipxe`, `/boot/ipxe`, `/boot/discovery/ARCH/FILE`, the boot loaders and
//! `POST /v1/enroll`), answered from the current snapshot and the local cache alone, so
//! machines keep booting while the manager or Redis is unreachable.
//!
//! Unknown machines boot discovery with this worker's site token and this worker's URL on
//! their kernel command line; their callback lands here, goes to the outbox on disk, and is
//! answered 202 (queued). The forwarder sends it on to the manager.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use ctpf_common::{
    Arch, BootAction, DatacenterSnapshot, EventBody, HostReport, Name, NewEvent, OffsetDateTime,
    Sha256Digest,
};
use ctpf_scripts::{
    BaseUrl, BootQuery, Profile, ScriptContext, render_entry, render_local_disk, render_machine,
};
use ctpf_store::artifacts::ArtifactStore;
use tokio::sync::{Notify, watch};

use super::local::Outbox;
use crate::boot_events::{self, BootEvents};
use crate::bundle::BundleCache;

/// Largest callback body accepted (a host report is a few KiB).
const MAX_CALLBACK_BYTES: usize = 256 * 1024;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct SiteHttp {
    pub snapshot: watch::Receiver<Option<Arc<DatacenterSnapshot>>>,
    pub cache: Arc<dyn ArtifactStore>,
    pub bundles: BundleCache,
    pub base_url: BaseUrl,
    pub site_token: Arc<str>,
    pub outbox: Outbox,
    pub outbox_ready: Arc<Notify>,
    pub worker: String,
    pub datacenter: Name,
    /// Where boot requests are recorded for the event stream.
    pub events: BootEvents,
}

/// The routes; serve them with `into_make_service_with_connect_info::<SocketAddr>()` so boot
/// events name the client.
pub fn router(state: SiteHttp) -> Router {
    Router::new()
        .route("/boot.ipxe", get(entry_script))
        .route("/boot/ipxe", get(machine_script))
        .route("/boot/discovery/{arch}/{file}", get(discovery_file))
        .route("/v1/enroll", post(enroll))
        .route("/healthz", get(|| async { "ok" }))
        .route("/{file}", get(loader))
        .fallback(bundle_file)
        .layer(middleware::from_fn_with_state(state.events.clone(), boot_events::record_http))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_CALLBACK_BYTES))
        .with_state(state)
}

fn text(status: StatusCode, message: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], message.into()).into_response()
}

fn script(body: Result<String, ctpf_scripts::ScriptError>) -> Response {
    match body {
        Ok(body) => text(StatusCode::OK, body),
        Err(e) => {
            tracing::warn!(error = %e, "cannot render a boot script");
            text(StatusCode::BAD_REQUEST, e.to_string())
        }
    }
}

impl SiteHttp {
    fn current(&self) -> Option<Arc<DatacenterSnapshot>> {
        self.snapshot.borrow().clone()
    }
}

fn no_snapshot() -> Response {
    text(StatusCode::SERVICE_UNAVAILABLE, "this worker has no snapshot of its datacenter yet")
}

async fn entry_script(State(s): State<SiteHttp>) -> Response {
    script(render_entry(&s.base_url))
}

/// Installed hosts boot their disk; every other machine boots discovery.
async fn machine_script(State(s): State<SiteHttp>, Query(query): Query<BootQuery>) -> Response {
    let request = match query.into_request() {
        Ok(request) => request,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let Some(snapshot) = s.current() else { return no_snapshot() };
    let known = snapshot.state.host_by_identity(request.uuid, request.mac);
    if known.is_some_and(|h| h.boot == BootAction::LocalDisk) {
        tracing::info!(mac = %request.mac, "installed: local disk boot");
        return script(render_local_disk(&request));
    }
    let context = match ScriptContext::new(s.base_url.as_str(), &s.site_token) {
        Ok(context) => context,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let profile = Profile::Discovery { cmdline: snapshot.state.boot.discovery_cmdline.clone() };
    tracing::info!(mac = %request.mac, arch = request.arch.as_str(), generation = snapshot.generation, "discovery boot");
    script(render_machine(&context, &request, &profile))
}

async fn discovery_file(
    State(s): State<SiteHttp>,
    Path((arch, file)): Path<(String, String)>,
) -> Response {
    let Ok(arch) = arch.parse::<Arch>() else {
        return text(StatusCode::BAD_REQUEST, "arch must be x86_64 or arm64");
    };
    let Some(snapshot) = s.current() else { return no_snapshot() };
    let Some(files) = snapshot.state.boot.discovery.get(&arch) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no {arch} discovery image in this datacenter"),
        );
    };
    let digest = match file.as_str() {
        "vmlinuz" => files.kernel.digest,
        "initrd" => files.initrd.digest,
        _ => return text(StatusCode::BAD_REQUEST, "file must be vmlinuz or initrd"),
    };
    stream(&s, &digest).await
}

/// A boot loader the snapshot names (`/ipxe.efi`, ...), else a file of its PXE bundle.
async fn loader(State(s): State<SiteHttp>, Path(file): Path<String>) -> Response {
    let Some(snapshot) = s.current() else { return no_snapshot() };
    match snapshot.state.boot.loaders.get(&file) {
        Some(stored) => stream(&s, &stored.digest).await,
        None => from_bundle(&s, &snapshot, &file).await,
    }
}

/// A file of the datacenter's PXE bundle by its path in the bundle (paths of more than one
/// part; `/{file}` tries the bundle after the loaders).
async fn bundle_file(State(s): State<SiteHttp>, method: Method, uri: Uri) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "boot files are only fetched with GET");
    }
    let Some(snapshot) = s.current() else { return no_snapshot() };
    from_bundle(&s, &snapshot, uri.path().trim_start_matches('/')).await
}

async fn from_bundle(s: &SiteHttp, snapshot: &DatacenterSnapshot, path: &str) -> Response {
    let not_found = || text(StatusCode::NOT_FOUND, format!("no boot file {path:?}"));
    let Some(bundle) = &snapshot.state.boot.pxe_bundle else { return not_found() };
    let opened = match s.bundles.index(bundle.file.digest).await {
        Ok(index) => index.open(path).await,
        Err(e) => Err(std::io::Error::other(e)),
    };
    match opened {
        Ok(Some(file)) => octet_stream(file.reader, file.size),
        Ok(None) => not_found(),
        Err(e) => {
            tracing::error!(bundle = %bundle.name, error = %e, "cannot read the PXE bundle");
            text(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the PXE bundle")
        }
    }
}

/// A file's bytes as the body, with its length (GRUB and iPXE want one).
fn octet_stream(reader: impl tokio::io::AsyncRead + Send + 'static, size: u64) -> Response {
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(reader));
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        body,
    )
        .into_response()
}

async fn stream(s: &SiteHttp, digest: &Sha256Digest) -> Response {
    match s.cache.get(digest).await {
        Ok(blob) => octet_stream(blob.reader, blob.size),
        Err(e) => {
            // The follower fetches every file before a snapshot is served; a missing one
            // means the cache was tampered with.
            tracing::error!(%digest, error = %e, "a file of the current snapshot is not in the cache");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{digest} is not in this worker's cache"),
            )
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    Some(value.strip_prefix("Bearer ")?.trim())
}

/// A machine's callback: kept on disk, then answered 202; the forwarder delivers it.
async fn enroll(
    State(s): State<SiteHttp>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !bearer(&headers).is_some_and(|t| ctpf_common::same_secret(t, &s.site_token)) {
        tracing::warn!("callback with a missing or wrong site token refused");
        return text(StatusCode::FORBIDDEN, "unknown enrollment token");
    }
    let report: HostReport = match serde_json::from_slice(&body) {
        Ok(report) => report,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("not a host report: {e}")),
    };
    if let Err(e) = report.validate() {
        return text(StatusCode::BAD_REQUEST, e.to_string());
    }
    let macs: Vec<String> = report.macs.iter().map(ToString::to_string).collect();
    let event = NewEvent::new(
        Some(s.datacenter.clone()),
        EventBody::HostCallbackForwarded {
            worker: s.worker.clone(),
            report: Box::new(report),
            received_at: OffsetDateTime::now_utc(),
        },
    );
    let outbox = s.outbox.clone();
    match tokio::task::spawn_blocking(move || outbox.push(&event)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot keep a callback");
            return text(StatusCode::SERVICE_UNAVAILABLE, "cannot keep the callback; retry");
        }
        Err(e) => {
            tracing::error!(error = %e, "keeping a callback panicked");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot keep the callback");
        }
    }
    s.outbox_ready.notify_one();
    tracing::info!(?macs, "host callback queued for the manager");
    let queued = serde_json::json!({
        "id": "queued",
        "datacenter": s.datacenter,
        "queued": true,
    });
    (StatusCode::ACCEPTED, Json(queued)).into_response()
}
