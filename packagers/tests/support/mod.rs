//! What the packager tests share: running the third-party tools that read our media back.

use std::process::Command;

/// Runs `cmd`, fails the test with its output unless it succeeds, and returns stdout and
/// stderr together (the tools split their reports between the two).
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the tool runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}
