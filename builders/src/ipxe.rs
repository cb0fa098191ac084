//! The iPXE recipe: a frontend to iPXE's own `make` that embeds a chain script, optional
//! HTTPS trust anchors and client certificates, and build options, into boot loaders.
//!
//! The user's source tree is never built in place: its `src` directory is copied into the
//! build directory (without the `bin*` output dirs), the generated `config/local/*.h` and the
//! script are written next to it, and make runs there under [`process::run_build`]. Copying
//! only `src` also keeps `git describe` of a checkout out of the binaries, so the same
//! inputs give the same bytes.
//!
//! Flow for a caller: [`IpxePlan::new`] validates the request and computes its build key
//! (cheap compared with a build, so a cache can be consulted first), then [`IpxePlan::build`].

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::digest::FieldHasher;
use ctpf_common::Sha256Digest;
use tokio_util::sync::CancellationToken;

use crate::process::{self, BuildCommand, BuildEnd, LogLine, OutputError, ProcessError};

/// Bump when the way a request becomes make's inputs changes in a way the key would miss.
pub const RECIPE_VERSION: &str = "ctpf-ipxe/1";
/// iPXE scripts are a few lines; anything this big is a mistake.
pub const MAX_SCRIPT_BYTES: usize = 64 * 1024;
/// More parallel jobs than this is a typo, not a machine.
pub const MAX_JOBS: u32 = 256;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// What the script is saved as in the build directory (iPXE names the embedded image after it).
pub const EMBED_FILE: &str = "embed.ipxe";
/// The copy of the source tree's `src` directory inside the build directory.
pub const SRC_SUBDIR: &str = "src";
const CERTS_SUBDIR: &str = "certs";

/// The boot loaders this frontend builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpxeTarget {
    /// BIOS PXE chainloader that uses the NIC ROM's UNDI driver.
    UndionlyKpxe,
    /// Linux-kernel-format image (for GRUB/SYSLINUX to load, or an ISO).
    IpxeLkrn,
    X86_64Efi,
    /// Cross-compiled on x86_64 hosts (Debian's gcc-aarch64-linux-gnu).
    Arm64Efi,
}

impl IpxeTarget {
    pub const ALL: [IpxeTarget; 4] = [
        IpxeTarget::UndionlyKpxe,
        IpxeTarget::IpxeLkrn,
        IpxeTarget::X86_64Efi,
        IpxeTarget::Arm64Efi,
    ];

    /// The make target, which is also the output path under `src/`.
    pub fn make_target(self) -> &'static str {
        match self {
            IpxeTarget::UndionlyKpxe => "bin/undionly.kpxe",
            IpxeTarget::IpxeLkrn => "bin/ipxe.lkrn",
            IpxeTarget::X86_64Efi => "bin-x86_64-efi/ipxe.efi",
            IpxeTarget::Arm64Efi => "bin-arm64-efi/ipxe.efi",
        }
    }

    /// The machine the code runs on, as Rust names it (`std::env::consts::ARCH`).
    pub fn machine(self) -> &'static str {
        match self {
            IpxeTarget::UndionlyKpxe | IpxeTarget::IpxeLkrn | IpxeTarget::X86_64Efi => "x86_64",
            IpxeTarget::Arm64Efi => "aarch64",
        }
    }

    /// make's `CROSS=` for this target on a `host_arch` machine; `None` when native.
    pub fn cross_prefix(self, host_arch: &str) -> Option<&'static str> {
        match (self.machine(), host_arch) {
            (target, host) if target == host => None,
            ("aarch64", _) => Some("aarch64-linux-gnu-"),
            _ => Some("x86_64-linux-gnu-"),
        }
    }

    fn valid_list() -> String {
        IpxeTarget::ALL.map(IpxeTarget::make_target).join(", ")
    }
}

impl fmt::Display for IpxeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.make_target())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown iPXE target {name:?}; valid targets: {}", IpxeTarget::valid_list())]
pub struct UnknownTarget {
    pub name: String,
}

