//! Durable leases for authoritative mode: an append-only journal with group commit.
//!
//! Every binding change is one [`Record`]. On disk a record is
//! `[payload length: u32 LE][CRC-32 of length and payload: u32 LE][payload]`, after an
//! 8-byte file magic. A crash can tear the last write; recovery keeps every record up to the
//! first one that is incomplete or fails its checksum, and truncates the rest so new records
//! are not appended behind garbage.
//!
//! Writes go through one dedicated writer thread: it takes every record queued, appends them
//! with one `write`, calls `fdatasync` once, then confirms them all (group commit). The file
//! is grown ahead of the records in zero-filled, fsynced steps ([`PREALLOCATE`]), so a batch
//! overwrites blocks that already exist and its `fdatasync` has no size or block allocation
//! to commit: only the data (the file system journal stays out of the hot path). Zeros are
//! not a valid record, so recovery ends at the first of them. While it
//! waits for the disk, the next batch queues up, so throughput is bounded by the batch size,
//! not by the ~ms an fsync costs. When the journal has grown well past the live state it is
//! compacted: a snapshot of the live entries goes to a temporary file, which is fsynced and
//! renamed over the journal, and the directory is fsynced.
//!
//! Limits: nothing stops two processes from opening the same journal (no file lock yet).
//! A checksum failure in the middle of the file (bit rot, not a crash) also ends recovery there.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use ctpf_common::MacAddr;
use tokio::sync::oneshot;

use super::leases::{Entry, Lease, LeaseTable, PoolConfig, Seconds};

/// First bytes of every journal, so we never replay (or truncate!) some other file.
const MAGIC: [u8; 8] = *b"CTPFLL01";
/// Length and checksum in front of every payload.
const FRAME: usize = 8;
/// Larger than any payload; a bigger length is corruption, not a record.
const MAX_PAYLOAD: usize = 64;
/// The journal grows by this much zero-filled space at a time (about 40,000 records).
const PREALLOCATE: u64 = 1 << 20;
/// Upper bound on one group commit, so one batch's buffer and latency stay bounded.
const MAX_BATCH: usize = 4096;

const TAG_BIND: u8 = 1;
const TAG_RELEASE: u8 = 2;
const TAG_DECLINE: u8 = 3;

/// One binding change, as journaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// A new binding or a renewal (the whole lease, so replay needs no history).
    Bind(Lease),
    /// The client gave the address back.
    Release { mac: MacAddr, ip: Ipv4Addr },
    /// The address is out of circulation until `until`.
    Decline { ip: Ipv4Addr, until: Seconds },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("lease journal: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("{0} is not a lease journal (bad magic)")]
    NotAJournal(PathBuf),
    /// An earlier write or fsync failed; after a failed fsync the file's contents are
    /// unknown, so nothing more is written or confirmed until the journal is reopened.
    #[error("lease journal is unusable after an earlier write failure")]
    Failed,
    #[error("lease journal writer has stopped")]
    Closed,
}

impl LogError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io { op, path: path.to_owned(), source: Arc::new(source) }
    }
}

/// When to compact: once the journal holds at least `min_records` records and more than
/// `live_factor` times as many records as live entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    pub min_records: u64,
    pub live_factor: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { min_records: 10_000, live_factor: 4 }
    }
}

/// Counters of the writer, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records made durable.
    pub records: u64,
    /// fdatasync calls on the journal (one per batch).
    pub fsyncs: u64,
    pub compactions: u64,
    /// Records in the current journal file (after the last compaction).
    pub records_in_file: u64,
}

#[derive(Debug, Default)]
struct Counters {
    records: AtomicU64,
    fsyncs: AtomicU64,
    compactions: AtomicU64,
    records_in_file: AtomicU64,
}

/// Who hears about a record once it is durable (or cannot be made so).
enum Waiter {
    Channel(oneshot::Sender<Result<(), LogError>>),
    /// Runs on the writer thread right after the fsync: no task, channel or wake-up per
    /// record, which is what lets a DHCP server send ACKs at the rate leases are written.
    Callback(Box<dyn FnOnce(Result<(), LogError>) + Send>),
}

