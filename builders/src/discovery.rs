//! The discovery image recipe: a kernel from an unpacked Debian `linux-image` package and an
//! initramfs built here (busybox, the NIC drivers with their dependencies, `/init`, the
//! agent). Every input is hashed into a build key, so a caller can tell whether the image it
//! stored last time is still current without building anything.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ctpf_common::{Arch, Sha256Digest};
use sha2::{Digest, Sha256};

use crate::initramfs::{self, BuiltImage, DiscoveryInputs, InitramfsError};
use crate::kmod::{KmodError, ModuleTree, discovery_nic_modules};
use crate::machine;

/// Bump when the layout, scripts or module choice change in a way the input digests miss.
pub const RECIPE_VERSION: &str = "ctpf-discovery/1";

/// PID 1 of the discovery environment.
pub const INIT_SCRIPT: &str = include_str!("../assets/discovery-init.sh");
/// busybox udhcpc's lease hook, installed as `/etc/udhcpc.script`.
pub const UDHCPC_SCRIPT: &str = include_str!("../assets/udhcpc.script");

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("discovery image input {what} ({path}): {source}")]
    Input { what: &'static str, path: PathBuf, source: io::Error },
    #[error(
        "the agent {path} {reason}; build it with --target {target}",
        target = arch.musl_target()
    )]
    AgentNotStatic { path: PathBuf, reason: &'static str, arch: Arch },
    #[error("{what} {path} {reason}")]
    UnknownMachine { what: &'static str, path: PathBuf, reason: &'static str },
    #[error(
        "the kernel {kernel} is for {found}, but this discovery image is for {wanted} \
         (pass an unpacked linux-image-*-{debian} package)", debian = wanted.debian()
    )]
    WrongKernel { kernel: PathBuf, found: Arch, wanted: Arch },
    #[error(
        "{what} {path} is for {found}, but the kernel {kernel} is for {arch}: kernel, modules, \
         busybox and agent must all be for one architecture ({hint})",
        hint = mismatch_hint(what, *arch)
    )]
    ArchMismatch { what: &'static str, path: PathBuf, found: Arch, kernel: PathBuf, arch: Arch },
    #[error("no kernel for modules {version} in {root}: expected boot/vmlinuz-{version}")]
    NoKernel { root: PathBuf, version: String },
    #[error(transparent)]
    Modules(#[from] KmodError),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
}

/// Where the inputs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoverySources {
    /// An unpacked `linux-image-*` package (`dpkg -x`), or `/` on a Debian host.
    pub linux_root: PathBuf,
    /// A statically linked busybox (Debian's busybox-static: `/bin/busybox`).
    pub busybox: PathBuf,
    /// The static `ctpf-agent` binary (crate `ctpf-discovery-agent`, built for musl).
    pub agent: PathBuf,
    /// The architecture the image must be for; `None`: the kernel's, whatever it is. The
    /// kernel decides either way, and every other part must match it.
    pub arch: Option<Arch>,
}

/// How to get a part for `arch`, for [`DiscoveryError::ArchMismatch`].
fn mismatch_hint(what: &str, arch: Arch) -> String {
    match what {
        "busybox" => format!("Debian's busybox-static:{}, bin/busybox", arch.debian()),
        "agent" => {
            format!("cargo build --release -p ctpf-discovery-agent --target {}", arch.musl_target())
        }
        _ => format!("the modules of the kernel's own linux-image package ({arch})"),
    }
}

/// Resolved inputs and their build key.
#[derive(Debug, Clone)]
pub struct DiscoveryPlan {
    /// The kernel's architecture, which every other part matches.
    pub arch: Arch,
    pub kernel: PathBuf,
    pub kernel_version: String,
    /// Module files in load order.
    pub modules: Vec<PathBuf>,
    /// Wanted NIC drivers this kernel does not have (not an error: kernels differ).
    pub missing_modules: Vec<String>,
    /// sha256 over the recipe version, the scripts, and every input file's digest.
    pub key: Sha256Digest,
}