impl FromStr for IpxeTarget {
    type Err = UnknownTarget;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        IpxeTarget::ALL
            .into_iter()
            .find(|target| target.make_target() == s)
            .ok_or_else(|| UnknownTarget { name: s.to_owned() })
    }
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpxeBuildRequest {
    /// An iPXE tree's `src` directory (with the `Makefile`), or the tree's top directory.
    pub source: PathBuf,
    pub targets: Vec<IpxeTarget>,
    /// Embedded with `EMBED=`; must start with `#!ipxe`.
    pub embed_script: Option<String>,
    /// CA certificates for HTTPS (`TRUST=`), replacing iPXE's default trust root.
    pub trust_certs: Option<Vec<PathBuf>>,
    /// Client certificates (`CERT=`).
    pub certs: Option<Vec<PathBuf>>,
    /// Build options (`DOWNLOAD_PROTO_HTTPS`, ...): `true` is `#define`, `false` `#undef`, in
    /// the generated `config/local/general.h` (`CRYPTO_*` in `config/local/crypto.h`).
    pub options: BTreeMap<String, bool>,
    /// `NO_WERROR=1`: newer compilers warn about older iPXE trees.
    pub no_werror: bool,
    /// make's `-j`.
    pub jobs: u32,
    /// Exported as `SOURCE_DATE_EPOCH`; part of the key, since tools may stamp it in.
    pub source_date_epoch: u64,
    pub timeout: Duration,
}

impl IpxeBuildRequest {
    /// A request with no script, certificates or options, one job per CPU, epoch 0.
    pub fn new(source: impl Into<PathBuf>, targets: Vec<IpxeTarget>) -> Self {
        let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            source: source.into(),
            targets,
            embed_script: None,
            trust_certs: None,
            certs: None,
            options: BTreeMap::new(),
            no_werror: false,
            jobs: u32::try_from(jobs).unwrap_or(1).min(MAX_JOBS),
            source_date_epoch: 0,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpxeError {
    #[error(transparent)]
    UnknownTarget(#[from] UnknownTarget),
    #[error("no targets given; valid targets: {}", IpxeTarget::valid_list())]
    NoTargets,
    #[error("the embedded script must start with #!ipxe (its first line is {first_line:?})")]
    NotAnIpxeScript { first_line: String },
    #[error("the embedded script is {size} bytes; at most {MAX_SCRIPT_BYTES} are allowed")]
    ScriptTooLarge { size: usize },
    #[error("the embedded script contains a NUL byte")]
    ScriptHasNul,
    #[error("no iPXE source tree at {path}: expected a Makefile in {path} or in {path}/src")]
    NoSource { path: PathBuf },
    #[error(
        "build option {name:?} is not valid: names are capital letters, digits and _ and do not start with a digit, like DOWNLOAD_PROTO_HTTPS"
    )]
    OptionName { name: String },
    #[error("{what} {path} does not exist or is not a file")]
    CertMissing { what: &'static str, path: PathBuf },
    #[error("{what} is an empty list: give at least one file, or leave it unset")]
    EmptyCertList { what: &'static str },
    #[error("jobs must be between 1 and {MAX_JOBS}, not {jobs}")]
    Jobs { jobs: u32 },
    #[error("{tool} is not on PATH; {hint}")]
    ToolMissing { tool: String, hint: &'static str },
    #[error("build directory {dir} is not fresh: {SRC_SUBDIR}/ already exists there")]
    BuildDirNotFresh { dir: PathBuf },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("make {end}; last lines of its log:\n{tail}")]
    Make { end: BuildEnd, tail: String },
    #[error("the build was cancelled")]
    Cancelled,
}

impl IpxeError {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_owned();
        move |source| IpxeError::Io { what, path, source }
    }
}

/// Checks everything that can be checked without running anything. Returns the `src`
/// directory to build.
pub fn validate(request: &IpxeBuildRequest) -> Result<PathBuf, IpxeError> {
    if request.targets.is_empty() {
        return Err(IpxeError::NoTargets);
    }
    if let Some(script) = &request.embed_script {
        validate_script(script)?;
    }
    for name in request.options.keys() {
        validate_option_name(name)?;
    }
    if request.jobs == 0 || request.jobs > MAX_JOBS {
        return Err(IpxeError::Jobs { jobs: request.jobs });
    }
    check_cert_files("trusted certificate", request.trust_certs.as_deref())?;
    check_cert_files("client certificate", request.certs.as_deref())?;
    resolve_src_dir(&request.source)
}

/// An embedded script: at most [`MAX_SCRIPT_BYTES`], no NUL, starting with `#!ipxe`.
pub fn validate_script(script: &str) -> Result<(), IpxeError> {
    if script.len() > MAX_SCRIPT_BYTES {
        return Err(IpxeError::ScriptTooLarge { size: script.len() });
    }
    if script.contains('\0') {
        return Err(IpxeError::ScriptHasNul);
    }
    let first_line = script.lines().next().unwrap_or("");
    let is_ipxe = first_line
        .strip_prefix("#!ipxe")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace));
    if !is_ipxe {
        return Err(IpxeError::NotAnIpxeScript {
            first_line: first_line.chars().take(60).collect(),
        });
    }
    Ok(())
}

