//! Build tools' versions, for build keys and manifests. Asking a tool for `--version` starts
//! a process, so answers are remembered per executable file (path, inode, size, mtime): a
//! cache hit then starts nothing, and an upgraded tool is asked again.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::process;

/// Recorded when a tool cannot be run.
pub const TOOL_NOT_FOUND: &str = "(not found)";

static PROCESSES_STARTED: AtomicU64 = AtomicU64::new(0);

/// How many processes the builders have started in this process (build runs and version
/// probes): how tests show that a cache hit ran nothing.
pub fn processes_started() -> u64 {
    PROCESSES_STARTED.load(Ordering::SeqCst)
}

pub(crate) fn count_process() {
    PROCESSES_STARTED.fetch_add(1, Ordering::SeqCst);
}

/// The file identity a remembered version belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ToolFile {
    path: PathBuf,
    inode: u64,
    size: u64,
    mtime_ns: i128,
}

impl ToolFile {
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            path: path.to_owned(),
            inode: meta.ino(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }
}

static VERSIONS: Mutex<Option<HashMap<ToolFile, String>>> = Mutex::new(None);

/// The first line of `TOOL --version` (the tool found on PATH), or [`TOOL_NOT_FOUND`].
pub async fn version_line(tool: &str) -> String {
    let Some(path) = find_on_path(tool) else { return TOOL_NOT_FOUND.to_owned() };
    let Some(file) = ToolFile::of(&path) else { return TOOL_NOT_FOUND.to_owned() };
    let remembered = {
        let versions = VERSIONS.lock().unwrap_or_else(PoisonError::into_inner);
        versions.as_ref().and_then(|m| m.get(&file)).cloned()
    };
    if let Some(version) = remembered {
        return version;
    }
    let version = probe(&path).await.unwrap_or_else(|| TOOL_NOT_FOUND.to_owned());
    VERSIONS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashMap::new)
        .insert(file, version.clone());
    version
}

async fn probe(path: &Path) -> Option<String> {
    let mut command = tokio::process::Command::new(path);
    command
        .arg("--version")
        .env_clear()
        .env("PATH", search_path())
        .env("LANG", "C")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    count_process();
    let output =
        tokio::time::timeout(Duration::from_secs(10), command.output()).await.ok()?.ok()?;
    if !output.status.success() {
        return None;
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    Some(stdout.lines().next()?.trim().to_owned())
}

fn search_path() -> std::ffi::OsString {
    std::env::var_os("PATH").unwrap_or_else(|| process::DEFAULT_PATH.into())
}

/// The executable `program` on PATH.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(&search_path()).map(|dir| dir.join(program)).find(|candidate| {
        std::fs::metadata(candidate)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn versions_are_asked_once_per_executable() {
        let first = version_line("sh").await;
        let started = processes_started();
        let second = version_line("sh").await;
        assert_eq!(first, second);
        assert_eq!(processes_started(), started, "the second answer came from the cache");
        assert_eq!(version_line("no-such-tool-ctpf").await, TOOL_NOT_FOUND);
    }
}
