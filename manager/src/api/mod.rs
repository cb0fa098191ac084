//! The manager's REST API. Routes and their OpenAPI document come from the same annotations
//! (utoipa); `openapi.json` at the crate root is the checked-in copy, and a test fails when
//! the two drift apart.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use ctpf_common::{
    Artifact, ArtifactKind, ArtifactName, Datacenter, Event, Host, HostPatch, HostReport, Job,
    Name, NewDatacenter, NewHost, NewJob, NewSshKey, OffsetDateTime, Sha256Digest, SshKey, Tags,
    Uuid,
};
use ctpf_registries::{Registry, TokenRole};
use ctpf_store::artifacts::ArtifactStore;
use futures::TryStreamExt as _;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::{
    Modify, OpenApi, ToSchema,
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
};
use utoipa_axum::{router::OpenApiRouter, routes};

pub mod boot;
mod builds;
mod download;
mod error;
mod extract;
mod media_keys;
mod packages;
pub mod sites;

pub use error::ApiError;
use error::ErrorBody;
use extract::{ListQuery, ValidJson};

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub registry: Registry,
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Cancelled at shutdown; long polls return early instead of holding the exit up.
    pub shutdown: CancellationToken,
    pub boot: boot::BootSettings,
    pub sites: sites::SiteSettings,
    /// Where requests of booting machines are recorded for the event stream.
    pub boot_events: ctpf_distributors::boot_events::BootEvents,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "ctpf manager API", description = "Datacenters, hosts, SSH keys, artifacts, jobs and events of a ctpf installation. Every route but /healthz and /openapi.json needs `Authorization: Bearer TOKEN`."),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components
            .add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// The router and the OpenAPI document it implements.
pub fn router_and_spec(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let (router, spec) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(list_datacenters, create_datacenter))
        .routes(routes!(get_datacenter, delete_datacenter, sites::update_datacenter))
        .routes(routes!(sites::list_reservations, sites::add_reservation))
        .routes(routes!(sites::remove_reservation))
        .routes(routes!(sites::get_snapshot))
        .routes(routes!(sites::list_workers))
        .routes(routes!(sites::worker_file))
        .routes(routes!(sites::list_worker_credentials, sites::create_worker_credential))
        .routes(routes!(sites::revoke_worker_credential))
        .routes(routes!(list_hosts, create_host))
        .routes(routes!(get_host, update_host, delete_host))
        .routes(routes!(list_keys, add_key))
        .routes(routes!(get_key, delete_key))
        .routes(routes!(list_artifacts))
        .routes(routes!(get_artifact, put_artifact, delete_artifact))
        .routes(routes!(download_artifact))
        .routes(routes!(download_blob))
        .routes(routes!(list_jobs, submit_job))
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
        .routes(routes!(builds::list_builds, builds::submit_build))
        .routes(routes!(builds::get_build))
        .routes(routes!(builds::build_logs))
        .routes(routes!(packages::list_packages, packages::submit_package))
        .routes(routes!(packages::get_package))
        .routes(routes!(packages::package_logs))
        .routes(routes!(list_events))
        .routes(routes!(issue_enrollment_token))
        .routes(routes!(media_keys::list_media_keys, media_keys::create_media_key))
        .routes(routes!(media_keys::get_media_key))
        .routes(routes!(media_keys::revoke_media_key))
        .routes(routes!(enroll))
        .routes(routes!(boot::entry_script))
        .routes(routes!(boot::machine_script))
        .routes(routes!(boot::machine_grub_config))
        .routes(routes!(boot::discovery_file))
        .routes(routes!(boot::boot_file))
        .with_state(state.clone())
        .split_for_parts();
    let spec_json = spec.clone();
    let router = router
        .route("/openapi.json", axum::routing::get(move || async move { Json(spec_json) }))
        .layer(middleware::from_fn_with_state(
            state.boot_events.clone(),
            ctpf_distributors::boot_events::record_http,
        ))
        .layer(middleware::from_fn_with_state(state, require_token));
    (router, spec)
}

pub fn router(state: AppState) -> Router {
    router_and_spec(state).0
}

/// Routes that take no admin token: health, the API document, enrollment (which checks its
/// own enrollment token) and what booting machines fetch.
fn is_public(path: &str) -> bool {
    matches!(path, "/healthz" | "/openapi.json" | "/v1/enroll" | "/boot.ipxe")
        || path.starts_with("/boot/")
        // Checks the worker's own credential.
        || path.starts_with("/v1/worker-files/")
        || path
            .strip_prefix('/')
            .is_some_and(|file| crate::boot_artifacts::HTTP_BOOT_FILES.contains(&file))
}