/// A build option name: like `DOWNLOAD_PROTO_HTTPS`.
pub fn validate_option_name(name: &str) -> Result<(), IpxeError> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_uppercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if valid { Ok(()) } else { Err(IpxeError::OptionName { name: name.to_owned() }) }
}

fn check_cert_files(what: &'static str, paths: Option<&[PathBuf]>) -> Result<(), IpxeError> {
    match paths {
        None => Ok(()),
        Some([]) => Err(IpxeError::EmptyCertList { what }),
        Some(paths) => match paths.iter().find(|path| !path.is_file()) {
            Some(path) => Err(IpxeError::CertMissing { what, path: path.clone() }),
            None => Ok(()),
        },
    }
}

/// `source` itself if it holds the Makefile, else its `src` (an iPXE checkout's layout).
fn resolve_src_dir(source: &Path) -> Result<PathBuf, IpxeError> {
    [source.to_owned(), source.join("src")]
        .into_iter()
        .find(|dir| dir.join("Makefile").is_file())
        .ok_or_else(|| IpxeError::NoSource { path: source.to_owned() })
}

/// First lines of `--version` of each tool, by tool name; part of the build key, since a
/// different compiler gives different bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolVersions(pub BTreeMap<String, String>);

pub use crate::tools::TOOL_NOT_FOUND;

/// The versions of make, the compiler and linker, and the cross tools `targets` need.
pub async fn tool_versions(targets: &[IpxeTarget]) -> ToolVersions {
    let mut versions = BTreeMap::new();
    for tool in tools_for(targets) {
        let version = crate::tools::version_line(&tool).await;
        versions.insert(tool, version);
    }
    ToolVersions(versions)
}

fn tools_for(targets: &[IpxeTarget]) -> Vec<String> {
    let mut tools = vec!["make".to_owned()];
    for prefix in cross_groups(targets).into_keys() {
        let prefix = prefix.unwrap_or("");
        tools.push(format!("{prefix}gcc"));
        tools.push(format!("{prefix}ld"));
    }
    tools
}

/// Targets grouped by the `CROSS=` they need; one make run per group.
fn cross_groups(targets: &[IpxeTarget]) -> BTreeMap<Option<&'static str>, Vec<IpxeTarget>> {
    let mut groups: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for &target in targets {
        groups.entry(target.cross_prefix(std::env::consts::ARCH)).or_default().push(target);
    }
    groups
}

/// Everything a build key is made of.
#[derive(Debug, Clone, Copy)]
pub struct KeyInputs<'a> {
    pub source_digest: &'a Sha256Digest,
    pub script: Option<&'a str>,
    pub targets: &'a [IpxeTarget],
    pub options: &'a BTreeMap<String, bool>,
    pub no_werror: bool,
    pub source_date_epoch: u64,
    pub trust_digests: &'a [Sha256Digest],
    pub cert_digests: &'a [Sha256Digest],
    pub tools: &'a ToolVersions,
}

/// sha256 over every input that can change the outputs (not `jobs` or the timeout). Targets
/// count as a set: their order does not change what is built.
pub fn build_key(inputs: &KeyInputs<'_>) -> Sha256Digest {
    let mut key = FieldHasher::default();
    key.field("recipe", RECIPE_VERSION.as_bytes());
    key.field("source", inputs.source_digest.as_bytes());
    key.field("script", inputs.script.unwrap_or("").as_bytes());
    key.field("has script", &[u8::from(inputs.script.is_some())]);
    let mut targets = inputs.targets.to_vec();
    targets.sort();
    targets.dedup();
    for target in targets {
        key.field("target", target.make_target().as_bytes());
    }
    for (name, enabled) in inputs.options {
        key.field(if *enabled { "define" } else { "undef" }, name.as_bytes());
    }
    key.field("no_werror", &[u8::from(inputs.no_werror)]);
    key.field("source_date_epoch", &inputs.source_date_epoch.to_le_bytes());
    for digest in inputs.trust_digests {
        key.field("trust", digest.as_bytes());
    }
    for digest in inputs.cert_digests {
        key.field("cert", digest.as_bytes());
    }
    for (tool, version) in &inputs.tools.0 {
        key.field(tool, version.as_bytes());
    }
    key.finish()
}

/// One entry of a source tree, as digested and copied.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TreeEntry {
    Dir(PathBuf),
    /// Relative path and whether it is executable (the only mode bit git keeps, so two
    /// checkouts with different umasks get the same digest).
    File(PathBuf, bool),
    /// Relative path and link target.
    Symlink(PathBuf, PathBuf),
}

