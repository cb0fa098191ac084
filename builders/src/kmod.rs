//! Choosing kernel modules for the discovery image from an unpacked kernel package.
//!
//! A Debian `linux-image-*` package, unpacked with `dpkg -x`, has no `modules.dep` (depmod
//! runs at install time), so dependencies are read from each module's own `.modinfo`
//! section (`depends=a,b`), the same field depmod reads. Modules listed in
//! `modules.builtin` are part of the kernel and need no file.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use ctpf_common::Arch;

use crate::initramfs::{self, InitramfsError};

/// NIC drivers the discovery image carries on every architecture, roots of the dependency
/// walk. virtio-net and e1000 are what VMs and QEMU tests use; e1000e, igb, igc, r8169, tg3
/// and bnx2 cover the wired NICs of laptops and common servers (PCIe cards, also in arm64
/// servers); the USB ones cover dongles on laptops with no Ethernet port.
pub const DISCOVERY_NIC_MODULES: &[&str] = &[
    "virtio_net",
    "virtio_pci",
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "r8169",
    "tg3",
    "bnx2",
    "xhci_pci",
    "ehci_pci",
    "r8152",
    "cdc_ether",
    "ax88179_178a",
];

/// NIC drivers only arm64 images add, after [`DISCOVERY_NIC_MODULES`]. PHY and MDIO drivers
/// come before the MAC drivers that use them: a module's `depends=` does not name them (they
/// bind by device match or `softdep`), and `/init` only insmods in list order.
/// - `virtio_mmio`: virtio devices on QEMU's `virt` machine without PCI (`virtio-net-device`);
/// - `mdio_bcm_unimac`, `broadcom`, `genet` (bcmgenet): the Raspberry Pi 4, 400 and CM4 port;
/// - `phy_generic`, `dwc2`: the Pi 3's USB host controller (its PHY is a `usb-nop-xceiv`),
///   behind which sit `smsc95xx` (Pi 3B, PHY driver `smsc`) and `lan78xx` (Pi 3B+, PHY
///   driver `microchip`). The Pi 4's USB (VL805 on PCIe) is `xhci_pci`, above.
pub const DISCOVERY_NIC_MODULES_ARM64: &[&str] = &[
    "virtio_mmio",
    "mdio_bcm_unimac",
    "broadcom",
    "genet",
    "phy_generic",
    "dwc2",
    "smsc",
    "smsc95xx",
    "microchip",
    "lan78xx",
];

/// The NIC drivers wanted for an image of `arch`, in load order (before dependencies).
pub fn discovery_nic_modules(arch: Arch) -> Vec<&'static str> {
    let mut modules = DISCOVERY_NIC_MODULES.to_vec();
    if arch == Arch::Arm64 {
        modules.extend_from_slice(DISCOVERY_NIC_MODULES_ARM64);
    }
    modules
}

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} has no lib/modules/<version>/kernel directory (is it an unpacked linux-image package?)"
    )]
    NoModulesTree { path: PathBuf },
    #[error("{path} holds modules of several kernels ({versions:?}); pass a tree with one")]
    SeveralKernels { path: PathBuf, versions: Vec<String> },
    #[error("module {name} is neither a file under {tree} nor built in")]
    UnknownModule { name: String, tree: PathBuf },
    #[error("module dependencies form a cycle through {name}")]
    Cycle { name: String },
    #[error(transparent)]
    Read(#[from] InitramfsError),
}

/// The modules of one kernel version: name (with `-` folded to `_`, as the kernel does) to
/// file, plus the built-in names.
#[derive(Debug)]
pub struct ModuleTree {
    root: PathBuf,
    version: String,
    files: BTreeMap<String, PathBuf>,
    builtin: HashSet<String>,
}

/// Kernel module names use `-` and `_` interchangeably.
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> KmodError + '_ {
    move |source| KmodError::Io { path: path.to_owned(), source }
}