/// The token of an `Authorization: Bearer` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    Some(value.strip_prefix("Bearer ")?.trim())
}

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let Some(token) = bearer(req.headers()) else {
        return ApiError::unauthorized().into_response();
    };
    match state.registry.verify_token(token).await {
        Ok(Some(record)) if record.role == TokenRole::Admin => next.run(req).await,
        Ok(Some(_)) => {
            tracing::warn!(path = %req.uri().path(), "non-admin token refused on the admin API");
            ApiError::unauthorized().into_response()
        }
        Ok(None) => {
            tracing::warn!(path = %req.uri().path(), "request with an unknown token refused");
            ApiError::unauthorized().into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub version: &'static str,
}

/// Liveness; needs no token.
#[utoipa::path(get, path = "/healthz", security(()), responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    Json(Health { status: "ok", version: env!("CARGO_PKG_VERSION") })
}

// ---- datacenters ----

/// Lists datacenters, filtered by tag (`?tag=k=v`, repeatable; all must match).
#[utoipa::path(get, path = "/v1/datacenters", tag = "datacenters",
    params(("tag" = Option<Vec<String>>, Query, description = "key=value; repeat to require several")),
    responses((status = 200, body = Vec<Datacenter>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list_datacenters(
    State(s): State<AppState>,
    q: ListQuery,
) -> Result<Json<Vec<Datacenter>>, ApiError> {
    let q = q.only(&[])?;
    Ok(Json(s.registry.datacenters(&q.filter).await?))
}

/// Creates a datacenter.
#[utoipa::path(post, path = "/v1/datacenters", tag = "datacenters", request_body = NewDatacenter,
    responses((status = 201, body = Datacenter), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_datacenter(
    State(s): State<AppState>,
    ValidJson(new): ValidJson<NewDatacenter>,
) -> Result<(StatusCode, Json<Datacenter>), ApiError> {
    Ok((StatusCode::CREATED, Json(s.registry.create_datacenter(new).await?)))
}

#[utoipa::path(get, path = "/v1/datacenters/{name}", tag = "datacenters",
    params(("name" = String, Path)),
    responses((status = 200, body = Datacenter), (status = 404, body = ErrorBody)))]
async fn get_datacenter(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Datacenter>, ApiError> {
    let name = Name::parse("name", &name)?;
    Ok(Json(s.registry.datacenter(&name).await?))
}

/// Deletes a datacenter; refused (409) while it has hosts, SSH keys, workers or worker
/// credentials unless `force=true` (which deletes or revokes them too).
#[utoipa::path(delete, path = "/v1/datacenters/{name}", tag = "datacenters",
    params(("name" = String, Path), ("force" = Option<bool>, Query)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_datacenter(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: ListQuery,
) -> Result<StatusCode, ApiError> {
    let q = q.only(&["force"])?;
    let name = Name::parse("name", &name)?;
    let force = match q.get("force") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "force",
                format!("force must be true or false, got {other:?}"),
            ));
        }
    };
    s.registry.delete_datacenter(&name, force).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- hosts ----

/// Lists hosts; `tag` matches a host's labels or its datacenter's tags.
#[utoipa::path(get, path = "/v1/hosts", tag = "hosts",
    params(("tag" = Option<Vec<String>>, Query), ("datacenter" = Option<String>, Query)),
    responses((status = 200, body = Vec<Host>), (status = 400, body = ErrorBody)))]
async fn list_hosts(State(s): State<AppState>, q: ListQuery) -> Result<Json<Vec<Host>>, ApiError> {
    let q = q.only(&[])?;
    Ok(Json(s.registry.hosts(&q.filter).await?))
}

/// Registers a host by hand (booted machines register themselves through the callback).
#[utoipa::path(post, path = "/v1/hosts", tag = "hosts", request_body = NewHost,
    responses((status = 201, body = Host), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_host(
    State(s): State<AppState>,
    ValidJson(new): ValidJson<NewHost>,
) -> Result<(StatusCode, Json<Host>), ApiError> {
    Ok((StatusCode::CREATED, Json(s.registry.create_host(new).await?)))
}

fn parse_uuid(field: &str, text: &str) -> Result<Uuid, ApiError> {
    text.parse()
        .map_err(|_| ApiError::invalid(field, format!("invalid {field} {text:?}: expected a UUID")))
}

#[utoipa::path(get, path = "/v1/hosts/{id}", tag = "hosts", params(("id" = String, Path)),
    responses((status = 200, body = Host), (status = 404, body = ErrorBody)))]
