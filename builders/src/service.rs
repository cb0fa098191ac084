//! The builder service: turns a [`BuildRequest`] into artifacts. Every build goes through the
//! same steps:
//!
//! 1. **plan**: validate the request and hash every input into a build key (recipe version,
//!    source digest, script/config, variables, tool versions). Nothing runs but `--version`
//!    probes, and those are remembered per tool file.
//! 2. **cache**: the ref `builds/<key>` in the artifact store points at the manifest of an
//!    earlier build with the same key; when it and its outputs are there, that manifest is
//!    the answer and no process starts.
//! 3. **build**: one build per key at a time ([`SingleFlight`]), in a fresh directory under
//!    the work dir, with log lines streamed to the caller.
//! 4. **store**: outputs and then the manifest go into the artifact store, and the ref last,
//!    so a ref never points at a manifest whose outputs are missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ctpf_common::{
    ArtifactKind, BuildLogLine, BuildManifest, BuildOutput, BuildRequest, LogStream,
    OffsetDateTime, Sha256Digest,
};
use ctpf_store::artifacts::{ArtifactError, ArtifactStore, read_json_ref};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::digest::{FieldHasher, file_sha256};
use crate::discovery::{DiscoveryError, DiscoveryPlan, DiscoverySources};
use crate::grub::{self, GrubError, GrubImageRequest, GrubTarget};
use crate::ipxe::{self, IpxeBuildRequest, IpxeError, IpxePlan, IpxeTarget};
use crate::process::{LogLine, Stream};
use crate::single_flight::SingleFlight;
use crate::source::{SourceError, SourceSpec, StagedSource};
use crate::syslinux::{self, SYSLINUX_FILES, SyslinuxError};
use crate::tools;

/// Refs of build manifests are `builds/<key hex>`.
pub const MANIFEST_REF_PREFIX: &str = "builds";
const GRUB_RECIPE_VERSION: &str = "ctpf-grub/1";
const SYSLINUX_RECIPE_VERSION: &str = "ctpf-syslinux/1";
const RASPI_FIRMWARE_RECIPE_VERSION: &str = "ctpf-raspi-firmware/1";
/// Largest manifest read back from the store (they are a few KiB).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Where and how builds run on this builder.
#[derive(Debug, Clone)]
pub struct BuilderConfig {
    /// Parent of the per-build working directories (each removed after its build).
    pub work_dir: PathBuf,
    /// Parents of GRUB's per-platform module directories (`x86_64-efi/`, `arm64-efi/`, ...),
    /// searched in order: the first holding a target's platform builds it. Default
    /// `/usr/lib/grub` alone; a Debian amd64 builder gets arm64-efi from an unpacked
    /// grub-efi-arm64-bin:arm64 put before it.
    pub grub_libs: Vec<PathBuf>,
    /// The root SYSLINUX files are collected from (`/`).
    pub syslinux_root: PathBuf,
    /// Exported to tools and used for file times: same inputs, same bytes.
    pub source_date_epoch: u64,
    /// make's `-j` for iPXE.
    pub jobs: u32,
    /// Longest a build may run before its process group is killed.
    pub timeout: Duration,
}

impl BuilderConfig {
    /// Debian's paths, one make job per CPU, epoch 0, 30 minutes.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            work_dir: work_dir.into(),
            grub_libs: vec![PathBuf::from(grub::DEBIAN_GRUB_LIB)],
            syslinux_root: PathBuf::from("/"),
            source_date_epoch: 0,
            jobs: u32::try_from(jobs).unwrap_or(1).min(ipxe::MAX_JOBS),
            timeout: ipxe::DEFAULT_TIMEOUT,
        }
    }
}

/// Why a build did not produce its artifacts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The request is wrong (unknown target, missing source, not an iPXE script, ...):
    /// refused before anything ran; retrying cannot help.
    #[error("{0}")]
    Invalid(String),
    /// The tool ran and failed; the message ends with the last lines of its log.
    #[error("{0}")]
    Failed(String),
    #[error("the build was cancelled")]
    Cancelled,
    /// Storage or file system trouble: another attempt may succeed.
    #[error("{0}")]
    Transient(String),
}

