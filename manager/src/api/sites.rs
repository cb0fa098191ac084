//! Datacenters as sites: their DHCP settings and reservations, the snapshot their
//! distributors serve, the workers that dialled in, and the credentials those workers use.

use std::time::Duration;

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, Method, StatusCode},
    response::Response,
};
use ctpf_common::{
    Datacenter, DatacenterPatch, DatacenterSnapshot, MacAddr, Name, Reservation, Sha256Digest,
    WorkerCredential, WorkerStatus, WorkerToken,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, AppState, ErrorBody, ListQuery, ValidJson};

/// How the manager judges its workers.
#[derive(Debug, Clone, Copy)]
pub struct SiteSettings {
    /// A worker silent for longer than this is shown as lost.
    pub worker_lost_after: Duration,
}

impl Default for SiteSettings {
    fn default() -> Self {
        Self { worker_lost_after: Duration::from_secs(15) }
    }
}

/// Replaces a datacenter's tags and/or DHCP settings; its distributors get the change with
/// the next snapshot generation.
#[utoipa::path(patch, path = "/v1/datacenters/{name}", tag = "datacenters",
    params(("name" = String, Path)), request_body = DatacenterPatch,
    responses((status = 200, body = Datacenter), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn update_datacenter(
    State(s): State<AppState>,
    Path(name): Path<String>,
    ValidJson(patch): ValidJson<DatacenterPatch>,
) -> Result<Json<Datacenter>, ApiError> {
    let name = Name::parse("name", &name)?;
    Ok(Json(s.registry.update_datacenter(&name, patch).await?))
}

#[utoipa::path(get, path = "/v1/datacenters/{name}/reservations", tag = "datacenters",
    params(("name" = String, Path)),
    responses((status = 200, body = Vec<Reservation>), (status = 404, body = ErrorBody)))]
