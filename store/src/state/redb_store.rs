//! The embedded state store: one redb file, no server.
//!
//! Reads run as redb read transactions on the blocking pool. Writes go through one writer
//! thread that practises group commit: it takes every commit waiting in its queue, applies
//! them in order inside one write transaction (each checks its own preconditions against the
//! state the ones before it left), and makes them durable with a single fsync. Callers are
//! answered only after that fsync, so an acknowledged write survives `kill -9` and power loss,
//! and throughput is not capped at one fsync per write.

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use ctpf_common::Event;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{
    Commit, Committed, EVENT_RETENTION, Record, StateError, StateStore, Table, Write, check_commit,
};

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const EVENT_SEQ: &str = "event_seq";
/// Upper bound of commits merged into one transaction.
const MAX_BATCH: usize = 512;

fn table_def(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

/// Stored value: the version as 8 big-endian bytes, then the record's bytes.
fn encode(version: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(value);
    out
}

fn decode(table: Table, key: &str, raw: &[u8]) -> Result<Record, StateError> {
    let (version, value) = raw
        .split_first_chunk::<8>()
        .ok_or_else(|| StateError::Corrupt(format!("{table}/{key}: shorter than its header")))?;
    Ok(Record { version: u64::from_be_bytes(*version), value: value.to_vec() })
}

fn storage<E: std::fmt::Display>(e: E) -> StateError {
    StateError::Storage(e.to_string())
}

struct Request {
    commit: Commit,
    reply: oneshot::Sender<Result<Committed, StateError>>,
}

#[derive(Debug, Clone)]
pub struct RedbStateStore {
    db: Arc<Database>,
    writer: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").finish_non_exhaustive()
    }
}

impl RedbStateStore {
    /// Opens or creates the database file. Fails with [`StateError::Locked`] when another
    /// process has it open.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StateError::Locked(path.display().to_string()));
            }
            Err(e) => return Err(storage(e)),
        };
        // Create every table up front so readers never meet a missing one.
        let txn = db.begin_write().map_err(storage)?;
        for table in Table::ALL {
            txn.open_table(table_def(table)).map_err(storage)?;
        }
        txn.open_table(EVENTS).map_err(storage)?;
        txn.open_table(META).map_err(storage)?;
        txn.commit().map_err(storage)?;

        let db = Arc::new(db);
        let (writer, requests) = mpsc::channel(4 * MAX_BATCH);
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("ctpf-state-writer".into())
            .spawn(move || write_loop(&writer_db, requests))
            .map_err(storage)?;
        Ok(Self { db, writer })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(storage)?
    }
}

fn write_loop(db: &Database, mut requests: mpsc::Receiver<Request>) {
    while let Some(first) = requests.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (commits, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|r| (r.commit, r.reply)).unzip();
        match apply_batch(db, commits) {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "state store write failed; nothing in the batch was applied");
                for reply in replies {
                    let _ = reply.send(Err(StateError::Storage(e.to_string())));
                }
            }
        }
    }
}

/// Applies commits in order within one transaction. The outer error aborts the whole batch
/// (an I/O failure); an inner error is one commit's failed precondition, which leaves the
/// others unaffected.
fn apply_batch(
    db: &Database,
    commits: Vec<Commit>,
) -> Result<Vec<Result<Committed, StateError>>, StateError> {
    let txn = db.begin_write().map_err(storage)?;
    let mut results = Vec::with_capacity(commits.len());
    {
        let mut meta = txn.open_table(META).map_err(storage)?;
        let mut events = txn.open_table(EVENTS).map_err(storage)?;
        let mut seq = meta.get(EVENT_SEQ).map_err(storage)?.map(|v| v.value()).unwrap_or(0);
        let first_seq = seq;
        for commit in commits {
            results.push(apply_one(&txn, commit, &mut events, &mut seq)?);
        }
        if seq != first_seq {
            meta.insert(EVENT_SEQ, seq).map_err(storage)?;
            // Trim the log in small steps so no single batch pays for a large delete.
            let cutoff = seq.saturating_sub(EVENT_RETENTION);
            for _ in 0..(2 * (seq - first_seq)) {
                match events.first().map_err(storage)? {
                    Some((k, _)) if k.value() <= cutoff => {}
                    _ => break,
                }
                events.pop_first().map_err(storage)?;
            }
        }
    }
    txn.commit().map_err(storage)?;
    Ok(results)
}