impl Waiter {
    fn notify(self, result: Result<(), LogError>) {
        match self {
            // The waiter may have gone away; the record is durable regardless.
            Waiter::Channel(tx) => {
                let _ = tx.send(result);
            }
            Waiter::Callback(callback) => callback(result),
        }
    }
}

enum Msg {
    Append(Record, Option<Waiter>),
    /// Test hook: the writer blocks until the sender side is dropped or sends.
    #[cfg(test)]
    Hold(mpsc::Receiver<()>),
    /// Test hook: behave as after a failed fsync.
    #[cfg(test)]
    Fail,
}

/// Handle to the journal and its writer thread. Dropping it lets the writer finish what is
/// queued and stop; [`LeaseLog::close`] also waits for that.
#[derive(Debug)]
pub struct LeaseLog {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Append(record, ack) => {
                f.debug_tuple("Append").field(record).field(&ack.is_some()).finish()
            }
            #[cfg(test)]
            Msg::Hold(_) => f.write_str("Hold"),
            #[cfg(test)]
            Msg::Fail => f.write_str("Fail"),
        }
    }
}

/// Confirmation of one record: resolves once it is on disk (or failed to get there).
#[derive(Debug)]
#[must_use = "a commit says nothing until it is awaited"]
pub struct Commit(Result<oneshot::Receiver<Result<(), LogError>>, LogError>);

impl Commit {
    pub async fn wait(self) -> Result<(), LogError> {
        match self.0 {
            Ok(rx) => rx.await.unwrap_or(Err(LogError::Closed)),
            Err(error) => Err(error),
        }
    }
}

impl LeaseLog {
    /// Opens (or creates) the journal at `path` with the default [`LogConfig`] and returns
    /// the records it holds, in order.
    pub fn open(path: impl AsRef<Path>) -> Result<(Self, Vec<Record>), LogError> {
        Self::open_with(path, LogConfig::default())
    }

    pub fn open_with(
        path: impl AsRef<Path>,
        config: LogConfig,
    ) -> Result<(Self, Vec<Record>), LogError> {
        let path = path.as_ref().to_owned();
        let (file, records, end) = recover(&path)?;
        let mut state = State::default();
        for record in &records {
            state.apply(*record);
        }
        let counters = Arc::new(Counters::default());
        counters.records_in_file.store(records.len() as u64, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let allocated = file.metadata().map_err(|e| LogError::io("reading", &path, e))?.len();
        let writer = Writer {
            file,
            end,
            allocated,
            path,
            config,
            state,
            counters: counters.clone(),
            failed: false,
            records_in_file: records.len() as u64,
        };
        let handle = std::thread::Builder::new()
            .name("dhcp-lease-log".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| LogError::io("spawning writer for", Path::new("lease journal"), e))?;
        Ok((Self { tx, counters, writer: Some(handle) }, records))
    }

    /// Queues `record`; the returned [`Commit`] resolves when it is durable.
    pub fn append(&self, record: Record) -> Commit {
        let (ack, rx) = oneshot::channel();
        match self.tx.send(Msg::Append(record, Some(Waiter::Channel(ack)))) {
            Ok(()) => Commit(Ok(rx)),
            Err(_) => Commit(Err(LogError::Closed)),
        }
    }

    /// Queues `record`; `then` runs on the journal's writer thread once it is durable (or
    /// with the error if it cannot be), or right away if the writer has stopped. Keep it
    /// short and non-blocking: it delays the confirmations of the rest of its batch.
    pub fn append_then(
        &self,
        record: Record,
        then: impl FnOnce(Result<(), LogError>) + Send + 'static,
    ) {
        let waiter = Waiter::Callback(Box::new(then));
        if let Err(mpsc::SendError(Msg::Append(_, Some(waiter)))) =
            self.tx.send(Msg::Append(record, Some(waiter)))
        {
            waiter.notify(Err(LogError::Closed));
        }
    }

    /// Queues `record` without waiting for it (RELEASE, DECLINE: nothing is promised to the
    /// client, so losing one in a crash only keeps an address held a little longer).
    pub fn append_detached(&self, record: Record) {
        if self.tx.send(Msg::Append(record, None)).is_err() {
            tracing::error!(?record, "lease journal writer has stopped; record dropped");
        }
    }

    pub fn stats(&self) -> LogStats {
        let c = &self.counters;
        LogStats {
            records: c.records.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            compactions: c.compactions.load(Ordering::Relaxed),
            records_in_file: c.records_in_file.load(Ordering::Relaxed),
        }
    }

    /// Stops the writer after everything queued is written, and waits for it (blocking).
    pub fn close(mut self) {
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(handle) = self.writer.take()
            && handle.join().is_err()
        {
            tracing::error!("lease journal writer panicked");
        }
    }

    #[cfg(test)]
    fn hold(&self) -> mpsc::Sender<()> {
        let (release, held) = mpsc::channel();
        let _ = self.tx.send(Msg::Hold(held));
        release
    }
}

/// Rebuilds the lease table from replayed records, dropping what has expired by `now`.
pub fn restore_table(config: PoolConfig, records: &[Record], now: Seconds) -> LeaseTable {
    let mut state = State::default();
    for record in records {
        state.apply(*record);
    }
    LeaseTable::restore(config, state.entries.into_iter().filter(|(_, e)| now < until(e)))
}

fn until(entry: &Entry) -> Seconds {
    match entry {
        Entry::Offered { until, .. } | Entry::Declined { until } => *until,
        Entry::Bound(lease) => lease.expires,
    }
}

/// The journal's view of the table: what replaying it yields. Mirrors how the table applies
/// the same changes (an address has one entry, a MAC one binding).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct State {
    entries: BTreeMap<Ipv4Addr, Entry>,
    by_mac: BTreeMap<MacAddr, Ipv4Addr>,
}

