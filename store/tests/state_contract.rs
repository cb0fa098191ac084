//! One contract for every state store: the embedded redb store and Redis (a real
//! redis-server) must behave the same.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::sync::Arc;

use ctpf_common::{EventBody, NewEvent};
use ctpf_e2e::RedisServer;
use ctpf_store::state::{
    Commit, Precondition, RedbStateStore, RedisStateStore, StateError, StateStore, Table, Write,
};

fn dc_event(name: &str) -> NewEvent {
    NewEvent::new(
        Some(name.parse().unwrap()),
        EventBody::DatacenterCreated { name: name.parse().unwrap() },
    )
}

fn put(table: Table, key: &str, value: &str, expect: Precondition) -> Commit {
    Commit::new().write(Write::put(table, key, value.as_bytes().to_vec(), expect))
}

async fn records_and_versions(store: &dyn StateStore) {
    assert_eq!(store.get(Table::Datacenters, "home").await.unwrap(), None);
    let done =
        store.commit(put(Table::Datacenters, "home", "v1", Precondition::Absent)).await.unwrap();
    assert_eq!(done.previous, vec![None]);
    let rec = store.get(Table::Datacenters, "home").await.unwrap().unwrap();
    assert_eq!((rec.version, rec.value.as_slice()), (1, b"v1".as_slice()));

    // Create-if-absent refuses a second create and names what it found.
    match store.commit(put(Table::Datacenters, "home", "again", Precondition::Absent)).await {
        Err(StateError::Conflict { table, key, found, .. }) => {
            assert_eq!((table, key.as_str(), found), (Table::Datacenters, "home", Some(1)));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }

    // Compare-and-swap on the version.
    store.commit(put(Table::Datacenters, "home", "v2", Precondition::Version(1))).await.unwrap();
    assert!(matches!(
        store.commit(put(Table::Datacenters, "home", "stale", Precondition::Version(1))).await,
        Err(StateError::Conflict { found: Some(2), .. })
    ));
    let rec = store.get(Table::Datacenters, "home").await.unwrap().unwrap();
    assert_eq!((rec.version, rec.value.as_slice()), (2, b"v2".as_slice()));
    store.commit(put(Table::Datacenters, "home", "v3", Precondition::Any)).await.unwrap();
    assert_eq!(store.get(Table::Datacenters, "home").await.unwrap().unwrap().version, 3);

    // The same key in another table is another record.
    assert_eq!(store.get(Table::Hosts, "home").await.unwrap(), None);

    // Delete: conditional, and reports what was there.
    let gone =
        Commit::new().write(Write::delete(Table::Datacenters, "home", Precondition::Version(3)));
    assert_eq!(store.commit(gone).await.unwrap().previous, vec![Some(3)]);
    assert_eq!(store.get(Table::Datacenters, "home").await.unwrap(), None);
    let nothing = Commit::new().write(Write::delete(Table::Datacenters, "home", Precondition::Any));
    assert_eq!(store.commit(nothing).await.unwrap().previous, vec![None]);
    // Re-created records start over at version 1.
    store.commit(put(Table::Datacenters, "home", "new", Precondition::Absent)).await.unwrap();
    assert_eq!(store.get(Table::Datacenters, "home").await.unwrap().unwrap().version, 1);

    // Binary values round-trip untouched.
    let bytes: Vec<u8> = (0..=255).collect();
    store
        .commit(Commit::new().write(Write::put(
            Table::Artifacts,
            "bin",
            bytes.clone(),
            Precondition::Any,
        )))
        .await
        .unwrap();
    assert_eq!(store.get(Table::Artifacts, "bin").await.unwrap().unwrap().value, bytes);
}

async fn commits_are_atomic(store: &dyn StateStore) {
    store.commit(put(Table::Hosts, "a", "1", Precondition::Any)).await.unwrap();
    let seq_before = store.last_event_seq().await.unwrap();
    // The second write's precondition fails: neither write nor the event is applied.
    let commit = Commit::new()
        .write(Write::put(Table::Hosts, "b", b"1".to_vec(), Precondition::Absent))
        .write(Write::put(Table::Hosts, "a", b"2".to_vec(), Precondition::Absent))
        .event(dc_event("x"));
    assert!(
        matches!(store.commit(commit).await, Err(StateError::Conflict { ref key, .. }) if key == "a")
    );
    assert_eq!(store.get(Table::Hosts, "b").await.unwrap(), None);
    assert_eq!(store.get(Table::Hosts, "a").await.unwrap().unwrap().value, b"1");
    assert_eq!(store.last_event_seq().await.unwrap(), seq_before);

    // Writes within one commit see each other: put then CAS on the new version.
    let commit = Commit::new()
        .write(Write::put(Table::Hosts, "c", b"1".to_vec(), Precondition::Absent))
        .write(Write::put(Table::Hosts, "c", b"2".to_vec(), Precondition::Version(1)));
    assert_eq!(store.commit(commit).await.unwrap().previous, vec![None, Some(1)]);
    let rec = store.get(Table::Hosts, "c").await.unwrap().unwrap();
    assert_eq!((rec.version, rec.value.as_slice()), (2, b"2".as_slice()));

    // A check writes nothing but must hold like any precondition.
    let commit = Commit::new()
        .write(Write::check(Table::Hosts, "c", Precondition::Version(2)))
        .write(Write::put(Table::Hosts, "d", b"1".to_vec(), Precondition::Absent));
    assert_eq!(store.commit(commit).await.unwrap().previous, vec![Some(2), None]);
    assert_eq!(store.get(Table::Hosts, "c").await.unwrap().unwrap().version, 2);
    let commit = Commit::new()
        .write(Write::put(Table::Hosts, "e", b"1".to_vec(), Precondition::Absent))
        .write(Write::check(Table::Hosts, "c", Precondition::Absent));
    assert!(
        matches!(store.commit(commit).await, Err(StateError::Conflict { ref key, .. }) if key == "c")
    );
    assert_eq!(store.get(Table::Hosts, "e").await.unwrap(), None);
    let gone = Commit::new().write(Write::delete(Table::Hosts, "d", Precondition::Any));
    store.commit(gone).await.unwrap();

    // Listing is complete and in key order.
    let keys: Vec<_> =
        store.list(Table::Hosts).await.unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["a", "c"]);
    assert!(store.list(Table::Tokens).await.unwrap().is_empty());

    // Bad keys are refused before anything is written.
    assert!(matches!(
        store.commit(put(Table::Hosts, "", "x", Precondition::Any)).await,
        Err(StateError::InvalidKey { .. })
    ));
}

