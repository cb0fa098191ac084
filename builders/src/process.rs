//! Running a build tool under control: one program in a directory the caller owns, in its own
//! process group with a cleared environment, its output streamed line by line, and a timeout
//! and a cancellation token that both take down the whole group (not just the direct child),
//! so a `make -j` never leaves compilers or shells running after the build is over.
//!
//! Linux only: the group's members are found in `/proc`.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest log line kept, in bytes; the rest of a longer line is dropped (and marked).
pub const MAX_LINE_BYTES: usize = 4096;
/// How many of the last lines a failure reports, unless the command says otherwise.
pub const DEFAULT_TAIL_LINES: usize = 50;
/// Between SIGTERM and SIGKILL: enough for make to remove half-written targets.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);
/// Used when the runner itself has no `PATH`.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Temporary files of the build go here, inside its directory.
pub const TMP_SUBDIR: &str = ".tmp";
/// Variables the runner sets itself; a command may not override them, since they keep the
/// build inside its directory and reproducible.
pub const RESERVED_VARIABLES: [&str; 4] = ["HOME", "TMPDIR", "SOURCE_DATE_EPOCH", "TZ"];

/// After the group is killed, how long to keep reading output that was already written.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// After SIGKILL, how long to wait for the kernel to take the group down before giving up.
const REAP_LIMIT: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// What to run and under which limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildCommand {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// The build directory: working directory, `HOME`, and parent of `TMPDIR`. Must exist.
    pub dir: PathBuf,
    /// Extra variables on top of the allow-list (`PATH`, `HOME`, `TMPDIR`, `LANG`, `TZ`,
    /// `SOURCE_DATE_EPOCH`). `PATH` and `LANG` may be overridden here; the rest may not.
    pub env: BTreeMap<String, String>,
    /// Exported as `SOURCE_DATE_EPOCH`, so tools that stamp times stamp this one.
    pub source_date_epoch: u64,
    pub timeout: Duration,
    /// How long the group gets between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Lines kept for the report of a failure.
    pub tail_lines: usize,
}

impl BuildCommand {
    /// A command with no extra variables, epoch 0, the default grace and tail.
    pub fn new(
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
        dir: impl Into<PathBuf>,
        timeout: Duration,
    ) -> Self {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            dir: dir.into(),
            env: BTreeMap::new(),
            source_date_epoch: 0,
            timeout,
            kill_grace: DEFAULT_KILL_GRACE,
            tail_lines: DEFAULT_TAIL_LINES,
        }
    }

    fn validate(&self) -> Result<(), ProcessError> {
        if !self.dir.is_dir() {
            return Err(ProcessError::MissingDir { dir: self.dir.clone() });
        }
        for (name, value) in &self.env {
            if RESERVED_VARIABLES.contains(&name.as_str()) {
                return Err(ProcessError::ReservedVariable { name: name.clone() });
            }
            let valid_name =
                name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name || value.contains('\0') {
                return Err(ProcessError::InvalidVariable { name: name.clone() });
            }
        }
        Ok(())
    }
}

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        })
    }
}

/// One line of output, in the order the runner read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// 0, 1, 2, ... over both streams together.
    pub seq: u64,
    pub stream: Stream,
    /// Without the line end; invalid UTF-8 replaced.
    pub text: String,
    /// The line was longer than [`MAX_LINE_BYTES`] and was cut.
    pub truncated: bool,
}

/// How the build's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildEnd {
    Succeeded,
    /// Exited with a non-zero code.
    Failed {
        code: i32,
    },
    /// Killed by a signal the runner did not send.
    Killed {
        signal: i32,
    },
    TimedOut {
        after: Duration,
    },
    Cancelled,
}

impl fmt::Display for BuildEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildEnd::Succeeded => f.write_str("succeeded"),
            BuildEnd::Failed { code } => write!(f, "failed with exit code {code}"),
            BuildEnd::Killed { signal } => write!(f, "was killed by signal {signal}"),
            BuildEnd::TimedOut { after } => write!(f, "timed out after {after:?}"),
            BuildEnd::Cancelled => f.write_str("was cancelled"),
        }
    }
}

