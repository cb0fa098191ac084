//! Builds: submit (optionally waiting for the result), list, show, and read or follow the
//! log. A build is a job with a `build` spec; these routes add what only builds have.

use std::time::Duration;

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use ctpf_common::{BuildLogLine, BuildRequest, Job, JobSpec, JobStatus, NewBuild};
use serde::Serialize;
use utoipa::ToSchema;

use ctpf_registries::RegistryError;

use super::{ApiError, AppState, ErrorBody, ListQuery, ValidJson, parse_uuid};

/// Longest `wait` a request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Submits a build for a worker with the `builder` role. An iPXE `source` is a path on the
/// builder, `sha256:HEX` or `artifact:NAME` (a tar or tar.gz in the artifact store), or a git
/// URL with an optional `#REV`. Bad input (unknown target, a script
/// that is not an iPXE script, a GRUB config that is an iPXE script, ...) is a 400 naming
/// what is valid. A GRUB request without a config gets this manager's entry config (GRUB's
/// network stack fetches the per-machine config from here), or with `chain_ipxe` one that
/// loads iPXE from here. With `wait=SECONDS` the answer
/// comes when the build is finished (or the wait is over): a cache hit returns at once.
#[utoipa::path(post, path = "/v1/builds", tag = "builds", request_body = NewBuild,
    params(("wait" = Option<u64>, Query, description = "seconds to wait for the result, at most 600")),
    responses((status = 201, body = Job), (status = 400, body = ErrorBody)))]
pub(super) async fn submit_build(
    State(s): State<AppState>,
    q: ListQuery,
    ValidJson(mut new): ValidJson<NewBuild>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let q = q.only(&["wait"])?;
    let wait = Duration::from_secs(q.parse_num::<u64>("wait", 0)?).min(MAX_WAIT);
    // A source tarball named as an artifact goes to the builder by digest.
    if let BuildRequest::Ipxe { source, .. } = &mut new.request
        && let Some(name) = source.strip_prefix("artifact:")
    {
        let artifact = s.registry.artifact(name).await?;
        *source = format!("sha256:{}", artifact.digest.hex());
    }
    ctpf_builders::service::validate(&new.request)
        .map_err(|e| ApiError::invalid("request", e.to_string()))?;
    if let BuildRequest::Grub { target, config: config @ None, chain_ipxe } = &mut new.request {
        let arch = match target.as_str() {
            "x86_64-efi" => ctpf_scripts::ScriptArch::X86_64Efi,
            "arm64-efi" => ctpf_scripts::ScriptArch::Arm64Efi,
            _ => ctpf_scripts::ScriptArch::X86_64Bios,
        };
        let rendered = if *chain_ipxe {
            ctpf_scripts::render_grub_chain_ipxe(&s.boot.base_url, arch)
        } else {
            ctpf_scripts::render_grub_entry(&s.boot.base_url, arch)
        };
        *config = Some(rendered.map_err(|e| ApiError::invalid("request.config", e.to_string()))?);
        // The config is now explicit; the flag has done its work.
        *chain_ipxe = false;
    }
    let job = s.registry.submit_build(new).await?;
    let deadline = tokio::time::Instant::now() + wait;
    let job = tokio::select! {
        job = s.registry.wait_until_final(job.id, deadline) => job?,
        // Shutting down: answer with the job as submitted rather than hold the exit up.
        () = s.shutdown.cancelled() => job,
    };
    Ok((StatusCode::CREATED, Json(job)))
}

/// Lists builds, newest first; `tag` matches a build's selector or its datacenter's tags.
#[utoipa::path(get, path = "/v1/builds", tag = "builds",
    params(("tag" = Option<Vec<String>>, Query), ("datacenter" = Option<String>, Query)),
    responses((status = 200, body = Vec<Job>), (status = 400, body = ErrorBody)))]
pub(super) async fn list_builds(
    State(s): State<AppState>,
    q: ListQuery,
) -> Result<Json<Vec<Job>>, ApiError> {
    let q = q.only(&[])?;
    let mut builds: Vec<Job> = s
        .registry
        .jobs(&q.filter)
        .await?
        .into_iter()
        .filter(|j| matches!(j.spec, JobSpec::Build { .. }))
        .collect();
    builds.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    Ok(Json(builds))
}

/// One build, with its manifest once it succeeded.
#[utoipa::path(get, path = "/v1/builds/{id}", tag = "builds", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
pub(super) async fn get_build(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(build_job(&s, &id).await?))
}

async fn build_job(s: &AppState, id: &str) -> Result<Job, ApiError> {
    let job = s.registry.job(parse_uuid("id", id)?).await?;
    if !matches!(job.spec, JobSpec::Build { .. }) {
        return Err(ApiError::not_found(format!("job {id} is not a build")));
    }
    Ok(job)
}

/// A page of a build's log.
#[derive(Debug, Serialize, ToSchema)]
pub struct BuildLogPage {
    pub lines: Vec<BuildLogLine>,
    /// Pass as `after` for the next page.
    pub next: u64,
    pub status: JobStatus,
    /// The build is over and every line it logged is in this or an earlier page.
    pub finished: bool,
    pub error: Option<String>,
}

/// The build's log lines after line `after`. With `wait=SECONDS` the answer waits for new
/// lines or the end of the build (long polling; what `ctpf builds logs --follow` uses).
#[utoipa::path(get, path = "/v1/builds/{id}/logs", tag = "builds",
    params(("id" = String, Path), ("after" = Option<u64>, Query), ("limit" = Option<usize>, Query, description = "default 1000, at most 10000"),
           ("wait" = Option<u64>, Query, description = "seconds, at most 60")),
    responses((status = 200, body = BuildLogPage), (status = 404, body = ErrorBody)))]
pub(super) async fn build_logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: ListQuery,
) -> Result<Json<BuildLogPage>, ApiError> {
    let job = build_job(&s, &id).await?;
    log_page(&s, job, q).await
}

/// A page of `job`'s log (builds and packaging jobs log the same way).
pub(super) async fn log_page(
    s: &AppState,
    job: Job,
    q: ListQuery,
) -> Result<Json<BuildLogPage>, ApiError> {
    let q = q.only(&["after", "limit", "wait"])?;
    let after: u64 = q.parse_num("after", 0)?;
    let limit: usize = q.parse_num::<usize>("limit", 1000)?.clamp(1, 10_000);
    let wait = Duration::from_secs(q.parse_num::<u64>("wait", 0)?.min(60));
    let deadline = tokio::time::Instant::now() + wait;
    let mut scanned_at = None;
    loop {
        // Lines, and the end of the build, arrive as events: rescan only after new ones.
        let head = s.registry.state().last_event_seq().await.map_err(RegistryError::from)?;
        if scanned_at == Some(head) {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = s.shutdown.cancelled() => {}
            }
            if tokio::time::Instant::now() < deadline && !s.shutdown.is_cancelled() {
                continue;
            }
        }
        scanned_at = Some(head);
        let (lines, job) = s.registry.build_log(job.id, after, limit).await?;
        let final_now = job.status.is_final();
        let expired = tokio::time::Instant::now() >= deadline || s.shutdown.is_cancelled();
        if !lines.is_empty() || final_now || expired {
            let next = lines.last().map_or(after, |l| l.seq);
            return Ok(Json(BuildLogPage {
                finished: final_now && lines.len() < limit,
                next,
                status: job.status,
                error: job.error,
                lines,
            }));
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = s.shutdown.cancelled() => {}
        }
    }
}
