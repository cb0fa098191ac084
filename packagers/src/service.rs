//! The packager service: turns a [`PackageRequest`] into a medium in the artifact store. Like
//! the builder, every job goes through the same steps:
//!
//! 1. **validate**: the format's input roles (missing and unknown ones are named, with the
//!    valid ones), the label and the kernel command line. The manager runs this too, before
//!    accepting a job.
//! 2. **cache**: the key is the sha256 of the packager version and the whole request (inputs
//!    by digest, so the media key and every byte of input count); the ref `packages/<key>`
//!    points at the manifest of an earlier run. Skipped with `no_cache`.
//! 3. **fetch**: each input is copied from the store into a fresh directory while it is
//!    hashed; a missing, truncated or corrupt input stops the job (not retried).
//! 4. **write**: the medium is planned and written in one pass (on a blocking thread).
//! 5. **store**: the medium, then its manifest, then the ref, so a ref never points at a
//!    manifest whose medium is missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ctpf_common::{
    BootMode, BuildLogLine, InputArtifact, LogStream, MediaEntry, MediaFormat, OffsetDateTime,
    PackageManifest, PackageRequest, Sha256Digest,
};
use ctpf_store::artifacts::{ArtifactError, ArtifactStore, read_json_ref};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::iso9660::Source;
use crate::media::{self, BootFiles, MediaConfig, Syslinux};

/// Refs of package manifests are `packages/<key hex>`.
pub const MANIFEST_REF_PREFIX: &str = "packages";
/// Part of every key: a new version of the writers means new media.
pub const PACKAGER_VERSION: &str = concat!("ctpf-packager/1 (", env!("CARGO_PKG_VERSION"), ")");
/// Largest manifest read back from the store (a few KiB; bundles list every file).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Kernel command line words: at most this many.
const MAX_KERNEL_WORDS: usize = 64;

/// Input roles of the boot media (ISO and USB stick).
pub const KERNEL: &str = "kernel";
pub const INITRD: &str = "initrd";
pub const EFI_X86_64: &str = "efi_x86_64";
/// Media for both architectures: the arm64 kernel and initrd (then `kernel`/`initrd` are
/// the x86_64 ones).
pub const KERNEL_ARM64: &str = "kernel_arm64";
pub const INITRD_ARM64: &str = "initrd_arm64";
pub const EFI_ARM64: &str = "efi_arm64";
pub const ISOLINUX_BIN: &str = "isolinux_bin";
pub const LDLINUX_C32: &str = "ldlinux_c32";
pub const ISOHDPFX_BIN: &str = "isohdpfx_bin";
const SYSLINUX_ROLES: [&str; 3] = [ISOLINUX_BIN, LDLINUX_C32, ISOHDPFX_BIN];
/// Raspberry Pi firmware files are inputs `firmware/PATH`, PATH being where they go.
pub const FIRMWARE_PREFIX: &str = "firmware/";

#[derive(Debug, Clone)]
pub struct PackagerConfig {
    /// Parent of the per-job directories (each removed after its job).
    pub work_dir: PathBuf,
}

/// Why a packaging job did not produce its medium.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackageError {
    /// The request is wrong (missing or unknown inputs, bad label or kernel words): refused
    /// before anything ran; retrying cannot help.
    #[error("{0}")]
    Invalid(String),
    /// An input in the store does not hash to its digest (truncated or corrupt): the job
    /// stops, and retrying cannot help until the artifact is stored again.
    #[error("input {role}: stored artifact {expected} is corrupt: {found}")]
    CorruptInput { role: String, expected: Sha256Digest, found: String },
    #[error("the packaging job was cancelled")]
    Cancelled,
    /// Storage or file system trouble: another attempt may succeed.
    #[error("{0}")]
    Transient(String),
}

impl PackageError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, PackageError::Transient(_))
    }
}

impl From<ArtifactError> for PackageError {
    fn from(e: ArtifactError) -> Self {
        PackageError::Transient(format!("artifact store: {e}"))
    }
}