/// The result of a run that got as far as starting the program.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    pub end: BuildEnd,
    /// The last lines (at most `tail_lines`), oldest first.
    pub tail: Vec<LogLine>,
    /// Lines seen in total.
    pub lines: u64,
    pub duration: Duration,
    /// Process id of the main process, which is also the id of the whole group.
    pub pgid: u32,
}

impl BuildOutcome {
    pub fn succeeded(&self) -> bool {
        self.end == BuildEnd::Succeeded
    }

    /// The tail as text, one line each, for error messages.
    pub fn tail_text(&self) -> String {
        tail_text(&self.tail)
    }
}

/// Formats log lines one per line (stderr lines marked), for error messages.
pub fn tail_text(tail: &[LogLine]) -> String {
    let mut text = String::new();
    for line in tail {
        if line.stream == Stream::Stderr {
            text.push_str("[stderr] ");
        }
        text.push_str(&line.text);
        if line.truncated {
            text.push_str(" [...]");
        }
        text.push('\n');
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("build directory {dir} does not exist or is not a directory")]
    MissingDir { dir: PathBuf },
    #[error(
        "variable {name} is set by the build runner and cannot be overridden (reserved: HOME, TMPDIR, SOURCE_DATE_EPOCH, TZ)"
    )]
    ReservedVariable { name: String },
    #[error(
        "variable {name:?} is not valid: names are [A-Za-z_][A-Za-z0-9_]* and values have no NUL"
    )]
    InvalidVariable { name: String },
    #[error("cannot start {program:?} in {dir}: {source}")]
    Spawn { program: OsString, dir: PathBuf, source: io::Error },
    #[error("build process: {what}: {source}")]
    Io { what: &'static str, source: io::Error },
}

/// Runs `spec` to its end, a timeout, or `cancel`, passing each output line to `log` as it
/// is read. On a timeout or cancel the whole process group gets SIGTERM, then SIGKILL after
/// `kill_grace`; after a normal exit, whatever the build left running in its group is killed
/// the same way. Either way no member of the group is alive when this returns `Ok`. If the
/// returned future is dropped early, the group gets SIGKILL.
pub async fn run_build(
    spec: BuildCommand,
    cancel: CancellationToken,
    mut log: impl FnMut(LogLine),
) -> Result<BuildOutcome, ProcessError> {
    spec.validate()?;
    let started = Instant::now();
    crate::tools::count_process();
    let mut child = spawn(&spec)?;
    let pgid = child.id().ok_or(ProcessError::Io {
        what: "the new process has no id",
        source: io::Error::other("exited before it was observed"),
    })?;
    let mut guard = GroupGuard { pgid, armed: true };
    let mut output = Output::new(&mut child, spec.tail_lines)?;
    tracing::debug!(pgid, program = ?spec.program, dir = %spec.dir.display(), "build started");

    let deadline = started + spec.timeout;
    let ended = loop {
        tokio::select! {
            status = child.wait() => break Ended::Exited(status.map_err(|source| ProcessError::Io { what: "waiting for the build", source })?),
            () = cancel.cancelled() => break Ended::Cancelled,
            () = tokio::time::sleep_until(deadline) => break Ended::TimedOut,
            Some(line) = output.next() => log(line),
        }
    };
    if !matches!(ended, Ended::Exited(_)) {
        tracing::debug!(pgid, ?ended, "stopping the build's process group");
    }
    // Stopping the group also covers whatever a finished build left behind in it.
    let status = stop_group(&mut child, pgid, spec.kill_grace).await?;
    guard.armed = false;
    output.drain(&mut log).await;

    let end = match ended {
        Ended::Exited(status) => end_of(status),
        Ended::Cancelled => BuildEnd::Cancelled,
        Ended::TimedOut => BuildEnd::TimedOut { after: spec.timeout },
    };
    tracing::debug!(pgid, %end, ?status, "build ended");
    Ok(BuildOutcome {
        end,
        tail: output.tail.into(),
        lines: output.seq,
        duration: started.elapsed(),
        pgid,
    })
}

