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
}

impl JobSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Probe { .. } => "probe",
            JobSpec::Build { .. } => "build",
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
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::DeadLettered)
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
    /// What a succeeded build made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<crate::BuildManifest>,
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
            error: None,
            manifest: None,
            first_event_seq: 0,
            created_at: now,
            updated_at: now,
        }
    }
}
