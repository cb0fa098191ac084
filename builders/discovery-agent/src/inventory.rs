//! Hardware facts read from sysfs and procfs. Every reader takes a [`Root`] so the tests can
//! point it at a fixture tree; every reader treats a missing or odd file as "unknown" rather
//! than an error, because firmware and drivers vary and a partial report still enrolls.

use std::fs;
use std::path::{Path, PathBuf};

use ctpf_common::{Disk, Inventory, MacAddr, Uuid};

/// The server's bound on firmware strings (`HostReport::validate`).
pub const MAX_TEXT: usize = 128;
/// The server's bound on a disk's kernel name.
pub const MAX_DISK_NAME: usize = 64;
/// The server's bound on the number of disks.
pub const MAX_DISKS: usize = 64;

/// Kernel block devices that are not disks a machine could be installed on.
const NOT_DISKS: &[&str] = &["loop", "ram", "zram", "dm-", "sr"];

/// What vendors leave in SMBIOS fields they did not fill in; worse than nothing in a table.
const PLACEHOLDERS: &[&str] = &[
    "to be filled by o.e.m.",
    "default string",
    "not specified",
    "not applicable",
    "system serial number",
    "system product name",
    "system manufacturer",
    "chassis serial number",
    "o.e.m.",
    "oem",
    "none",
    "n/a",
    "0123456789",
];

/// Where sysfs and procfs are found: `/` on a machine, a fixture directory in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root(PathBuf);

impl Root {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// `rel` below the root; `rel` is written without a leading slash (`sys/class/net`).
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.0.join(rel)
    }

    /// The file's text, or `None` when it is missing or unreadable. Firmware strings need
    /// not be UTF-8, so invalid bytes become U+FFFD instead of losing the whole value.
    fn read(&self, rel: impl AsRef<Path>) -> Option<String> {
        fs::read(self.join(rel)).ok().map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Names of the entries of a directory, sorted so reports do not depend on readdir order.
    fn list(&self, rel: &str) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.join(rel)) else {
            return Vec::new();
        };
        let mut names: Vec<String> =
            entries.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
        names.sort();
        names
    }
}

impl Default for Root {
    fn default() -> Self {
        Self::new("/")
    }
}

/// The MACs of the physical NICs, in interface-name order. Skips `lo`, virtual interfaces
/// (no `device` link: bridges, bonds, veths, tunnels, whose MACs are not the machine's
/// identity), all-zero MACs and addresses that are not Ethernet (InfiniBand's are 20 bytes).
pub fn collect_macs(root: &Root) -> Vec<MacAddr> {
    let mut macs = Vec::new();
    for iface in root.list("sys/class/net") {
        let dir = format!("sys/class/net/{iface}");
        if iface == "lo" || fs::symlink_metadata(root.join(format!("{dir}/device"))).is_err() {
            continue;
        }
        let Some(text) = root.read(format!("{dir}/address")) else { continue };
        match text.trim().parse::<MacAddr>() {
            Ok(mac) if mac.octets() != [0; 6] && !macs.contains(&mac) => macs.push(mac),
            _ => {}
        }
    }
    macs
}

/// The SMBIOS system UUID. Boards without one report all zeros or all `F`s, which would make
/// every such machine the same host on the server, so those count as none.
pub fn smbios_uuid(root: &Root) -> Option<Uuid> {
    let text = root.read("sys/class/dmi/id/product_uuid")?;
    usable_uuid(text.trim().parse().ok()?)
}

/// `None` for the nil and the all-ones UUID, which identify no machine.
pub fn usable_uuid(uuid: Uuid) -> Option<Uuid> {
    let bytes = uuid.as_bytes();
    (bytes.iter().any(|&b| b != 0) && bytes.iter().any(|&b| b != 0xff)).then_some(uuid)
}

/// Serial, vendor, model, CPU, memory and disks.
pub fn collect_inventory(root: &Root) -> Inventory {
    let cpuinfo = root.read("proc/cpuinfo").unwrap_or_default();
    Inventory {
        serial: dmi_string(root, "product_serial"),
        vendor: dmi_string(root, "sys_vendor"),
        model: dmi_string(root, "product_name"),
        cpu_model: cpu_model(&cpuinfo),
        cpu_cores: cpu_count(&cpuinfo),
        memory_bytes: root.read("proc/meminfo").as_deref().and_then(memory_bytes),
        disks: collect_disks(root),
    }
}

/// A DMI field, cleaned, with vendors' placeholders treated as absent.
fn dmi_string(root: &Root, field: &str) -> Option<String> {
    let text = clean_text(&root.read(format!("sys/class/dmi/id/{field}"))?, MAX_TEXT)?;
    let lower = text.to_ascii_lowercase();
    (!PLACEHOLDERS.contains(&lower.as_str())).then_some(text)
}

