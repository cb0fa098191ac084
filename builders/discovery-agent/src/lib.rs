//! The discovery agent: the last step of ctpf's discovery initramfs. `/init` brings the NICs
//! up with DHCP and execs `ctpf-agent`, which reads its settings from the kernel command line
//! ([`cmdline`]), collects what the machine is ([`inventory`], [`addresses`]), builds a report
//! the server will accept ([`report`]) and enrolls with the one-time token ([`enroll`]).
//! Everything it prints starts with `ctpf-agent: ` so it stands out on a serial console.

pub mod addresses;
pub mod cli;
pub mod cmdline;
pub mod enroll;
pub mod inventory;
pub mod report;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::cmdline::{BootParams, CmdlineError};
use crate::enroll::{EnrollError, Enrolled, RetryPolicy};
use crate::inventory::Root;
use crate::report::ReportError;

/// How often the agent says it is still alive while it waits for work.
const WAIT_INTERVAL: Duration = Duration::from_secs(60);

/// What one run of the agent does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where `sys/` and `proc/` are read.
    pub root: Root,
    /// The kernel command line file.
    pub cmdline: PathBuf,
    /// Exit after enrolling instead of waiting for work.
    pub once: bool,
    pub retry: RetryPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: Root::default(),
            cmdline: PathBuf::from("/proc/cmdline"),
            once: false,
            retry: RetryPolicy::default(),
        }
    }
}

/// Everything that stops the agent; `/init` drops to a shell when it exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read the kernel command line {path}: {source}")]
    ReadCmdline { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(transparent)]
    Enroll(#[from] EnrollError),
}

/// Enrolls the machine, then waits for work forever unless `config.once` is set. Returns
/// only with `config.once` or on an error.
pub fn run(config: &Config, out: &mut dyn Write) -> Result<(), AgentError> {
    enroll_machine(config, out)?;
    if config.once {
        return Ok(());
    }
    loop {
        // There is no work protocol yet; staying up keeps the machine in discovery, reachable
        // on the console, instead of letting the kernel panic when init exits.
        std::thread::sleep(WAIT_INTERVAL);
        say(out, "waiting for work");
    }
}

/// Reads the command line and the hardware, and enrolls; prints the line the end-to-end
/// tests look for (`ctpf-agent: enrolled host ...`).
pub fn enroll_machine(config: &Config, out: &mut dyn Write) -> Result<Enrolled, AgentError> {
    let text = std::fs::read_to_string(&config.cmdline)
        .map_err(|source| AgentError::ReadCmdline { path: config.cmdline.clone(), source })?;
    let params = BootParams::parse(&text)?;
    for ignored in &params.ignored {
        say(out, &format!("ignoring malformed {ignored} on the kernel command line"));
    }
    let report = report::build_report(&config.root, &params, addresses::local_addresses())?;
    say(out, &summary(&report));
    say(out, &format!("enrolling at {}", params.url));
    let enrolled = enroll::enroll(&params, &report, &config.retry, out)?;
    if enrolled.queued {
        // A site worker answered: the manager gets the callback when it can be reached.
        say(
            out,
            &format!("callback queued by the site's worker for datacenter {}", enrolled.datacenter),
        );
        return Ok(enrolled);
    }
    if !enrolled.created {
        say(out, "the server already knew this machine; its host record was updated");
    }
    say(out, &format!("enrolled host {} in datacenter {}", enrolled.id, enrolled.datacenter));
    Ok(enrolled)
}

/// One line about what will be reported, so a console shows what the server will see.
fn summary(report: &ctpf_common::HostReport) -> String {
    let macs: Vec<String> = report.macs.iter().map(ToString::to_string).collect();
    let inv = &report.inventory;
    let uuid = report.smbios_uuid.map_or_else(|| "none".to_owned(), |u| u.to_string());
    let memory = inv.memory_bytes.map_or_else(|| "?".to_owned(), |b| (b >> 20).to_string());
    let cores = inv.cpu_cores.map_or_else(|| "?".to_owned(), |c| c.to_string());
    format!(
        "MACs {}; SMBIOS UUID {uuid}; {cores} CPUs; {memory} MiB; {} disks; {} addresses",
        macs.join(" "),
        inv.disks.len(),
        report.addresses.len()
    )
}

/// Prints one progress line. A console that cannot be written to must not stop enrollment,
/// so write errors are ignored.
pub(crate) fn say(out: &mut dyn Write, message: &str) {
    let _ = writeln!(out, "ctpf-agent: {message}");
    let _ = out.flush();
}
