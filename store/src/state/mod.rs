//! Records and the event log.
//!
//! Records are opaque bytes (the registries store JSON) under `(table, key)`, each with a
//! version that starts at 1 and grows by one on every write. A [`Commit`] applies several
//! writes and appends events atomically, and only if every write's [`Precondition`] holds: that
//! is how "create unless it exists", compare-and-swap updates and "record and announce" are
//! expressed without races. Events get a sequence number from the store that only grows.

use std::fmt::{self, Debug};

use async_trait::async_trait;
use ctpf_common::{Event, NewEvent};

mod redb_store;
mod redis_store;

pub use redb_store::RedbStateStore;
pub use redis_store::RedisStateStore;

/// The record tables. A closed set: every backend creates exactly these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Datacenters,
    Hosts,
    SshKeys,
    Tokens,
    Jobs,
    Artifacts,
    /// Unique keys that point at a host (`mac:...`, `uuid:...`), so one machine never gets
    /// two identities even when two registrations race.
    HostIndex,
    /// Media keys by name (registries' `MediaKeyWithSecret`).
    MediaKeys,
    /// SHA-256 (hex) of a media key's secret -> the key's name, so enrollment finds a key in
    /// one lookup.
    MediaKeyIndex,
    /// Site worker credentials by id (the secret's SHA-256, never the secret).
    WorkerCredentials,
    /// What the manager last concluded about each worker (`DATACENTER/ID`): alive or lost.
    Workers,
    /// DHCP reservations by `DATACENTER/MAC`.
    Reservations,
    /// `DATACENTER/IP` -> MAC, so one address is never reserved twice.
    ReservedIps,
    /// Per datacenter, the last published snapshot generation and what it held.
    Snapshots,
}

impl Table {
    pub const ALL: [Table; 14] = [
        Table::Datacenters,
        Table::Hosts,
        Table::SshKeys,
        Table::Tokens,
        Table::Jobs,
        Table::Artifacts,
        Table::HostIndex,
        Table::MediaKeys,
        Table::MediaKeyIndex,
        Table::WorkerCredentials,
        Table::Workers,
        Table::Reservations,
        Table::ReservedIps,
        Table::Snapshots,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Datacenters => "datacenters",
            Table::Hosts => "hosts",
            Table::SshKeys => "ssh_keys",
            Table::Tokens => "tokens",
            Table::Jobs => "jobs",
            Table::Artifacts => "artifacts",
            Table::HostIndex => "host_index",
            Table::MediaKeys => "media_keys",
            Table::MediaKeyIndex => "media_key_index",
            Table::WorkerCredentials => "worker_credentials",
            Table::Workers => "workers",
            Table::Reservations => "reservations",
            Table::ReservedIps => "reserved_ips",
            Table::Snapshots => "snapshots",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub version: u64,
    pub value: Vec<u8>,
}

/// What must be true of a record for a write to it to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Nothing; the write always applies.
    Any,
    /// The record must not exist.
    Absent,
    /// The record must exist at exactly this version.
    Version(u64),
}

impl Precondition {
    fn holds(self, current: Option<u64>) -> bool {
        match self {
            Precondition::Any => true,
            Precondition::Absent => current.is_none(),
            Precondition::Version(v) => current == Some(v),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put {
        table: Table,
        key: String,
        value: Vec<u8>,
        expect: Precondition,
    },
    Delete {
        table: Table,
        key: String,
        expect: Precondition,
    },
    /// Changes nothing; only its precondition counts (e.g. "the datacenter still exists at
    /// the version I read" while adding a host to it).
    Check {
        table: Table,
        key: String,
        expect: Precondition,
    },
}

impl Write {
    pub fn put(table: Table, key: impl Into<String>, value: Vec<u8>, expect: Precondition) -> Self {
        Write::Put { table, key: key.into(), value, expect }
    }

    pub fn delete(table: Table, key: impl Into<String>, expect: Precondition) -> Self {
        Write::Delete { table, key: key.into(), expect }
    }

    pub fn check(table: Table, key: impl Into<String>, expect: Precondition) -> Self {
        Write::Check { table, key: key.into(), expect }
    }

    fn target(&self) -> (Table, &str, Precondition) {
        match self {
            Write::Put { table, key, expect, .. }
            | Write::Delete { table, key, expect }
            | Write::Check { table, key, expect } => (*table, key, *expect),
        }
    }
}

/// Writes and events applied all together or not at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commit {
    pub writes: Vec<Write>,
    pub events: Vec<NewEvent>,
}

impl Commit {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn write(mut self, write: Write) -> Self {
        self.writes.push(write);
        self
    }

    pub fn event(mut self, event: NewEvent) -> Self {
        self.events.push(event);
        self
    }
}

/// The outcome of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// For each write, in order: the record's version before it (`None`: it did not exist).
    /// A put's new version is that plus one; a check leaves it as it is.
    pub previous: Vec<Option<u64>>,
    /// The appended events with their sequence numbers.
    pub events: Vec<Event>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{table}/{key}: expected {expected:?}, found version {found:?}")]
    Conflict { table: Table, key: String, expected: Precondition, found: Option<u64> },
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error(
        "the state database is in use by another process ({0}); is another ctpf running on this data dir?"
    )]
    Locked(String),
    #[error("state store: {0}")]
    Storage(String),
    #[error("state store unreachable: {0}")]
    Unavailable(String),
    #[error("corrupt record in the state store: {0}")]
    Corrupt(String),
}

/// Keys are ids and names; bound them so a hostile one cannot bloat the store.
fn check_key(key: &str) -> Result<(), StateError> {
    if key.is_empty() {
        return Err(StateError::InvalidKey { key: key.into(), reason: "empty" });
    }
    if key.len() > 512 {
        return Err(StateError::InvalidKey {
            key: key[..64].into(),
            reason: "longer than 512 bytes",
        });
    }
    Ok(())
}

fn check_commit(commit: &Commit) -> Result<(), StateError> {
    commit.writes.iter().try_for_each(|w| check_key(w.target().1))
}

#[async_trait]
pub trait StateStore: Send + Sync + Debug {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Record>, StateError>;

    /// Every record of a table, in key order.
    async fn list(&self, table: Table) -> Result<Vec<(String, Record)>, StateError>;

    /// Applies every write and appends every event, or nothing (returning the first failed
    /// precondition as [`StateError::Conflict`]). Once this returns `Ok`, the change is durable
    /// to the backend's guarantee (embedded: on disk).
    async fn commit(&self, commit: Commit) -> Result<Committed, StateError>;

    /// Events with `seq > after`, oldest first, at most `limit`.
    async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StateError>;

    /// The newest event's sequence number (0 when there are none).
    async fn last_event_seq(&self) -> Result<u64, StateError>;
}

/// How many events the stores keep; older ones are trimmed.
pub const EVENT_RETENTION: u64 = 100_000;