async fn get_host(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Host>, ApiError> {
    Ok(Json(s.registry.host(parse_uuid("id", &id)?).await?))
}

/// Changes a host's state, hostname or labels (e.g. `{"state": "installed"}` once its OS is
/// on disk, so its next network boot goes to the local disk).
#[utoipa::path(patch, path = "/v1/hosts/{id}", tag = "hosts", params(("id" = String, Path)), request_body = HostPatch,
    responses((status = 200, body = Host), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn update_host(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ValidJson(patch): ValidJson<HostPatch>,
) -> Result<Json<Host>, ApiError> {
    Ok(Json(s.registry.update_host(parse_uuid("id", &id)?, patch).await?))
}

#[utoipa::path(delete, path = "/v1/hosts/{id}", tag = "hosts", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_host(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.registry.delete_host(parse_uuid("id", &id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- SSH keys ----

#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    params(("tag" = Option<Vec<String>>, Query), ("datacenter" = Option<String>, Query)),
    responses((status = 200, body = Vec<SshKey>), (status = 400, body = ErrorBody)))]
async fn list_keys(State(s): State<AppState>, q: ListQuery) -> Result<Json<Vec<SshKey>>, ApiError> {
    let q = q.only(&[])?;
    Ok(Json(s.registry.keys(&q.filter).await?))
}

/// Registers an SSH public key (OpenSSH one-line form, no authorized_keys options).
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = NewSshKey,
    responses((status = 201, body = SshKey), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn add_key(
    State(s): State<AppState>,
    ValidJson(new): ValidJson<NewSshKey>,
) -> Result<(StatusCode, Json<SshKey>), ApiError> {
    Ok((StatusCode::CREATED, Json(s.registry.add_key(new).await?)))
}

#[utoipa::path(get, path = "/v1/keys/{name}", tag = "keys", params(("name" = String, Path)),
    responses((status = 200, body = SshKey), (status = 404, body = ErrorBody)))]
async fn get_key(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<SshKey>, ApiError> {
    Ok(Json(s.registry.key(&Name::parse("name", &name)?).await?))
}

#[utoipa::path(delete, path = "/v1/keys/{name}", tag = "keys", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_key(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.registry.delete_key(&Name::parse("name", &name)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- artifacts ----

#[utoipa::path(get, path = "/v1/artifacts", tag = "artifacts",
    params(("tag" = Option<Vec<String>>, Query), ("kind" = Option<ArtifactKind>, Query)),
    responses((status = 200, body = Vec<Artifact>), (status = 400, body = ErrorBody)))]
async fn list_artifacts(
    State(s): State<AppState>,
    q: ListQuery,
) -> Result<Json<Vec<Artifact>>, ApiError> {
    let q = q.only(&["kind"])?;
    let kind: Option<ArtifactKind> = q.get("kind").map(str::parse).transpose()?;
    let list = s.registry.artifacts(&q.filter).await?;
    Ok(Json(list.into_iter().filter(|a| kind.is_none_or(|k| a.kind == k)).collect()))
}

#[utoipa::path(get, path = "/v1/artifacts/{name}", tag = "artifacts", params(("name" = String, Path)),
    responses((status = 200, body = Artifact), (status = 404, body = ErrorBody)))]
async fn get_artifact(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Artifact>, ApiError> {
    let name = ArtifactName::parse("name", &name)?;
    Ok(Json(s.registry.artifact(name.as_str()).await?))
}

/// Uploads content under a name (streamed; hashed on the way in). With `digest`, content
/// that hashes differently is refused and nothing is stored.
#[utoipa::path(put, path = "/v1/artifacts/{name}", tag = "artifacts",
    params(("name" = String, Path), ("kind" = Option<ArtifactKind>, Query, description = "default: other"),
           ("tag" = Option<Vec<String>>, Query), ("digest" = Option<String>, Query, description = "expected sha256:...")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Artifact), (status = 400, body = ErrorBody)))]