fn invalid(message: impl Into<String>) -> PackageError {
    PackageError::Invalid(message.into())
}

/// The input roles a format takes, for messages and checks.
fn roles_text(format: MediaFormat) -> String {
    match format {
        MediaFormat::Iso => format!(
            "{KERNEL}, {INITRD} and at least one loader: {EFI_X86_64}, {EFI_ARM64}, or all of \
             {ISOLINUX_BIN}, {LDLINUX_C32}, {ISOHDPFX_BIN}; for both architectures also \
             {KERNEL_ARM64}, {INITRD_ARM64}"
        ),
        MediaFormat::Usb => format!(
            "{KERNEL}, {INITRD} and at least one of {EFI_X86_64}, {EFI_ARM64}; for both \
             architectures also {KERNEL_ARM64}, {INITRD_ARM64}"
        ),
        MediaFormat::Raspi => format!("{KERNEL}, {INITRD} and {FIRMWARE_PREFIX}PATH files"),
        MediaFormat::PxeBundle => "the served paths (e.g. undionly.kpxe, ipxe.efi)".into(),
    }
}

/// Checks what can be checked without the store: the manager runs this before accepting a
/// job, so a bad request is a 400, not a failed job.
pub fn validate(request: &PackageRequest) -> Result<(), PackageError> {
    request.check_label().map_err(|e| invalid(e.to_string()))?;
    if request.kernel_words.len() > MAX_KERNEL_WORDS {
        return Err(invalid(format!("at most {MAX_KERNEL_WORDS} kernel command line words")));
    }
    media::check_kernel_words(&request.kernel_words).map_err(|e| invalid(e.to_string()))?;
    let inputs = &request.inputs;
    let format = request.format;
    let unknown = |role: &str| {
        invalid(format!(
            "{format} media take no input {role:?}; valid inputs: {}",
            roles_text(format)
        ))
    };
    let require = |roles: &[&str]| -> Result<(), PackageError> {
        let missing: Vec<&str> =
            roles.iter().copied().filter(|r| !inputs.contains_key(*r)).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(invalid(format!(
                "{format} media need input(s) {}; valid inputs: {}",
                missing.join(", "),
                roles_text(format)
            )))
        }
    };
    match format {
        MediaFormat::Iso | MediaFormat::Usb => {
            require(&[KERNEL, INITRD])?;
            let allowed: &[&str] = if format == MediaFormat::Iso {
                &[
                    KERNEL,
                    INITRD,
                    KERNEL_ARM64,
                    INITRD_ARM64,
                    EFI_X86_64,
                    EFI_ARM64,
                    ISOLINUX_BIN,
                    LDLINUX_C32,
                    ISOHDPFX_BIN,
                ]
            } else {
                &[KERNEL, INITRD, KERNEL_ARM64, INITRD_ARM64, EFI_X86_64, EFI_ARM64]
            };
            if let Some(role) = inputs.keys().find(|r| !allowed.contains(&r.as_str())) {
                return Err(unknown(role));
            }
            if inputs.contains_key(KERNEL_ARM64) || inputs.contains_key(INITRD_ARM64) {
                require(&[KERNEL_ARM64, INITRD_ARM64, EFI_ARM64])?;
            }
            let syslinux = SYSLINUX_ROLES.iter().filter(|r| inputs.contains_key(**r)).count();
            if syslinux != 0 {
                require(&SYSLINUX_ROLES)?;
            }
            if syslinux == 0 && !inputs.contains_key(EFI_X86_64) && !inputs.contains_key(EFI_ARM64)
            {
                return Err(invalid(format!(
                    "{format} media need a boot loader; valid inputs: {}",
                    roles_text(format)
                )));
            }
        }
        MediaFormat::Raspi => {
            require(&[KERNEL, INITRD])?;
            for role in inputs.keys() {
                match role.strip_prefix(FIRMWARE_PREFIX) {
                    Some(path) => {
                        crate::pxe_bundle::check_path(path).map_err(|e| invalid(e.to_string()))?
                    }
                    None if role == KERNEL || role == INITRD => {}
                    None => return Err(unknown(role)),
                }
            }
        }
        MediaFormat::PxeBundle => {
            if inputs.is_empty() {
                return Err(invalid(format!(
                    "a PXE bundle needs files; valid inputs: {}",
                    roles_text(format)
                )));
            }
            for path in inputs.keys() {
                crate::pxe_bundle::check_path(path).map_err(|e| invalid(e.to_string()))?;
            }
        }
    }
    Ok(())
}

