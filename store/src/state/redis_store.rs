//! The state store for distributed sites: Redis.
//!
//! Layout, all under one hash tag so a Redis Cluster keeps it in one slot:
//! - `{ns}:rec:<table>`: hash of key -> record bytes;
//! - `{ns}:ver:<table>`: hash of key -> version;
//! - `{ns}:events`: a stream whose entry ids are `0-<seq>`, field `e` = the event's JSON;
//! - `{ns}:event-seq`: the last sequence number handed out.
//!
//! A commit is one Lua script, which Redis runs atomically: it checks every precondition,
//! then applies the writes and appends the events. Durability is Redis's: run it with
//! `appendonly yes` (and `appendfsync always` for fsync-per-write).

use async_trait::async_trait;
use ctpf_common::{Event, NewEvent};
use redis::{AsyncCommands as _, Script, Value, aio::ConnectionManager};

use super::{
    Commit, Committed, EVENT_RETENTION, Precondition, Record, StateError, StateStore, Table, Write,
    check_commit,
};

/// ARGV: namespace, retention, write count, then per write: op, table, key, condition, value;
/// then per event: its JSON. Returns {"ok", prev versions (-1 = absent)..., seqs...} or
/// {"conflict", write index, found version (-1 = absent)}.
const COMMIT_SCRIPT: &str = r#"
local ns = ARGV[1]
local retention = tonumber(ARGV[2])
local nwrites = tonumber(ARGV[3])
local function rec(t) return ns .. ':rec:' .. t end
local function ver(t) return ns .. ':ver:' .. t end
local pending = {}
local prev = {}
for i = 0, nwrites - 1 do
  local base = 4 + i * 5
  local op, t, k, cond = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local id = t .. '\n' .. k
  local current
  if pending[id] ~= nil then
    current = pending[id]
  else
    current = tonumber(redis.call('HGET', ver(t), k)) or -1
  end
  if cond == 'absent' then
    if current ~= -1 then return {'conflict', i, current} end
  elseif cond ~= 'any' then
    if current ~= tonumber(cond) then return {'conflict', i, current} end
  end
  prev[i + 1] = current
  if op == 'put' then
    pending[id] = math.max(current, 0) + 1
  elseif op == 'del' then
    pending[id] = -1
  end
end
local out = {'ok'}
for i = 0, nwrites - 1 do
  local base = 4 + i * 5
  local op, t, k, value = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 4]
  if op == 'put' then
    redis.call('HSET', rec(t), k, value)
    redis.call('HSET', ver(t), k, math.max(prev[i + 1], 0) + 1)
  elseif op == 'del' then
    redis.call('HDEL', rec(t), k)
    redis.call('HDEL', ver(t), k)
  end
  table.insert(out, prev[i + 1])
end
for j = 4 + nwrites * 5, #ARGV do
  local seq = redis.call('INCR', ns .. ':event-seq')
  redis.call('XADD', ns .. ':events', 'MAXLEN', '~', retention, '0-' .. seq, 'e', ARGV[j])
  table.insert(out, seq)
end
return out
"#;

#[derive(Clone)]
pub struct RedisStateStore {
    conn: ConnectionManager,
    ns: String,
    script: Script,
}

impl std::fmt::Debug for RedisStateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStateStore").field("ns", &self.ns).finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> StateError {
    StateError::Unavailable(e.to_string())
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