async fn put_artifact(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: ListQuery,
    body: Body,
) -> Result<(StatusCode, Json<Artifact>), ApiError> {
    let q = q.only(&["kind", "digest"])?;
    let name = ArtifactName::parse("name", &name)?;
    let kind: ArtifactKind =
        q.get("kind").map(str::parse).transpose()?.unwrap_or(ArtifactKind::Other);
    let expected = q.get("digest").map(|d| Sha256Digest::parse("digest", d)).transpose()?;
    if q.filter.datacenter.is_some() {
        return Err(ApiError::invalid("datacenter", "artifacts belong to no datacenter; use tags"));
    }
    let tags: Tags = q.filter.tags.into_iter().collect();
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(stream);
    let info = s.artifacts.put(Box::pin(reader), expected).await?;
    let artifact = Artifact {
        name,
        digest: info.digest,
        kind,
        size: info.size,
        tags,
        created_at: OffsetDateTime::now_utc(),
    };
    s.registry.record_artifact(&artifact).await?;
    Ok((StatusCode::CREATED, Json(artifact)))
}

#[utoipa::path(delete, path = "/v1/artifacts/{name}", tag = "artifacts", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_artifact(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    // The name goes; the content stays addressable by digest (other names may share it).
    s.registry.delete_artifact(&ArtifactName::parse("name", &name)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Streams an artifact's content. ETag is its digest; HEAD, one `Range`, `If-None-Match` and
/// `If-Range` are supported.
#[utoipa::path(get, path = "/v1/artifacts/{name}/content", tag = "artifacts", params(("name" = String, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 206, content_type = "application/octet-stream", body = Vec<u8>), (status = 304), (status = 404, body = ErrorBody), (status = 416)))]
async fn download_artifact(
    State(s): State<AppState>,
    method: Method,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let name = ArtifactName::parse("name", &name)?;
    let artifact = s.registry.artifact(name.as_str()).await?;
    download::stream_blob(&s, &method, &headers, &artifact.digest, Some(&artifact.name)).await
}

/// Streams content by digest (what workers fetch into their caches); same HTTP features as
/// the named download.
#[utoipa::path(get, path = "/v1/blobs/{digest}", tag = "artifacts", params(("digest" = String, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 206, content_type = "application/octet-stream", body = Vec<u8>), (status = 304), (status = 404, body = ErrorBody), (status = 416)))]
async fn download_blob(
    State(s): State<AppState>,
    method: Method,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let digest = Sha256Digest::parse("digest", &digest)?;
    download::stream_blob(&s, &method, &headers, &digest, None).await
}

// ---- jobs ----

/// Lists jobs; `tag` matches a job's selector or its datacenter's tags.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(("tag" = Option<Vec<String>>, Query), ("datacenter" = Option<String>, Query)),
    responses((status = 200, body = Vec<Job>), (status = 400, body = ErrorBody)))]
async fn list_jobs(State(s): State<AppState>, q: ListQuery) -> Result<Json<Vec<Job>>, ApiError> {
    let q = q.only(&[])?;
    let mut jobs = s.registry.jobs(&q.filter).await?;
    s.registry.annotate_waiting(&mut jobs, s.sites.worker_lost_after).await?;
    Ok(Json(jobs))
}

/// Submits a job; it waits until a worker whose tags match its selector takes it.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = NewJob,
    responses((status = 201, body = Job), (status = 400, body = ErrorBody)))]
async fn submit_job(
    State(s): State<AppState>,
    ValidJson(new): ValidJson<NewJob>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    Ok((StatusCode::CREATED, Json(s.registry.submit_job(new).await?)))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
async fn get_job(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Job>, ApiError> {
    let mut job = [s.registry.job(parse_uuid("id", &id)?).await?];
    s.registry.annotate_waiting(&mut job, s.sites.worker_lost_after).await?;
    let [job] = job;
    Ok(Json(job))
}

/// Asks a queued or running job to stop. A queued job is cancelled at once; a running one
/// shows `cancel_requested` until its worker stops it (within a second) and reports
/// `cancelled`. A finished job gets 409.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)),
    responses((status = 202, body = Job), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn cancel_job(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(s.registry.cancel_job(parse_uuid("id", &id)?).await?)))
}

// ---- enrollment ----

/// The bearer token of an enrollment request (a one-time token or a media key), checked (401
/// when absent, 403 when unusable) before the body is read.
#[derive(Debug)]
struct EnrollmentBearer(String);

impl axum::extract::FromRequestParts<AppState> for EnrollmentBearer {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or_else(ApiError::unauthorized)?;
        state.registry.check_enrollment(token).await?;
        Ok(Self(token.to_owned()))
    }
}