/// The cache key of a request: the packager version and the canonical JSON of the request
/// (inputs by digest; maps are sorted).
pub fn package_key(request: &PackageRequest) -> Sha256Digest {
    let mut hasher = Sha256::new();
    hasher.update(PACKAGER_VERSION.as_bytes());
    hasher.update([0]);
    hasher.update(serde_json::to_vec(request).expect("a request always serializes"));
    Sha256Digest::from_bytes(hasher.finalize().into())
}

/// Where a job's log lines go, numbered from 1 (the same lines builds send).
#[derive(Debug, Clone)]
pub struct PackageLog {
    tx: Option<mpsc::UnboundedSender<BuildLogLine>>,
    next: Arc<AtomicU64>,
}

impl PackageLog {
    pub fn new(tx: mpsc::UnboundedSender<BuildLogLine>) -> Self {
        Self { tx: Some(tx), next: Arc::new(AtomicU64::new(1)) }
    }

    /// A log nobody reads.
    pub fn discard() -> Self {
        Self { tx: None, next: Arc::new(AtomicU64::new(1)) }
    }

    pub fn say(&self, text: impl Into<String>) {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        if let Some(tx) = &self.tx {
            // The reader went away: the job still finishes.
            let _ = tx.send(BuildLogLine { seq, stream: LogStream::Builder, text: text.into() });
        }
    }
}

/// Packages, caches and stores. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Packager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: PackagerConfig,
    artifacts: Arc<dyn ArtifactStore>,
}

impl Packager {
    /// Creates the work directory if needed.
    pub fn new(
        config: PackagerConfig,
        artifacts: Arc<dyn ArtifactStore>,
    ) -> Result<Self, PackageError> {
        std::fs::create_dir_all(&config.work_dir).map_err(|e| {
            PackageError::Transient(format!(
                "creating the work directory {}: {e}",
                config.work_dir.display()
            ))
        })?;
        Ok(Self { inner: Arc::new(Inner { config, artifacts }) })
    }