impl ModuleTree {
    /// Indexes `ROOT/lib/modules/<version>/`; `ROOT` is an unpacked package (or `/`).
    pub fn open(root: &Path) -> Result<Self, KmodError> {
        let modules = root.join("lib/modules");
        let mut versions = Vec::new();
        if let Ok(entries) = fs::read_dir(&modules) {
            for entry in entries {
                let entry = entry.map_err(io_error(&modules))?;
                if entry.path().join("kernel").is_dir() {
                    versions.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        versions.sort();
        let version = match versions.as_slice() {
            [] => return Err(KmodError::NoModulesTree { path: root.to_owned() }),
            [one] => one.clone(),
            _ => return Err(KmodError::SeveralKernels { path: root.to_owned(), versions }),
        };
        let base = modules.join(&version);
        let mut files = BTreeMap::new();
        index_modules(&base.join("kernel"), &mut files)?;
        let builtin = match fs::read_to_string(base.join("modules.builtin")) {
            Ok(text) => text.lines().filter_map(module_name_of).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(source) => {
                return Err(KmodError::Io { path: base.join("modules.builtin"), source });
            }
        };
        Ok(Self { root: base, version, files, builtin })
    }

    /// The kernel release these modules belong to, e.g. `6.1.0-56-amd64`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether `name` is available, as a file or built in.
    pub fn contains(&self, name: &str) -> bool {
        let name = canonical(name);
        self.files.contains_key(&name) || self.builtin.contains(&name)
    }

    /// Module files for `wanted` and everything they depend on, dependencies first (the order
    /// `insmod` needs). Built-in modules are skipped; a wanted module that is neither a file
    /// nor built in is an error, so a typo does not silently leave out a NIC driver.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<PathBuf>, KmodError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        let mut visiting = BTreeSet::new();
        for name in wanted {
            self.visit(&canonical(name), &mut visiting, &mut done, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        visiting: &mut BTreeSet<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<(), KmodError> {
        if done.contains(name) {
            return Ok(());
        }
        let Some(path) = self.files.get(name) else {
            if self.builtin.contains(name) {
                done.insert(name.to_owned());
                return Ok(());
            }
            return Err(KmodError::UnknownModule {
                name: name.to_owned(),
                tree: self.root.clone(),
            });
        };
        if !visiting.insert(name.to_owned()) {
            return Err(KmodError::Cycle { name: name.to_owned() });
        }
        for dependency in module_depends(path)? {
            self.visit(&canonical(&dependency), visiting, done, order)?;
        }
        visiting.remove(name);
        done.insert(name.to_owned());
        order.push(path.clone());
        Ok(())
    }
}

/// `kernel/drivers/net/virtio_net.ko.xz` → `virtio_net`.
fn module_name_of(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file.strip_suffix(".ko").or_else(|| {
        file.strip_suffix(".ko.xz")
            .or_else(|| file.strip_suffix(".ko.gz"))
            .or_else(|| file.strip_suffix(".ko.zst"))
    })?;
    Some(canonical(stem))
}

fn index_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<(), KmodError> {
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(io_error(&path))?;
        if file_type.is_dir() {
            index_modules(&path, files)?;
        } else if let Some(name) = path.to_str().and_then(module_name_of) {
            files.insert(name, path);
        }
    }
    Ok(())
}

/// The `depends=` field of a module's `.modinfo` section. The section is a run of
/// NUL-terminated `key=value` strings; rather than parse ELF, find the field the way
/// `strings | grep` would, which is exact because each field starts after a NUL.
pub fn module_depends(path: &Path) -> Result<Vec<String>, KmodError> {
    let bytes = read_module(path)?;
    const FIELD: &[u8] = b"\0depends=";
    let Some(start) = bytes.windows(FIELD.len()).position(|w| w == FIELD) else {
        return Ok(Vec::new());
    };
    let value = &bytes[start + FIELD.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    let text = String::from_utf8_lossy(&value[..end]);
    Ok(text.split(',').filter(|d| !d.is_empty()).map(str::to_owned).collect())
}

/// A module's bytes, decompressed the way the initramfs writer does it.
fn read_module(path: &Path) -> Result<Vec<u8>, KmodError> {
    let (_, encoding) = initramfs::module_name_and_encoding(path)?;
    Ok(initramfs::read_decompressed(path, encoding)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake module: some ELF-ish bytes, then a `.modinfo`-style run of fields.
    fn write_module(dir: &Path, rel: &str, depends: &str) {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut bytes = b"\x7fELF....license=GPL".to_vec();
        bytes
            .extend_from_slice(format!("\0author=x\0depends={depends}\0vermagic=6.1\0").as_bytes());
        fs::write(path, bytes).unwrap();
    }

    fn tree() -> (tempfile::TempDir, ModuleTree) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("lib/modules/6.1.0-test");
        write_module(&base, "kernel/net/core/failover.ko", "");
        write_module(&base, "kernel/drivers/net/net_failover.ko", "failover");
        write_module(&base, "kernel/drivers/virtio/virtio_ring.ko", "");
        write_module(&base, "kernel/drivers/virtio/virtio.ko", "virtio_ring");
        write_module(&base, "kernel/drivers/net/virtio_net.ko", "net_failover,virtio,virtio_ring");
        write_module(&base, "kernel/drivers/net/e1000e.ko", "ptp");
        write_module(&base, "kernel/drivers/ptp/ptp.ko", "pps_core");
        write_module(&base, "kernel/drivers/loop/a.ko", "b");
        write_module(&base, "kernel/drivers/loop/b.ko", "a");
        fs::write(base.join("modules.builtin"), "kernel/drivers/pps/pps_core.ko\n").unwrap();
        let tree = ModuleTree::open(dir.path()).unwrap();
        (dir, tree)
    }

    fn names(order: &[PathBuf]) -> Vec<String> {
        order.iter().map(|p| module_name_of(p.to_str().unwrap()).unwrap()).collect()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let (_dir, tree) = tree();
        assert_eq!(tree.version(), "6.1.0-test");
        let order = tree.load_order(&["virtio_net", "virtio-ring", "e1000e"]).unwrap();
        assert_eq!(
            names(&order),
            ["failover", "net_failover", "virtio_ring", "virtio", "virtio_net", "ptp", "e1000e"]
        );
    }

    #[test]
    fn unknown_modules_and_cycles_are_errors() {
        let (_dir, tree) = tree();
        let err = tree.load_order(&["no_such_nic"]).unwrap_err();
        assert!(err.to_string().contains("no_such_nic"), "{err}");
        assert!(matches!(tree.load_order(&["a"]), Err(KmodError::Cycle { .. })));
    }

    #[test]
    fn a_tree_without_modules_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = ModuleTree::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("linux-image"), "{err}");
    }
}