impl State {
    fn apply(&mut self, record: Record) {
        match record {
            Record::Bind(lease) => {
                self.clear(lease.ip);
                if let Some(old) = self.by_mac.get(&lease.mac).copied() {
                    self.clear(old);
                }
                self.by_mac.insert(lease.mac, lease.ip);
                self.entries.insert(lease.ip, Entry::Bound(lease));
            }
            Record::Release { mac, ip } => {
                if matches!(self.entries.get(&ip), Some(Entry::Bound(l)) if l.mac == mac) {
                    self.clear(ip);
                }
            }
            Record::Decline { ip, until } => {
                self.clear(ip);
                self.entries.insert(ip, Entry::Declined { until });
            }
        }
    }

    fn clear(&mut self, ip: Ipv4Addr) {
        if let Some(Entry::Bound(lease)) = self.entries.remove(&ip)
            && self.by_mac.get(&lease.mac) == Some(&ip)
        {
            self.by_mac.remove(&lease.mac);
        }
    }

    /// The records a snapshot of the live state consists of.
    fn snapshot(&self, now: Seconds) -> Vec<Record> {
        self.entries
            .iter()
            .filter(|(_, e)| now < until(e))
            .filter_map(|(ip, e)| match e {
                Entry::Bound(lease) => Some(Record::Bind(*lease)),
                Entry::Declined { until } => Some(Record::Decline { ip: *ip, until: *until }),
                Entry::Offered { .. } => None,
            })
            .collect()
    }
}

struct Writer {
    file: File,
    /// Where the next record goes: the end of the valid records.
    end: u64,
    /// The file's size; everything from `end` up to it is zeros.
    allocated: u64,
    path: PathBuf,
    config: LogConfig,
    state: State,
    counters: Arc<Counters>,
    failed: bool,
    records_in_file: u64,
}

