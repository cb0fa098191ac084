use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::TagSelector;

/// The work a job asks for. Each service adds its own kinds (builds, packaging, SSH runs);
/// `probe` exercises the pipeline itself: a worker sleeps, then succeeds or fails as asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum JobSpec {
    Probe {
        #[serde(default)]
        sleep_ms: u64,
        #[serde(default)]
        fail: bool,
    },
    /// A build on a worker with the `builder` role; `name` as in [`crate::NewBuild`].
    Build {
        request: Box<crate::BuildRequest>,
        #[serde(default)]
        name: Option<crate::ArtifactName>,
    },
    /// Boot media on a worker with the `packager` role; fields as in [`crate::NewPackage`].
    Package {
        request: Box<crate::PackageRequest>,
        #[serde(default)]
        name: Option<crate::ArtifactName>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        no_cache: bool,
    },
}

impl JobSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Probe { .. } => "probe",
            JobSpec::Build { .. } => "build",
            JobSpec::Package { .. } => "package",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a worker whose tags match the selector.
    Queued,
    Running,
    Succeeded,
    /// Failed on its last allowed attempt, or failed in a way retrying cannot fix.
    Failed,
    /// Given up after too many deliveries (e.g. every worker that took it died).
    DeadLettered,
    /// Stopped on request (`POST /v1/jobs/{id}/cancel`), before or while it ran.
    Cancelled,
}

impl JobStatus {
    /// The name as it appears in JSON.
    pub fn label(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::DeadLettered => "dead_lettered",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded
                | JobStatus::Failed
                | JobStatus::DeadLettered
                | JobStatus::Cancelled
        )
    }
}

/// What a client sends to submit a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    pub spec: JobSpec,
    #[serde(default)]
    pub selector: TagSelector,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: Uuid,
    pub spec: JobSpec,
    pub selector: TagSelector,
    pub status: JobStatus,
    /// How many times a worker has taken this job.
    pub attempts: u32,
    /// The worker that last took it.
    pub worker: Option<String>,
    /// Why it failed or was dead-lettered.
    pub error: Option<String>,
    /// A cancel was asked for while it ran; the worker stops it at its next check.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
    /// Why a queued job is not running: no live worker matches its selector. Filled in when
    /// the job is read through the API, never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// What a succeeded build made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<crate::BuildManifest>,
    /// What a succeeded packaging job made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<crate::PackageManifest>,
    /// An event sequence number at or before this job's first event: where reading its log
    /// lines from the event log starts.
    #[serde(default)]
    pub first_event_seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
}

impl Job {
    pub fn new(id: Uuid, new: NewJob, now: OffsetDateTime) -> Self {
        Self {
            id,
            spec: new.spec,
            selector: new.selector,
            status: JobStatus::Queued,
            attempts: 0,
            worker: None,
            waiting_for: None,
            error: None,
            cancel_requested: false,
            manifest: None,
            package: None,
            first_event_seq: 0,
            created_at: now,
            updated_at: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JobStatus;

    #[test]
    fn status_labels_match_json() {
        for status in [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::DeadLettered,
            JobStatus::Cancelled,
        ] {
            let json = serde_json::to_value(status).expect("a status serializes");
            assert_eq!(json, status.label());
        }
    }
}