    /// Writes the medium `request` describes, or answers from the cache when the same
    /// request was packaged before (the manifest then has `cached: true`) and `no_cache` is
    /// not set.
    pub async fn package(
        &self,
        request: &PackageRequest,
        no_cache: bool,
        cancel: CancellationToken,
        log: PackageLog,
    ) -> Result<PackageManifest, PackageError> {
        validate(request)?;
        let key = package_key(request);
        log.say(format!("{} medium {}, key {key}", request.format, request.label));
        if no_cache {
            log.say("--no-cache: writing it again");
        } else if let Some(manifest) = self.inner.cached(&key).await? {
            log.say(format!(
                "cache hit: written {} in {} ms; nothing to do",
                manifest.built_at, manifest.duration_ms
            ));
            return Ok(manifest);
        }
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix(&format!("package-{}-", request.format))
            .tempdir_in(&self.inner.config.work_dir)
            .map_err(|e| PackageError::Transient(format!("creating a work directory: {e}")))?;
        let mut local = BTreeMap::new();
        for (i, (role, input)) in request.inputs.iter().enumerate() {
            if cancel.is_cancelled() {
                return Err(PackageError::Cancelled);
            }
            let path = dir.path().join(format!("input-{i}"));
            self.inner.fetch(role, input, &path).await?;
            local.insert(role.clone(), (path, *input));
        }
        log.say(format!("fetched {} inputs, digests checked", local.len()));
        if cancel.is_cancelled() {
            return Err(PackageError::Cancelled);
        }
        let file = format!("{}.{}", request.label.to_lowercase(), request.format.extension());
        let out = dir.path().join(&file);
        let written = {
            let (request, out) = (request.clone(), out.clone());
            tokio::task::spawn_blocking(move || write_medium(&request, &local, &out))
                .await
                .map_err(|e| PackageError::Transient(format!("writing the medium: {e}")))??
        };
        log.say(format!("wrote {file}: {} bytes, {} files", written.size, written.contents.len()));
        let body = tokio::fs::File::open(&out)
            .await
            .map_err(|e| PackageError::Transient(format!("opening {}: {e}", out.display())))?;
        let stored = self.inner.artifacts.put(Box::pin(body), None).await?;
        let manifest = PackageManifest {
            format: request.format,
            packager_version: PACKAGER_VERSION.to_owned(),
            key,
            label: request.label.clone(),
            inputs: request.inputs.clone(),
            file,
            digest: stored.digest,
            size: stored.size,
            boot_modes: written.boot_modes,
            contents: written.contents,
            source_date_epoch: request.source_date_epoch,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            built_at: OffsetDateTime::now_utc(),
            cached: false,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| PackageError::Transient(format!("encoding the manifest: {e}")))?;
        let manifest_blob =
            self.inner.artifacts.put(Box::pin(std::io::Cursor::new(json)), None).await?;
        self.inner.artifacts.set_ref(&manifest_ref(&key), &manifest_blob.digest).await?;
        log.say(format!(
            "stored {} ({}) in {} ms; manifest {}",
            manifest.file, manifest.digest, manifest.duration_ms, manifest_blob.digest
        ));
        Ok(manifest)
    }
}

impl Inner {
    /// The stored manifest of `key`, when it and its medium are in the store.
    async fn cached(&self, key: &Sha256Digest) -> Result<Option<PackageManifest>, PackageError> {
        let reference = manifest_ref(key);
        let found = read_json_ref(self.artifacts.as_ref(), &reference, MAX_MANIFEST_BYTES).await?;
        let Some(mut manifest): Option<PackageManifest> = found else { return Ok(None) };
        if self.artifacts.stat(&manifest.digest).await? != Some(manifest.size) {
            tracing::info!(file = manifest.file, "a cached medium is gone; packaging again");
            return Ok(None);
        }
        manifest.cached = true;
        Ok(Some(manifest))
    }

