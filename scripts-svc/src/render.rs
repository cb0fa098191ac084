//! Rendering the entry script and each machine's script.

use std::fmt;

use askama::Template;
use ctpf_common::{MacAddr, ParseError};

use crate::escape::{BaseUrl, EnrollmentToken, HttpUrl, KernelCmdline};
use crate::request::{BootRequest, ScriptArch};

/// Why no script was produced.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// A value failed validation; [`ParseError::field`] names it (`base_url`,
    /// `profile.cmdline`, ...).
    #[error(transparent)]
    Invalid(#[from] ParseError),
    /// The template could not be rendered. With validated inputs this means a template
    /// interpolated something [`crate::IpxeEscaper`] refused: a bug in ctpf, not bad input.
    #[error("rendering the {template} script failed: {source}")]
    Render {
        template: &'static str,
        #[source]
        source: askama::Error,
    },
}

impl ScriptError {
    /// The name of the invalid field, if the error is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid(err) => Some(&err.field),
            Self::Render { .. } => None,
        }
    }
}

/// What every script needs to know about this ctpf installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptContext {
    /// ctpf's URL as booting machines reach it.
    pub base_url: BaseUrl,
    /// Presented by the discovery environment (and installer) when it calls back.
    pub enrollment_token: EnrollmentToken,
}

impl ScriptContext {
    /// Validates both values; errors name `base_url` or `enrollment_token`.
    pub fn new(base_url: &str, enrollment_token: &str) -> Result<Self, ScriptError> {
        Ok(Self {
            base_url: BaseUrl::parse("base_url", base_url)?,
            enrollment_token: EnrollmentToken::parse("enrollment_token", enrollment_token)?,
        })
    }
}

/// What a machine should boot, as decided by the caller from the host registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// Unknown machine: boot ctpf's discovery kernel and initrd so it enrols itself, with the
    /// operator's extra kernel parameters (e.g. `console=ttyS0`; errors name
    /// `discovery.cmdline`).
    Discovery { cmdline: String },
    /// Known machine with an assigned profile: boot its installer. The values are
    /// user-supplied and validated at render time (errors name `profile.kernel_url`,
    /// `profile.initrd_url` or `profile.cmdline`).
    Install { kernel_url: String, initrd_url: String, cmdline: String },
    /// Installed machine: boot the local disk.
    LocalDisk,
}

impl Profile {
    /// A stable name: `discovery`, `install`, `local-disk`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Discovery { .. } => "discovery",
            Self::Install { .. } => "install",
            Self::LocalDisk => "local-disk",
        }
    }
}

/// How many times the entry script walks all NICs before it gives up.
pub const ENTRY_MAX_ROUNDS: u32 = 5;
/// NICs the entry script tries per round (`net0` to `net3`).
pub const ENTRY_MAX_NICS: u32 = 4;
/// Pause between rounds, seconds: long enough for a switch port to finish spanning-tree
/// listening/learning (about 30 s in total over the rounds).
pub const ENTRY_RETRY_DELAY_SECS: u32 = 10;

#[derive(Template)]
#[template(path = "entry.ipxe")]
struct EntryScript<'a> {
    base_url: &'a BaseUrl,
    max_rounds: u32,
    max_nics: u32,
    retry_delay_secs: u32,
}

/// The `#!ipxe` script DHCP points every iPXE at: it finds a NIC with a lease and chains
/// `{base_url}/boot/ipxe?mac=...&uuid=...&arch=...&platform=...` (see [`crate::BootQuery`]).
pub fn render_entry(base_url: &BaseUrl) -> Result<String, ScriptError> {
    let script = EntryScript {
        base_url,
        max_rounds: ENTRY_MAX_ROUNDS,
        max_nics: ENTRY_MAX_NICS,
        retry_delay_secs: ENTRY_RETRY_DELAY_SECS,
    };
    finish("entry", script.render())
}

/// ctpf's own kernel parameters, written as one validated unit so the discovery and install
/// templates cannot drift apart.
pub(crate) struct CtpfKernelParams<'a> {
    pub(crate) base_url: &'a BaseUrl,
    pub(crate) token: &'a EnrollmentToken,
    pub(crate) request: &'a BootRequest,
}