impl DiscoveryPlan {
    /// Resolves kernel and modules under `sources.linux_root`, checks that every part is for
    /// the kernel's architecture (and that one for `sources.arch`), and hashes all inputs.
    pub fn resolve(sources: &DiscoverySources) -> Result<Self, DiscoveryError> {
        let tree = ModuleTree::open(&sources.linux_root)?;
        let kernel_version = tree.version().to_owned();
        let kernel = sources.linux_root.join(format!("boot/vmlinuz-{kernel_version}"));
        if !kernel.is_file() {
            return Err(DiscoveryError::NoKernel {
                root: sources.linux_root.clone(),
                version: kernel_version,
            });
        }
        let arch = file_machine("kernel", &kernel, machine::kernel_arch)?;
        if let Some(wanted) = sources.arch
            && wanted != arch
        {
            return Err(DiscoveryError::WrongKernel { kernel, found: arch, wanted });
        }
        let mismatch = |what, path: &Path, found| DiscoveryError::ArchMismatch {
            what,
            path: path.to_owned(),
            found,
            kernel: kernel.clone(),
            arch,
        };
        let busybox_arch = file_machine("busybox", &sources.busybox, machine::elf_arch)?;
        if busybox_arch != arch {
            return Err(mismatch("busybox", &sources.busybox, busybox_arch));
        }
        let (present, missing): (Vec<&str>, Vec<&str>) =
            discovery_nic_modules(arch).into_iter().partition(|name| tree.contains(name));
        let modules = tree.load_order(&present)?;
        for module in &modules {
            let (_, encoding) = initramfs::module_name_and_encoding(module)?;
            let bytes = initramfs::read_decompressed(module, encoding)?;
            let found =
                machine::elf_arch(&bytes).map_err(|reason| DiscoveryError::UnknownMachine {
                    what: "kernel module",
                    path: module.clone(),
                    reason,
                })?;
            if found != arch {
                return Err(mismatch("kernel module", module, found));
            }
        }

        let mut key = Sha256::new();
        let mut field = |label: &str, value: &[u8]| {
            // Length-prefixed, so no two different input lists hash the same bytes.
            key.update((label.len() as u64).to_le_bytes());
            key.update(label.as_bytes());
            key.update((value.len() as u64).to_le_bytes());
            key.update(value);
        };
        field("recipe", RECIPE_VERSION.as_bytes());
        field("init", INIT_SCRIPT.as_bytes());
        field("udhcpc", UDHCPC_SCRIPT.as_bytes());
        field("applets", initramfs::DISCOVERY_APPLETS.join(",").as_bytes());
        field("kernel", &file_digest("kernel", &kernel)?);
        field("busybox", &file_digest("busybox", &sources.busybox)?);
        let agent_arch = check_static_agent(&sources.agent, arch)?;
        if agent_arch != arch {
            return Err(mismatch("agent", &sources.agent, agent_arch));
        }
        field("agent", &file_digest("agent", &sources.agent)?);
        for module in &modules {
            let name = module.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
            field(&format!("module {name}"), &file_digest("kernel module", module)?);
        }
        let key = Sha256Digest::from_bytes(key.finalize().into());
        Ok(Self {
            arch,
            kernel,
            kernel_version,
            modules,
            missing_modules: missing.into_iter().map(str::to_owned).collect(),
            key,
        })
    }

    /// Writes the initramfs (gzip newc cpio) to `out`; same inputs and `epoch`, same bytes.
    pub fn build_initrd(
        &self,
        sources: &DiscoverySources,
        epoch: u64,
        out: impl Write,
    ) -> Result<BuiltImage, DiscoveryError> {
        let inputs = DiscoveryInputs {
            busybox: sources.busybox.clone(),
            kernel_modules: self.modules.clone(),
            init_script: INIT_SCRIPT.as_bytes().to_vec(),
            agent: Some(sources.agent.clone()),
            extra_files: vec![("etc/udhcpc.script".to_owned(), UDHCPC_SCRIPT.as_bytes().to_vec())],
        };
        let spec = initramfs::discovery_spec(&inputs)?;
        Ok(initramfs::build(&spec, epoch, out)?)
    }
}

/// The initramfs has no C library: an agent linked against one (a plain `cargo build`)
/// would fail to start on every machine, so it is refused here rather than at boot. Returns
/// the agent's architecture; `arch` (the kernel's) only names the target in the error.
fn check_static_agent(path: &Path, arch: Arch) -> Result<Arch, DiscoveryError> {
    let bytes = std::fs::read(path).map_err(|source| DiscoveryError::Input {
        what: "agent",
        path: path.to_owned(),
        source,
    })?;
    let not_static =
        |reason| DiscoveryError::AgentNotStatic { path: path.to_owned(), reason, arch };
    static_elf(&bytes).map_err(not_static)?;
    machine::elf_arch(&bytes).map_err(not_static)
}

/// The machine of the file at `path` from its first bytes.
fn file_machine(
    what: &'static str,
    path: &Path,
    machine_of: fn(&[u8]) -> Result<Arch, &'static str>,
) -> Result<Arch, DiscoveryError> {
    use std::io::Read as _;
    let input_error = |source| DiscoveryError::Input { what, path: path.to_owned(), source };
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(machine::HEADER_BYTES as u64).read_to_end(&mut head))
        .map_err(input_error)?;
    machine_of(&head).map_err(|reason| DiscoveryError::UnknownMachine {
        what,
        path: path.to_owned(),
        reason,
    })
}

