//! GRUB flavours of the boot scripts, for sites that boot GRUB images instead of iPXE: the
//! entry config embedded in the image, and each machine's config, fetched over GRUB's own
//! HTTP client (`(http,HOST:PORT)/path`). The decisions are the same as for iPXE; only the
//! language differs.

use askama::Template;
use ctpf_common::{MacAddr, ParseError};

use crate::escape::{BaseUrl, KernelCmdline};
use crate::render::{CtpfKernelParams, Profile, ScriptContext, ScriptError, finish};
use crate::request::{BootRequest, ScriptArch};

/// GRUB's HTTP client speaks plain HTTP only, and names servers `HOST:PORT` inside a device.
fn http_server(base_url: &BaseUrl) -> Result<String, ScriptError> {
    let authority = base_url.as_str().strip_prefix("http://").ok_or_else(|| {
        ParseError::new("base_url", base_url.as_str(), "GRUB fetches over plain http:// only")
    })?;
    if authority.contains('/') {
        return Err(ParseError::new(
            "base_url",
            base_url.as_str(),
            "GRUB needs ctpf at the root of its server (no path)",
        )
        .into());
    }
    Ok(authority.to_owned())
}

/// GRUB's names for what it runs on, as the entry config reports them back.
fn grub_platform(arch: ScriptArch) -> (&'static str, &'static str) {
    match arch {
        ScriptArch::X86_64Bios => ("i386", "pcbios"),
        ScriptArch::X86_64Efi => ("x86_64", "efi"),
        ScriptArch::Arm64Efi => ("arm64", "efi"),
    }
}

#[derive(Template)]
#[template(path = "grub_entry.cfg")]
struct GrubEntry<'a> {
    base_url: &'a BaseUrl,
    http_server: String,
    grub_cpu: &'static str,
    grub_platform: &'static str,
}

/// The config embedded in a GRUB image for `arch`: DHCP with retries, then `source` of
/// `{base_url}/boot/grub?arch=..&platform=..&mac=..&uuid=..` (the same query as iPXE's, so
/// [`crate::BootQuery`] parses it).
pub fn render_grub_entry(base_url: &BaseUrl, arch: ScriptArch) -> Result<String, ScriptError> {
    let (grub_cpu, grub_platform) = grub_platform(arch);
    let entry =
        GrubEntry { base_url, http_server: http_server(base_url)?, grub_cpu, grub_platform };
    finish("grub entry", entry.render())
}

#[derive(Template)]
#[template(path = "grub_chain_ipxe.cfg")]
struct GrubChainIpxe<'a> {
    base_url: &'a BaseUrl,
    http_server: String,
    bios: bool,
    ipxe_file: &'static str,
}

/// A config for a GRUB image that only loads iPXE from ctpf (`/ipxe.efi`,
/// `/ipxe-arm64.efi`, or `/ipxe.lkrn` under BIOS) and has it chain `/boot.ipxe`, for sites
/// whose scripts stay iPXE. Proven under BIOS with iPXE 1.21.1 (2025): SeaBIOS, GRUB 2.12,
/// `ipxe.lkrn`, callback (`tests/tests/pxe_qemu.rs`). Debian 12's iPXE (2019) stops after
/// loading. Under UEFI it does not boot yet: GRUB's `efinet` has taken the NIC's SNP, so
/// `snponly.efi` finds no network device and `ipxe.efi` hangs initialising devices.
pub fn render_grub_chain_ipxe(base_url: &BaseUrl, arch: ScriptArch) -> Result<String, ScriptError> {
    let (bios, ipxe_file) = match arch {
        ScriptArch::X86_64Bios => (true, "ipxe.lkrn"),
        ScriptArch::X86_64Efi => (false, "ipxe.efi"),
        ScriptArch::Arm64Efi => (false, "ipxe-arm64.efi"),
    };
    let chain = GrubChainIpxe { base_url, http_server: http_server(base_url)?, bios, ipxe_file };
    finish("grub chain ipxe", chain.render())
}

#[derive(Template)]
#[template(path = "grub_discovery.cfg")]
struct GrubDiscovery<'a> {
    http_server: String,
    mac: &'a MacAddr,
    arch: ScriptArch,
    cpu: &'static str,
    /// The operator's parameters, then ctpf's, one word each.
    kernel_words: Vec<String>,
}

#[derive(Template)]
#[template(path = "grub_local_disk.cfg")]
struct GrubLocalDisk<'a> {
    mac: &'a MacAddr,
    arch: ScriptArch,
}

/// One machine's GRUB config. Install profiles name arbitrary URLs, which GRUB cannot fetch
/// in general (https, paths under other servers), so they are refused (field `profile`):
/// such sites chainload iPXE from GRUB instead.
pub fn render_grub_machine(
    context: &ScriptContext,
    request: &BootRequest,
    profile: &Profile,
) -> Result<String, ScriptError> {
    let rendered = match profile {
        Profile::Discovery { cmdline } => {
            let cmdline = KernelCmdline::parse("discovery.cmdline", cmdline)?;
            let ctpf_params = CtpfKernelParams {
                base_url: &context.base_url,
                token: &context.enrollment_token,
                request,
            }
            .to_string();
            let kernel_words = cmdline
                .as_str()
                .split_whitespace()
                .chain(ctpf_params.split_whitespace())
                .map(str::to_owned)
                .collect();
            GrubDiscovery {
                http_server: http_server(&context.base_url)?,
                mac: &request.mac,
                arch: request.arch,
                cpu: request.arch.cpu_name(),
                kernel_words,
            }
            .render()
        }
        Profile::Install { .. } => {
            return Err(ParseError::new(
                "profile",
                "install",
                "GRUB boots install profiles only by chainloading iPXE",
            )
            .into());
        }
        Profile::LocalDisk => return render_grub_local_disk(request),
    };
    finish("grub discovery", rendered)
}

/// An installed machine's GRUB config: boot its own disk.
pub fn render_grub_local_disk(request: &BootRequest) -> Result<String, ScriptError> {
    finish("grub local disk", GrubLocalDisk { mac: &request.mac, arch: request.arch }.render())
}
