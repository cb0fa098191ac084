use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{ArtifactName, Name, Sha256Digest};

/// Something that happened, in the order the store accepted it. `seq` is assigned by the
/// store and only grows, so a client can resume with `?after=SEQ`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: OffsetDateTime,
    /// The datacenter it concerns, if any; events are filtered by datacenter and its tags.
    pub datacenter: Option<Name>,
    #[serde(flatten)]
    pub body: EventBody,
}

/// An event before the store numbered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub datacenter: Option<Name>,
    #[serde(flatten)]
    pub body: EventBody,
}

impl NewEvent {
    pub fn new(datacenter: Option<Name>, body: EventBody) -> Self {
        Self { at: OffsetDateTime::now_utc(), datacenter, body }
    }

    pub fn numbered(self, seq: u64) -> Event {
        Event { seq, at: self.at, datacenter: self.datacenter, body: self.body }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    DatacenterCreated {
        name: Name,
    },
    DatacenterDeleted {
        name: Name,
    },
    HostRegistered {
        host_id: Uuid,
    },
    /// A machine enrolled with a token: `new` when it got a new host record, otherwise it
    /// was recognised (by SMBIOS UUID, then MAC) and its record updated.
    HostEnrolled {
        host_id: Uuid,
        new: bool,
        /// The media key it enrolled with (its name; never the secret), if it used one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media_key: Option<Name>,
    },
    HostUpdated {
        host_id: Uuid,
        state: crate::HostState,
    },
    /// An enrollment was refused (unknown, used or expired token); `reason` says which.
    EnrollmentRefused {
        reason: String,
    },
    HostDeleted {
        host_id: Uuid,
    },
    SshKeyAdded {
        name: Name,
        fingerprint: String,
    },
    SshKeyDeleted {
        name: Name,
    },
    ArtifactStored {
        name: ArtifactName,
        digest: Sha256Digest,
        size: u64,
    },
    ArtifactDeleted {
        name: ArtifactName,
    },
    JobQueued {
        job_id: Uuid,
        selector: String,
    },
    JobStarted {
        job_id: Uuid,
        worker: String,
        attempt: u32,
    },
    JobSucceeded {
        job_id: Uuid,
        worker: String,
        /// What a build made (build jobs only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        manifest: Option<Box<crate::BuildManifest>>,
        /// What a packaging job made (packaging jobs only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        package: Option<Box<crate::PackageManifest>>,
    },
    /// Log lines of a running build, in batches.
    BuildLog {
        job_id: Uuid,
        lines: Vec<crate::BuildLogLine>,
    },
    JobFailed {
        job_id: Uuid,
        worker: String,
        error: String,
        will_retry: bool,
    },
    JobDeadLettered {
        job_id: Uuid,
        reason: String,
    },
    /// Someone asked for the job to stop.
    JobCancelRequested {
        job_id: Uuid,
    },
    /// The worker running the job stopped it on request (or saw the request before starting).
    JobCancelled {
        job_id: Uuid,
        worker: String,
    },
    WorkerStarted {
        worker: String,
    },
    /// A media key was created (its name; events never carry the secret).
    MediaKeyCreated {
        name: Name,
    },
    MediaKeyRevoked {
        name: Name,
    },
    /// A datacenter's tags or DHCP settings changed.
    DatacenterUpdated {
        name: Name,
    },
    ReservationAdded {
        mac: crate::MacAddr,
        #[schema(value_type = String)]
        ip: std::net::Ipv4Addr,
    },
    ReservationRemoved {
        mac: crate::MacAddr,
    },
    WorkerCredentialCreated {
        id: String,
    },
    WorkerCredentialRevoked {
        id: String,
    },
    /// A worker heartbeated for the first time.
    WorkerJoined {
        worker: String,
    },
    /// A worker was silent for longer than the manager's timeout.
    WorkerLost {
        worker: String,
    },
    /// A lost worker heartbeated again.
    WorkerBack {
        worker: String,
    },
    /// The manager published a new generation of the datacenter's snapshot.
    SnapshotPublished {
        generation: u64,
    },
    /// A machine's callback that a site worker took while it booted there (possibly while the
    /// manager was unreachable) and forwarded. The manager turns it into a `host_enrolled`
    /// event; it is not kept as such.
    HostCallbackForwarded {
        worker: String,
        report: Box<crate::HostReport>,
        #[serde(with = "time::serde::rfc3339")]
        #[schema(value_type = String, format = DateTime)]
        received_at: OffsetDateTime,
    },
    /// A site worker sent a report about something outside its datacenter; it was dropped.
    ReportRefused {
        reason: String,
    },
    /// A worker's DHCP server answered a machine (`reply` is `offer`, `ack` or `nak`; `ip`
    /// is the address handed out, none in proxyDHCP). `boot_file` says which stage it sent
    /// the machine to: a TFTP loader, or an iPXE script URL.
    DhcpReplied {
        worker: String,
        mac: crate::MacAddr,
        reply: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>)]
        ip: Option<std::net::Ipv4Addr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_file: Option<String>,
    },
    /// A TFTP read a worker served, however it ended (`outcome` is `completed` or why not).
    TftpTransfer {
        worker: String,
        client: String,
        file: String,
        bytes: u64,
        millis: u64,
        outcome: String,
    },
    /// A boot request (script, kernel, initrd, loader) a worker's HTTP boot server answered.
    HttpBoot {
        worker: String,
        client: String,
        path: String,
        status: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<crate::MacAddr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
    },
    /// Boot events a worker did not send: beyond its rate limit, or beyond its backlog while
    /// the bus was unreachable.
    BootEventsDropped {
        worker: String,
        count: u64,
    },
}