/// Build output directories (`bin`, `bin-x86_64-efi`, ...) at the top of `src`: stale
/// outputs of an earlier in-place build must neither be copied nor change the digest.
fn is_output_dir(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|name| name == "bin" || name.starts_with("bin-"))
}

/// The tree under `root` in sorted order (parents before their contents), output dirs skipped.
fn tree_entries(root: &Path) -> Result<Vec<TreeEntry>, IpxeError> {
    let mut entries = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(dir) = pending.pop() {
        let listing = fs::read_dir(root.join(&dir))
            .map_err(IpxeError::io("reading source dir", &root.join(&dir)))?;
        for item in listing {
            let item = item.map_err(IpxeError::io("reading source dir", &root.join(&dir)))?;
            let name = item.file_name();
            if dir.as_os_str().is_empty() && is_output_dir(&name) {
                continue;
            }
            let relative = dir.join(&name);
            let path = root.join(&relative);
            let metadata =
                fs::symlink_metadata(&path).map_err(IpxeError::io("reading source file", &path))?;
            let kind = metadata.file_type();
            if kind.is_dir() {
                pending.push(relative.clone());
                entries.push(TreeEntry::Dir(relative));
            } else if kind.is_file() {
                entries.push(TreeEntry::File(relative, metadata.permissions().mode() & 0o111 != 0));
            } else if kind.is_symlink() {
                let target =
                    fs::read_link(&path).map_err(IpxeError::io("reading source symlink", &path))?;
                entries.push(TreeEntry::Symlink(relative, target));
            }
            // Sockets, fifos and devices have no place in a source tree; they are skipped.
        }
    }
    entries.sort_by(|a, b| a.path().cmp(b.path()));
    Ok(entries)
}

impl TreeEntry {
    fn path(&self) -> &Path {
        match self {
            TreeEntry::Dir(path) | TreeEntry::File(path, _) | TreeEntry::Symlink(path, _) => path,
        }
    }
}

/// A digest of the tree under `src_dir`: sorted relative paths, kinds, executable bits,
/// file contents and symlink targets, with the `bin*` output dirs left out.
pub fn source_digest(src_dir: &Path) -> Result<Sha256Digest, IpxeError> {
    let mut hasher = FieldHasher::default();
    for entry in tree_entries(src_dir)? {
        let path = entry.path().as_os_str().as_encoded_bytes().to_vec();
        match &entry {
            TreeEntry::Dir(_) => hasher.field("dir", &path),
            TreeEntry::File(relative, executable) => {
                hasher.field(if *executable { "exec" } else { "file" }, &path);
                let (digest, _) = file_sha256(&src_dir.join(relative))?;
                hasher.field("content", digest.as_bytes());
            }
            TreeEntry::Symlink(_, target) => {
                hasher.field("symlink", &path);
                hasher.field("target", target.as_os_str().as_encoded_bytes());
            }
        }
    }
    Ok(hasher.finish())
}

/// Copies the tree (output dirs skipped) to `to`, which must not exist yet. File modes are
/// kept (`fs::copy`), symlinks are copied as symlinks.
fn copy_tree(from: &Path, to: &Path) -> Result<(), IpxeError> {
    fs::create_dir(to).map_err(IpxeError::io("creating", to))?;
    for entry in tree_entries(from)? {
        let target = to.join(entry.path());
        match &entry {
            TreeEntry::Dir(_) => {
                fs::create_dir(&target).map_err(IpxeError::io("creating", &target))?
            }
            TreeEntry::File(relative, _) => {
                fs::copy(from.join(relative), &target)
                    .map_err(IpxeError::io("copying to", &target))?;
            }
            TreeEntry::Symlink(_, link) => std::os::unix::fs::symlink(link, &target)
                .map_err(IpxeError::io("creating symlink", &target))?,
        }
    }
    Ok(())
}

fn file_sha256(path: &Path) -> Result<(Sha256Digest, u64), IpxeError> {
    crate::digest::file_sha256(path).map_err(IpxeError::io("reading", path))
}

/// The generated `config/local/*.h` files: file name under `config/local/` and contents.
/// `general.h` is always written (replacing one that came with the tree, so the options
/// are exactly the request's); `crypto.h` only when a `CRYPTO_*` option is set.
pub fn local_config(options: &BTreeMap<String, bool>) -> Vec<(&'static str, String)> {
    let mut general = String::from("/* Generated by ctpf for this build. */\n");
    let mut crypto = String::from("/* Generated by ctpf for this build. */\n");
    let mut any_crypto = false;
    for (name, enabled) in options {
        let file = if name.starts_with("CRYPTO_") {
            any_crypto = true;
            &mut crypto
        } else {
            &mut general
        };
        // #undef first, so defining what the defaults already define is no redefinition.
        file.push_str(&format!("#undef {name}\n"));
        if *enabled {
            file.push_str(&format!("#define {name}\n"));
        }
    }
    let mut files = vec![("general.h", general)];
    if any_crypto {
        files.push(("crypto.h", crypto));
    }
    files
}