#[derive(Debug)]
enum Ended {
    Exited(ExitStatus),
    Cancelled,
    TimedOut,
}

fn end_of(status: ExitStatus) -> BuildEnd {
    match (status.code(), status.signal()) {
        (Some(0), _) => BuildEnd::Succeeded,
        (Some(code), _) => BuildEnd::Failed { code },
        (None, Some(signal)) => BuildEnd::Killed { signal },
        (None, None) => BuildEnd::Failed { code: -1 },
    }
}

/// Starts the program in a new process group, with only the allow-listed variables.
fn spawn(spec: &BuildCommand) -> Result<Child, ProcessError> {
    let tmp = spec.dir.join(TMP_SUBDIR);
    std::fs::create_dir_all(&tmp).map_err(|source| ProcessError::Io {
        what: "creating TMPDIR in the build directory",
        source,
    })?;
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .current_dir(&spec.dir)
        .env_clear()
        .env("PATH", path)
        .env("LANG", "C.UTF-8")
        .envs(&spec.env)
        .env("HOME", &spec.dir)
        .env("TMPDIR", &tmp)
        .env("TZ", "UTC")
        .env("SOURCE_DATE_EPOCH", spec.source_date_epoch.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    command.spawn().map_err(|source| ProcessError::Spawn {
        program: spec.program.clone(),
        dir: spec.dir.clone(),
        source,
    })
}

/// SIGTERM to the group, SIGKILL after `grace`, then waits until no member is left alive.
/// Reaps the main process; returns its exit status.
async fn stop_group(
    child: &mut Child,
    pgid: u32,
    grace: Duration,
) -> Result<ExitStatus, ProcessError> {
    let wait_error = |source| ProcessError::Io { what: "waiting for the build", source };
    if group_is_empty(pgid) {
        return child.wait().await.map_err(wait_error);
    }
    signal_group(pgid, Signal::SIGTERM);
    let grace_end = Instant::now() + grace;
    let status = match tokio::time::timeout_at(grace_end, child.wait()).await {
        Ok(status) => Some(status.map_err(wait_error)?),
        Err(_) => None,
    };
    if !wait_for_empty_group(pgid, grace_end).await {
        signal_group(pgid, Signal::SIGKILL);
    }
    let status = match status {
        Some(status) => status,
        None => child.wait().await.map_err(wait_error)?,
    };
    if !wait_for_empty_group(pgid, Instant::now() + REAP_LIMIT).await {
        tracing::warn!(pgid, "members of the build's process group survived SIGKILL");
    }
    Ok(status)
}

async fn wait_for_empty_group(pgid: u32, until: Instant) -> bool {
    loop {
        if group_is_empty(pgid) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn signal_group(pgid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pgid) else { return };
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(error) => {
            tracing::warn!(pgid, %signal, %error, "cannot signal the build's process group")
        }
    }
}

fn group_is_empty(pgid: u32) -> bool {
    live_group_members(pgid).is_empty()
}

/// Processes in group `pgid` that are still running (zombies do not count: they have
/// exited and only wait for their parent, maybe a PID 1 that never reaps).
pub fn live_group_members(pgid: u32) -> Vec<u32> {
    let Ok(raw) = i32::try_from(pgid) else { return Vec::new() };
    // Fast path: the kernel knows no process in the group at all.
    if killpg(Pid::from_raw(raw), None) == Err(Errno::ESRCH) {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            matches!(parse_stat(&stat), Some((state, group)) if group == pgid && state != 'Z' && state != 'X')
        })
        .collect()
}

/// State and process group from `/proc/PID/stat` (`pid (comm) state ppid pgrp ...`; comm may
/// contain spaces and parentheses, so fields are counted from the last `)`).
fn parse_stat(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Kills the group if the run is abandoned half way (its future dropped).
struct GroupGuard {
    pgid: u32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, Signal::SIGKILL);
        }
    }
}