/// Ok for a 64-bit little-endian ELF executable without a program interpreter (PT_INTERP),
/// i.e. one that needs no dynamic loader.
pub fn static_elf(bytes: &[u8]) -> Result<(), &'static str> {
    const PT_INTERP: u32 = 3;
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err("is not a 64-bit little-endian ELF executable");
    }
    let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let header = (|| {
        let phoff = u64::from_le_bytes(bytes.get(0x20..0x28)?.try_into().ok()?);
        Some((usize::try_from(phoff).ok()?, usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?)))
    })();
    let (phoff, phentsize, phnum) = header.ok_or("has a truncated ELF header")?;
    for index in 0..phnum {
        let at = index.checked_mul(phentsize).and_then(|o| o.checked_add(phoff));
        let kind = at
            .and_then(|at| bytes.get(at..at.checked_add(4)?))
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or("has a truncated program header table")?;
        if kind == PT_INTERP {
            return Err("is dynamically linked (it names a program interpreter)");
        }
    }
    Ok(())
}

fn file_digest(what: &'static str, path: &Path) -> Result<[u8; 32], DiscoveryError> {
    let (digest, _) = crate::digest::file_sha256(path).map_err(|source| DiscoveryError::Input {
        what,
        path: path.to_owned(),
        source,
    })?;
    Ok(*digest.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::tests::kernel_image;
    use std::fs;

    fn e_machine(arch: Arch) -> u16 {
        match arch {
            Arch::X86_64 => 62,
            Arch::Arm64 => 183,
        }
    }

    /// A minimal 64-bit ELF for `arch` with one program header of type `kind`, then `payload`.
    pub(crate) fn elf(arch: Arch, kind: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; 64 + 56];
        bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
        bytes[0x12..0x14].copy_from_slice(&e_machine(arch).to_le_bytes());
        bytes[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        bytes[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        bytes[64..68].copy_from_slice(&kind.to_le_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    /// A kernel module for `arch` (an ELF header, then a `.modinfo`-style field).
    fn module(arch: Arch, depends: &str) -> Vec<u8> {
        let mut bytes = elf(arch, 0, b"");
        bytes.extend_from_slice(format!("\0depends={depends}\0").as_bytes());
        bytes
    }

    /// Every part for `arch`: a kernel with virtio_net and (arm64) genet with its PHY.
    fn fixture_for(arch: Arch) -> (tempfile::TempDir, DiscoverySources) {
        let dir = tempfile::tempdir().unwrap();
        let linux = dir.path().join("linux");
        let base = linux.join("lib/modules/6.1.0-test");
        let net = base.join("kernel/drivers/net");
        fs::create_dir_all(&net).unwrap();
        fs::write(net.join("virtio_net.ko"), module(arch, "")).unwrap();
        if arch == Arch::Arm64 {
            fs::write(net.join("genet.ko"), module(arch, "libphy")).unwrap();
            fs::write(net.join("libphy.ko"), module(arch, "")).unwrap();
            fs::write(net.join("broadcom.ko"), module(arch, "libphy")).unwrap();
        }
        fs::create_dir_all(linux.join("boot")).unwrap();
        fs::write(linux.join("boot/vmlinuz-6.1.0-test"), kernel_image(arch, true)).unwrap();
        fs::write(dir.path().join("busybox"), elf(arch, 1, b"busybox")).unwrap();
        fs::write(dir.path().join("agent"), elf(arch, 1, b"agent v1")).unwrap();
        let sources = DiscoverySources {
            linux_root: linux,
            busybox: dir.path().join("busybox"),
            agent: dir.path().join("agent"),
            arch: None,
        };
        (dir, sources)
    }

    fn fixture() -> (tempfile::TempDir, DiscoverySources) {
        fixture_for(Arch::X86_64)
    }

    #[test]
    fn the_key_follows_the_inputs() {
        let (dir, sources) = fixture();
        let plan = DiscoveryPlan::resolve(&sources).unwrap();
        assert_eq!(plan.kernel_version, "6.1.0-test");
        assert_eq!(plan.arch, Arch::X86_64);
        assert_eq!(plan.modules.len(), 1);
        assert!(plan.missing_modules.contains(&"e1000".to_owned()));
        assert_eq!(DiscoveryPlan::resolve(&sources).unwrap().key, plan.key);
        fs::write(dir.path().join("agent"), elf(Arch::X86_64, 1, b"agent v2")).unwrap();
        assert_ne!(DiscoveryPlan::resolve(&sources).unwrap().key, plan.key);
    }

    #[test]
    fn missing_inputs_are_named() {
        let (dir, sources) = fixture();
        fs::remove_file(dir.path().join("busybox")).unwrap();
        let err = DiscoveryPlan::resolve(&sources).unwrap_err();
        assert!(err.to_string().contains("busybox"), "{err}");
        fs::remove_file(sources.linux_root.join("boot/vmlinuz-6.1.0-test")).unwrap();
        let err = DiscoveryPlan::resolve(&sources).unwrap_err();
        assert!(err.to_string().contains("vmlinuz-6.1.0-test"), "{err}");
    }

    #[test]
    fn a_dynamically_linked_or_non_elf_agent_is_refused() {
        let (dir, sources) = fixture();
        let dynamic = elf(Arch::X86_64, 3, b"/lib64/ld-linux-x86-64.so.2");
        fs::write(dir.path().join("agent"), dynamic).unwrap();
        let err = DiscoveryPlan::resolve(&sources).unwrap_err().to_string();
        assert!(err.contains("dynamically linked") && err.contains("x86_64-unknown-linux-musl"));
        fs::write(dir.path().join("agent"), b"#!/bin/sh\n").unwrap();
        let err = DiscoveryPlan::resolve(&sources).unwrap_err().to_string();
        assert!(err.contains("not a 64-bit"), "{err}");
        assert!(static_elf(b"\x7fELF\x02\x01").is_err(), "truncated header");
    }

    #[test]
    fn an_arm64_kernel_makes_an_arm64_image_with_its_nic_drivers() {
        let (_dir, sources) = fixture_for(Arch::Arm64);
        let plan = DiscoveryPlan::resolve(&sources).unwrap();
        assert_eq!(plan.arch, Arch::Arm64);
        let names: Vec<String> = plan
            .modules
            .iter()
            .map(|m| m.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        // The PHY driver before the MAC driver; their common dependency first.
        assert_eq!(names, ["virtio_net.ko", "libphy.ko", "broadcom.ko", "genet.ko"]);
        assert!(plan.missing_modules.contains(&"lan78xx".to_owned()));
        let arm64 = DiscoverySources { arch: Some(Arch::Arm64), ..sources.clone() };
        assert_eq!(DiscoveryPlan::resolve(&arm64).unwrap().key, plan.key);
        let (_x86_dir, x86) = fixture();
        let x86 = DiscoveryPlan::resolve(&x86).unwrap();
        assert!(!x86.missing_modules.contains(&"genet".to_owned()), "arm64 drivers only");
    }

    #[test]
    fn parts_of_another_architecture_are_refused_by_name() {
        let (dir, sources) = fixture_for(Arch::Arm64);
        let kernel = sources.linux_root.join("boot/vmlinuz-6.1.0-test");
        let x86 = DiscoverySources { arch: Some(Arch::X86_64), ..sources.clone() };
        let err = DiscoveryPlan::resolve(&x86).unwrap_err().to_string();
        assert!(err.contains("is for arm64, but this discovery image is for x86_64"), "{err}");
        assert!(err.contains(&kernel.display().to_string()) && err.contains("amd64"), "{err}");

        let busybox = elf(Arch::X86_64, 1, b"busybox");
        fs::write(dir.path().join("busybox"), busybox).unwrap();
        let err = DiscoveryPlan::resolve(&sources).unwrap_err().to_string();
        assert!(err.contains("busybox") && err.contains("is for x86_64"), "{err}");
        assert!(err.contains(&kernel.display().to_string()), "{err}");
        assert!(err.contains("busybox-static:arm64"), "{err}");
        fs::write(dir.path().join("busybox"), elf(Arch::Arm64, 1, b"busybox")).unwrap();

        fs::write(dir.path().join("agent"), elf(Arch::X86_64, 1, b"agent")).unwrap();
        let err = DiscoveryPlan::resolve(&sources).unwrap_err().to_string();
        assert!(err.contains("agent") && err.contains("aarch64-unknown-linux-musl"), "{err}");
        fs::write(dir.path().join("agent"), elf(Arch::Arm64, 1, b"agent")).unwrap();

        let genet = sources.linux_root.join("lib/modules/6.1.0-test/kernel/drivers/net/genet.ko");
        fs::write(&genet, module(Arch::X86_64, "libphy")).unwrap();
        let err = DiscoveryPlan::resolve(&sources).unwrap_err().to_string();
        assert!(err.contains("kernel module") && err.contains("genet.ko"), "{err}");
        fs::write(&genet, b"\0depends=libphy\0").unwrap();
        let err = DiscoveryPlan::resolve(&sources).unwrap_err().to_string();
        assert!(err.contains("genet.ko is not an ELF file"), "{err}");

        fs::write(&kernel, b"kernel").unwrap();
        let err = DiscoveryPlan::resolve(&sources).unwrap_err().to_string();
        assert!(err.contains("kernel") && err.contains("not a Linux kernel image"), "{err}");
    }

    #[test]
    fn the_initrd_is_reproducible() {
        let (_dir, sources) = fixture();
        let plan = DiscoveryPlan::resolve(&sources).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let first = plan.build_initrd(&sources, 0, &mut a).unwrap();
        plan.build_initrd(&sources, 0, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(first.compressed_size, a.len() as u64);
    }
}