fn apply_one(
    txn: &redb::WriteTransaction,
    commit: Commit,
    events: &mut redb::Table<u64, &[u8]>,
    seq: &mut u64,
) -> Result<Result<Committed, StateError>, StateError> {
    // Check every precondition first, so a conflict leaves nothing half-applied.
    let mut previous = Vec::with_capacity(commit.writes.len());
    for write in &commit.writes {
        let (table, key, expect) = write.target();
        let t = txn.open_table(table_def(table)).map_err(storage)?;
        let current = match t.get(key).map_err(storage)? {
            Some(raw) => Some(decode(table, key, raw.value())?.version),
            None => None,
        };
        // A later write in the same commit sees the earlier ones' effect.
        let current = overlay(&commit.writes, write, &previous, current);
        if !expect.holds(current) {
            return Ok(Err(StateError::Conflict {
                table,
                key: key.to_owned(),
                expected: expect,
                found: current,
            }));
        }
        previous.push(current);
    }
    for (write, prev) in commit.writes.iter().zip(&previous) {
        match write {
            Write::Put { table, key, value, .. } => {
                let mut t = txn.open_table(table_def(*table)).map_err(storage)?;
                let stored = encode(prev.unwrap_or(0) + 1, value);
                t.insert(key.as_str(), stored.as_slice()).map_err(storage)?;
            }
            Write::Delete { table, key, .. } => {
                let mut t = txn.open_table(table_def(*table)).map_err(storage)?;
                t.remove(key.as_str()).map_err(storage)?;
            }
            Write::Check { .. } => {}
        }
    }
    let mut appended = Vec::with_capacity(commit.events.len());
    for event in commit.events {
        *seq += 1;
        let event: Event = event.numbered(*seq);
        let json = serde_json::to_vec(&event).map_err(storage)?;
        events.insert(*seq, json.as_slice()).map_err(storage)?;
        appended.push(event);
    }
    Ok(Ok(Committed { previous, events: appended }))
}

/// The version `write`'s record will have when its turn comes, given the writes before it in
/// the same commit.
fn overlay(
    writes: &[Write],
    write: &Write,
    previous: &[Option<u64>],
    stored: Option<u64>,
) -> Option<u64> {
    let (table, key, _) = write.target();
    let mut current = stored;
    for (earlier, prev) in writes.iter().zip(previous) {
        let (t, k, _) = earlier.target();
        if t == table && k == key {
            current = match earlier {
                Write::Put { .. } => Some(prev.unwrap_or(0) + 1),
                Write::Delete { .. } => None,
                Write::Check { .. } => *prev,
            };
        }
    }
    current
}

#[async_trait]
impl StateStore for RedbStateStore {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Record>, StateError> {
        let key = key.to_owned();
        self.read(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let t = txn.open_table(table_def(table)).map_err(storage)?;
            match t.get(key.as_str()).map_err(storage)? {
                Some(raw) => Ok(Some(decode(table, &key, raw.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list(&self, table: Table) -> Result<Vec<(String, Record)>, StateError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let t = txn.open_table(table_def(table)).map_err(storage)?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                let key = k.value().to_owned();
                let record = decode(table, &key, v.value())?;
                out.push((key, record));
            }
            Ok(out)
        })
        .await
    }

    async fn commit(&self, commit: Commit) -> Result<Committed, StateError> {
        check_commit(&commit)?;
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Request { commit, reply })
            .await
            .map_err(|_| StateError::Storage("the writer thread has stopped".into()))?;
        answer.await.map_err(|_| StateError::Storage("the writer thread has stopped".into()))?
    }

    async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StateError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let t = txn.open_table(EVENTS).map_err(storage)?;
            let mut out = Vec::new();
            for entry in t.range(after.saturating_add(1)..).map_err(storage)?.take(limit) {
                let (k, v) = entry.map_err(storage)?;
                let event: Event = serde_json::from_slice(v.value())
                    .map_err(|e| StateError::Corrupt(format!("event {}: {e}", k.value())))?;
                out.push(event);
            }
            Ok(out)
        })
        .await
    }

    async fn last_event_seq(&self) -> Result<u64, StateError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let meta = txn.open_table(META).map_err(storage)?;
            Ok(meta.get(EVENT_SEQ).map_err(storage)?.map(|v| v.value()).unwrap_or(0))
        })
        .await
    }
}
