//! `process::run_build` and `process::collect_outputs` against real shells.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::Path;
use std::time::Duration;

use ctpf_builders::process::{
    BuildCommand, BuildEnd, LogLine, MAX_LINE_BYTES, OutputError, Stream, collect_outputs,
    live_group_members, run_build,
};
use tokio_util::sync::CancellationToken;

fn sh(dir: &Path, script: &str, timeout: Duration) -> BuildCommand {
    BuildCommand::new("sh", ["-c", script], dir, timeout)
}

async fn run(spec: BuildCommand) -> (ctpf_builders::process::BuildOutcome, Vec<LogLine>) {
    let mut lines = Vec::new();
    let outcome = run_build(spec, CancellationToken::new(), |line| lines.push(line)).await.unwrap();
    (outcome, lines)
}

fn texts(lines: &[LogLine], stream: Stream) -> Vec<&str> {
    lines.iter().filter(|l| l.stream == stream).map(|l| l.text.as_str()).collect()
}

/// Asserts that nothing in the group is running; the runner promised that before returning.
fn assert_group_gone(pgid: u32) {
    let alive = live_group_members(pgid);
    assert!(alive.is_empty(), "members of group {pgid} still running: {alive:?}");
}

#[tokio::test]
async fn log_lines_arrive_in_order_from_both_streams() {
    let dir = tempfile::tempdir().unwrap();
    let script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done; printf 'no newline'";
    let (outcome, lines) = run(sh(dir.path(), script, Duration::from_secs(30))).await;
    assert!(outcome.succeeded(), "{:?}", outcome.end);
    assert_eq!(
        texts(&lines, Stream::Stdout),
        ["out1", "out2", "out3", "out4", "out5", "no newline"]
    );
    assert_eq!(texts(&lines, Stream::Stderr), ["err1", "err2", "err3", "err4", "err5"]);
    let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, (0..11).collect::<Vec<_>>(), "one numbering over both streams");
    assert_eq!(outcome.lines, 11);
}

#[tokio::test]
async fn lines_are_streamed_before_the_process_ends() {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let canceller = cancel.clone();
    // The script only ends when cancelled, so the line must have come while it ran.
    let spec = sh(dir.path(), "echo first; sleep 300", Duration::from_secs(60));
    let outcome = run_build(spec, cancel, |line| {
        if line.text == "first" {
            canceller.cancel();
        }
    })
    .await
    .unwrap();
    assert_eq!(outcome.end, BuildEnd::Cancelled);
    assert!(outcome.duration < Duration::from_secs(30), "{:?}", outcome.duration);
}

#[tokio::test]
async fn a_failure_keeps_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let script = "i=0; while [ $i -lt 120 ]; do echo line$i; i=$((i+1)); done; sleep 0.3; echo 'make: *** [bin/x] Error 1' >&2; exit 3";
    let (outcome, lines) = run(sh(dir.path(), script, Duration::from_secs(30))).await;
    assert_eq!(outcome.end, BuildEnd::Failed { code: 3 });
    assert_eq!(lines.len(), 121);
    assert_eq!(outcome.tail.len(), 50);
    assert_eq!(outcome.tail, lines[71..], "the tail is the last 50 lines as they were read");
    let last = outcome.tail.last().unwrap();
    assert_eq!((last.stream, last.text.as_str()), (Stream::Stderr, "make: *** [bin/x] Error 1"));
    assert_eq!(outcome.tail[0].text, "line71");
    assert!(outcome.tail_text().contains("[stderr] make: *** [bin/x] Error 1"));
}

#[tokio::test]
async fn long_lines_are_cut_and_marked() {
    let dir = tempfile::tempdir().unwrap();
    let script = "head -c 10000 /dev/zero | tr '\\0' x; echo; printf 'bad \\377 utf8\\n'";
    let (outcome, lines) = run(sh(dir.path(), script, Duration::from_secs(30))).await;
    assert!(outcome.succeeded());
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0].text.len(), MAX_LINE_BYTES);
    assert!(lines[0].truncated);
    assert_eq!(lines[1].text, "bad \u{fffd} utf8");
    assert!(!lines[1].truncated);
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let script = "echo started; sleep 300 & sleep 300";
    let (outcome, _) = run(sh(dir.path(), script, Duration::from_millis(500))).await;
    assert_eq!(outcome.end, BuildEnd::TimedOut { after: Duration::from_millis(500) });
    assert_eq!(outcome.tail.last().map(|l| l.text.as_str()), Some("started"));
    assert!(outcome.duration < Duration::from_secs(10), "{:?}", outcome.duration);
    assert_group_gone(outcome.pgid);
}

#[tokio::test]
async fn a_group_that_ignores_sigterm_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let script = "trap '' TERM; sh -c \"trap '' TERM; sleep 300\" & sleep 300";
    let mut spec = sh(dir.path(), script, Duration::from_millis(300));
    spec.kill_grace = Duration::from_millis(200);
    let (outcome, _) = run(spec).await;
    assert!(matches!(outcome.end, BuildEnd::TimedOut { .. }), "{:?}", outcome.end);
    assert_group_gone(outcome.pgid);
}