impl RedisStateStore {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379/`). `namespace` prefixes every key,
    /// so several ctpf installations (or tests) can share one Redis.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, StateError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let conn = ConnectionManager::new(client).await.map_err(unavailable)?;
        Ok(Self { conn, ns: format!("{{{namespace}}}"), script: Script::new(COMMIT_SCRIPT) })
    }

    fn rec_key(&self, table: Table) -> String {
        format!("{}:rec:{}", self.ns, table.name())
    }

    fn ver_key(&self, table: Table) -> String {
        format!("{}:ver:{}", self.ns, table.name())
    }

    fn events_key(&self) -> String {
        format!("{}:events", self.ns)
    }
}

fn parse_event(
    id: &str,
    fields: &std::collections::HashMap<String, Value>,
) -> Result<Event, StateError> {
    let seq = id
        .strip_prefix("0-")
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| StateError::Corrupt(format!("event id {id}")))?;
    let json = match fields.get("e") {
        Some(Value::BulkString(b)) => b,
        _ => return Err(StateError::Corrupt(format!("event {id} has no body"))),
    };
    let event: NewEvent = serde_json::from_slice(json)
        .map_err(|e| StateError::Corrupt(format!("event {id}: {e}")))?;
    Ok(event.numbered(seq))
}

#[async_trait]
impl StateStore for RedisStateStore {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Record>, StateError> {
        let mut conn = self.conn.clone();
        let (value, version): (Option<Vec<u8>>, Option<u64>) = redis::pipe()
            .atomic()
            .hget(self.rec_key(table), key)
            .hget(self.ver_key(table), key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        match (value, version) {
            (Some(value), Some(version)) => Ok(Some(Record { version, value })),
            (None, None) => Ok(None),
            _ => Err(StateError::Corrupt(format!("{table}/{key}: record and version disagree"))),
        }
    }

    async fn list(&self, table: Table) -> Result<Vec<(String, Record)>, StateError> {
        let mut conn = self.conn.clone();
        let (values, versions): (
            std::collections::BTreeMap<String, Vec<u8>>,
            std::collections::HashMap<String, u64>,
        ) = redis::pipe()
            .atomic()
            .hgetall(self.rec_key(table))
            .hgetall(self.ver_key(table))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        values
            .into_iter()
            .map(|(key, value)| {
                let version = versions.get(&key).copied().ok_or_else(|| {
                    StateError::Corrupt(format!("{table}/{key}: record without version"))
                })?;
                Ok((key, Record { version, value }))
            })
            .collect()
    }

    async fn commit(&self, commit: Commit) -> Result<Committed, StateError> {
        check_commit(&commit)?;
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(&self.ns).arg(EVENT_RETENTION).arg(commit.writes.len());
        for write in &commit.writes {
            let (op, value): (&str, &[u8]) = match write {
                Write::Put { value, .. } => ("put", value),
                Write::Delete { .. } => ("del", b""),
                Write::Check { .. } => ("chk", b""),
            };
            let (table, key, expect) = write.target();
            let cond = match expect {
                Precondition::Any => "any".to_owned(),
                Precondition::Absent => "absent".to_owned(),
                Precondition::Version(v) => v.to_string(),
            };
            invocation.arg(op).arg(table.name()).arg(key).arg(cond).arg(value);
        }
        for event in &commit.events {
            invocation
                .arg(serde_json::to_vec(event).map_err(|e| StateError::Storage(e.to_string()))?);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = invocation.invoke_async(&mut conn).await.map_err(unavailable)?;
        let status = match reply.first() {
            Some(Value::BulkString(s)) => s.as_slice(),
            Some(Value::SimpleString(s)) => s.as_bytes(),
            _ => b"",
        };
        let ints: Vec<i64> = reply.iter().skip(1).filter_map(as_int).collect();
        if status == b"conflict" {
            let index = ints.first().copied().unwrap_or(0).max(0) as usize;
            let found = ints.get(1).copied().filter(|v| *v >= 0).map(|v| v as u64);
            let (table, key, expected) = commit
                .writes
                .get(index)
                .map(Write::target)
                .ok_or_else(|| StateError::Storage("conflict on an unknown write".into()))?;
            return Err(StateError::Conflict { table, key: key.to_owned(), expected, found });
        }
        if status != b"ok" || ints.len() != commit.writes.len() + commit.events.len() {
            return Err(StateError::Storage(format!("unexpected commit reply {reply:?}")));
        }
        let (prev, seqs) = ints.split_at(commit.writes.len());
        let previous = prev.iter().map(|v| (*v >= 0).then_some(*v as u64)).collect();
        let events =
            commit.events.into_iter().zip(seqs).map(|(e, seq)| e.numbered(*seq as u64)).collect();
        Ok(Committed { previous, events })
    }

    async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StateError> {
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply = conn
            .xrange_count(self.events_key(), format!("(0-{after}"), "+", limit)
            .await
            .map_err(unavailable)?;
        reply.ids.iter().map(|entry| parse_event(&entry.id, &entry.map)).collect()
    }

    async fn last_event_seq(&self) -> Result<u64, StateError> {
        let mut conn = self.conn.clone();
        let seq: Option<u64> =
            conn.get(format!("{}:event-seq", self.ns)).await.map_err(unavailable)?;
        Ok(seq.unwrap_or(0))
    }
}