impl EventBody {
    /// The `type` tag as it appears in JSON.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventBody::DatacenterCreated { .. } => "datacenter_created",
            EventBody::DatacenterDeleted { .. } => "datacenter_deleted",
            EventBody::HostRegistered { .. } => "host_registered",
            EventBody::HostEnrolled { .. } => "host_enrolled",
            EventBody::HostUpdated { .. } => "host_updated",
            EventBody::EnrollmentRefused { .. } => "enrollment_refused",
            EventBody::HostDeleted { .. } => "host_deleted",
            EventBody::SshKeyAdded { .. } => "ssh_key_added",
            EventBody::SshKeyDeleted { .. } => "ssh_key_deleted",
            EventBody::ArtifactStored { .. } => "artifact_stored",
            EventBody::ArtifactDeleted { .. } => "artifact_deleted",
            EventBody::JobQueued { .. } => "job_queued",
            EventBody::JobStarted { .. } => "job_started",
            EventBody::JobSucceeded { .. } => "job_succeeded",
            EventBody::JobFailed { .. } => "job_failed",
            EventBody::BuildLog { .. } => "build_log",
            EventBody::JobDeadLettered { .. } => "job_dead_lettered",
            EventBody::JobCancelRequested { .. } => "job_cancel_requested",
            EventBody::JobCancelled { .. } => "job_cancelled",
            EventBody::WorkerStarted { .. } => "worker_started",
            EventBody::MediaKeyCreated { .. } => "media_key_created",
            EventBody::MediaKeyRevoked { .. } => "media_key_revoked",
            EventBody::DatacenterUpdated { .. } => "datacenter_updated",
            EventBody::ReservationAdded { .. } => "reservation_added",
            EventBody::ReservationRemoved { .. } => "reservation_removed",
            EventBody::WorkerCredentialCreated { .. } => "worker_credential_created",
            EventBody::WorkerCredentialRevoked { .. } => "worker_credential_revoked",
            EventBody::WorkerJoined { .. } => "worker_joined",
            EventBody::WorkerLost { .. } => "worker_lost",
            EventBody::WorkerBack { .. } => "worker_back",
            EventBody::SnapshotPublished { .. } => "snapshot_published",
            EventBody::HostCallbackForwarded { .. } => "host_callback_forwarded",
            EventBody::ReportRefused { .. } => "report_refused",
            EventBody::DhcpReplied { .. } => "dhcp_replied",
            EventBody::TftpTransfer { .. } => "tftp_transfer",
            EventBody::HttpBoot { .. } => "http_boot",
            EventBody::BootEventsDropped { .. } => "boot_events_dropped",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_with_a_flat_type_tag() {
        let ev = NewEvent::new(
            Some("home".parse().unwrap()),
            EventBody::JobDeadLettered { job_id: Uuid::nil(), reason: "3 deliveries".into() },
        )
        .numbered(7);
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["type"], "job_dead_lettered");
        assert_eq!(json["seq"], 7);
        assert_eq!(ev.body.type_name(), "job_dead_lettered");
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, ev);
    }
}
