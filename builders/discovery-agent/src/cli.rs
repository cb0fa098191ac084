//! `ctpf-agent [--once] [--root DIR] [--cmdline FILE]`, parsed with std alone: clap would
//! double the size of a binary that lives in every discovery initramfs.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::Config;
use crate::inventory::Root;

/// Shown with `--help` and after a usage error.
pub const USAGE: &str = "\
usage: ctpf-agent [--once] [--root DIR] [--cmdline FILE]

Reports this machine to ctpf (ctpf.url= and ctpf.token= on the kernel command line),
then waits for work.

  --once          exit after enrolling instead of waiting for work
  --root DIR      where sys/ and proc/ are found (default /)
  --cmdline FILE  kernel command line to read (default /proc/cmdline)
  --help          show this text";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run(Config),
    Help,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    #[error("unknown argument {0:?}; valid: --once, --root DIR, --cmdline FILE, --help")]
    Unknown(String),
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("arguments must be valid UTF-8 flags, got {0:?}")]
    NotUtf8(OsString),
}

/// Parses the arguments after the program name. Values may follow as the next argument or
/// after `=` (`--root=/mnt`); paths are taken as given, even if not UTF-8.
pub fn parse_args<I>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut config = Config::default();
    let mut args = args.into_iter().map(Into::into);
    while let Some(arg) = args.next() {
        let text = arg.to_str().ok_or_else(|| UsageError::NotUtf8(arg.clone()))?;
        let (flag, inline) = match text.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(OsString::from(value))),
            _ => (text, None),
        };
        let mut value = |name: &'static str| {
            inline
                .clone()
                .or_else(|| args.next())
                .map(PathBuf::from)
                .ok_or(UsageError::MissingValue(name))
        };
        match flag {
            "--once" if inline.is_none() => config.once = true,
            "--root" => config.root = Root::new(value("--root")?),
            "--cmdline" => config.cmdline = value("--cmdline")?,
            "--help" | "-h" if inline.is_none() => return Ok(Command::Help),
            _ => return Err(UsageError::Unknown(text.to_owned())),
        }
    }
    Ok(Command::Run(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Config {
        match parse_args(args.iter().copied()).unwrap() {
            Command::Run(config) => config,
            Command::Help => panic!("help"),
        }
    }

    #[test]
    fn defaults_suit_the_initramfs() {
        let config = run(&[]);
        assert_eq!(config, Config::default());
        assert!(!config.once);
        assert_eq!(config.root, Root::new("/"));
        assert_eq!(config.cmdline, PathBuf::from("/proc/cmdline"));
    }

    #[test]
    fn flags_and_values() {
        let config = run(&["--once", "--root", "/tmp/fx", "--cmdline=/tmp/fx/cmdline"]);
        assert!(config.once);
        assert_eq!(config.root, Root::new("/tmp/fx"));
        assert_eq!(config.cmdline, PathBuf::from("/tmp/fx/cmdline"));
        assert_eq!(parse_args(["--help"]), Ok(Command::Help));
    }

    #[test]
    fn bad_arguments_are_named() {
        assert_eq!(parse_args(["--forever"]), Err(UsageError::Unknown("--forever".into())));
        assert_eq!(parse_args(["--once=yes"]), Err(UsageError::Unknown("--once=yes".into())));
        assert_eq!(parse_args(["--root"]), Err(UsageError::MissingValue("--root")));
        let msg = UsageError::Unknown("-x".into()).to_string();
        assert!(msg.contains("--once") && msg.contains("--cmdline FILE"), "{msg}");
    }
}