/// One built boot loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltFile {
    pub target: IpxeTarget,
    /// Canonical path inside the build directory.
    pub path: PathBuf,
    pub digest: Sha256Digest,
    pub size: u64,
}

/// What a successful build produced.
#[derive(Debug, Clone)]
pub struct IpxeBuildOutput {
    pub key: Sha256Digest,
    /// In the order of the plan's targets.
    pub files: Vec<BuiltFile>,
    /// The last log lines of the last make run.
    pub tail: Vec<LogLine>,
    pub duration: Duration,
}

/// A validated request with its inputs' digests and build key.
#[derive(Debug, Clone)]
pub struct IpxePlan {
    /// The request, targets sorted and deduplicated.
    pub request: IpxeBuildRequest,
    /// The `src` directory that is copied and built.
    pub src_dir: PathBuf,
    pub source_digest: Sha256Digest,
    pub trust_digests: Vec<Sha256Digest>,
    pub cert_digests: Vec<Sha256Digest>,
    pub tools: ToolVersions,
    pub key: Sha256Digest,
}

impl IpxePlan {
    /// Validates `request`, checks the tools it needs are installed, hashes the source tree
    /// and certificates, and computes the build key. Runs nothing but `--version`.
    pub async fn new(mut request: IpxeBuildRequest) -> Result<Self, IpxeError> {
        request.targets.sort();
        request.targets.dedup();
        let src_dir = validate(&request)?;
        check_toolchain(&request.targets)?;
        let tools = tool_versions(&request.targets).await;
        let hash_inputs = {
            let (src_dir, request) = (src_dir.clone(), request.clone());
            move || -> Result<_, IpxeError> {
                Ok((
                    source_digest(&src_dir)?,
                    file_digests(request.trust_certs.as_deref())?,
                    file_digests(request.certs.as_deref())?,
                ))
            }
        };
        let (source_digest, trust_digests, cert_digests) =
            tokio::task::spawn_blocking(hash_inputs).await.map_err(|e| IpxeError::Io {
                what: "hashing the source tree",
                path: src_dir.clone(),
                source: io::Error::other(e),
            })??;
        let key = build_key(&KeyInputs {
            source_digest: &source_digest,
            script: request.embed_script.as_deref(),
            targets: &request.targets,
            options: &request.options,
            no_werror: request.no_werror,
            source_date_epoch: request.source_date_epoch,
            trust_digests: &trust_digests,
            cert_digests: &cert_digests,
            tools: &tools,
        });
        Ok(Self { request, src_dir, source_digest, trust_digests, cert_digests, tools, key })
    }

    /// Builds in `build_dir` (which must exist and be fresh; the caller owns and removes
    /// it), streaming make's output to `log` with one numbering across make runs.
    pub async fn build(
        &self,
        build_dir: &Path,
        cancel: CancellationToken,
        mut log: impl FnMut(LogLine),
    ) -> Result<IpxeBuildOutput, IpxeError> {
        let started = std::time::Instant::now();
        let build_dir =
            build_dir.canonicalize().map_err(IpxeError::io("build directory", build_dir))?;
        let extra_args = self.prepare(&build_dir).await?;
        let mut seq_offset = 0;
        let mut tail = Vec::new();
        for (cross, targets) in cross_groups(&self.request.targets) {
            let spec = self.make_command(&build_dir, &targets, cross, &extra_args);
            let renumber = |mut line: LogLine| {
                line.seq += seq_offset;
                log(line);
            };
            let outcome = process::run_build(spec, cancel.clone(), renumber).await?;
            seq_offset += outcome.lines;
            match outcome.end {
                BuildEnd::Succeeded => tail = outcome.tail,
                BuildEnd::Cancelled => return Err(IpxeError::Cancelled),
                end => return Err(IpxeError::Make { end, tail: outcome.tail_text() }),
            }
        }
        let files = self.collect(&build_dir.join(SRC_SUBDIR)).await?;
        Ok(IpxeBuildOutput { key: self.key, files, tail, duration: started.elapsed() })
    }