type Ack = Option<Waiter>;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut batch: Vec<(Record, Ack)> = Vec::new();
        // Exits once every LeaseLog handle is gone and the queue is drained.
        while let Ok(first) = rx.recv() {
            self.take(first, &mut batch);
            while batch.len() < MAX_BATCH
                && let Ok(next) = rx.try_recv()
            {
                self.take(next, &mut batch);
            }
            if batch.is_empty() {
                continue;
            }
            let result = self.commit(&batch);
            for (_, ack) in batch.drain(..) {
                if let Some(ack) = ack {
                    ack.notify(result.clone());
                }
            }
            if result.is_ok() {
                self.maybe_compact();
            }
        }
    }

    fn take(&mut self, msg: Msg, batch: &mut Vec<(Record, Ack)>) {
        match msg {
            Msg::Append(record, ack) => batch.push((record, ack)),
            #[cfg(test)]
            Msg::Hold(held) => {
                let _ = held.recv();
            }
            #[cfg(test)]
            Msg::Fail => self.failed = true,
        }
    }

    /// Appends the batch and fsyncs once.
    fn commit(&mut self, batch: &[(Record, Ack)]) -> Result<(), LogError> {
        if self.failed {
            return Err(LogError::Failed);
        }
        let mut buf = Vec::with_capacity(batch.len() * (FRAME + 20));
        for (record, _) in batch {
            encode(record, &mut buf);
        }
        let written = self
            .reserve(buf.len() as u64)
            .and_then(|()| {
                self.file
                    .write_all_at(&buf, self.end)
                    .map_err(|e| LogError::io("appending to", &self.path, e))
            })
            .and_then(|()| {
                self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.file.sync_data().map_err(|e| LogError::io("fsyncing", &self.path, e))
            });
        if let Err(error) = &written {
            // A partial write or failed fsync leaves the tail unknown; recovery sorts it out.
            tracing::error!(%error, "lease journal write failed; no more leases will be confirmed");
            self.failed = true;
            return written;
        }
        self.end += buf.len() as u64;
        for (record, _) in batch {
            self.state.apply(*record);
        }
        let n = batch.len() as u64;
        self.records_in_file += n;
        self.counters.records.fetch_add(n, Ordering::Relaxed);
        self.counters.records_in_file.store(self.records_in_file, Ordering::Relaxed);
        Ok(())
    }

    /// Makes sure `len` bytes fit after `end` in zero-filled space that is already on disk
    /// (written and fsynced, size included), growing the file by whole [`PREALLOCATE`] steps.
    fn reserve(&mut self, len: u64) -> Result<(), LogError> {
        if self.end + len <= self.allocated {
            return Ok(());
        }
        let grown = (self.end + len).next_multiple_of(PREALLOCATE);
        let zeros = vec![0u8; usize::try_from(grown - self.allocated).unwrap_or(usize::MAX)];
        let path = &self.path;
        self.file
            .write_all_at(&zeros, self.allocated)
            .map_err(|e| LogError::io("growing", path, e))?;
        self.file.sync_all().map_err(|e| LogError::io("fsyncing", path, e))?;
        self.allocated = grown;
        Ok(())
    }

    fn maybe_compact(&mut self) {
        let live = self.state.entries.len() as u64;
        if self.records_in_file < self.config.min_records
            || self.records_in_file <= live.saturating_mul(self.config.live_factor)
        {
            return;
        }
        let snapshot = self.state.snapshot(unix_now());
        match self.compact(&snapshot) {
            Ok((file, end)) => {
                self.file = file;
                self.end = end;
                self.allocated = end;
                self.records_in_file = snapshot.len() as u64;
                self.counters.records_in_file.store(self.records_in_file, Ordering::Relaxed);
                self.counters.compactions.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(records = snapshot.len(), "lease journal compacted");
            }
            Err(error) => tracing::warn!(%error, "lease journal compaction failed"),
        }
    }

    /// Writes the snapshot next to the journal and renames it over it. Until the rename the
    /// old journal is intact; after it, the new one is complete and fsynced.
    fn compact(&mut self, snapshot: &[Record]) -> Result<(File, u64), LogError> {
        let tmp = self.path.with_extension("compact");
        let mut buf = MAGIC.to_vec();
        for record in snapshot {
            encode(record, &mut buf);
        }
        let written = File::create(&tmp)
            .and_then(|mut f| f.write_all(&buf).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(LogError::io("compacting", &self.path, e));
        }
        // From here the new file is the journal: if it cannot be made durable or reopened,
        // appending to the old (unlinked) inode would lose records, so stop confirming.
        let reopened = sync_dir(&self.path).and_then(|()| open_write(&self.path));
        reopened.map(|file| (file, buf.len() as u64)).map_err(|e| {
            self.failed = true;
            LogError::io("reopening compacted", &self.path, e)
        })
    }
}