pub(super) async fn list_reservations(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Reservation>>, ApiError> {
    let name = Name::parse("name", &name)?;
    s.registry.datacenter(&name).await?;
    Ok(Json(s.registry.reservations(&name).await?))
}

/// Reserves an address for a MAC in the datacenter (answered by its distributors' DHCP in
/// authoritative mode); 409 when the MAC or the address is taken.
#[utoipa::path(post, path = "/v1/datacenters/{name}/reservations", tag = "datacenters",
    params(("name" = String, Path)), request_body = Reservation,
    responses((status = 201, body = Reservation), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn add_reservation(
    State(s): State<AppState>,
    Path(name): Path<String>,
    ValidJson(reservation): ValidJson<Reservation>,
) -> Result<(StatusCode, Json<Reservation>), ApiError> {
    let name = Name::parse("name", &name)?;
    Ok((StatusCode::CREATED, Json(s.registry.add_reservation(&name, reservation).await?)))
}

#[utoipa::path(delete, path = "/v1/datacenters/{name}/reservations/{mac}", tag = "datacenters",
    params(("name" = String, Path), ("mac" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn remove_reservation(
    State(s): State<AppState>,
    Path((name, mac)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let name = Name::parse("name", &name)?;
    let mac = MacAddr::parse("mac", &mac)?;
    s.registry.remove_reservation(&name, mac).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The snapshot last published for the datacenter: what its distributors serve.
#[utoipa::path(get, path = "/v1/datacenters/{name}/snapshot", tag = "datacenters",
    params(("name" = String, Path)),
    responses((status = 200, body = DatacenterSnapshot), (status = 404, body = ErrorBody)))]
pub(super) async fn get_snapshot(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<DatacenterSnapshot>, ApiError> {
    let name = Name::parse("name", &name)?;
    match s.registry.snapshot(&name).await? {
        Some(snapshot) => Ok(Json(snapshot)),
        None => {
            Err(ApiError::not_found(format!("no snapshot published for datacenter {name} yet")))
        }
    }
}

/// A file the caller's datacenter's current snapshot names, for site workers that fetch
/// through the manager instead of holding S3 credentials. Takes the worker's own token
/// (`Authorization: Bearer ctpf_wk_...`), not an admin token; any other file is 404.
#[utoipa::path(get, path = "/v1/worker-files/{digest}", tag = "workers",
    params(("digest" = String, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn worker_file(
    State(s): State<AppState>,
    method: Method,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let token: WorkerToken = super::bearer(&headers)
        .ok_or_else(ApiError::unauthorized)?
        .parse()
        .map_err(|_| ApiError::unauthorized())?;
    let credential = s.registry.verify_worker_token(&token).await?;
    let digest = Sha256Digest::parse("digest", &digest)?;
    let named = s
        .registry
        .snapshot(&credential.datacenter)
        .await?
        .is_some_and(|snapshot| snapshot.state.files().iter().any(|f| f.digest == digest));
    if !named {
        return Err(ApiError::not_found(format!(
            "{digest} is not a file of datacenter {}'s snapshot",
            credential.datacenter
        )));
    }
    super::download::stream_blob(&s, &method, &headers, &digest, None).await
}

/// Workers that dialled in, per datacenter, alive or lost (`?tag=`, `?datacenter=`).
#[utoipa::path(get, path = "/v1/workers", tag = "workers",
    params(("tag" = Option<Vec<String>>, Query), ("datacenter" = Option<String>, Query)),
    responses((status = 200, body = Vec<WorkerStatus>), (status = 400, body = ErrorBody)))]
pub(super) async fn list_workers(
    State(s): State<AppState>,
    q: ListQuery,
) -> Result<Json<Vec<WorkerStatus>>, ApiError> {
    let q = q.only(&[])?;
    Ok(Json(s.registry.workers(&q.filter, s.sites.worker_lost_after).await?))
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWorkerCredential {
    pub datacenter: Name,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IssuedWorkerCredential {
    #[serde(flatten)]
    pub credential: WorkerCredential,
    /// `ctpf_wk_ID_SECRET`, for `ctpf worker --token`. Shown once; only a hash is kept.
    pub token: String,
}

/// Issues a credential for a worker of one datacenter.
#[utoipa::path(post, path = "/v1/worker-credentials", tag = "workers",
    request_body = NewWorkerCredential,
    responses((status = 201, body = IssuedWorkerCredential), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub(super) async fn create_worker_credential(
    State(s): State<AppState>,
    ValidJson(new): ValidJson<NewWorkerCredential>,
) -> Result<(StatusCode, Json<IssuedWorkerCredential>), ApiError> {
    let (credential, token) = s.registry.create_worker_credential(&new.datacenter).await?;
    // At once, so the worker can connect as soon as it has the token.
    s.registry.authorize_workers().await?;
    let issued = IssuedWorkerCredential { credential, token: token.to_string() };
    Ok((StatusCode::CREATED, Json(issued)))
}

/// Worker credentials, revoked ones included (`?datacenter=`, `?tag=`).
#[utoipa::path(get, path = "/v1/worker-credentials", tag = "workers",
    params(("tag" = Option<Vec<String>>, Query), ("datacenter" = Option<String>, Query)),
    responses((status = 200, body = Vec<WorkerCredential>), (status = 400, body = ErrorBody)))]
pub(super) async fn list_worker_credentials(
    State(s): State<AppState>,
    q: ListQuery,
) -> Result<Json<Vec<WorkerCredential>>, ApiError> {
    let q = q.only(&[])?;
    Ok(Json(s.registry.worker_credentials(&q.filter).await?))
}

/// Revokes a worker credential: Redis drops its user and the connections using it.
#[utoipa::path(post, path = "/v1/worker-credentials/{id}/revoke", tag = "workers",
    params(("id" = String, Path)),
    responses((status = 200, body = WorkerCredential), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_worker_credential(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<WorkerCredential>, ApiError> {
    let credential = s.registry.revoke_worker_credential(&id).await?;
    s.registry.authorize_workers().await?;
    Ok(Json(credential))
}