    /// Copies the tree, writes the script, certificates and local config; returns the make
    /// variables that point at them.
    async fn prepare(&self, build_dir: &Path) -> Result<Vec<String>, IpxeError> {
        let src = build_dir.join(SRC_SUBDIR);
        if src.exists() {
            return Err(IpxeError::BuildDirNotFresh { dir: build_dir.to_owned() });
        }
        let (from, to) = (self.src_dir.clone(), src.clone());
        tokio::task::spawn_blocking(move || copy_tree(&from, &to)).await.map_err(|e| {
            IpxeError::Io {
                what: "copying the source tree",
                path: src.clone(),
                source: io::Error::other(e),
            }
        })??;
        let local = src.join("config/local");
        fs::create_dir_all(&local).map_err(IpxeError::io("creating", &local))?;
        for (name, contents) in local_config(&self.request.options) {
            let path = local.join(name);
            fs::write(&path, contents).map_err(IpxeError::io("writing", &path))?;
        }
        let mut args = Vec::new();
        if let Some(script) = &self.request.embed_script {
            let path = build_dir.join(EMBED_FILE);
            fs::write(&path, script).map_err(IpxeError::io("writing", &path))?;
            args.push(format!("EMBED={}", path.display()));
        }
        let certs = build_dir.join(CERTS_SUBDIR);
        if let Some(list) = copy_certs(&certs, "trust", self.request.trust_certs.as_deref())? {
            args.push(format!("TRUST={list}"));
        }
        if let Some(list) = copy_certs(&certs, "cert", self.request.certs.as_deref())? {
            args.push(format!("CERT={list}"));
        }
        if self.request.no_werror {
            args.push("NO_WERROR=1".to_owned());
        }
        Ok(args)
    }

    fn make_command(
        &self,
        build_dir: &Path,
        targets: &[IpxeTarget],
        cross: Option<&str>,
        extra_args: &[String],
    ) -> BuildCommand {
        let mut args = vec![
            "-C".to_owned(),
            build_dir.join(SRC_SUBDIR).display().to_string(),
            format!("-j{}", self.request.jobs),
        ];
        args.extend(targets.iter().map(|t| t.make_target().to_owned()));
        args.extend(extra_args.iter().cloned());
        if let Some(prefix) = cross {
            args.push(format!("CROSS={prefix}"));
        }
        let mut spec = BuildCommand::new("make", args, build_dir, self.request.timeout);
        spec.source_date_epoch = self.request.source_date_epoch;
        spec
    }

    async fn collect(&self, src: &Path) -> Result<Vec<BuiltFile>, IpxeError> {
        let names: Vec<&str> = self.request.targets.iter().map(|t| t.make_target()).collect();
        let paths = process::collect_outputs(src, &names)?;
        let targets = self.request.targets.clone();
        let hash = move || -> Result<Vec<BuiltFile>, IpxeError> {
            targets
                .into_iter()
                .zip(paths)
                .map(|(target, path)| {
                    let (digest, size) = file_sha256(&path)?;
                    Ok(BuiltFile { target, path, digest, size })
                })
                .collect()
        };
        tokio::task::spawn_blocking(hash).await.map_err(|e| IpxeError::Io {
            what: "hashing outputs",
            path: src.to_owned(),
            source: io::Error::other(e),
        })?
    }
}

/// Validates, plans and builds in one go (no cache in between).
pub async fn build(
    request: IpxeBuildRequest,
    build_dir: &Path,
    cancel: CancellationToken,
    log: impl FnMut(LogLine),
) -> Result<IpxeBuildOutput, IpxeError> {
    IpxePlan::new(request).await?.build(build_dir, cancel, log).await
}

fn file_digests(paths: Option<&[PathBuf]>) -> Result<Vec<Sha256Digest>, IpxeError> {
    paths.unwrap_or_default().iter().map(|path| Ok(file_sha256(path)?.0)).collect()
}

/// Copies certificate files into the build dir under generated names (so a comma in a
/// user's file name cannot split make's list) and returns make's comma-separated list.
fn copy_certs(
    dir: &Path,
    kind: &str,
    paths: Option<&[PathBuf]>,
) -> Result<Option<String>, IpxeError> {
    let Some(paths) = paths else { return Ok(None) };
    fs::create_dir_all(dir).map_err(IpxeError::io("creating", dir))?;
    let mut list = Vec::new();
    for (index, path) in paths.iter().enumerate() {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .filter(|e| e.chars().all(|c| c.is_ascii_alphanumeric()));
        let name = match extension {
            Some(extension) => format!("{kind}-{index}.{extension}"),
            None => format!("{kind}-{index}.crt"),
        };
        let target = dir.join(name);
        fs::copy(path, &target).map_err(IpxeError::io("copying certificate", path))?;
        list.push(target.display().to_string());
    }
    Ok(Some(list.join(",")))
}