impl fmt::Display for CtpfKernelParams<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ctpf.url={} ctpf.token={} ctpf.mac={}",
            self.base_url, self.token, self.request.mac
        )?;
        if let Some(uuid) = self.request.uuid {
            write!(f, " ctpf.uuid={uuid}")?;
        }
        if let Some(datacenter) = &self.request.datacenter {
            write!(f, " ctpf.datacenter={datacenter}")?;
        }
        Ok(())
    }
}

#[derive(Template)]
#[template(path = "discovery.ipxe")]
struct DiscoveryScript<'a> {
    base_url: &'a BaseUrl,
    mac: &'a MacAddr,
    arch: ScriptArch,
    cpu: &'static str,
    cmdline: KernelCmdline,
    ctpf_params: CtpfKernelParams<'a>,
}

#[derive(Template)]
#[template(path = "install.ipxe")]
struct InstallScript<'a> {
    mac: &'a MacAddr,
    arch: ScriptArch,
    kernel_url: HttpUrl,
    initrd_url: HttpUrl,
    cmdline: KernelCmdline,
    ctpf_params: CtpfKernelParams<'a>,
}

#[derive(Template)]
#[template(path = "local_disk.ipxe")]
struct LocalDiskScript<'a> {
    mac: &'a MacAddr,
    arch: ScriptArch,
}

/// The script for one machine. Every user-supplied value in `profile` is validated first; a
/// bad one is a [`ScriptError::Invalid`] naming the field, and no script is produced.
pub fn render_machine(
    context: &ScriptContext,
    request: &BootRequest,
    profile: &Profile,
) -> Result<String, ScriptError> {
    let ctpf_params =
        CtpfKernelParams { base_url: &context.base_url, token: &context.enrollment_token, request };
    let rendered = match profile {
        Profile::Discovery { cmdline } => DiscoveryScript {
            base_url: &context.base_url,
            mac: &request.mac,
            arch: request.arch,
            cpu: request.arch.cpu_name(),
            cmdline: KernelCmdline::parse("discovery.cmdline", cmdline)?,
            ctpf_params,
        }
        .render(),
        Profile::Install { kernel_url, initrd_url, cmdline } => InstallScript {
            mac: &request.mac,
            arch: request.arch,
            kernel_url: HttpUrl::parse("profile.kernel_url", kernel_url)?,
            initrd_url: HttpUrl::parse("profile.initrd_url", initrd_url)?,
            cmdline: KernelCmdline::parse("profile.cmdline", cmdline)?,
            ctpf_params,
        }
        .render(),
        Profile::LocalDisk => return render_local_disk(request),
    };
    finish(profile.kind(), rendered)
}

/// The script of an installed machine: boot its own disk. It needs neither ctpf's URL nor a
/// token, so none is asked for.
pub fn render_local_disk(request: &BootRequest) -> Result<String, ScriptError> {
    let rendered = LocalDiskScript { mac: &request.mac, arch: request.arch }.render();
    finish(Profile::LocalDisk.kind(), rendered)
}

/// Ends the script with exactly one newline (askama drops the template's last one).
pub(crate) fn finish(
    template: &'static str,
    rendered: Result<String, askama::Error>,
) -> Result<String, ScriptError> {
    let mut script = rendered.map_err(|source| ScriptError::Render { template, source })?;
    let trimmed_len = script.trim_end_matches('\n').len();
    script.truncate(trimmed_len);
    script.push('\n');
    Ok(script)
}

#[cfg(test)]
mod tests {
    use askama::Template;

    /// Proves the `.ipxe` extension selects `IpxeEscaper`: even a raw `&str` (which no real
    /// template takes) cannot smuggle a command in.
    #[derive(Template)]
    #[template(source = "echo {{ value }}", ext = "ipxe")]
    struct Probe<'a> {
        value: &'a str,
    }

    #[test]
    fn ipxe_templates_refuse_unsafe_text() {
        assert_eq!(Probe { value: "hello" }.render().unwrap(), "echo hello");
        for hostile in ["x\nshell", "${ip}", "a || b", "a;b", "\"q\""] {
            assert!(Probe { value: hostile }.render().is_err(), "{hostile:?}");
        }
    }
}
