//! What booting machines fetch over HTTP, without an admin token: the iPXE entry script, the
//! per-machine script, and the discovery kernel and initrd.
//!
//! The per-machine script is where a machine's life is decided: an unknown machine (or one
//! not installed yet) boots the discovery environment with a fresh one-time enrollment token
//! on its kernel command line; an installed one boots its local disk, so it never net-boots
//! into a loop.

use std::time::Duration;

use axum::{
    extract::{Path, Query, State},
    http::{HeaderMap, Method, header},
    response::{IntoResponse, Response},
};
use ctpf_common::{HostState, Name, NewDatacenter};
use ctpf_registries::RegistryError;
use ctpf_scripts::{
    BaseUrl, BootQuery, BootRequest, Profile, ScriptContext, render_entry, render_grub_local_disk,
    render_grub_machine, render_local_disk, render_machine,
};

use super::{ApiError, AppState, download};

/// How machines reach this ctpf, and where unknown machines enroll.
#[derive(Debug, Clone)]
pub struct BootSettings {
    /// The URL booting machines use (not necessarily the address the API binds).
    pub base_url: BaseUrl,
    /// The datacenter machines that boot here enroll into; created on first use.
    pub datacenter: Name,
    /// Extra kernel parameters of discovery boots (checked at start).
    pub discovery_cmdline: String,
}

/// A discovery boot must reach the callback within this; it is one-time anyway.
const DISCOVERY_TOKEN_TTL: Duration = Duration::from_secs(3600);

fn script(text: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

fn script_error(e: ctpf_scripts::ScriptError) -> ApiError {
    match e.field() {
        Some(field) => ApiError::invalid(field.to_owned(), e.to_string()),
        None => ApiError::internal(&e),
    }
}

/// The entry script DHCP points every iPXE at: DHCP on each NIC, then chain
/// `/boot/ipxe?mac=...`.
#[utoipa::path(get, path = "/boot.ipxe", tag = "boot", security(()),
    responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn entry_script(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(script(render_entry(&s.boot.base_url).map_err(script_error)?))
}

/// What a machine boots next, decided from the registry.
enum Decision {
    LocalDisk(BootRequest),
    Discovery { context: ScriptContext, request: BootRequest, profile: Profile },
}

/// An installed (or ready) host boots its disk; every other machine the discovery
/// environment, with a fresh one-time enrollment token for its datacenter.
async fn decide(s: &AppState, query: BootQuery) -> Result<Decision, ApiError> {
    let request = query.into_request()?;
    let known = s.registry.host_by_identity(request.uuid, &[request.mac]).await?;
    let installed = known
        .as_ref()
        .is_some_and(|(host, _)| matches!(host.state, HostState::Installed | HostState::Ready));
    if installed {
        tracing::info!(mac = %request.mac, arch = request.arch.as_str(), "installed: local disk boot");
        return Ok(Decision::LocalDisk(request));
    }
    let datacenter = known
        .map(|(host, _)| host.datacenter)
        .or_else(|| request.datacenter.clone())
        .unwrap_or_else(|| s.boot.datacenter.clone());
    ensure_datacenter(s, &datacenter).await?;
    let (token, _) = s.registry.issue_enrollment_token(&datacenter, DISCOVERY_TOKEN_TTL, 1).await?;
    let context = ScriptContext::new(s.boot.base_url.as_str(), &token).map_err(script_error)?;
    tracing::info!(mac = %request.mac, arch = request.arch.as_str(), %datacenter, "discovery boot");
    let profile = Profile::Discovery { cmdline: s.boot.discovery_cmdline.clone() };
    Ok(Decision::Discovery { context, request, profile })
}

/// The script for one machine, identified by what iPXE knows of it.
#[utoipa::path(get, path = "/boot/ipxe", tag = "boot", security(()),
    params(("mac" = String, Query), ("uuid" = Option<String>, Query), ("arch" = String, Query,
        description = "iPXE ${buildarch}"), ("platform" = String, Query, description = "iPXE ${platform}"),
        ("datacenter" = Option<String>, Query)),
    responses((status = 200, content_type = "text/plain", body = String), (status = 400, body = super::ErrorBody)))]