fn open_write(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).open(path)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

fn unix_now() -> Seconds {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Reads the journal, zeros a torn or corrupt tail and returns the file, its records and
/// where the next record goes.
fn recover(path: &Path) -> Result<(File, Vec<Record>, u64), LogError> {
    let io = |op| move |e| LogError::io(op, path, e);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io("opening"))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io("reading"))?;
    let (records, valid) = if bytes.len() < MAGIC.len() && MAGIC.starts_with(&bytes) {
        // New, or torn while the magic was written: start over.
        (Vec::new(), 0)
    } else if bytes.starts_with(&MAGIC) {
        decode_all(&bytes)
    } else {
        return Err(LogError::NotAJournal(path.to_owned()));
    };
    if valid == 0 {
        file.set_len(0).map_err(io("truncating"))?;
        // The read left the cursor behind a torn magic; writing there would leave a hole.
        file.seek(SeekFrom::Start(0)).map_err(io("seeking"))?;
        file.write_all(&MAGIC).map_err(io("initialising"))?;
        file.sync_all().map_err(io("fsyncing"))?;
        sync_dir(path).map_err(io("fsyncing directory of"))?;
    } else if let Some(garbage) = bytes[valid..].iter().rposition(|b| *b != 0) {
        // Preallocated zeros after the records are normal; anything else is a torn or
        // corrupt tail. Zero it, so that records written later are never followed by stale
        // bytes that could decode.
        tracing::warn!(
            path = %path.display(),
            dropped_bytes = garbage + 1,
            "lease journal has a torn or corrupt tail; clearing it"
        );
        file.write_all_at(&vec![0u8; garbage + 1], valid as u64).map_err(io("clearing"))?;
        file.sync_all().map_err(io("fsyncing"))?;
    }
    let end = if valid == 0 { MAGIC.len() } else { valid };
    Ok((file, records, end as u64))
}

/// Decodes the records after the magic; returns them and the length of the valid prefix.
fn decode_all(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut at = MAGIC.len();
    while let Some(rest) = bytes.get(at..)
        && let Some((record, used)) = decode(rest)
    {
        records.push(record);
        at += used;
    }
    (records, at)
}

pub(crate) fn encode(record: &Record, out: &mut Vec<u8>) {
    let mut payload = Vec::with_capacity(20);
    match record {
        Record::Bind(lease) => {
            payload.push(TAG_BIND);
            payload.extend(lease.mac.octets());
            payload.extend(lease.ip.octets());
            payload.extend(lease.expires.to_le_bytes());
        }
        Record::Release { mac, ip } => {
            payload.push(TAG_RELEASE);
            payload.extend(mac.octets());
            payload.extend(ip.octets());
        }
        Record::Decline { ip, until } => {
            payload.push(TAG_DECLINE);
            payload.extend(ip.octets());
            payload.extend(until.to_le_bytes());
        }
    }
    let len = (payload.len() as u32).to_le_bytes();
    out.extend(len);
    out.extend(crc32(&[&len, &payload]).to_le_bytes());
    out.extend(payload);
}

/// One framed record from the start of `bytes` and how many bytes it took; None if it is
/// incomplete, fails its checksum or does not parse.
pub(crate) fn decode(bytes: &[u8]) -> Option<(Record, usize)> {
    let len_bytes: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    let crc = u32::from_le_bytes(bytes.get(4..FRAME)?.try_into().ok()?);
    let len = usize::try_from(u32::from_le_bytes(len_bytes)).ok()?;
    if len == 0 || len > MAX_PAYLOAD {
        return None;
    }
    let payload = bytes.get(FRAME..FRAME + len)?;
    if crc32(&[&len_bytes, payload]) != crc {
        return None;
    }
    let (&tag, body) = payload.split_first()?;
    let mac = |b: &[u8]| -> Option<MacAddr> { Some(MacAddr::new(b.try_into().ok()?)) };
    let ip = |b: &[u8]| -> Option<Ipv4Addr> { Some(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?)) };
    let secs = |b: &[u8]| -> Option<Seconds> { Some(u64::from_le_bytes(b.try_into().ok()?)) };
    let record = match (tag, body.len()) {
        (TAG_BIND, 18) => Record::Bind(Lease {
            mac: mac(body.get(..6)?)?,
            ip: ip(body.get(6..10)?)?,
            expires: secs(body.get(10..18)?)?,
        }),
        (TAG_RELEASE, 10) => {
            Record::Release { mac: mac(body.get(..6)?)?, ip: ip(body.get(6..10)?)? }
        }
        (TAG_DECLINE, 12) => {
            Record::Decline { ip: ip(body.get(..4)?)?, until: secs(body.get(4..12)?)? }
        }
        _ => return None,
    };
    Some((record, FRAME + len))
}