impl BuildError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, BuildError::Transient(_))
    }
}

impl From<ArtifactError> for BuildError {
    fn from(e: ArtifactError) -> Self {
        BuildError::Transient(format!("artifact store: {e}"))
    }
}

impl From<GrubError> for BuildError {
    fn from(e: GrubError) -> Self {
        match e {
            GrubError::UnknownTarget { .. }
            | GrubError::BadConfig(_)
            | GrubError::MissingModules { .. } => BuildError::Invalid(e.to_string()),
            GrubError::Io { .. } => BuildError::Transient(e.to_string()),
            _ => BuildError::Failed(e.to_string()),
        }
    }
}

impl From<IpxeError> for BuildError {
    fn from(e: IpxeError) -> Self {
        match e {
            IpxeError::Cancelled => BuildError::Cancelled,
            IpxeError::Make { .. } | IpxeError::Process(_) | IpxeError::Output(_) => {
                BuildError::Failed(e.to_string())
            }
            IpxeError::Io { .. } | IpxeError::BuildDirNotFresh { .. } => {
                BuildError::Transient(e.to_string())
            }
            _ => BuildError::Invalid(e.to_string()),
        }
    }
}

impl From<DiscoveryError> for BuildError {
    fn from(e: DiscoveryError) -> Self {
        BuildError::Invalid(format!("discovery image: {e}"))
    }
}

impl From<SourceError> for BuildError {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Unrecognised(_)
            | SourceError::BadRevision(_)
            | SourceError::BadTarball { .. }
            | SourceError::MissingTarball(_) => BuildError::Invalid(e.to_string()),
            SourceError::Git { .. } | SourceError::Process(_) => BuildError::Failed(e.to_string()),
            SourceError::Store(_) | SourceError::Io { .. } => BuildError::Transient(e.to_string()),
        }
    }
}

impl From<SyslinuxError> for BuildError {
    fn from(e: SyslinuxError) -> Self {
        match e {
            SyslinuxError::Missing { .. } => BuildError::Invalid(e.to_string()),
            SyslinuxError::Io { .. } => BuildError::Transient(e.to_string()),
        }
    }
}

fn io_error(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = format!("{what} {}", path.display());
    move |e| BuildError::Transient(format!("{what}: {e}"))
}

/// Where a build's log lines go, numbered from 1 across the builder's own lines and the
/// tools' output. Cloning shares the numbering.
#[derive(Debug, Clone)]
pub struct BuildLog {
    tx: Option<mpsc::UnboundedSender<BuildLogLine>>,
    next: Arc<AtomicU64>,
}

impl BuildLog {
    pub fn new(tx: mpsc::UnboundedSender<BuildLogLine>) -> Self {
        Self { tx: Some(tx), next: Arc::new(AtomicU64::new(1)) }
    }

    /// A log nobody reads (the lines are still counted).
    pub fn discard() -> Self {
        Self { tx: None, next: Arc::new(AtomicU64::new(1)) }
    }

    /// Lines written so far.
    pub fn lines(&self) -> u64 {
        self.next.load(Ordering::SeqCst) - 1
    }

    fn push(&self, stream: LogStream, text: String) {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        if let Some(tx) = &self.tx {
            // The reader went away (the job was abandoned): the build still finishes.
            let _ = tx.send(BuildLogLine { seq, stream, text });
        }
    }

    /// A line from the builder itself.
    pub fn say(&self, text: impl Into<String>) {
        self.push(LogStream::Builder, text.into());
    }

    fn tool_line(&self, line: LogLine) {
        let stream = match line.stream {
            Stream::Stdout => LogStream::Stdout,
            Stream::Stderr => LogStream::Stderr,
        };
        let text = if line.truncated { format!("{} [...]", line.text) } else { line.text };
        self.push(stream, text);
    }
}