pub async fn machine_script(
    State(s): State<AppState>,
    Query(query): Query<BootQuery>,
) -> Result<Response, ApiError> {
    let text = match decide(&s, query).await? {
        Decision::LocalDisk(request) => render_local_disk(&request),
        Decision::Discovery { context, request, profile } => {
            render_machine(&context, &request, &profile)
        }
    };
    Ok(script(text.map_err(script_error)?))
}

/// The GRUB config for one machine, for GRUB images that ctpf built (their embedded config
/// sends the same query as iPXE: `arch` is GRUB's CPU, `i386` on BIOS).
#[utoipa::path(get, path = "/boot/grub", tag = "boot", security(()),
    params(("mac" = String, Query), ("uuid" = Option<String>, Query), ("arch" = String, Query,
        description = "i386, x86_64 or arm64"), ("platform" = String, Query, description = "pcbios or efi"),
        ("datacenter" = Option<String>, Query)),
    responses((status = 200, content_type = "text/plain", body = String), (status = 400, body = super::ErrorBody)))]
pub async fn machine_grub_config(
    State(s): State<AppState>,
    Query(query): Query<BootQuery>,
) -> Result<Response, ApiError> {
    let text = match decide(&s, query).await? {
        Decision::LocalDisk(request) => render_grub_local_disk(&request),
        Decision::Discovery { context, request, profile } => {
            render_grub_machine(&context, &request, &profile)
        }
    };
    Ok(script(text.map_err(script_error)?))
}

async fn ensure_datacenter(s: &AppState, name: &Name) -> Result<(), ApiError> {
    let new =
        NewDatacenter { name: name.clone(), tags: Default::default(), dhcp: Default::default() };
    match s.registry.create_datacenter(new).await {
        Ok(_) | Err(RegistryError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The discovery kernel (`vmlinuz`) or initramfs (`initrd`) for an architecture, from the
/// artifact named `discovery-ARCH-FILE`; Range and HEAD work as for any download.
#[utoipa::path(get, path = "/boot/discovery/{arch}/{file}", tag = "boot", security(()),
    params(("arch" = String, Path, description = "x86_64 or arm64"), ("file" = String, Path, description = "vmlinuz or initrd")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = super::ErrorBody)))]
pub async fn discovery_file(
    State(s): State<AppState>,
    method: Method,
    headers: HeaderMap,
    Path((arch, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    if !matches!(arch.as_str(), "x86_64" | "arm64") {
        return Err(ApiError::invalid("arch", "arch must be x86_64 or arm64"));
    }
    if !matches!(file.as_str(), "vmlinuz" | "initrd") {
        return Err(ApiError::invalid("file", "file must be vmlinuz or initrd"));
    }
    let artifact = s.registry.artifact(&format!("discovery-{arch}-{file}")).await?;
    download::stream_blob(&s, &method, &headers, &artifact.digest, None).await
}

/// A boot loader named in DHCP answers to UEFI HTTP boot clients (`/ipxe.efi`, ...), from the
/// artifact `boot-FILE` that start-up stores from the boot root.
#[utoipa::path(get, path = "/{file}", tag = "boot", security(()),
    params(("file" = String, Path, description = "ipxe.efi, ipxe-arm64.efi or undionly.kpxe")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = super::ErrorBody)))]
pub async fn boot_file(
    State(s): State<AppState>,
    method: Method,
    headers: HeaderMap,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    if !crate::boot_artifacts::HTTP_BOOT_FILES.contains(&file.as_str()) {
        return Err(ApiError::not_found(format!("no boot file {file:?}")));
    }
    let artifact = s.registry.artifact(&crate::boot_artifacts::boot_file_artifact(&file)).await?;
    download::stream_blob(&s, &method, &headers, &artifact.digest, None).await
}