/// Both pipes, read line by line, numbered in the order read, the last lines kept.
struct Output {
    stdout: LineReader<ChildStdout>,
    stderr: LineReader<ChildStderr>,
    seq: u64,
    tail: VecDeque<LogLine>,
    tail_lines: usize,
}

impl Output {
    fn new(child: &mut Child, tail_lines: usize) -> Result<Self, ProcessError> {
        let missing = |what| ProcessError::Io { what, source: io::Error::other("pipe not set up") };
        let stdout = child.stdout.take().ok_or_else(|| missing("stdout"))?;
        let stderr = child.stderr.take().ok_or_else(|| missing("stderr"))?;
        Ok(Self {
            stdout: LineReader::new(stdout),
            stderr: LineReader::new(stderr),
            seq: 0,
            tail: VecDeque::with_capacity(tail_lines),
            tail_lines,
        })
    }

    /// The next line from either pipe; `None` once both are closed. Cancel safe: a line
    /// half read stays in its reader.
    ///
    /// Lines already in a reader's buffer go first: they were read from the kernel before
    /// anything that could be read from the other pipe now, so a failure's last message on
    /// stderr is not overtaken by stdout lines written before it.
    async fn next(&mut self) -> Option<LogLine> {
        let (stream, raw) = loop {
            let read = if self.stdout.has_buffered_line() {
                (Stream::Stdout, self.stdout.next_line().await)
            } else if self.stderr.has_buffered_line() {
                (Stream::Stderr, self.stderr.next_line().await)
            } else {
                tokio::select! {
                    line = self.stdout.next_line(), if !self.stdout.done => (Stream::Stdout, line),
                    line = self.stderr.next_line(), if !self.stderr.done => (Stream::Stderr, line),
                    else => return None,
                }
            };
            if let (stream, Some(raw)) = read {
                break (stream, raw);
            }
        };
        Some(self.record(stream, raw))
    }

    fn record(&mut self, stream: Stream, raw: RawLine) -> LogLine {
        let line = LogLine {
            seq: self.seq,
            stream,
            text: String::from_utf8_lossy(&raw.bytes).into_owned(),
            truncated: raw.truncated,
        };
        self.seq += 1;
        if self.tail_lines > 0 {
            if self.tail.len() == self.tail_lines {
                self.tail.pop_front();
            }
            self.tail.push_back(line.clone());
        }
        line
    }

    /// Reads what is left after the group is gone, for a bounded time (a process that left
    /// the group could hold a pipe open forever).
    async fn drain(&mut self, log: &mut impl FnMut(LogLine)) {
        let until = Instant::now() + DRAIN_LIMIT;
        while let Ok(Some(line)) = tokio::time::timeout_at(until, self.next()).await {
            log(line);
        }
    }
}

struct RawLine {
    bytes: Vec<u8>,
    truncated: bool,
}

/// Splits a pipe into lines of at most [`MAX_LINE_BYTES`], keeping all state in `self` so
/// `next_line` can be dropped at an await point without losing bytes.
struct LineReader<R> {
    reader: BufReader<R>,
    line: Vec<u8>,
    truncated: bool,
    done: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(reader: R) -> Self {
        Self { reader: BufReader::new(reader), line: Vec::new(), truncated: false, done: false }
    }

    /// A whole line is buffered, so `next_line` returns it without waiting for the pipe.
    fn has_buffered_line(&self) -> bool {
        self.reader.buffer().contains(&b'\n')
    }