async fn events_are_numbered_in_order(store: &dyn StateStore) {
    let start = store.last_event_seq().await.unwrap();
    let done = store.commit(Commit::new().event(dc_event("a")).event(dc_event("b"))).await.unwrap();
    let seqs: Vec<u64> = done.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [start + 1, start + 2]);
    assert_eq!(store.last_event_seq().await.unwrap(), start + 2);
    let read = store.events_after(start, 10).await.unwrap();
    assert_eq!(read, done.events);
    assert_eq!(store.events_after(start + 1, 10).await.unwrap(), done.events[1..]);
    assert_eq!(store.events_after(start, 1).await.unwrap().len(), 1);
    assert!(store.events_after(start + 2, 10).await.unwrap().is_empty());
}

/// Many concurrent committers: every commit is applied exactly once, every event gets its own
/// sequence number, and compare-and-swap increments lose no update.
async fn concurrent_commits(store: Arc<dyn StateStore>) {
    store.commit(put(Table::Jobs, "counter", "0", Precondition::Any)).await.unwrap();
    let start = store.last_event_seq().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("job-{i}");
            store
                .commit(put(Table::Jobs, &key, "x", Precondition::Absent).event(dc_event("c")))
                .await
                .unwrap();
            // Increment the shared counter with CAS, retrying on conflict.
            loop {
                let rec = store.get(Table::Jobs, "counter").await.unwrap().unwrap();
                let n: u64 = std::str::from_utf8(&rec.value).unwrap().parse().unwrap();
                let next = put(
                    Table::Jobs,
                    "counter",
                    &(n + 1).to_string(),
                    Precondition::Version(rec.version),
                );
                match store.commit(next).await {
                    Ok(_) => break,
                    Err(StateError::Conflict { .. }) => continue,
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let counter = store.get(Table::Jobs, "counter").await.unwrap().unwrap();
    assert_eq!(counter.value, b"40");
    assert_eq!(store.list(Table::Jobs).await.unwrap().len(), 41);
    let events = store.events_after(start, 1000).await.unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (start + 1..=start + 40).collect::<Vec<_>>());
}

async fn contract(make: impl Fn() -> Arc<dyn StateStore>) {
    records_and_versions(&*make()).await;
    commits_are_atomic(&*make()).await;
    events_are_numbered_in_order(&*make()).await;
    concurrent_commits(make()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redb_store_meets_the_contract() {
    // Each part of the contract gets a fresh database.
    let dir = tempfile::tempdir().unwrap();
    let counter = std::sync::atomic::AtomicU32::new(0);
    contract(|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Arc::new(RedbStateStore::open(&dir.path().join(format!("state-{n}.redb"))).unwrap())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_meets_the_contract() {
    let server = RedisServer::start().unwrap();
    let mut stores = Vec::new();
    for n in 0..4 {
        stores.push(Arc::new(
            RedisStateStore::connect(&server.url(), &format!("t{n}")).await.unwrap(),
        ));
    }
    let next = std::sync::Mutex::new(stores.into_iter());
    contract(|| next.lock().unwrap().next().unwrap() as Arc<dyn StateStore>).await;
}

#[tokio::test]
async fn redb_store_keeps_writes_across_reopen_and_locks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let store = RedbStateStore::open(&path).unwrap();
    store
        .commit(put(Table::Tokens, "t", "secret", Precondition::Absent).event(dc_event("a")))
        .await
        .unwrap();
    // A second opener (another ctpf on the same data dir) is told why it cannot start.
    assert!(matches!(RedbStateStore::open(&path), Err(StateError::Locked(_))));
    drop(store);
    // The writer thread holds the database until its queue closes; give it a moment.
    let store = loop {
        match RedbStateStore::open(&path) {
            Ok(s) => break s,
            Err(StateError::Locked(_)) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(store.get(Table::Tokens, "t").await.unwrap().unwrap().value, b"secret");
    assert_eq!(store.last_event_seq().await.unwrap(), 1);
}

#[tokio::test]
async fn redis_store_survives_a_server_restart_and_reports_an_outage() {
    let mut server = RedisServer::start().unwrap();
    let store = RedisStateStore::connect(&server.url(), "ctpf").await.unwrap();
    store
        .commit(put(Table::Hosts, "h", "1", Precondition::Absent).event(dc_event("a")))
        .await
        .unwrap();
    server.restart().unwrap();
    // The connection manager reconnects; the first call after the restart may still fail.
    let mut rec = None;
    for _ in 0..50 {
        if let Ok(r) = store.get(Table::Hosts, "h").await {
            rec = r;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(rec.unwrap().value, b"1");
    assert_eq!(store.last_event_seq().await.unwrap(), 1);
    drop(server);
    assert!(matches!(store.get(Table::Hosts, "h").await, Err(StateError::Unavailable(_))));
}