/// Makes free text acceptable to the server: control characters dropped (tabs and newlines
/// become spaces), whitespace trimmed, at most `max` bytes (cut on a character boundary);
/// `None` when nothing is left.
pub fn clean_text(raw: &str, max: usize) -> Option<String> {
    let mut text: String = raw
        .chars()
        .filter_map(|c| match c {
            '\t' | '\n' | '\r' => Some(' '),
            c if c.is_control() => None,
            c => Some(c),
        })
        .collect();
    let trimmed_len = text.trim_end().len();
    text.truncate(trimmed_len);
    let start = text.len() - text.trim_start().len();
    text.drain(..start);
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        let trimmed_len = text.trim_end().len();
        text.truncate(trimmed_len);
    }
    (!text.is_empty()).then_some(text)
}

/// `key : value` pairs of `/proc/cpuinfo`.
fn cpuinfo_fields(cpuinfo: &str) -> impl Iterator<Item = (&str, &str)> {
    cpuinfo.lines().filter_map(|line| line.split_once(':')).map(|(k, v)| (k.trim(), v.trim()))
}

/// The CPU's name: x86 has `model name`; arm64 usually has only numeric implementer/part
/// ids, which still tell two machine types apart, so those are reported when no name is.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    let field = |key: &str| cpuinfo_fields(cpuinfo).find(|(k, _)| *k == key).map(|(_, v)| v);
    let text = match (field("model name"), field("CPU implementer"), field("CPU part")) {
        (Some(name), _, _) => name.to_owned(),
        (None, Some(implementer), Some(part)) => {
            format!("CPU implementer {implementer} part {part}")
        }
        (None, None, Some(part)) => format!("CPU part {part}"),
        _ => return None,
    };
    clean_text(&text, MAX_TEXT)
}

/// Logical CPUs: one `processor` entry each (arm64's old `Processor` banner line is not one).
fn cpu_count(cpuinfo: &str) -> Option<u32> {
    let count = cpuinfo_fields(cpuinfo).filter(|(k, _)| *k == "processor").count();
    u32::try_from(count).ok().filter(|&n| n > 0)
}

/// `MemTotal` from `/proc/meminfo` (given in KiB) in bytes.
fn memory_bytes(meminfo: &str) -> Option<u64> {
    let (_, value) = cpuinfo_fields(meminfo).find(|(k, _)| *k == "MemTotal")?;
    let kib: u64 = value.strip_suffix("kB").unwrap_or(value).trim().parse().ok()?;
    kib.checked_mul(1024).filter(|&b| b > 0)
}

