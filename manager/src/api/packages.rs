//! Packaging: submit (optionally waiting for the result), list, show, and read or follow the
//! log. A packaging job is a job with a `package` spec; `ctpf image build` drives these.

use std::time::Duration;

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use ctpf_common::{Job, JobSpec, NewPackage};

use super::builds::{BuildLogPage, log_page};
use super::{ApiError, AppState, ErrorBody, ListQuery, ValidJson, parse_uuid};

/// Longest `wait` a request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Submits a packaging job for a worker with the `packager` role. Every input names stored
/// content by digest and size; a request whose inputs are missing from the store, or that
/// lacks an input its format needs, is a 400 naming them (and the valid inputs). With
/// `wait=SECONDS` the answer comes when the medium is written (a cache hit returns at once).
#[utoipa::path(post, path = "/v1/packages", tag = "packages", request_body = NewPackage,
    params(("wait" = Option<u64>, Query, description = "seconds to wait for the result, at most 600")),
    responses((status = 201, body = Job), (status = 400, body = ErrorBody)))]
pub(super) async fn submit_package(
    State(s): State<AppState>,
    q: ListQuery,
    ValidJson(new): ValidJson<NewPackage>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let q = q.only(&["wait"])?;
    let wait = Duration::from_secs(q.parse_num::<u64>("wait", 0)?).min(MAX_WAIT);
    ctpf_packagers::service::validate(&new.request)
        .map_err(|e| ApiError::invalid("request", e.to_string()))?;
    let mut missing = Vec::new();
    for (role, input) in &new.request.inputs {
        match s.artifacts.stat(&input.digest).await? {
            Some(size) if size == input.size => {}
            Some(size) => missing
                .push(format!("{role} ({} is {size} bytes, not {})", input.digest, input.size)),
            None => missing.push(format!("{role} ({} is not stored)", input.digest)),
        }
    }
    if !missing.is_empty() {
        return Err(ApiError::invalid("request.inputs", missing.join("; ")));
    }
    let job = s.registry.submit_package(new).await?;
    let deadline = tokio::time::Instant::now() + wait;
    let job = tokio::select! {
        job = s.registry.wait_until_final(job.id, deadline) => job?,
        () = s.shutdown.cancelled() => job,
    };
    Ok((StatusCode::CREATED, Json(job)))
}

/// Lists packaging jobs, newest first.
#[utoipa::path(get, path = "/v1/packages", tag = "packages",
    params(("tag" = Option<Vec<String>>, Query), ("datacenter" = Option<String>, Query)),
    responses((status = 200, body = Vec<Job>), (status = 400, body = ErrorBody)))]
pub(super) async fn list_packages(
    State(s): State<AppState>,
    q: ListQuery,
) -> Result<Json<Vec<Job>>, ApiError> {
    let q = q.only(&[])?;
    let mut jobs: Vec<Job> = s
        .registry
        .jobs(&q.filter)
        .await?
        .into_iter()
        .filter(|j| matches!(j.spec, JobSpec::Package { .. }))
        .collect();
    jobs.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    Ok(Json(jobs))
}

/// One packaging job, with the medium's manifest once it succeeded.
#[utoipa::path(get, path = "/v1/packages/{id}", tag = "packages", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
pub(super) async fn get_package(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(package_job(&s, &id).await?))
}

async fn package_job(s: &AppState, id: &str) -> Result<Job, ApiError> {
    let job = s.registry.job(parse_uuid("id", id)?).await?;
    if !matches!(job.spec, JobSpec::Package { .. }) {
        return Err(ApiError::not_found(format!("job {id} is not a packaging job")));
    }
    Ok(job)
}

/// The packaging job's log lines after line `after` (long polling with `wait`, as for builds).
#[utoipa::path(get, path = "/v1/packages/{id}/logs", tag = "packages",
    params(("id" = String, Path), ("after" = Option<u64>, Query), ("limit" = Option<usize>, Query, description = "default 1000, at most 10000"),
           ("wait" = Option<u64>, Query, description = "seconds, at most 60")),
    responses((status = 200, body = BuildLogPage), (status = 404, body = ErrorBody)))]
pub(super) async fn package_logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: ListQuery,
) -> Result<Json<BuildLogPage>, ApiError> {
    let job = package_job(&s, &id).await?;
    log_page(&s, job, q).await
}