#[tokio::test]
async fn cancel_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let canceller = cancel.clone();
    // `$$` is the shell's pid, which is the group id; the two sleeps are in the group.
    let spec =
        sh(dir.path(), "sleep 300 & sleep 300 & echo ready $$; wait", Duration::from_secs(300));
    let task = tokio::spawn(run_build(spec, cancel, move |line| {
        if let Some(pgid) = line.text.strip_prefix("ready ") {
            let members = live_group_members(pgid.parse().unwrap());
            assert_eq!(members.len(), 3, "the shell and two sleeps: {members:?}");
            canceller.cancel();
        }
    }));
    let outcome =
        tokio::time::timeout(Duration::from_secs(30), task).await.unwrap().unwrap().unwrap();
    assert_eq!(outcome.end, BuildEnd::Cancelled);
    assert_eq!(
        outcome.tail.last().map(|l| l.text.clone()),
        Some(format!("ready {}", outcome.pgid))
    );
    assert_group_gone(outcome.pgid);
}

#[tokio::test]
async fn what_a_finished_build_leaves_running_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, lines) =
        run(sh(dir.path(), "sleep 300 & echo done", Duration::from_secs(60))).await;
    assert!(outcome.succeeded(), "{:?}", outcome.end);
    assert_eq!(texts(&lines, Stream::Stdout), ["done"]);
    assert!(outcome.duration < Duration::from_secs(30), "{:?}", outcome.duration);
    assert_group_gone(outcome.pgid);
}

#[tokio::test]
async fn a_signal_death_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, _) = run(sh(dir.path(), "kill -9 $$", Duration::from_secs(30))).await;
    assert_eq!(outcome.end, BuildEnd::Killed { signal: 9 });
}

#[tokio::test]
async fn the_environment_is_cleared_and_confined_to_the_build_dir() {
    // Cargo sets this for the test process; the build must not see it.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    let dir = tempfile::tempdir().unwrap();
    let mut spec =
        BuildCommand::new("env", Vec::<String>::new(), dir.path(), Duration::from_secs(30));
    spec.source_date_epoch = 1_700_000_000;
    spec.env.insert("CTPF_EXTRA".into(), "yes".into());
    let (outcome, lines) = run(spec).await;
    assert!(outcome.succeeded());
    let mut names: Vec<&str> =
        lines.iter().filter_map(|l| l.text.split_once('=')).map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(names, ["CTPF_EXTRA", "HOME", "LANG", "PATH", "SOURCE_DATE_EPOCH", "TMPDIR", "TZ"]);
    let value = |name: &str| {
        let prefix = format!("{name}=");
        lines.iter().find_map(|l| l.text.strip_prefix(&prefix)).unwrap().to_owned()
    };
    assert_eq!(value("HOME"), dir.path().to_str().unwrap());
    assert!(Path::new(&value("TMPDIR")).starts_with(dir.path()));
    assert!(Path::new(&value("TMPDIR")).is_dir());
    assert_eq!(value("SOURCE_DATE_EPOCH"), "1700000000");
    assert_eq!(value("LANG"), "C.UTF-8");
    assert_eq!(value("CTPF_EXTRA"), "yes");
}

#[tokio::test]
async fn the_build_runs_in_its_dir_with_stdin_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, lines) = run(sh(dir.path(), "pwd; cat; echo end", Duration::from_secs(30))).await;
    assert!(outcome.succeeded());
    let cwd = dir.path().canonicalize().unwrap();
    assert_eq!(texts(&lines, Stream::Stdout), [cwd.to_str().unwrap(), "end"]);
}

#[tokio::test]
async fn bad_commands_are_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err =
        run_build(sh(&missing, "true", Duration::from_secs(1)), CancellationToken::new(), |_| {})
            .await
            .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");

    let spec = BuildCommand::new(
        "/no/such/program",
        Vec::<String>::new(),
        dir.path(),
        Duration::from_secs(1),
    );
    let err = run_build(spec, CancellationToken::new(), |_| {}).await.unwrap_err();
    assert!(err.to_string().contains("/no/such/program"), "{err}");

    let mut spec = sh(dir.path(), "true", Duration::from_secs(1));
    spec.env.insert("HOME".into(), "/root".into());
    let err = run_build(spec, CancellationToken::new(), |_| {}).await.unwrap_err();
    assert!(err.to_string().contains("HOME"), "{err}");
}

#[test]
fn outputs_are_resolved_inside_the_dir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bin")).unwrap();
    std::fs::write(dir.path().join("bin/x"), b"x").unwrap();
    std::fs::write(dir.path().join("bin/y"), b"y").unwrap();
    let found = collect_outputs(dir.path(), &["bin/x", "bin/y"]).unwrap();
    let root = dir.path().canonicalize().unwrap();
    assert_eq!(found, [root.join("bin/x"), root.join("bin/y")]);
}

#[test]
fn output_paths_that_escape_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"s").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bin")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("bin/link")).unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();

    for path in ["../secret", "bin/../../secret", "/etc/passwd", "./bin/x", ""] {
        let err = collect_outputs(dir.path(), &[path]).unwrap_err();
        assert!(matches!(err, OutputError::NotRelative { .. }), "{path}: {err}");
        assert!(err.to_string().contains("relative path"), "{err}");
    }
    for path in ["bin/link", "out/secret"] {
        let err = collect_outputs(dir.path(), &[path]).unwrap_err();
        assert!(matches!(err, OutputError::Escapes { .. }), "{path}: {err}");
        assert!(err.to_string().contains("outside the build directory"), "{err}");
    }
}

#[test]
fn a_missing_output_names_what_is_there() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bin")).unwrap();
    std::fs::write(dir.path().join("bin/ipxe.lkrn"), b"x").unwrap();
    let err = collect_outputs(dir.path(), &["bin/undionly.kpxe"]).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("bin/undionly.kpxe") && text.contains("bin/ipxe.lkrn"), "{text}");
    let err = collect_outputs(dir.path(), &["bin"]).unwrap_err();
    assert!(matches!(err, OutputError::NotAFile { .. }), "{err}");
}