/// Block devices that could hold an OS, with sizes (`size` counts 512-byte sectors whatever
/// the disk's own sector size). Empty devices (card readers, unconnected nbd) are skipped.
fn collect_disks(root: &Root) -> Vec<Disk> {
    root.list("sys/block")
        .into_iter()
        .filter(|name| !NOT_DISKS.iter().any(|prefix| name.starts_with(prefix)))
        .filter_map(|name| {
            let sectors: u64 = root.read(format!("sys/block/{name}/size"))?.trim().parse().ok()?;
            let size_bytes = sectors.checked_mul(512).filter(|&b| b > 0)?;
            let model = root
                .read(format!("sys/block/{name}/device/model"))
                .and_then(|m| clean_text(&m, MAX_TEXT));
            Some(Disk { name: clean_text(&name, MAX_DISK_NAME)?, size_bytes, model })
        })
        .take(MAX_DISKS)
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes `files` (path below the root, content) into a fresh temporary directory.
    pub(crate) fn fixture(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let path = dir.path().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, content).unwrap();
        }
        dir
    }

    const CPUINFO_X86: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
        model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz\nflags\t\t: fpu vme\n\n\
        processor\t: 1\nmodel name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz\n\n";
    const CPUINFO_ARM64: &str = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n\
        CPU part\t: 0xd0c\n\nprocessor\t: 1\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n\n\
        processor\t: 2\nCPU part\t: 0xd0c\n";
    const MEMINFO: &str = "MemTotal:       16318412 kB\nMemFree:         1234 kB\n";

    /// A machine with two real NICs, `lo`, a bridge, a zero-MAC NIC, placeholder DMI strings
    /// and disks that are not disks.
    pub(crate) fn machine() -> tempfile::TempDir {
        fixture(&[
            ("sys/class/net/lo/address", "00:00:00:00:00:00\n"),
            ("sys/class/net/eth0/address", "52:54:00:00:00:01\n"),
            ("sys/class/net/eth0/device/vendor", "0x8086\n"),
            ("sys/class/net/eth1/address", "52:54:00:00:00:02\n"),
            ("sys/class/net/eth1/device/vendor", "0x8086\n"),
            ("sys/class/net/br0/address", "52:54:00:00:00:99\n"),
            ("sys/class/net/eth2/address", "00:00:00:00:00:00\n"),
            ("sys/class/net/eth2/device/vendor", "0x8086\n"),
            ("sys/class/dmi/id/product_uuid", "4C4C4544-0035-3010-8052-B4C04F4B4D32\n"),
            ("sys/class/dmi/id/product_serial", "To be filled by O.E.M.\n"),
            ("sys/class/dmi/id/sys_vendor", "  Dell Inc.\n"),
            ("sys/class/dmi/id/product_name", "Default string\n"),
            ("proc/cpuinfo", CPUINFO_X86),
            ("proc/meminfo", MEMINFO),
            ("sys/block/sda/size", "1953525168\n"),
            ("sys/block/sda/device/model", "ST1000NM0033-9ZM\n"),
            ("sys/block/nvme0n1/size", "2000409264\n"),
            ("sys/block/loop0/size", "1024\n"),
            ("sys/block/sr0/size", "2097151\n"),
            ("sys/block/dm-0/size", "1024\n"),
            ("sys/block/sdb/size", "0\n"),
        ])
    }

    #[test]
    fn macs_of_physical_nics_only() {
        let dir = machine();
        let macs = collect_macs(&Root::new(dir.path()));
        let want: Vec<MacAddr> =
            ["52:54:00:00:00:01", "52:54:00:00:00:02"].iter().map(|m| m.parse().unwrap()).collect();
        assert_eq!(macs, want);
    }

    #[test]
    fn inventory_from_sysfs_and_procfs() {
        let dir = machine();
        let root = Root::new(dir.path());
        assert_eq!(smbios_uuid(&root).unwrap().to_string(), "4c4c4544-0035-3010-8052-b4c04f4b4d32");
        let inv = collect_inventory(&root);
        assert_eq!(inv.serial, None);
        assert_eq!(inv.vendor.as_deref(), Some("Dell Inc."));
        assert_eq!(inv.model, None);
        assert_eq!(inv.cpu_model.as_deref(), Some("Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz"));
        assert_eq!(inv.cpu_cores, Some(2));
        assert_eq!(inv.memory_bytes, Some(16_318_412 * 1024));
        let disks: Vec<_> =
            inv.disks.iter().map(|d| (d.name.as_str(), d.size_bytes, d.model.as_deref())).collect();
        assert_eq!(
            disks,
            [
                ("nvme0n1", 2_000_409_264 * 512, None),
                ("sda", 1_953_525_168 * 512, Some("ST1000NM0033-9ZM")),
            ]
        );
    }

    #[test]
    fn an_empty_root_is_an_empty_inventory() {
        let dir = fixture(&[]);
        let root = Root::new(dir.path());
        assert!(collect_macs(&root).is_empty());
        assert_eq!(smbios_uuid(&root), None);
        assert_eq!(collect_inventory(&root), Inventory::default());
    }

    #[test]
    fn placeholder_uuids_are_none() {
        for text in ["00000000-0000-0000-0000-000000000000", "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF"]
        {
            let dir = fixture(&[("sys/class/dmi/id/product_uuid", text)]);
            assert_eq!(smbios_uuid(&Root::new(dir.path())), None, "{text}");
        }
        let dir = fixture(&[("sys/class/dmi/id/product_uuid", "not a uuid")]);
        assert_eq!(smbios_uuid(&Root::new(dir.path())), None);
    }

    #[test]
    fn arm64_cpus_are_named_by_their_ids() {
        assert_eq!(cpu_model(CPUINFO_ARM64).as_deref(), Some("CPU implementer 0x41 part 0xd0c"));
        assert_eq!(cpu_count(CPUINFO_ARM64), Some(3));
        assert_eq!(cpu_model("processor : 0\n"), None);
        assert_eq!(cpu_count(""), None);
    }

    #[test]
    fn meminfo_without_memtotal_is_unknown() {
        assert_eq!(memory_bytes("MemFree: 12 kB\n"), None);
        assert_eq!(memory_bytes("MemTotal: lots kB\n"), None);
        assert_eq!(memory_bytes("MemTotal: 1 kB\n"), Some(1024));
    }

    #[test]
    fn text_is_cleaned_and_bounded() {
        assert_eq!(clean_text("  a\u{7}b\tc \n", 128).as_deref(), Some("ab c"));
        assert_eq!(clean_text(" \n\u{0} ", 128), None);
        assert_eq!(clean_text(&"x".repeat(300), 128).unwrap().len(), 128);
        // 'é' is two bytes: the cut never splits it.
        assert_eq!(clean_text(&"é".repeat(100), 127).unwrap().len(), 126);
    }
}