    /// The next complete line (or the unterminated last one); `None` at end of stream. A read
    /// error ends the stream too: losing the rest of a log must not fail the build.
    async fn next_line(&mut self) -> Option<RawLine> {
        loop {
            let buffer = match self.reader.fill_buf().await {
                Ok(buffer) => buffer,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::warn!(%error, "reading build output");
                    &[][..]
                }
            };
            if buffer.is_empty() {
                self.done = true;
                return (!self.line.is_empty() || self.truncated).then(|| self.take_line());
            }
            let (chunk, newline) = match buffer.iter().position(|&b| b == b'\n') {
                Some(at) => (&buffer[..at], true),
                None => (buffer, false),
            };
            let room = MAX_LINE_BYTES.saturating_sub(self.line.len());
            self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            self.truncated |= chunk.len() > room;
            let used = chunk.len() + usize::from(newline);
            self.reader.consume(used);
            if newline {
                return Some(self.take_line());
            }
        }
    }

    fn take_line(&mut self) -> RawLine {
        let mut bytes = std::mem::take(&mut self.line);
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        RawLine { bytes, truncated: std::mem::replace(&mut self.truncated, false) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "output path {path:?} is not valid: give a relative path of plain names inside the build directory, like bin/undionly.kpxe"
    )]
    NotRelative { path: String },
    #[error("output {path:?} resolves to {resolved}, outside the build directory {dir}")]
    Escapes { path: String, resolved: PathBuf, dir: PathBuf },
    #[error("output {path:?} was not produced in {dir}; {}", present_list(.present))]
    Missing { path: String, dir: PathBuf, present: Vec<String> },
    #[error("output {path:?} in {dir} is not a regular file")]
    NotAFile { path: String, dir: PathBuf },
    #[error("checking outputs in {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
}

fn present_list(present: &[String]) -> String {
    if present.is_empty() {
        "its directory has no files".to_owned()
    } else {
        format!("files there: {}", present.join(", "))
    }
}

/// Most file names listed in an [`OutputError::Missing`].
const MAX_LISTED: usize = 20;

/// Resolves each relative `paths` entry inside `dir` to its canonical path, refusing
/// anything that is absolute, has `..`/`.` components, or leads (through symlinks) outside
/// `dir`, and naming the files that do exist when one is missing.
pub fn collect_outputs(dir: &Path, paths: &[&str]) -> Result<Vec<PathBuf>, OutputError> {
    let io_error = |source| OutputError::Io { dir: dir.to_owned(), source };
    let root = dir.canonicalize().map_err(io_error)?;
    paths.iter().map(|path| collect_one(&root, path)).collect()
}

fn collect_one(root: &Path, path: &str) -> Result<PathBuf, OutputError> {
    let relative = Path::new(path);
    let plain =
        !path.is_empty() && relative.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(OutputError::NotRelative { path: path.to_owned() });
    }
    let joined = root.join(relative);
    let resolved = match joined.canonicalize() {
        Ok(resolved) => resolved,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(OutputError::Missing {
                path: path.to_owned(),
                dir: root.to_owned(),
                present: files_near(root, relative),
            });
        }
        Err(source) => return Err(OutputError::Io { dir: root.to_owned(), source }),
    };
    if !resolved.starts_with(root) {
        return Err(OutputError::Escapes { path: path.to_owned(), resolved, dir: root.to_owned() });
    }
    if !resolved.is_file() {
        return Err(OutputError::NotAFile { path: path.to_owned(), dir: root.to_owned() });
    }
    Ok(resolved)
}

/// Regular files in the directory the missing output would be in, relative to `root`.
fn files_near(root: &Path, relative: &Path) -> Vec<String> {
    let parent = relative.parent().unwrap_or(Path::new(""));
    let Ok(entries) = std::fs::read_dir(root.join(parent)) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .map(|entry| parent.join(entry.file_name()).to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.truncate(MAX_LISTED);
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        assert_eq!(parse_stat("42 (make) S 1 42 42 0"), Some(('S', 42)));
        assert_eq!(parse_stat("43 (a) b (c) Z 42 7 7 0"), Some(('Z', 7)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn reserved_and_bad_variables_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec =
            BuildCommand::new("true", Vec::<String>::new(), dir.path(), Duration::from_secs(1));
        spec.env.insert("HOME".into(), "/".into());
        assert!(matches!(spec.validate(), Err(ProcessError::ReservedVariable { .. })));
        spec.env.clear();
        spec.env.insert("1BAD".into(), "x".into());
        assert!(matches!(spec.validate(), Err(ProcessError::InvalidVariable { .. })));
        spec.env.clear();
        spec.env.insert("GOOD_1".into(), "x".into());
        assert!(spec.validate().is_ok());
    }
}
