//! Workers' reports arrive at least once, possibly late or twice; the job records must end up
//! right anyway.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{sync::Arc, time::Duration};

use ctpf_bus::{Bus, BusConfig, MemoryBus};
use ctpf_common::{EventBody, JobSpec, JobStatus, NewEvent, NewJob, Role, WorkerIdentity};
use ctpf_registries::Registry;
use ctpf_store::state::RedbStateStore;

fn registry(dir: &tempfile::TempDir, bus: Arc<dyn Bus>) -> Registry {
    let state = Arc::new(RedbStateStore::open(&dir.path().join("state.redb")).unwrap());
    Registry::new(state, bus)
}

fn probe() -> NewJob {
    NewJob { spec: JobSpec::Probe { sleep_ms: 0, fail: false }, selector: Default::default() }
}

fn report(body: EventBody) -> NewEvent {
    NewEvent::new(None, body)
}

#[tokio::test]
async fn final_states_do_not_move_and_duplicates_are_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(&dir, Arc::new(MemoryBus::new(BusConfig::default())));
    let job = reg.submit_job(probe()).await.unwrap();
    let id = job.id;
    let started = EventBody::JobStarted { job_id: id, worker: "w1".into(), attempt: 1 };
    reg.apply_report(report(started.clone())).await.unwrap();
    assert_eq!(reg.job(id).await.unwrap().status, JobStatus::Running);
    let done =
        EventBody::JobSucceeded { job_id: id, worker: "w1".into(), manifest: None, package: None };
    reg.apply_report(report(done.clone())).await.unwrap();
    // A duplicate and a late "started" change nothing.
    assert!(reg.apply_report(report(done)).await.unwrap().is_none());
    assert!(reg.apply_report(report(started)).await.unwrap().is_none());
    let job = reg.job(id).await.unwrap();
    assert_eq!(
        (job.status, job.attempts, job.worker.as_deref()),
        (JobStatus::Succeeded, 1, Some("w1"))
    );

    // A retryable failure puts the job back to queued with the error kept.
    let other = reg.submit_job(probe()).await.unwrap().id;
    let failed = EventBody::JobFailed {
        job_id: other,
        worker: "w2".into(),
        error: "disk full".into(),
        will_retry: true,
    };
    reg.apply_report(report(failed)).await.unwrap();
    let job = reg.job(other).await.unwrap();
    assert_eq!((job.status, job.error.as_deref()), (JobStatus::Queued, Some("disk full")));

    // A report about a job nobody knows is dropped, not an error.
    let ghost = EventBody::JobSucceeded {
        job_id: ctpf_common::Uuid::now_v7(),
        worker: "w".into(),
        manifest: None,
        package: None,
    };
    assert!(reg.apply_report(report(ghost)).await.unwrap().is_none());
}

#[tokio::test]
async fn a_job_whose_workers_keep_dying_is_recorded_as_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let config = BusConfig { lease: Duration::from_millis(100), max_deliveries: 2 };
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new(config));
    let reg = registry(&dir, bus.clone());
    let id = reg.submit_job(probe()).await.unwrap().id;
    let worker = |id: &str| WorkerIdentity {
        id: id.into(),
        datacenter: "home".parse().unwrap(),
        tags: Default::default(),
        roles: vec![Role::Builder],
    };
    // Two workers take it and vanish without a word.
    for w in ["w1", "w2"] {
        bus.next_job(&worker(w), Duration::from_secs(2)).await.unwrap().unwrap();
    }
    assert!(bus.next_job(&worker("w3"), Duration::from_millis(500)).await.unwrap().is_none());
    // The manager applies what the bus reported.
    let reports = bus.next_reports("manager", 10, Duration::from_secs(1)).await.unwrap();
    for r in &reports {
        reg.apply_report(r.event.clone()).await.unwrap();
    }
    let job = reg.job(id).await.unwrap();
    assert_eq!(job.status, JobStatus::DeadLettered, "{job:?}");
    assert!(job.error.unwrap().contains("delivered 2 times"));
}

#[tokio::test]
async fn a_waiter_sees_the_final_report_and_gives_up_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Arc::new(registry(&dir, Arc::new(MemoryBus::new(BusConfig::default()))));
    let id = reg.submit_job(probe()).await.unwrap().id;

    // A deadline already passed: the job as it is.
    let now = tokio::time::Instant::now();
    assert_eq!(reg.wait_until_final(id, now).await.unwrap().status, JobStatus::Queued);

    // A waiter started before the report gets the final job, woken by the commit.
    let waiter = tokio::spawn({
        let reg = reg.clone();
        async move { reg.wait_until_final(id, now + Duration::from_secs(60)).await }
    });
    tokio::task::yield_now().await;
    let done =
        EventBody::JobSucceeded { job_id: id, worker: "w1".into(), manifest: None, package: None };
    reg.apply_report(report(done)).await.unwrap();
    let job = waiter.await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
}
