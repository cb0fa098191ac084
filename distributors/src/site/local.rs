//! What a site worker keeps on its own disk, so it serves boots with the manager and Redis
//! out of reach: the last good snapshot, the files it names (a content-addressed cache), and
//! the host callbacks not yet forwarded.
//!
//! Every write goes to a temporary file that is synced and then renamed into place (and the
//! directory synced), so a crash leaves the old version or the new one, never half of one.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use ctpf_common::{DatacenterSnapshot, Name, NewEvent};

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> LocalError + '_ {
    move |source| LocalError::Io { path: path.to_owned(), source }
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), LocalError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(io_at(&tmp))?;
    file.write_all(bytes).map_err(io_at(&tmp))?;
    file.sync_all().map_err(io_at(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_at(path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), LocalError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

/// The last good snapshot, in `DATA_DIR/snapshot.json`.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    path: PathBuf,
}

impl SnapshotFile {
    pub fn new(data_dir: &Path) -> Self {
        Self { path: data_dir.join("snapshot.json") }
    }

    /// The stored snapshot, if any. One of another datacenter (a data dir reused for another
    /// site) or one that no longer parses is an error: serving it would be wrong.
    pub fn load(&self, datacenter: &Name) -> Result<Option<DatacenterSnapshot>, LocalError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LocalError::Io { path: self.path.clone(), source }),
        };
        let corrupt = |reason: String| LocalError::Corrupt { path: self.path.clone(), reason };
        DatacenterSnapshot::decode(&bytes, datacenter, 0)
            .map(Some)
            .map_err(|e| corrupt(e.to_string()))
    }

    pub fn store(&self, snapshot: &DatacenterSnapshot) -> Result<(), LocalError> {
        let bytes = serde_json::to_vec_pretty(snapshot)
            .map_err(|e| LocalError::Corrupt { path: self.path.clone(), reason: e.to_string() })?;
        write_durably(&self.path, &bytes)
    }
}

/// Host callbacks waiting to be forwarded, one file each in `DATA_DIR/outbox`, named so that
/// their order is the order they arrived in.
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    pub fn open(data_dir: &Path) -> Result<Self, LocalError> {
        let dir = data_dir.join("outbox");
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        Ok(Self { dir })
    }

    /// Keeps `event` on disk; once this returns, a crash does not lose it.
    pub fn push(&self, event: &NewEvent) -> Result<(), LocalError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = self.dir.join(format!("{nanos:024}-{}.json", uuid::Uuid::new_v4().simple()));
        let bytes = serde_json::to_vec(event)
            .map_err(|e| LocalError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        write_durably(&path, &bytes)
    }

    /// The waiting entries, oldest first. Unreadable ones are moved aside (`*.bad`) and
    /// logged rather than blocking the rest forever.
    pub fn pending(&self) -> Result<Vec<(PathBuf, NewEvent)>, LocalError> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(io_at(&self.dir))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        let mut entries = Vec::new();
        for path in paths {
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<NewEvent>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(event) => entries.push((path, event)),
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "moving an unreadable callback aside");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                }
            }
        }
        Ok(entries)
    }

    /// Forgets a forwarded entry.
    pub fn remove(&self, path: &Path) -> Result<(), LocalError> {
        match std::fs::remove_file(path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LocalError::Io { path: path.to_owned(), source }),
        }
    }
}

/// The enrollment token of this worker's discovery boots (`ctpf.token=` on their kernel
/// command line), made once and kept in `DATA_DIR/site-enroll.token`: it shows that a
/// callback comes from a machine that booted through this worker.
pub fn site_enroll_token(data_dir: &Path) -> Result<String, LocalError> {
    let path = data_dir.join("site-enroll.token");
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().starts_with("ctpf_site_") => return Ok(text.trim().to_owned()),
        Ok(_) => {
            return Err(LocalError::Corrupt { path, reason: "not a ctpf_site_ token".into() });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(LocalError::Io { path, source }),
    }
    let token = format!("ctpf_site_{}", uuid::Uuid::new_v4().simple());
    write_durably(&path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ctpf_common::EventBody;

    #[test]
    fn the_outbox_keeps_order_and_survives_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        for n in 0..3 {
            let event = NewEvent::new(None, EventBody::WorkerStarted { worker: format!("w{n}") });
            outbox.push(&event).unwrap();
        }
        std::fs::write(dir.path().join("outbox/0-garbage.json"), b"{not json").unwrap();
        let pending = outbox.pending().unwrap();
        let workers: Vec<_> = pending
            .iter()
            .map(|(_, e)| match &e.body {
                EventBody::WorkerStarted { worker } => worker.clone(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(workers, ["w0", "w1", "w2"]);
        assert!(dir.path().join("outbox/0-garbage.bad").exists());
        outbox.remove(&pending[0].0).unwrap();
        outbox.remove(&pending[0].0).unwrap(); // twice is harmless
        assert_eq!(Outbox::open(dir.path()).unwrap().pending().unwrap().len(), 2);
    }

    #[test]
    fn the_site_token_is_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = site_enroll_token(dir.path()).unwrap();
        assert!(first.starts_with("ctpf_site_"));
        assert_eq!(site_enroll_token(dir.path()).unwrap(), first);
    }
}