/// make, and the cross compiler of each cross target, must be installed.
fn check_toolchain(targets: &[IpxeTarget]) -> Result<(), IpxeError> {
    let missing = |tool: String, hint| Err(IpxeError::ToolMissing { tool, hint });
    if crate::tools::find_on_path("make").is_none() {
        return missing("make".to_owned(), "install GNU make (Debian: make)");
    }
    for prefix in cross_groups(targets).into_keys().flatten() {
        let compiler = format!("{prefix}gcc");
        if crate::tools::find_on_path(&compiler).is_none() {
            let hint = match prefix {
                "aarch64-linux-gnu-" => {
                    "bin-arm64-efi/ipxe.efi is cross-compiled: install gcc-aarch64-linux-gnu (Debian)"
                }
                _ => "x86 targets are cross-compiled here: install gcc-x86-64-linux-gnu (Debian)",
            };
            return missing(compiler, hint);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_list_the_valid_ones() {
        for target in IpxeTarget::ALL {
            assert_eq!(target.make_target().parse::<IpxeTarget>().unwrap(), target);
        }
        let err = "bin/ipxe.usb".parse::<IpxeTarget>().unwrap_err().to_string();
        for target in IpxeTarget::ALL {
            assert!(err.contains(target.make_target()), "{err}");
        }
    }

    #[test]
    fn arm64_is_cross_compiled_on_x86() {
        assert_eq!(IpxeTarget::Arm64Efi.cross_prefix("x86_64"), Some("aarch64-linux-gnu-"));
        assert_eq!(IpxeTarget::Arm64Efi.cross_prefix("aarch64"), None);
        assert_eq!(IpxeTarget::UndionlyKpxe.cross_prefix("x86_64"), None);
        assert_eq!(IpxeTarget::X86_64Efi.cross_prefix("aarch64"), Some("x86_64-linux-gnu-"));
    }

    #[test]
    fn scripts_must_be_ipxe_scripts() {
        assert!(validate_script("#!ipxe\nchain http://x/\n").is_ok());
        assert!(validate_script("#!ipxe").is_ok());
        assert!(validate_script("#!ipxe \r\nshell").is_ok());
        for bad in ["", "#!/bin/sh\n", "#!ipxeX\n", " #!ipxe\n"] {
            let err = validate_script(bad).unwrap_err();
            assert!(err.to_string().contains("must start with #!ipxe"), "{bad:?}: {err}");
        }
        assert!(matches!(validate_script("#!ipxe\n\0"), Err(IpxeError::ScriptHasNul)));
        let big = format!("#!ipxe\n{}", "x".repeat(MAX_SCRIPT_BYTES));
        assert!(matches!(validate_script(&big), Err(IpxeError::ScriptTooLarge { .. })));
    }

    #[test]
    fn option_names_are_c_macro_names() {
        for good in ["DOWNLOAD_PROTO_HTTPS", "NET_PROTO_IPV6", "_X"] {
            assert!(validate_option_name(good).is_ok(), "{good}");
        }
        for bad in ["", "lower", "1ABC", "A-B", "A B", "A\nB"] {
            assert!(validate_option_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn local_config_defines_and_undefines() {
        let options = BTreeMap::from([
            ("DOWNLOAD_PROTO_HTTPS".to_owned(), true),
            ("NET_PROTO_IPV6".to_owned(), false),
        ]);
        let files = local_config(&options);
        assert_eq!(files.len(), 1);
        let (name, text) = &files[0];
        assert_eq!(*name, "general.h");
        assert!(
            text.contains("#undef DOWNLOAD_PROTO_HTTPS\n#define DOWNLOAD_PROTO_HTTPS\n"),
            "{text}"
        );
        assert!(
            text.contains("#undef NET_PROTO_IPV6\n") && !text.contains("#define NET_PROTO_IPV6"),
            "{text}"
        );
        let options = BTreeMap::from([("CRYPTO_DIGEST_MD5".to_owned(), true)]);
        let files = local_config(&options);
        assert_eq!(files[1].0, "crypto.h");
        assert!(files[1].1.contains("#define CRYPTO_DIGEST_MD5"));
        assert!(!files[0].1.contains("CRYPTO"));
    }

    #[test]
    fn the_source_digest_skips_outputs_and_follows_contents_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("config/local")).unwrap();
        fs::write(root.join("Makefile"), "all:\n").unwrap();
        fs::write(root.join("config/general.h"), "#define X\n").unwrap();
        let first = source_digest(root).unwrap();

        fs::create_dir_all(root.join("bin-x86_64-efi")).unwrap();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/ipxe.lkrn"), "stale").unwrap();
        assert_eq!(source_digest(root).unwrap(), first, "bin* output dirs do not count");

        fs::set_permissions(root.join("Makefile"), fs::Permissions::from_mode(0o755)).unwrap();
        let executable = source_digest(root).unwrap();
        assert_ne!(executable, first);
        fs::set_permissions(root.join("Makefile"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(root.join("config/general.h"), fs::Permissions::from_mode(0o600))
            .unwrap();
        assert_eq!(source_digest(root).unwrap(), first, "only the executable bit counts");

        fs::write(root.join("config/general.h"), "#define Y\n").unwrap();
        assert_ne!(source_digest(root).unwrap(), first);
    }

    #[test]
    fn the_copy_skips_outputs_and_keeps_links_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        fs::create_dir_all(from.join("bin")).unwrap();
        fs::create_dir_all(from.join("util")).unwrap();
        fs::write(from.join("bin/old"), "stale").unwrap();
        fs::write(from.join("util/tool.pl"), "#!/usr/bin/perl\n").unwrap();
        fs::set_permissions(from.join("util/tool.pl"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("tool.pl", from.join("util/link")).unwrap();
        let to = dir.path().join("to");
        copy_tree(&from, &to).unwrap();
        assert!(!to.join("bin").exists());
        assert_eq!(
            fs::metadata(to.join("util/tool.pl")).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(fs::read_link(to.join("util/link")).unwrap(), Path::new("tool.pl"));
        assert_eq!(source_digest(&from).unwrap(), source_digest(&to).unwrap());
    }

    /// Owned key inputs, so each case can change one of them.
    struct Inputs {
        source: Sha256Digest,
        script: Option<String>,
        targets: Vec<IpxeTarget>,
        options: BTreeMap<String, bool>,
        no_werror: bool,
        epoch: u64,
        trust: Vec<Sha256Digest>,
        cert: Vec<Sha256Digest>,
        tools: ToolVersions,
    }

    fn key_with(change: impl FnOnce(&mut Inputs)) -> Sha256Digest {
        let mut inputs = Inputs {
            source: Sha256Digest::of(b"tree"),
            script: Some("#!ipxe\n".to_owned()),
            targets: vec![IpxeTarget::UndionlyKpxe, IpxeTarget::X86_64Efi],
            options: BTreeMap::from([("DOWNLOAD_PROTO_HTTPS".to_owned(), true)]),
            no_werror: false,
            epoch: 0,
            trust: vec![],
            cert: vec![],
            tools: ToolVersions(BTreeMap::from([("make".to_owned(), "GNU Make 4.4.1".to_owned())])),
        };
        change(&mut inputs);
        build_key(&KeyInputs {
            source_digest: &inputs.source,
            script: inputs.script.as_deref(),
            targets: &inputs.targets,
            options: &inputs.options,
            no_werror: inputs.no_werror,
            source_date_epoch: inputs.epoch,
            trust_digests: &inputs.trust,
            cert_digests: &inputs.cert,
            tools: &inputs.tools,
        })
    }

    #[test]
    fn the_key_follows_every_input() {
        let base = key_with(|_| {});
        assert_eq!(key_with(|_| {}), base);
        assert_eq!(key_with(|i| i.targets.reverse()), base, "targets are a set");
        let changed = [
            key_with(|i| i.source = Sha256Digest::of(b"other tree")),
            key_with(|i| i.script = Some("#!ipxe\nshell\n".to_owned())),
            key_with(|i| i.script = None),
            key_with(|i| i.targets.truncate(1)),
            key_with(|i| i.options.clear()),
            key_with(|i| i.options = BTreeMap::from([("DOWNLOAD_PROTO_HTTPS".to_owned(), false)])),
            key_with(|i| i.no_werror = true),
            key_with(|i| i.epoch = 1),
            key_with(|i| i.trust = vec![Sha256Digest::of(b"ca")]),
            key_with(|i| i.cert = vec![Sha256Digest::of(b"ca")]),
            key_with(|i| {
                i.tools =
                    ToolVersions(BTreeMap::from([("make".to_owned(), "GNU Make 4.3".to_owned())]))
            }),
        ];
        for (index, key) in changed.iter().enumerate() {
            assert_ne!(*key, base, "change {index}");
            for other in &changed[index + 1..] {
                assert_ne!(key, other);
            }
        }
    }
}