/// Checks what can be checked anywhere (no files, no tools): the manager runs this before
/// accepting a build, so a bad target or script is a 400, not a failed job.
pub fn validate(request: &BuildRequest) -> Result<(), BuildError> {
    match request {
        BuildRequest::Grub { target, config, chain_ipxe } => {
            GrubTarget::parse(target)?;
            if config.is_some() && *chain_ipxe {
                return Err(BuildError::Invalid(
                    "give either a GRUB config or chain_ipxe, not both".into(),
                ));
            }
            if let Some(config) = config {
                grub::check_config(config)?;
            }
        }
        BuildRequest::Ipxe { source, targets, embed, options, .. } => {
            SourceSpec::parse(source)?;
            if targets.is_empty() {
                return Err(IpxeError::NoTargets.into());
            }
            for target in targets {
                target.parse::<IpxeTarget>().map_err(IpxeError::from)?;
            }
            // The source path and certificate files are checked by the builder that has them.
            if let Some(script) = embed {
                ipxe::validate_script(script)?;
            }
            for name in options.keys() {
                ipxe::validate_option_name(name)?;
            }
        }
        BuildRequest::Syslinux {} => {}
        BuildRequest::RaspiFirmware { firmware, linux } => {
            for (what, path) in [("firmware", firmware), ("linux", linux)] {
                if !path.starts_with('/') {
                    return Err(BuildError::Invalid(format!(
                        "raspi_firmware {what} must be an absolute path on the builder, not {path:?}"
                    )));
                }
            }
        }
        BuildRequest::Discovery { linux, busybox, agent, arch: _ } => {
            for (what, path) in [("linux", linux), ("busybox", busybox), ("agent", agent)] {
                if !path.starts_with('/') {
                    return Err(BuildError::Invalid(format!(
                        "discovery {what} must be an absolute path on the builder, not {path:?}"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// A validated request with its key: everything needed to build or to find the cached build.
#[derive(Debug)]
struct Plan {
    recipe: &'static str,
    recipe_version: String,
    key: Sha256Digest,
    inputs: BTreeMap<String, String>,
    tools: BTreeMap<String, String>,
    work: Work,
}

#[derive(Debug)]
enum Work {
    Grub(GrubImageRequest),
    /// The plan, and the staged source it copies from (kept until the build is done).
    Ipxe(Box<IpxePlan>, StagedSource),
    Syslinux,
    /// Each file by its path on the boot partition.
    RaspiFirmware(BTreeMap<String, PathBuf>),
    Discovery(DiscoverySources, Box<DiscoveryPlan>),
}

/// Builds, caches and stores. Cheap to clone; clones share the in-flight builds.
#[derive(Debug, Clone)]
pub struct Builder {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: BuilderConfig,
    artifacts: Arc<dyn ArtifactStore>,
    flights: SingleFlight<BuildManifest, BuildError>,
}

impl Builder {
    /// Creates the work directory if needed.
    pub fn new(
        config: BuilderConfig,
        artifacts: Arc<dyn ArtifactStore>,
    ) -> Result<Self, BuildError> {
        std::fs::create_dir_all(&config.work_dir)
            .map_err(io_error("creating the work directory", &config.work_dir))?;
        let inner = Inner { config, artifacts, flights: SingleFlight::default() };
        Ok(Self { inner: Arc::new(inner) })
    }

    pub fn config(&self) -> &BuilderConfig {
        &self.inner.config
    }

    /// Builds `request`, or answers from the cache when its key was built before (the
    /// manifest then has `cached: true`). `cancel` stops a running build (its process group
    /// is killed); a build that other identical requests wait for finishes regardless.
    pub async fn build(
        &self,
        request: &BuildRequest,
        cancel: CancellationToken,
        log: BuildLog,
    ) -> Result<BuildManifest, BuildError> {
        validate(request)?;
        let plan = self.inner.plan(request, cancel.clone(), &log).await?;
        log.say(format!("{} build, key {}", plan.recipe, plan.key));
        if let Some(manifest) = self.inner.cached(&plan.key).await? {
            log.say(format!(
                "cache hit: built {} in {} ms; nothing to run",
                manifest.built_at, manifest.duration_ms
            ));
            return Ok(manifest);
        }
        let key = plan.key;
        let inner = self.inner.clone();
        let leader_log = log.clone();
        let (result, leader) = self
            .inner
            .flights
            .run(key, move || async move { inner.build_and_store(plan, cancel, leader_log).await })
            .await;
        if !leader {
            log.say("an identical build was already running; its result is this build's");
        }
        result.map_err(|e| (*e).clone())
    }

    /// The stored manifest of `key`, when it and all its outputs are in the store.
    pub async fn cached_manifest(
        &self,
        key: &Sha256Digest,
    ) -> Result<Option<BuildManifest>, BuildError> {
        self.inner.cached(key).await
    }
}

impl Inner {
    async fn plan(
        &self,
        request: &BuildRequest,
        cancel: CancellationToken,
        log: &BuildLog,
    ) -> Result<Plan, BuildError> {
        match request {
            BuildRequest::Grub { target, config, .. } => {
                self.plan_grub(target, config.as_deref()).await
            }
            BuildRequest::Ipxe { source, targets, embed, trust, certs, options, no_werror } => {
                let spec = SourceSpec::parse(source)?;
                if !matches!(spec, SourceSpec::Path(_)) {
                    log.say(format!("staging the source {source}"));
                }
                let tool_log = |line: LogLine| log.tool_line(line);
                let staged = crate::source::stage(
                    &spec,
                    self.artifacts.as_ref(),
                    &self.config.work_dir,
                    cancel,
                    tool_log,
                )
                .await?;
                let mut ipxe = IpxeBuildRequest::new(&staged.dir, Vec::new());
                ipxe.targets = targets
                    .iter()
                    .map(|t| t.parse().map_err(IpxeError::from))
                    .collect::<Result<_, _>>()?;
                ipxe.embed_script = embed.clone();
                let paths = |list: &Vec<String>| {
                    (!list.is_empty()).then(|| list.iter().map(PathBuf::from).collect())
                };
                ipxe.trust_certs = paths(trust);
                ipxe.certs = paths(certs);
                ipxe.options = options.clone();
                ipxe.no_werror = *no_werror;
                ipxe.jobs = self.config.jobs;
                ipxe.source_date_epoch = self.config.source_date_epoch;
                ipxe.timeout = self.config.timeout;
                let plan = IpxePlan::new(ipxe).await?;
                let mut inputs = BTreeMap::new();
                inputs.insert("source".into(), plan.source_digest.to_string());
                inputs.insert("source_location".into(), source.clone());
                let targets: Vec<&str> =
                    plan.request.targets.iter().map(|t| t.make_target()).collect();
                inputs.insert("targets".into(), targets.join(","));
                if let Some(script) = &plan.request.embed_script {
                    inputs.insert("embed".into(), Sha256Digest::of(script.as_bytes()).to_string());
                }
                for (i, digest) in plan.trust_digests.iter().enumerate() {
                    inputs.insert(format!("trust.{i}"), digest.to_string());
                }
                for (i, digest) in plan.cert_digests.iter().enumerate() {
                    inputs.insert(format!("cert.{i}"), digest.to_string());
                }
                for (name, on) in &plan.request.options {
                    inputs.insert(format!("option.{name}"), on.to_string());
                }
                inputs.insert("no_werror".into(), plan.request.no_werror.to_string());
                Ok(Plan {
                    recipe: "ipxe",
                    recipe_version: ipxe::RECIPE_VERSION.into(),
                    key: plan.key,
                    inputs,
                    tools: plan.tools.0.clone(),
                    work: Work::Ipxe(Box::new(plan), staged),
                })
            }
            BuildRequest::Syslinux {} => self.plan_syslinux().await,
            BuildRequest::RaspiFirmware { firmware, linux } => {
                plan_raspi_firmware(firmware.into(), linux.into()).await
            }
            BuildRequest::Discovery { linux, busybox, agent, arch } => {
                let sources = DiscoverySources {
                    linux_root: linux.into(),
                    busybox: busybox.into(),
                    agent: agent.into(),
                    arch: *arch,
                };
                let resolve = sources.clone();
                let plan = tokio::task::spawn_blocking(move || DiscoveryPlan::resolve(&resolve))
                    .await
                    .map_err(|e| BuildError::Transient(format!("planning: {e}")))??;
                let mut key = FieldHasher::default();
                key.field("discovery", plan.key.as_bytes());
                key.field("epoch", &self.config.source_date_epoch.to_le_bytes());
                let mut inputs = BTreeMap::new();
                inputs.insert("arch".into(), plan.arch.to_string());
                inputs.insert("discovery_inputs".into(), plan.key.to_string());
                inputs.insert("kernel_version".into(), plan.kernel_version.clone());
                inputs.insert("linux".into(), linux.clone());
                inputs.insert("modules".into(), plan.modules.len().to_string());
                if !plan.missing_modules.is_empty() {
                    inputs.insert("modules_missing".into(), plan.missing_modules.join(","));
                }
                let tools = BTreeMap::from([(
                    "ctpf-initramfs".to_owned(),
                    env!("CARGO_PKG_VERSION").to_owned(),
                )]);
                Ok(Plan {
                    recipe: "discovery",
                    recipe_version: crate::discovery::RECIPE_VERSION.into(),
                    key: key.finish(),
                    inputs,
                    tools,
                    work: Work::Discovery(sources, Box::new(plan)),
                })
            }
        }
    }

    async fn plan_grub(&self, target: &str, config: Option<&str>) -> Result<Plan, BuildError> {
        let target = GrubTarget::parse(target)?;
        let config = config.ok_or_else(|| {
            BuildError::Invalid("no GRUB config given (the manager fills in its own)".into())
        })?;
        let mut request = GrubImageRequest::new(target, config);
        // The first directory with the target's platform; else the last (the default), which
        // names what is missing.
        for lib in &self.config.grub_libs {
            request.grub_lib = lib.clone();
            if request.moddep().is_file() {
                break;
            }
        }
        request.validate()?;
        let moddep = request.moddep();
        let (moddep_digest, _) = file_sha256(&moddep).map_err(io_error("reading", &moddep))?;
        let mkimage = tools::version_line("grub-mkimage").await;
        let mut key = FieldHasher::default();
        key.field("recipe", GRUB_RECIPE_VERSION.as_bytes());
        key.field("target", target.format().as_bytes());
        key.field("config", config.as_bytes());
        key.field("moddep", moddep_digest.as_bytes());
        key.field("grub-mkimage", mkimage.as_bytes());
        key.field("modules", target.modules().join(" ").as_bytes());
        let inputs = BTreeMap::from([
            ("target".to_owned(), target.format().to_owned()),
            ("config".to_owned(), Sha256Digest::of(config.as_bytes()).to_string()),
            ("modules".to_owned(), moddep_digest.to_string()),
        ]);
        Ok(Plan {
            recipe: "grub",
            recipe_version: GRUB_RECIPE_VERSION.into(),
            key: key.finish(),
            inputs,
            tools: BTreeMap::from([("grub-mkimage".to_owned(), mkimage)]),
            work: Work::Grub(request),
        })
    }

    async fn plan_syslinux(&self) -> Result<Plan, BuildError> {
        let root = self.config.syslinux_root.clone();
        let digests = tokio::task::spawn_blocking(move || {
            SYSLINUX_FILES
                .iter()
                .map(|file| {
                    let path = root.join(file.installed_at);
                    if !path.is_file() {
                        return Err(SyslinuxError::Missing {
                            name: file.name,
                            path,
                            package: file.package,
                        }
                        .into());
                    }
                    let (digest, _) = file_sha256(&path).map_err(io_error("reading", &path))?;
                    Ok((file.name.to_owned(), digest))
                })
                .collect::<Result<Vec<_>, BuildError>>()
        })
        .await
        .map_err(|e| BuildError::Transient(format!("hashing SYSLINUX files: {e}")))??;
        let mut key = FieldHasher::default();
        key.field("recipe", SYSLINUX_RECIPE_VERSION.as_bytes());
        for (name, digest) in &digests {
            key.field(name, digest.as_bytes());
        }
        let inputs = digests.into_iter().map(|(name, digest)| (name, digest.to_string())).collect();
        Ok(Plan {
            recipe: "syslinux",
            recipe_version: SYSLINUX_RECIPE_VERSION.into(),
            key: key.finish(),
            inputs,
            tools: BTreeMap::new(),
            work: Work::Syslinux,
        })
    }

    async fn cached(&self, key: &Sha256Digest) -> Result<Option<BuildManifest>, BuildError> {
        let reference = manifest_ref(key);
        let found = read_json_ref(self.artifacts.as_ref(), &reference, MAX_MANIFEST_BYTES).await?;
        let Some(mut manifest): Option<BuildManifest> = found else { return Ok(None) };
        for output in &manifest.outputs {
            if self.artifacts.stat(&output.digest).await? != Some(output.size) {
                tracing::info!(file = output.file, "a cached output is gone; building again");
                return Ok(None);
            }
        }
        manifest.cached = true;
        Ok(Some(manifest))
    }

    async fn build_and_store(
        self: Arc<Self>,
        plan: Plan,
        cancel: CancellationToken,
        log: BuildLog,
    ) -> Result<BuildManifest, BuildError> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", plan.recipe))
            .tempdir_in(&self.config.work_dir)
            .map_err(io_error("creating a build directory in", &self.config.work_dir))?;
        let mut tools = plan.tools.clone();
        let files = self.run_work(&plan, dir.path(), cancel, &log, &mut tools).await?;
        let duration = started.elapsed();
        let mut outputs = Vec::with_capacity(files.len());
        for (file, kind, path) in files {
            let body = tokio::fs::File::open(&path).await.map_err(io_error("opening", &path))?;
            let info = self.artifacts.put(Box::pin(body), None).await?;
            log.say(format!("stored {file}: {} bytes, {}", info.size, info.digest));
            outputs.push(BuildOutput { file, kind, digest: info.digest, size: info.size });
        }
        let manifest = BuildManifest {
            recipe: plan.recipe.to_owned(),
            recipe_version: plan.recipe_version,
            key: plan.key,
            inputs: plan.inputs,
            tools,
            outputs,
            source_date_epoch: self.config.source_date_epoch,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            // And the one summary line said below, once the manifest's digest is known.
            log_lines: log.lines() + 1,
            built_at: OffsetDateTime::now_utc(),
            cached: false,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| BuildError::Transient(format!("encoding the manifest: {e}")))?;
        let stored = self.artifacts.put(Box::pin(std::io::Cursor::new(json)), None).await?;
        self.artifacts.set_ref(&manifest_ref(&manifest.key), &stored.digest).await?;
        log.say(format!("built in {} ms; manifest {}", manifest.duration_ms, stored.digest));
        Ok(manifest)
    }

    /// Runs the recipe in `dir`; returns (file name, kind, path) of each output.
    async fn run_work(
        &self,
        plan: &Plan,
        dir: &Path,
        cancel: CancellationToken,
        log: &BuildLog,
        tools: &mut BTreeMap<String, String>,
    ) -> Result<Vec<(String, ArtifactKind, PathBuf)>, BuildError> {
        let tool_log = |line: LogLine| log.tool_line(line);
        match &plan.work {
            Work::Grub(request) => {
                log.say(format!("grub-mkimage -O {}", request.target.format()));
                let image = match grub::build_image(request, dir, cancel, tool_log).await {
                    Err(GrubError::Process(e)) => return Err(BuildError::Failed(e.to_string())),
                    other => other?,
                };
                if image.outcome.end == crate::process::BuildEnd::Cancelled {
                    return Err(BuildError::Cancelled);
                }
                let file = request.target.file_name().to_owned();
                Ok(vec![(file, ArtifactKind::Bootloader, image.path)])
            }
            Work::Ipxe(ipxe_plan, _source) => {
                log.say(format!("make {}", targets_text(&ipxe_plan.request.targets)));
                let built = ipxe_plan.build(dir, cancel, tool_log).await?;
                Ok(built
                    .files
                    .into_iter()
                    .map(|f| {
                        (ipxe_file_name(f.target).to_owned(), ArtifactKind::Bootloader, f.path)
                    })
                    .collect())
            }
            Work::Syslinux => {
                let (root, out) = (self.config.syslinux_root.clone(), dir.to_owned());
                let collected = tokio::task::spawn_blocking(move || syslinux::collect(&root, &out))
                    .await
                    .map_err(|e| BuildError::Transient(format!("collecting: {e}")))??;
                let mut files = Vec::new();
                for file in collected {
                    let version = file.package_version.as_deref().unwrap_or("(unpacked tree)");
                    tools.insert(file.package.to_owned(), version.to_owned());
                    log.say(format!("{} from {} {version}", file.name, file.package));
                    files.push((file.name.to_owned(), ArtifactKind::Bootloader, file.path));
                }
                Ok(files)
            }
            Work::RaspiFirmware(files) => {
                log.say(format!("{} Raspberry Pi boot files", files.len()));
                Ok(files
                    .iter()
                    .map(|(name, path)| (name.clone(), ArtifactKind::Bootloader, path.clone()))
                    .collect())
            }
            Work::Discovery(sources, discovery) => {
                log.say(format!(
                    "initramfs: {} kernel {}, {} modules, busybox, agent",
                    discovery.arch,
                    discovery.kernel_version,
                    discovery.modules.len()
                ));
                let initrd = dir.join("initrd");
                let out = std::fs::File::create(&initrd).map_err(io_error("creating", &initrd))?;
                let (plan, sources, epoch) =
                    ((**discovery).clone(), sources.clone(), self.config.source_date_epoch);
                let built = tokio::task::spawn_blocking(move || {
                    plan.build_initrd(&sources, epoch, std::io::BufWriter::new(out))
                })
                .await
                .map_err(|e| BuildError::Transient(format!("writing the initramfs: {e}")))?
                .map_err(|e| BuildError::Failed(format!("writing the initramfs: {e}")))?;
                log.say(format!("initrd: {} bytes compressed", built.compressed_size));
                Ok(vec![
                    ("vmlinuz".to_owned(), ArtifactKind::Kernel, discovery.kernel.clone()),
                    ("initrd".to_owned(), ArtifactKind::Initrd, initrd),
                ])
            }
        }
    }
}

/// Picks the firmware and device trees (`packagers::media::RaspiFiles::from_debian`'s rules)
/// and keys them by digest.
async fn plan_raspi_firmware(firmware: PathBuf, linux: PathBuf) -> Result<Plan, BuildError> {
    let (files, digests) = tokio::task::spawn_blocking(move || {
        let stand_in = ctpf_packagers::iso9660::Source::Bytes(Vec::new());
        let picked = ctpf_packagers::media::RaspiFiles::from_debian(&firmware, &linux, stand_in)
            .map_err(|e| BuildError::Invalid(format!("raspi_firmware: {e}")))?;
        let mut files = BTreeMap::new();
        let mut digests = BTreeMap::new();
        for (name, source) in picked.firmware {
            let ctpf_packagers::iso9660::Source::File { path, .. } = source else { continue };
            let (digest, _) = file_sha256(&path).map_err(io_error("reading", &path))?;
            digests.insert(name.clone(), digest);
            files.insert(name, path);
        }
        Ok::<_, BuildError>((files, digests))
    })
    .await
    .map_err(|e| BuildError::Transient(format!("collecting Raspberry Pi files: {e}")))??;
    let mut key = FieldHasher::default();
    key.field("recipe", RASPI_FIRMWARE_RECIPE_VERSION.as_bytes());
    for (name, digest) in &digests {
        key.field(name, digest.as_bytes());
    }
    let inputs = digests.into_iter().map(|(name, digest)| (name, digest.to_string())).collect();
    Ok(Plan {
        recipe: "raspi_firmware",
        recipe_version: RASPI_FIRMWARE_RECIPE_VERSION.into(),
        key: key.finish(),
        inputs,
        tools: BTreeMap::new(),
        work: Work::RaspiFirmware(files),
    })
}

fn manifest_ref(key: &Sha256Digest) -> String {
    format!("{MANIFEST_REF_PREFIX}/{}", key.hex())
}

fn targets_text(targets: &[IpxeTarget]) -> String {
    targets.iter().map(|t| t.make_target()).collect::<Vec<_>>().join(" ")
}

/// The file name an iPXE target is served under (the names DHCP hands out).
pub fn ipxe_file_name(target: IpxeTarget) -> &'static str {
    match target {
        IpxeTarget::UndionlyKpxe => "undionly.kpxe",
        IpxeTarget::IpxeLkrn => "ipxe.lkrn",
        IpxeTarget::X86_64Efi => "ipxe.efi",
        IpxeTarget::Arm64Efi => "ipxe-arm64.efi",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_are_refused_with_what_is_valid() {
        let grub = |target: &str, config: Option<&str>| BuildRequest::Grub {
            target: target.into(),
            config: config.map(str::to_owned),
            chain_ipxe: false,
        };
        let err = validate(&grub("mips-arc", None)).unwrap_err().to_string();
        assert!(err.contains("x86_64-efi") && err.contains("i386-pc-pxe"), "{err}");
        let err = validate(&grub("x86_64-efi", Some("#!ipxe\nchain x"))).unwrap_err();
        assert!(err.to_string().contains("iPXE script"), "{err}");
        validate(&grub("x86_64-efi", Some("echo hi\n"))).unwrap();

        let ipxe = |targets: &[&str], embed: Option<&str>| BuildRequest::Ipxe {
            source: "/src/ipxe".into(),
            targets: targets.iter().map(|t| (*t).to_owned()).collect(),
            embed: embed.map(str::to_owned),
            trust: Vec::new(),
            certs: Vec::new(),
            options: BTreeMap::new(),
            no_werror: false,
        };
        let err = validate(&ipxe(&["bin/ipxe.usb"], None)).unwrap_err().to_string();
        assert!(err.contains("bin/undionly.kpxe") && err.contains("bin-arm64-efi/ipxe.efi"));
        let err = validate(&ipxe(&["bin/undionly.kpxe"], Some("menu\n"))).unwrap_err();
        assert!(err.to_string().contains("#!ipxe"), "{err}");
        assert!(validate(&ipxe(&[], None)).is_err());
        validate(&ipxe(&["bin/undionly.kpxe"], Some("#!ipxe\nshell\n"))).unwrap();

        let relative = BuildRequest::Discovery {
            linux: "linux".into(),
            busybox: "/bin/busybox".into(),
            agent: "/a".into(),
            arch: None,
        };
        assert!(validate(&relative).unwrap_err().to_string().contains("absolute"));
        assert!(!BuildError::Invalid("x".into()).is_retryable());
        assert!(BuildError::Transient("x".into()).is_retryable());
    }

    #[test]
    fn log_lines_are_numbered_across_sources() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let log = BuildLog::new(tx);
        log.say("starting");
        log.clone().tool_line(LogLine {
            seq: 0,
            stream: Stream::Stderr,
            text: "warning".into(),
            truncated: true,
        });
        let first = rx.try_recv().unwrap();
        let second = rx.try_recv().unwrap();
        assert_eq!((first.seq, first.stream), (1, LogStream::Builder));
        assert_eq!(
            (second.seq, second.stream, second.text.as_str()),
            (2, LogStream::Stderr, "warning [...]")
        );
        assert_eq!(log.lines(), 2);
    }
}
