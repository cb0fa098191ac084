//! Media keys: the reusable enrollment credentials boot media carry (`ctpf.token=` on the
//! kernel command line). Create, list (no secrets), show (with the secret, so a rebuilt
//! image embeds the same key) and revoke. Enrollment itself is `POST /v1/enroll`.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use ctpf_common::{MediaKey, MediaKeyWithSecret, Name, NewMediaKey};

use super::{ApiError, AppState, ErrorBody, ListQuery, ValidJson};

/// Creates a media key for machines joining `datacenter` from boot media; the answer carries
/// its secret. `ttl_seconds` is required, at most a year.
#[utoipa::path(post, path = "/v1/media-keys", tag = "media-keys", request_body = NewMediaKey,
    responses((status = 201, body = MediaKeyWithSecret), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn create_media_key(
    State(s): State<AppState>,
    ValidJson(new): ValidJson<NewMediaKey>,
) -> Result<(StatusCode, Json<MediaKeyWithSecret>), ApiError> {
    Ok((StatusCode::CREATED, Json(s.registry.create_media_key(new).await?)))
}

/// Lists media keys by name, without their secrets (`?datacenter=` to filter).
#[utoipa::path(get, path = "/v1/media-keys", tag = "media-keys",
    params(("datacenter" = Option<String>, Query)),
    responses((status = 200, body = Vec<MediaKey>), (status = 400, body = ErrorBody)))]
pub(super) async fn list_media_keys(
    State(s): State<AppState>,
    q: ListQuery,
) -> Result<Json<Vec<MediaKey>>, ApiError> {
    let q = q.only(&[])?;
    if !q.filter.tags.is_empty() {
        return Err(ApiError::invalid("tag", "media keys have no tags; filter by datacenter"));
    }
    Ok(Json(s.registry.media_keys(q.filter.datacenter.as_ref()).await?))
}

/// One media key with its secret: the same key for every rebuild of an image.
#[utoipa::path(get, path = "/v1/media-keys/{name}", tag = "media-keys",
    params(("name" = String, Path)),
    responses((status = 200, body = MediaKeyWithSecret), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub(super) async fn get_media_key(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<MediaKeyWithSecret>, ApiError> {
    Ok(Json(s.registry.media_key(&Name::parse("name", &name)?).await?))
}

/// Revokes a media key for good: enrollments with it get 403 from now on. Idempotent.
#[utoipa::path(post, path = "/v1/media-keys/{name}/revoke", tag = "media-keys",
    params(("name" = String, Path)),
    responses((status = 200, body = MediaKey), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_media_key(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<MediaKey>, ApiError> {
    Ok(Json(s.registry.revoke_media_key(&Name::parse("name", &name)?).await?))
}