    /// Copies input `role` to `to`, hashing as it goes; the content must match the digest
    /// and size the request names.
    async fn fetch(
        &self,
        role: &str,
        input: &InputArtifact,
        to: &Path,
    ) -> Result<(), PackageError> {
        let blob = match self.artifacts.get(&input.digest).await {
            Ok(blob) => blob,
            Err(ArtifactError::NotFound(_)) => {
                return Err(invalid(format!(
                    "input {role}: artifact {} is not in the store",
                    input.digest
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let io_error = |e: std::io::Error| {
            PackageError::Transient(format!("input {role}: copying to {}: {e}", to.display()))
        };
        let mut reader = blob.reader;
        let mut file = tokio::fs::File::create(to).await.map_err(io_error)?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buffer).await.map_err(|e| PackageError::CorruptInput {
                role: role.to_owned(),
                expected: input.digest,
                found: format!("reading it failed: {e}"),
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            size += n as u64;
            file.write_all(&buffer[..n]).await.map_err(io_error)?;
        }
        file.flush().await.map_err(io_error)?;
        let actual = Sha256Digest::from_bytes(hasher.finalize().into());
        if actual != input.digest || size != input.size {
            return Err(PackageError::CorruptInput {
                role: role.to_owned(),
                expected: input.digest,
                found: format!(
                    "it holds {size} bytes hashing to {actual} ({} bytes expected)",
                    input.size
                ),
            });
        }
        Ok(())
    }
}

fn manifest_ref(key: &Sha256Digest) -> String {
    format!("{MANIFEST_REF_PREFIX}/{}", key.hex())
}

/// What writing a medium gave.
struct Written {
    size: u64,
    boot_modes: Vec<BootMode>,
    contents: Vec<MediaEntry>,
}

/// Plans and writes the medium to `out` (blocking). `local` maps each role to its fetched
/// file and the digest it was checked against.
fn write_medium(
    request: &PackageRequest,
    local: &BTreeMap<String, (PathBuf, InputArtifact)>,
    out: &Path,
) -> Result<Written, PackageError> {
    let source = |role: &str| -> Option<Source> {
        local.get(role).map(|(path, input)| Source::File { path: path.clone(), len: input.size })
    };
    let required = |role: &str| source(role).ok_or_else(|| invalid(format!("no input {role}")));
    let epoch = i64::try_from(request.source_date_epoch)
        .map_err(|_| invalid("source_date_epoch is out of range"))?;
    let config = MediaConfig {
        label: request.label.clone(),
        kernel_words: request.kernel_words.clone(),
        timestamp: epoch,
        // Fixed by the request, so the same request gives the same serials.
        serial: u32::from_be_bytes(
            package_key(request).as_bytes()[..4].try_into().unwrap_or([0; 4]),
        ),
    };
    let failed = |what: &str| {
        let what = what.to_owned();
        move |e: &dyn std::fmt::Display| PackageError::Transient(format!("{what}: {e}"))
    };
    let create = || std::fs::File::create(out).map_err(|e| failed("creating the medium")(&e));
    let mut boot_modes = Vec::new();
    let (size, tree) = match request.format {
        MediaFormat::Iso | MediaFormat::Usb => {
            let syslinux = match (source(ISOLINUX_BIN), source(LDLINUX_C32), source(ISOHDPFX_BIN)) {
                (Some(isolinux_bin), Some(ldlinux_c32), Some(isohdpfx_bin)) => {
                    Some(Syslinux { isolinux_bin, ldlinux_c32, isohdpfx_bin })
                }
                _ => None,
            };
            let arm64 = match (source(KERNEL_ARM64), source(INITRD_ARM64)) {
                (Some(kernel), Some(initrd)) => Some(media::KernelFiles { kernel, initrd }),
                _ => None,
            };
            let files = BootFiles {
                kernel: required(KERNEL)?,
                initrd: required(INITRD)?,
                arm64,
                efi_x86_64: source(EFI_X86_64),
                efi_arm64: source(EFI_ARM64),
                syslinux,
            };
            let media_error = |e: media::MediaError| match e {
                media::MediaError::KernelWord { .. } | media::MediaError::Missing(_) => {
                    invalid(e.to_string())
                }
                e => PackageError::Transient(format!("writing the medium: {e}")),
            };
            if request.format == MediaFormat::Iso {
                if files.syslinux.is_some() {
                    boot_modes.extend([BootMode::BiosCdrom, BootMode::BiosUsb]);
                }
                if files.efi_x86_64.is_some() {
                    boot_modes.extend([BootMode::UefiX86_64Cdrom, BootMode::UefiX86_64Usb]);
                }
                if files.efi_arm64.is_some() {
                    boot_modes.extend([BootMode::UefiArm64Cdrom, BootMode::UefiArm64Usb]);
                }
                let tree = media::iso_tree(&files, &config).map_err(media_error)?;
                let plan = media::hybrid_iso(&files, &config).map_err(media_error)?;
                let mut writer = std::io::BufWriter::with_capacity(1 << 20, create()?);
                let size = plan.write(&mut writer).map_err(|e| failed("writing the ISO")(&e))?;
                finish(writer)?;
                (size, tree)
            } else {
                if files.efi_x86_64.is_some() {
                    boot_modes.push(BootMode::UefiX86_64Usb);
                }
                if files.efi_arm64.is_some() {
                    boot_modes.push(BootMode::UefiArm64Usb);
                }
                let tree = media::usb_esp_tree(&files, &config).map_err(media_error)?;
                let esp = media::usb_esp(&files, &config).map_err(media_error)?;
                let size = crate::disk::write_gpt_esp(out, &esp, config.serial)
                    .map_err(|e| failed("writing the disk image")(&e))?;
                (size, tree)
            }
        }
        MediaFormat::Raspi => {
            boot_modes.push(BootMode::RaspberryPi);
            let firmware = local
                .keys()
                .filter_map(|role| {
                    let path = role.strip_prefix(FIRMWARE_PREFIX)?;
                    Some(required(role).map(|source| (path.to_owned(), source)))
                })
                .collect::<Result<_, _>>()?;
            let files = media::RaspiFiles {
                kernel: required(KERNEL)?,
                initrd: required(INITRD)?,
                firmware,
            };
            let media_error = |e: media::MediaError| match e {
                media::MediaError::Read { .. } | media::MediaError::Fat(_) => {
                    PackageError::Transient(format!("writing the medium: {e}"))
                }
                e => invalid(e.to_string()),
            };
            let tree = media::raspi_tree(&files, &config).map_err(media_error)?;
            let partition = media::raspi_partition(&files, &config).map_err(media_error)?;
            let size = crate::disk::write_mbr_fat(out, &partition, config.serial)
                .map_err(|e| failed("writing the disk image")(&e))?;
            (size, tree)
        }
        MediaFormat::PxeBundle => {
            for path in local.keys() {
                boot_modes.extend(pxe_boot_mode(path));
            }
            boot_modes.sort();
            boot_modes.dedup();
            let tree: BTreeMap<String, Source> = local
                .keys()
                .map(|path| Ok((path.clone(), required(path)?)))
                .collect::<Result<_, PackageError>>()?;
            let mut writer = std::io::BufWriter::with_capacity(1 << 20, create()?);
            let size = crate::pxe_bundle::write_tar(&tree, request.source_date_epoch, &mut writer)
                .map_err(|e| failed("writing the bundle")(&e))?;
            finish(writer)?;
            (size, tree)
        }
    };
    let contents = tree
        .iter()
        .map(|(path, source)| {
            let digest = match source {
                Source::Bytes(bytes) => Sha256Digest::of(bytes),
                // Every file source is a fetched input, already checked against its digest.
                Source::File { path: file, .. } => local
                    .values()
                    .find(|(p, _)| p == file)
                    .map(|(_, input)| input.digest)
                    .ok_or_else(|| invalid(format!("{path}: not an input")))?,
            };
            Ok(MediaEntry { path: path.clone(), digest, size: source.len() })
        })
        .collect::<Result<_, PackageError>>()?;
    Ok(Written { size, boot_modes, contents })
}

fn finish(writer: std::io::BufWriter<std::fs::File>) -> Result<(), PackageError> {
    let file = writer
        .into_inner()
        .map_err(|e| PackageError::Transient(format!("writing the medium: {}", e.error())))?;
    file.sync_all().map_err(|e| PackageError::Transient(format!("syncing the medium: {e}")))
}

/// Which firmware loads a bundle file by its name (the names DHCP hands out).
fn pxe_boot_mode(path: &str) -> Option<BootMode> {
    let file = path.rsplit('/').next().unwrap_or(path);
    match file {
        "undionly.kpxe" | "core.0" | "pxelinux.0" => Some(BootMode::PxeBios),
        "ipxe.efi" | "grubx64.efi" => Some(BootMode::PxeUefiX86_64),
        "ipxe-arm64.efi" | "grubaa64.efi" => Some(BootMode::PxeUefiArm64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(byte: u8) -> InputArtifact {
        InputArtifact { digest: Sha256Digest::of(&[byte]), size: 1 }
    }

    fn request(format: MediaFormat, roles: &[&str]) -> PackageRequest {
        PackageRequest {
            format,
            label: "CTPF".into(),
            inputs: roles.iter().map(|r| ((*r).to_owned(), input(1))).collect(),
            kernel_words: vec!["console=ttyS0".into()],
            source_date_epoch: 0,
        }
    }

    #[test]
    fn missing_and_unknown_inputs_are_named_with_the_valid_ones() {
        let err = validate(&request(MediaFormat::Iso, &[KERNEL, EFI_X86_64])).unwrap_err();
        assert!(err.to_string().contains("need input(s) initrd; valid inputs: kernel"), "{err}");
        let err = validate(&request(MediaFormat::Usb, &[KERNEL, INITRD, ISOLINUX_BIN]));
        assert!(err.unwrap_err().to_string().contains("no input \"isolinux_bin\""));
        let err = validate(&request(MediaFormat::Iso, &[KERNEL, INITRD, ISOLINUX_BIN]));
        assert!(err.unwrap_err().to_string().contains("ldlinux_c32, isohdpfx_bin"));
        let err = validate(&request(MediaFormat::Iso, &[KERNEL, INITRD])).unwrap_err();
        assert!(err.to_string().contains("need a boot loader"), "{err}");
        validate(&request(MediaFormat::Iso, &[KERNEL, INITRD, EFI_X86_64])).unwrap();
        let mut all = vec![KERNEL, INITRD, EFI_ARM64];
        all.extend(SYSLINUX_ROLES);
        validate(&request(MediaFormat::Iso, &all)).unwrap();
        let err = validate(&request(MediaFormat::Usb, &[KERNEL, INITRD, EFI_X86_64, KERNEL_ARM64]));
        assert!(err.unwrap_err().to_string().contains("initrd_arm64, efi_arm64"));
        let both = [KERNEL, INITRD, EFI_X86_64, KERNEL_ARM64, INITRD_ARM64, EFI_ARM64];
        validate(&request(MediaFormat::Usb, &both)).unwrap();

        let err = validate(&request(MediaFormat::PxeBundle, &["../etc/passwd"])).unwrap_err();
        assert!(err.to_string().contains("../etc/passwd"), "{err}");
        validate(&request(MediaFormat::PxeBundle, &["ipxe.efi", "discovery/vmlinuz"])).unwrap();
        let err = validate(&request(MediaFormat::Raspi, &[KERNEL, INITRD, "config.txt"]));
        assert!(err.unwrap_err().to_string().contains("firmware/PATH"));
    }

    #[test]
    fn labels_and_kernel_words_are_checked() {
        let mut bad = request(MediaFormat::Usb, &[KERNEL, INITRD, EFI_X86_64]);
        bad.kernel_words.push("ctpf.url=$(reboot)".into());
        assert!(matches!(validate(&bad), Err(PackageError::Invalid(_))));
        let mut bad = request(MediaFormat::Usb, &[KERNEL, INITRD, EFI_X86_64]);
        bad.label = "ctpf".into();
        assert!(validate(&bad).unwrap_err().to_string().contains("A-Z"));
    }

    #[test]
    fn the_key_covers_every_input_and_setting() {
        let base = request(MediaFormat::Iso, &[KERNEL, INITRD, EFI_X86_64]);
        let key = package_key(&base);
        assert_eq!(key, package_key(&base.clone()));
        let mut other = base.clone();
        other.kernel_words.push("ctpf.token=x".into());
        assert_ne!(key, package_key(&other));
        let mut other = base.clone();
        other.inputs.insert(KERNEL.into(), input(2));
        assert_ne!(key, package_key(&other));
        let mut other = base;
        other.source_date_epoch = 1;
        assert_ne!(key, package_key(&other));
    }

    #[test]
    fn bundle_files_map_to_boot_modes() {
        assert_eq!(pxe_boot_mode("undionly.kpxe"), Some(BootMode::PxeBios));
        assert_eq!(pxe_boot_mode("grub/core.0"), Some(BootMode::PxeBios));
        assert_eq!(pxe_boot_mode("ipxe-arm64.efi"), Some(BootMode::PxeUefiArm64));
        assert_eq!(pxe_boot_mode("discovery/x86_64/vmlinuz"), None);
    }
}