/// CRC-32 (IEEE 802.3, the zlib one) over the concatenation of `parts`.
fn crc32(parts: &[&[u8]]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for part in parts {
        for &b in *part {
            crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr::new([0x52, 0x54, 0, 0, 0, n])
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, n)
    }

    /// Far in the future, so compaction (which uses the real clock) keeps them.
    const LATER: Seconds = 1 << 40;

    fn samples() -> Vec<Record> {
        vec![
            Record::Bind(Lease { mac: mac(1), ip: ip(100), expires: LATER }),
            Record::Release { mac: mac(1), ip: ip(100) },
            Record::Decline { ip: ip(101), until: LATER + 5 },
            Record::Bind(Lease { mac: mac(2), ip: ip(102), expires: u64::MAX }),
        ]
    }

    fn read_all(path: &Path) -> Vec<Record> {
        let (log, records) = LeaseLog::open(path).unwrap();
        log.close();
        records
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xcbf4_3926);
    }

    #[test]
    fn records_round_trip() {
        let mut buf = Vec::new();
        for r in samples() {
            encode(&r, &mut buf);
        }
        let mut at = 0;
        let mut out = Vec::new();
        while let Some((r, used)) = decode(&buf[at..]) {
            out.push(r);
            at += used;
        }
        assert_eq!(out, samples());
        assert_eq!(at, buf.len());
        // Any single flipped bit is caught.
        let mut one = Vec::new();
        encode(&samples()[0], &mut one);
        for byte in 0..one.len() {
            for bit in 0..8 {
                let mut bad = one.clone();
                bad[byte] ^= 1 << bit;
                assert_eq!(decode(&bad), None, "flip byte {byte} bit {bit}");
            }
        }
    }

    async fn write(path: &Path, records: &[Record]) -> LeaseLog {
        let (log, _) = LeaseLog::open(path).unwrap();
        for r in records {
            log.append(*r).wait().await.unwrap();
        }
        log
    }

    #[tokio::test]
    async fn torn_tail_at_every_offset_yields_the_records_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases");
        write(&path, &samples()).await.close();
        let mut encoded = MAGIC.to_vec();
        for r in samples() {
            encode(&r, &mut encoded);
        }
        let full = std::fs::read(&path).unwrap();
        // The records, then the zeros the journal was grown by.
        assert_eq!(full.len() as u64, PREALLOCATE);
        assert_eq!(&full[..encoded.len()], encoded);
        assert!(full[encoded.len()..].iter().all(|b| *b == 0));
        let full = encoded;
        let mut last = Vec::new();
        encode(samples().last().unwrap(), &mut last);
        let start = full.len() - last.len();
        let before = &samples()[..samples().len() - 1];
        for cut in start..full.len() {
            let torn = dir.path().join(format!("torn-{cut}"));
            std::fs::write(&torn, &full[..cut]).unwrap();
            assert_eq!(read_all(&torn), before, "cut at {cut}");
            // The tail was cleared, so new records follow the good ones.
            let log = write(&torn, &samples()[..1]).await;
            log.close();
            let mut expected = before.to_vec();
            expected.push(samples()[0]);
            assert_eq!(read_all(&torn), expected, "append after cut at {cut}");
        }
        assert_eq!(read_all(&path), samples());
    }

    #[tokio::test]
    async fn garbage_in_the_preallocated_tail_is_cleared_and_the_journal_grows_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases");
        write(&path, &samples()).await.close();
        let mut bytes = std::fs::read(&path).unwrap();
        let mut data = MAGIC.len();
        for r in samples() {
            let mut one = Vec::new();
            encode(&r, &mut one);
            data += one.len();
        }
        // A torn record followed by zeros, and a stray byte further on.
        bytes[data..data + 5].copy_from_slice(&[9, 0, 0, 0, 7]);
        bytes[data + 1000] = 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_all(&path), samples());
        assert!(std::fs::read(&path).unwrap()[data..].iter().all(|b| *b == 0));
        write(&path, &samples()[..1]).await.close();
        let mut expected = samples();
        expected.push(samples()[0]);
        assert_eq!(read_all(&path), expected);

        // Past the first step: the file grows by whole steps and every record survives.
        let (log, _) = LeaseLog::open(&path).unwrap();
        let many: Vec<Record> = (0..50_000u32)
            .map(|i| {
                let [_, a, b, c] = i.to_be_bytes();
                let mac = MacAddr::new([2, 0, 0, a, b, c]);
                Record::Bind(Lease { mac, ip: Ipv4Addr::from(0x0a00_0000 | i), expires: LATER })
            })
            .collect();
        for r in &many {
            log.append_detached(*r);
        }
        log.append(samples()[0]).wait().await.unwrap();
        log.close();
        assert_eq!(std::fs::metadata(&path).unwrap().len() % PREALLOCATE, 0);
        assert!(std::fs::metadata(&path).unwrap().len() > PREALLOCATE);
        assert_eq!(read_all(&path).len(), expected.len() + many.len() + 1);
    }

    #[tokio::test]
    async fn corrupt_record_ends_recovery_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases");
        write(&path, &samples()).await.close();
        let mut bytes = std::fs::read(&path).unwrap();
        // Flip a bit in the third record's payload.
        let mut first_two = Vec::new();
        for r in &samples()[..2] {
            encode(r, &mut first_two);
        }
        bytes[MAGIC.len() + first_two.len() + FRAME + 2] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_all(&path), samples()[..2]);

        let foreign = dir.path().join("foreign");
        std::fs::write(&foreign, b"#!/bin/sh\necho hello\n").unwrap();
        assert!(matches!(LeaseLog::open(&foreign), Err(LogError::NotAJournal(_))));
        // Not touched.
        assert_eq!(std::fs::read(&foreign).unwrap(), b"#!/bin/sh\necho hello\n");
        // An empty or torn-magic file is a new journal.
        let torn = dir.path().join("torn-magic");
        std::fs::write(&torn, &MAGIC[..3]).unwrap();
        assert_eq!(read_all(&torn), vec![]);
        assert_eq!(std::fs::read(&torn).unwrap(), MAGIC);
        write(&torn, &samples()).await.close();
        assert_eq!(read_all(&torn), samples());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_batches_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases");
        let (log, _) = LeaseLog::open(&path).unwrap();
        let log = Arc::new(log);
        // Hold the writer so all 1,000 commits are queued before it runs: deterministic.
        let release = log.hold();
        let tasks: Vec<_> = (0..1000u32)
            .map(|i| {
                let lease = Lease {
                    mac: MacAddr::new([2, 0, 0, 0, (i >> 8) as u8, i as u8]),
                    ip: Ipv4Addr::from(0x0a00_0000 + i),
                    expires: LATER,
                };
                let commit = log.append(Record::Bind(lease));
                tokio::spawn(commit.wait())
            })
            .collect();
        drop(release);
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let stats = log.stats();
        assert_eq!(stats.records, 1000);
        assert!(stats.fsyncs <= 2, "{stats:?}");

        // Without the hold: concurrent submitters, every commit confirmed, and fsyncs never
        // exceed commits (how many batches form depends on the scheduler).
        let tasks: Vec<_> = (0..1000u32)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    let lease = Lease { mac: mac(1), ip: ip(100), expires: LATER + u64::from(i) };
                    log.append(Record::Bind(lease)).wait().await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let after = log.stats();
        assert_eq!(after.records, 2000);
        assert!(after.fsyncs - stats.fsyncs <= 1000, "{after:?}");
        let log = Arc::into_inner(log).unwrap();
        log.close();
        assert_eq!(read_all(&path).len(), 2000);
    }

    #[tokio::test]
    async fn confirmed_records_survive_a_drop_without_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases");
        let log = write(&path, &samples()).await;
        // No close(): the handle vanishes as in a crash after the confirmations.
        std::mem::forget(log);
        assert_eq!(read_all(&path), samples());
    }

    #[tokio::test]
    async fn failed_writer_confirms_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases");
        let (mut log, _) = LeaseLog::open(&path).unwrap();
        // Simulate a dead writer: its channel is gone.
        let (tx, rx) = mpsc::channel();
        drop(rx);
        let old = std::mem::replace(&mut log.tx, tx);
        drop(old);
        assert!(matches!(log.append(samples()[0]).wait().await, Err(LogError::Closed)));
        log.append_detached(samples()[0]);
    }

    #[tokio::test]
    async fn after_a_write_failure_nothing_is_confirmed_or_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases");
        let log = write(&path, &samples()[..1]).await;
        let _ = log.tx.send(Msg::Fail);
        assert!(matches!(log.append(samples()[1]).wait().await, Err(LogError::Failed)));
        log.append_detached(samples()[2]);
        assert!(matches!(log.append(samples()[3]).wait().await, Err(LogError::Failed)));
        assert_eq!(log.stats().records, 1);
        log.close();
        assert_eq!(read_all(&path), samples()[..1]);
    }

    #[tokio::test]
    async fn compaction_keeps_live_leases_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases");
        let config = LogConfig { min_records: 50, live_factor: 2 };
        let (log, _) = LeaseLog::open_with(&path, config).unwrap();
        let mut model = State::default();
        let mut all = Vec::new();
        for round in 0..40u64 {
            for n in 0..8u8 {
                // Clients move between addresses, release, decline; one lease expired.
                let ip_n = 100 + ((u64::from(n) + round) % 12) as u8;
                let record = match (round + u64::from(n)) % 5 {
                    0..=2 => Record::Bind(Lease {
                        mac: mac(n),
                        ip: ip(ip_n),
                        expires: if n == 7 { 1 } else { LATER + round },
                    }),
                    3 => Record::Release { mac: mac(n), ip: ip(ip_n) },
                    _ => Record::Decline { ip: ip(ip_n), until: LATER + round },
                };
                model.apply(record);
                all.push(record);
                log.append(record).wait().await.unwrap();
            }
        }
        let stats = log.stats();
        assert!(stats.compactions >= 1, "{stats:?}");
        assert!(stats.records_in_file < all.len() as u64, "{stats:?}");
        log.close();
        let mut replayed = State::default();
        for r in read_all(&path) {
            replayed.apply(r);
        }
        let live = |s: &State| s.snapshot(unix_now());
        assert_eq!(live(&replayed), live(&model));
        assert!(!live(&model).is_empty());
        // The temp file does not linger.
        assert!(!path.with_extension("compact").exists());
    }

    #[test]
    fn restore_table_drops_expired_and_applies_in_order() {
        let config = PoolConfig {
            first: ip(100),
            last: ip(110),
            lease_secs: 600,
            offer_hold_secs: 30,
            decline_secs: 300,
            reservations: BTreeMap::new(),
        };
        let records = vec![
            Record::Bind(Lease { mac: mac(1), ip: ip(100), expires: 1000 }),
            // Moved to another address: the first one is free again.
            Record::Bind(Lease { mac: mac(1), ip: ip(101), expires: 2000 }),
            Record::Bind(Lease { mac: mac(2), ip: ip(102), expires: 500 }),
            Record::Bind(Lease { mac: mac(3), ip: ip(103), expires: 2000 }),
            Record::Release { mac: mac(3), ip: ip(103) },
            Record::Decline { ip: ip(104), until: 2000 },
        ];
        let table = restore_table(config, &records, 900);
        assert_eq!(
            table.entries().collect::<Vec<_>>(),
            vec![
                (ip(101), Entry::Bound(Lease { mac: mac(1), ip: ip(101), expires: 2000 })),
                (ip(104), Entry::Declined { until: 2000 }),
            ]
        );
    }
}