/// What an operator asks for when issuing an enrollment token.
#[derive(Debug, Clone, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEnrollmentToken {
    pub datacenter: Name,
    /// Seconds the token stays valid (default 3600, at most 30 days).
    #[serde(default = "default_ttl")]
    pub ttl_seconds: u64,
    /// Machines that may enroll with it (default 1; more for boot media).
    #[serde(default = "default_uses")]
    pub uses: u32,
}

fn default_ttl() -> u64 {
    3600
}

fn default_uses() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EnrollmentToken {
    /// Shown once; only its hash is stored.
    pub token: String,
    pub datacenter: Name,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
    pub uses: u32,
}

/// Issues an enrollment token for machines joining `datacenter`.
#[utoipa::path(post, path = "/v1/enrollment-tokens", tag = "enrollment", request_body = NewEnrollmentToken,
    responses((status = 201, body = EnrollmentToken), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn issue_enrollment_token(
    State(s): State<AppState>,
    ValidJson(new): ValidJson<NewEnrollmentToken>,
) -> Result<(StatusCode, Json<EnrollmentToken>), ApiError> {
    if !(1..=30 * 24 * 3600).contains(&new.ttl_seconds) {
        return Err(ApiError::invalid("ttl_seconds", "ttl_seconds must be 1 to 2592000"));
    }
    if !(1..=100_000).contains(&new.uses) {
        return Err(ApiError::invalid("uses", "uses must be 1 to 100000"));
    }
    let ttl = Duration::from_secs(new.ttl_seconds);
    let (token, record) = s.registry.issue_enrollment_token(&new.datacenter, ttl, new.uses).await?;
    let expires_at = record.expires_at.unwrap_or_else(OffsetDateTime::now_utc);
    let issued = EnrollmentToken { token, datacenter: new.datacenter, expires_at, uses: new.uses };
    Ok((StatusCode::CREATED, Json(issued)))
}

/// A booted machine registers itself. Authorized by its enrollment token or media key (not
/// an admin token); unknown, used, expired and revoked ones get 403. The same machine
/// enrolling again keeps its host record (matched by SMBIOS UUID, then MAC): 200 instead of
/// 201.
#[utoipa::path(post, path = "/v1/enroll", tag = "enrollment", request_body = HostReport,
    security(("bearer" = [])),
    responses((status = 201, body = Host), (status = 200, body = Host), (status = 400, body = ErrorBody),
               (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn enroll(
    State(s): State<AppState>,
    EnrollmentBearer(token): EnrollmentBearer,
    ValidJson(report): ValidJson<HostReport>,
) -> Result<(StatusCode, Json<Host>), ApiError> {
    let (host, new) = s.registry.enroll(&token, report).await?;
    Ok((if new { StatusCode::CREATED } else { StatusCode::OK }, Json(host)))
}

// ---- events ----

/// Events after `after` (a sequence number), oldest first. With `wait=SECONDS` the call
/// waits up to that long for the first new event (long polling; what `--follow` uses).
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(("after" = Option<u64>, Query), ("limit" = Option<usize>, Query, description = "default 100, at most 1000"),
           ("wait" = Option<u64>, Query, description = "seconds, at most 60"),
           ("tag" = Option<Vec<String>>, Query), ("datacenter" = Option<String>, Query)),
    responses((status = 200, body = Vec<Event>), (status = 400, body = ErrorBody)))]
async fn list_events(
    State(s): State<AppState>,
    q: ListQuery,
) -> Result<Json<Vec<Event>>, ApiError> {
    let q = q.only(&["after", "limit", "wait"])?;
    let after: u64 = q.parse_num("after", 0)?;
    let limit: usize = q.parse_num::<usize>("limit", 100)?.min(1000);
    let wait = Duration::from_secs(q.parse_num::<u64>("wait", 0)?.min(60));
    let deadline = tokio::time::Instant::now() + wait;
    let mut cursor = after;
    loop {
        let (events, scanned_to) = s.registry.events(cursor, limit, &q.filter).await?;
        if !events.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(events));
        }
        // Move past events the filter rejected so a long poll does not rescan them.
        if let Some(seq) = scanned_to {
            cursor = seq;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = s.shutdown.cancelled() => return Ok(Json(events)),
        }
    }
}
