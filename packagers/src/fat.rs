//! FAT12/16/32 file system images (EFI system partitions, Raspberry Pi boot partitions),
//! written in one pass like the ISO: the layout is planned, then metadata, directories and
//! file contents go out sequentially, each file in contiguous clusters.
//!
//! Written here because the published `fatfs` (0.3.6) gives every new directory long-name
//! entries for `.` and `..`, which `fsck.fat` rejects. A write-once image needs none of a
//! general file system's allocation logic, and planning it makes the output reproducible:
//! fixed volume id and label, one timestamp, names sorted, clusters assigned in order.
//!
//! Names: a name that is a valid 8.3 name once upper-cased is stored as that short name,
//! all-lower-case parts marked by the NT case flags (as Windows and Linux store them), so
//! readers of short names only (the Raspberry Pi boot ROM looking for `BOOTCODE.BIN`) find
//! it; mixed-case names add VFAT long-name entries. Any other name gets long-name entries
//! and a generated `BASENA~N.EXT` short name.

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    io::{self, Read, Write},
};

use crate::{iso9660::Source, output::Output};

const SECTOR: u64 = 512;
const ENTRY: usize = 32;
const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_ARCHIVE: u8 = 0x20;
const ATTR_LONG_NAME: u8 = 0x0F;
/// NT case flags (byte 12 of a short entry): the base name / extension reads lower-case.
const CASE_LOWER_BASE: u8 = 0x08;
const CASE_LOWER_EXT: u8 = 0x10;
/// FAT12/16 root directory entries (a fixed region of 32 sectors).
const ROOT_ENTRIES: u64 = 512;
/// FAT32: reserved sectors (boot sector, FSInfo, backup boot sector at 6).
const FAT32_RESERVED: u64 = 32;
/// Cluster counts decide the FAT type; stay clear of the boundaries some drivers miscount.
const FAT12_MAX_CLUSTERS: u64 = 4084 - 16;
const FAT16_MIN_CLUSTERS: u64 = 4085 + 16;
const FAT16_MAX_CLUSTERS: u64 = 65524 - 16;
const FAT32_MIN_CLUSTERS: u64 = 65525 + 16;
/// The largest FAT32 volume written (2 TiB of 512-byte sectors).
const MAX_SECTORS: u64 = u32::MAX as u64;

#[derive(Debug, thiserror::Error)]
pub enum FatError {
    #[error("invalid path {path:?} in the FAT image: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("{path} is both a file and a directory in the FAT image")]
    Conflict { path: String },
    #[error("the files need {needed} bytes but the FAT image is {size} bytes")]
    TooSmall { needed: u64, size: u64 },
    #[error("no FAT layout fits {size} bytes as {kind:?}")]
    NoLayout { size: u64, kind: FatKind },
    #[error("invalid volume label {0:?}: up to 11 characters of A-Z, 0-9, _ and -")]
    Label(String),
    #[error("{path} changed while the image was written ({expected} bytes planned)")]
    SourceChanged { path: String, expected: u64 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatKind {
    /// FAT12 or FAT16, whichever the size calls for (small ESPs inside ISOs).
    Auto,
    /// FAT32 (USB sticks, Raspberry Pi); at least [`MIN_FAT32_SIZE`] bytes.
    Fat32,
}

/// The smallest FAT32 image (65541 clusters of 512 bytes plus metadata).
pub const MIN_FAT32_SIZE: u64 = 34 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct FatSpec {
    pub label: String,
    pub volume_id: u32,
    /// Every file time (SOURCE_DATE_EPOCH), clamped to what FAT can store (1980-2107).
    pub timestamp: i64,
    pub kind: FatKind,
    /// Image size in bytes; `None` sizes it to the files with a little room to spare.
    pub size: Option<u64>,
    /// Sectors before this file system on its disk (the partition's start); recorded in the
    /// boot sector, where some boot loaders look for it.
    pub hidden_sectors: u32,
    pub files: BTreeMap<String, Source>,
}

/// Formats an image in memory and returns its bytes.
pub fn build(spec: &FatSpec) -> Result<Vec<u8>, FatError> {
    let plan = FatPlan::new(spec)?;
    let mut out = Vec::with_capacity(usize::try_from(plan.size()).unwrap_or(0));
    plan.write(&mut out)?;
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FatType {
    Fat12,
    Fat16,
    Fat32,
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    fat_type: FatType,
    total_sectors: u64,
    sectors_per_cluster: u64,
    reserved_sectors: u64,
    sectors_per_fat: u64,
    root_dir_sectors: u64,
    clusters: u64,
}

impl Geometry {
    /// The layout for `total_sectors`: the smallest cluster size that gives a valid cluster
    /// count for the wanted type.
    fn choose(total_sectors: u64, kind: FatKind) -> Option<Self> {
        for spc in [1u64, 2, 4, 8, 16, 32, 64] {
            let candidate = match kind {
                FatKind::Fat32 => Self::with(total_sectors, spc, FatType::Fat32),
                FatKind::Auto => Self::with(total_sectors, spc, FatType::Fat12)
                    .filter(|g| g.clusters <= FAT12_MAX_CLUSTERS)
                    .or_else(|| Self::with(total_sectors, spc, FatType::Fat16)),
            };
            let Some(g) = candidate else { continue };
            let valid = match g.fat_type {
                FatType::Fat12 => g.clusters >= 1 && g.clusters <= FAT12_MAX_CLUSTERS,
                FatType::Fat16 => (FAT16_MIN_CLUSTERS..=FAT16_MAX_CLUSTERS).contains(&g.clusters),
                FatType::Fat32 => g.clusters >= FAT32_MIN_CLUSTERS && g.clusters < 0x0FFF_FFF0,
            };
            // FAT32 prefers 4 KiB clusters once there are enough of them (fewer FAT sectors).
            if valid
                && (g.fat_type != FatType::Fat32
                    || spc >= 8
                    || !Self::fat32_fits(total_sectors, spc * 2))
            {
                return Some(g);
            }
        }
        None
    }

    fn fat32_fits(total_sectors: u64, spc: u64) -> bool {
        spc <= 8
            && Self::with(total_sectors, spc, FatType::Fat32)
                .is_some_and(|g| g.clusters >= FAT32_MIN_CLUSTERS)
    }

    fn with(total_sectors: u64, spc: u64, fat_type: FatType) -> Option<Self> {
        let (reserved, root_dir_sectors) = match fat_type {
            FatType::Fat32 => (FAT32_RESERVED, 0),
            _ => (1, ROOT_ENTRIES * ENTRY as u64 / SECTOR),
        };
        // The FAT's size depends on the cluster count and the other way round: iterate.
        let mut sectors_per_fat = 1u64;
        loop {
            let meta = reserved + root_dir_sectors + 2 * sectors_per_fat;
            let clusters = total_sectors.checked_sub(meta)? / spc;
            let fat_bytes = match fat_type {
                FatType::Fat12 => ((clusters + 2) * 3).div_ceil(2),
                FatType::Fat16 => (clusters + 2) * 2,
                FatType::Fat32 => (clusters + 2) * 4,
            };
            let needed = fat_bytes.div_ceil(SECTOR);
            if needed <= sectors_per_fat {
                return Some(Self {
                    fat_type,
                    total_sectors,
                    sectors_per_cluster: spc,
                    reserved_sectors: reserved,
                    sectors_per_fat,
                    root_dir_sectors,
                    clusters,
                });
            }
            sectors_per_fat = needed;
        }
    }

    fn cluster_bytes(&self) -> u64 {
        self.sectors_per_cluster * SECTOR
    }

    fn data_start(&self) -> u64 {
        (self.reserved_sectors + 2 * self.sectors_per_fat + self.root_dir_sectors) * SECTOR
    }
}

#[derive(Debug)]
struct Dir {
    /// Index of the parent in `FatPlan::dirs` (the root is its own parent).
    parent: usize,
    /// Children by name.
    children: BTreeMap<String, Node>,
    first_cluster: u32,
    clusters: u64,
}

#[derive(Debug, Clone, Copy)]
enum Node {
    Dir(usize),
    File(usize),
}

#[derive(Debug)]
struct FileEntry {
    path: String,
    source: Source,
    first_cluster: u32,
    clusters: u64,
}

/// Where everything goes; built by [`FatPlan::new`], written by [`FatPlan::write`].
#[derive(Debug)]
pub struct FatPlan {
    geometry: Geometry,
    label: [u8; 11],
    volume_id: u32,
    hidden_sectors: u32,
    date: (u16, u16),
    /// Breadth-first; index 0 is the root.
    dirs: Vec<Dir>,
    files: Vec<FileEntry>,
    /// Short names per directory, assigned once.
    short_names: Vec<BTreeMap<String, [u8; 11]>>,
    used_clusters: u64,
}

impl FatPlan {
    pub fn new(spec: &FatSpec) -> Result<Self, FatError> {
        let label = volume_label(&spec.label)?;
        let (mut dirs, mut files) = tree(&spec.files)?;
        let short_names: Vec<_> = dirs.iter().map(|d| assign_short_names(&d.children)).collect();

        let payload: u64 = files.iter().map(|f| f.source.len()).sum();
        let entries: u64 = dirs.iter().map(|d| d.children.len() as u64 * 8 + 2).sum();
        let needed = payload + entries * ENTRY as u64 + files.len() as u64 * 4096;
        let size = match spec.size {
            Some(size) => size,
            None => {
                let minimum =
                    if spec.kind == FatKind::Fat32 { MIN_FAT32_SIZE } else { 1024 * 1024 };
                // Room for cluster slack and the FATs.
                (needed + needed / 32 + 256 * 1024).max(minimum).div_ceil(SECTOR * 64) * SECTOR * 64
            }
        };
        let total_sectors = (size / SECTOR).min(MAX_SECTORS);
        let geometry = Geometry::choose(total_sectors, spec.kind)
            .ok_or(FatError::NoLayout { size, kind: spec.kind })?;

        // Clusters in order: FAT32's root first (at 2), directories breadth-first, files.
        let cluster_bytes = geometry.cluster_bytes();
        let mut next = 2u64;
        for (index, dir) in dirs.iter_mut().enumerate() {
            let is_fixed_root = index == 0 && geometry.fat_type != FatType::Fat32;
            let mut count = 2 + dir_entry_count(&dir.children, &short_names[index]);
            if index == 0 {
                count = count - 2 + 1; // no dot entries in the root; the volume label instead
            }
            if is_fixed_root {
                if count > ROOT_ENTRIES {
                    return Err(FatError::InvalidPath {
                        path: "/".into(),
                        reason: "too many entries in the root directory (512 on FAT12/16)",
                    });
                }
                continue;
            }
            dir.clusters = (count * ENTRY as u64).div_ceil(cluster_bytes).max(1);
            dir.first_cluster = cluster_number(next)?;
            next += dir.clusters;
        }
        for file in &mut files {
            if file.source.len() > u64::from(u32::MAX) {
                return Err(FatError::InvalidPath {
                    path: file.path.clone(),
                    reason: "larger than 4 GiB - 1",
                });
            }
            file.clusters = file.source.len().div_ceil(cluster_bytes);
            if file.clusters > 0 {
                file.first_cluster = cluster_number(next)?;
                next += file.clusters;
            }
        }
        let used_clusters = next - 2;
        if used_clusters > geometry.clusters {
            return Err(FatError::TooSmall {
                needed: geometry.data_start() + used_clusters * cluster_bytes,
                size,
            });
        }
        Ok(Self {
            geometry,
            label,
            volume_id: spec.volume_id,
            hidden_sectors: spec.hidden_sectors,
            date: dos_date_time(spec.timestamp),
            dirs,
            files,
            short_names,
            used_clusters,
        })
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.geometry.total_sectors * SECTOR
    }

    /// Sectors before the file system on its disk, as recorded in the boot sector.
    pub fn hidden_sectors(&self) -> u32 {
        self.hidden_sectors
    }

    /// Writes the image to `out` in one pass; returns the bytes written ([`FatPlan::size`]).
    pub fn write<W: Write>(&self, out: &mut W) -> Result<u64, FatError> {
        let g = &self.geometry;
        let mut w = Output::new(out);
        // Reserved region.
        let boot = self.boot_sector();
        w.write_all(&boot)?;
        if g.fat_type == FatType::Fat32 {
            w.write_all(&self.fs_info())?;
            w.zeros(4 * SECTOR)?;
            w.write_all(&boot)?; // backup boot sector at 6
            w.write_all(&self.fs_info())?;
            w.zeros((g.reserved_sectors - 8) * SECTOR)?;
        } else {
            w.zeros((g.reserved_sectors - 1) * SECTOR)?;
        }
        // Two identical FATs.
        let fat = self.fat();
        for _ in 0..2 {
            w.write_all(&fat)?;
        }
        // FAT12/16's fixed root directory.
        if g.fat_type != FatType::Fat32 {
            let mut root = self.directory(0);
            root.resize((g.root_dir_sectors * SECTOR) as usize, 0);
            w.write_all(&root)?;
        }
        // Data: directories, then files, each padded to whole clusters.
        let cluster_bytes = g.cluster_bytes();
        for index in 0..self.dirs.len() {
            if self.dirs[index].clusters == 0 {
                continue;
            }
            let mut bytes = self.directory(index);
            bytes.resize((self.dirs[index].clusters * cluster_bytes) as usize, 0);
            w.write_all(&bytes)?;
        }
        for file in &self.files {
            let len = file.source.len();
            let copied = match &file.source {
                Source::Bytes(bytes) => {
                    w.write_all(bytes)?;
                    len
                }
                Source::File { path, .. } => w.copy_from(&mut File::open(path)?.take(len))?,
            };
            if copied != len {
                return Err(FatError::SourceChanged { path: file.path.clone(), expected: len });
            }
            w.zeros(file.clusters * cluster_bytes - len)?;
        }
        w.zeros_to(self.size())?;
        w.flush()?;
        Ok(w.written)
    }

    fn boot_sector(&self) -> Vec<u8> {
        let g = &self.geometry;
        let mut b = vec![0u8; SECTOR as usize];
        let fat32 = g.fat_type == FatType::Fat32;
        b[0..3].copy_from_slice(if fat32 { &[0xEB, 0x58, 0x90] } else { &[0xEB, 0x3C, 0x90] });
        b[3..11].copy_from_slice(b"CTPF    ");
        b[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
        b[13] = g.sectors_per_cluster as u8;
        b[14..16].copy_from_slice(&(g.reserved_sectors as u16).to_le_bytes());
        b[16] = 2;
        let root_entries = if fat32 { 0 } else { ROOT_ENTRIES as u16 };
        b[17..19].copy_from_slice(&root_entries.to_le_bytes());
        match u16::try_from(g.total_sectors) {
            Ok(small) if !fat32 => b[19..21].copy_from_slice(&small.to_le_bytes()),
            _ => b[32..36].copy_from_slice(&(g.total_sectors as u32).to_le_bytes()),
        }
        b[21] = 0xF8; // fixed disk
        if !fat32 {
            b[22..24].copy_from_slice(&(g.sectors_per_fat as u16).to_le_bytes());
        }
        b[24..26].copy_from_slice(&32u16.to_le_bytes()); // sectors per track
        b[26..28].copy_from_slice(&64u16.to_le_bytes()); // heads
        b[28..32].copy_from_slice(&self.hidden_sectors.to_le_bytes());
        let ebpb = if fat32 {
            b[36..40].copy_from_slice(&(g.sectors_per_fat as u32).to_le_bytes());
            b[44..48].copy_from_slice(&2u32.to_le_bytes()); // root directory cluster
            b[48..50].copy_from_slice(&1u16.to_le_bytes()); // FSInfo sector
            b[50..52].copy_from_slice(&6u16.to_le_bytes()); // backup boot sector
            64
        } else {
            36
        };
        b[ebpb] = 0x80; // drive number
        b[ebpb + 2] = 0x29; // extended boot signature: the next three fields are valid
        b[ebpb + 3..ebpb + 7].copy_from_slice(&self.volume_id.to_le_bytes());
        b[ebpb + 7..ebpb + 18].copy_from_slice(&self.label);
        let name: &[u8; 8] = match g.fat_type {
            FatType::Fat12 => b"FAT12   ",
            FatType::Fat16 => b"FAT16   ",
            FatType::Fat32 => b"FAT32   ",
        };
        b[ebpb + 18..ebpb + 26].copy_from_slice(name);
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    fn fs_info(&self) -> Vec<u8> {
        let mut s = vec![0u8; SECTOR as usize];
        s[0..4].copy_from_slice(&0x4161_5252u32.to_le_bytes());
        s[484..488].copy_from_slice(&0x6141_7272u32.to_le_bytes());
        let free = self.geometry.clusters - self.used_clusters;
        s[488..492].copy_from_slice(&(free as u32).to_le_bytes());
        s[492..496].copy_from_slice(&((self.used_clusters + 2) as u32).to_le_bytes());
        s[508..512].copy_from_slice(&0xAA55_0000u32.to_le_bytes());
        s
    }

    /// One FAT: the two reserved entries, then each chain of contiguous clusters.
    fn fat(&self) -> Vec<u8> {
        let g = &self.geometry;
        let mut entries = vec![0u32; (g.clusters + 2) as usize];
        let eoc = match g.fat_type {
            FatType::Fat12 => 0x0FFF,
            FatType::Fat16 => 0xFFFF,
            FatType::Fat32 => 0x0FFF_FFFF,
        };
        entries[0] = (eoc & !0xFF) | 0xF8;
        entries[1] = eoc;
        let chains = self
            .dirs
            .iter()
            .map(|d| (d.first_cluster, d.clusters))
            .chain(self.files.iter().map(|f| (f.first_cluster, f.clusters)));
        for (first, count) in chains.filter(|(_, n)| *n > 0) {
            let first = first as usize;
            for i in 0..count as usize {
                let last = i + 1 == count as usize;
                entries[first + i] = if last { eoc } else { (first + i + 1) as u32 };
            }
        }
        let mut bytes = match g.fat_type {
            FatType::Fat12 => {
                let mut b = vec![0u8; (entries.len() * 3).div_ceil(2)];
                for (i, e) in entries.iter().enumerate() {
                    let at = i * 3 / 2;
                    if i % 2 == 0 {
                        b[at] = (e & 0xFF) as u8;
                        b[at + 1] = (b[at + 1] & 0xF0) | ((e >> 8) & 0x0F) as u8;
                    } else {
                        b[at] = (b[at] & 0x0F) | ((e << 4) & 0xF0) as u8;
                        b[at + 1] = (e >> 4) as u8;
                    }
                }
                b
            }
            FatType::Fat16 => entries.iter().flat_map(|e| (*e as u16).to_le_bytes()).collect(),
            FatType::Fat32 => entries.iter().flat_map(|e| e.to_le_bytes()).collect(),
        };
        bytes.resize((g.sectors_per_fat * SECTOR) as usize, 0);
        bytes
    }

    /// The entries of directory `index`.
    fn directory(&self, index: usize) -> Vec<u8> {
        let dir = &self.dirs[index];
        let (date, time) = self.date;
        let mut out = Vec::new();
        if index == 0 {
            out.extend_from_slice(&short_entry(&self.label, ATTR_VOLUME_ID, 0, 0, date, time));
        } else {
            let parent = if dir.parent == 0 { 0 } else { self.dirs[dir.parent].first_cluster };
            let dot = *b".          ";
            let dotdot = *b"..         ";
            out.extend_from_slice(&short_entry(
                &dot,
                ATTR_DIRECTORY,
                dir.first_cluster,
                0,
                date,
                time,
            ));
            out.extend_from_slice(&short_entry(&dotdot, ATTR_DIRECTORY, parent, 0, date, time));
        }
        for (name, node) in &dir.children {
            let short = self.short_names[index][name];
            let case = case_flags(name, &short);
            if case.is_none() {
                out.extend_from_slice(&long_name_entries(name, &short));
            }
            let mut entry = match *node {
                Node::Dir(d) => {
                    short_entry(&short, ATTR_DIRECTORY, self.dirs[d].first_cluster, 0, date, time)
                }
                Node::File(f) => {
                    let file = &self.files[f];
                    let size = file.source.len() as u32;
                    short_entry(&short, ATTR_ARCHIVE, file.first_cluster, size, date, time)
                }
            };
            entry[12] = case.unwrap_or(0);
            out.extend_from_slice(&entry);
        }
        out
    }
}

fn cluster_number(n: u64) -> Result<u32, FatError> {
    u32::try_from(n).map_err(|_| FatError::NoLayout { size: n, kind: FatKind::Fat32 })
}

/// Directory entries a directory's children take: one short entry each, plus long-name
/// entries (13 characters each) where needed.
fn dir_entry_count(children: &BTreeMap<String, Node>, short: &BTreeMap<String, [u8; 11]>) -> u64 {
    children
        .keys()
        .map(|name| {
            let long = if needs_long_name(name, &short[name]) {
                name.encode_utf16().count().div_ceil(13) as u64
            } else {
                0
            };
            1 + long
        })
        .sum()
}

fn short_entry(
    name: &[u8; 11],
    attr: u8,
    cluster: u32,
    size: u32,
    date: u16,
    time: u16,
) -> [u8; ENTRY] {
    let mut e = [0u8; ENTRY];
    e[0..11].copy_from_slice(name);
    e[11] = attr;
    e[14..16].copy_from_slice(&time.to_le_bytes()); // created
    e[16..18].copy_from_slice(&date.to_le_bytes());
    e[18..20].copy_from_slice(&date.to_le_bytes()); // accessed
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[22..24].copy_from_slice(&time.to_le_bytes()); // written
    e[24..26].copy_from_slice(&date.to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// VFAT long-name entries for `name`, last part first, as they precede the short entry.
fn long_name_entries(name: &str, short: &[u8; 11]) -> Vec<u8> {
    let checksum = short.iter().fold(0u8, |sum, b| sum.rotate_right(1).wrapping_add(*b));
    let mut units: Vec<u16> = name.encode_utf16().collect();
    let parts = units.len().div_ceil(13);
    if !units.len().is_multiple_of(13) {
        units.push(0);
        units.resize(parts * 13, 0xFFFF);
    }
    let mut out = Vec::with_capacity(parts * ENTRY);
    for part in (0..parts).rev() {
        let chars = &units[part * 13..part * 13 + 13];
        let mut e = [0u8; ENTRY];
        e[0] = (part + 1) as u8 | if part + 1 == parts { 0x40 } else { 0 };
        e[11] = ATTR_LONG_NAME;
        e[13] = checksum;
        let slots = (1..11).step_by(2).chain((14..26).step_by(2)).chain((28..32).step_by(2));
        for (slot, c) in slots.zip(chars) {
            e[slot..slot + 2].copy_from_slice(&c.to_le_bytes());
        }
        out.extend_from_slice(&e);
    }
    out
}

/// Whether `name` needs long-name entries: it does unless its short name and case flags
/// ([`case_flags`]) spell it.
fn needs_long_name(name: &str, short: &[u8; 11]) -> bool {
    case_flags(name, short).is_none()
}

/// The NT case flags under which `short` reads back as `name` (0 for an upper-case 8.3
/// name, [`CASE_LOWER_BASE`]/[`CASE_LOWER_EXT`] for all-lower-case parts), or `None` when no
/// flags do: another short name, or a part of mixed case.
fn case_flags(name: &str, short: &[u8; 11]) -> Option<u8> {
    if short_form(&name.to_ascii_uppercase()).as_ref() != Some(short) {
        return None;
    }
    let (base, ext) = name.split_once('.').unwrap_or((name, ""));
    let flag = |part: &str, lower: u8| match (
        part.bytes().any(|b| b.is_ascii_lowercase()),
        part.bytes().any(|b| b.is_ascii_uppercase()),
    ) {
        (true, true) => None,
        (true, false) => Some(lower),
        (false, _) => Some(0),
    };
    Some(flag(base, CASE_LOWER_BASE)? | flag(ext, CASE_LOWER_EXT)?)
}

/// The 11-byte form of a name that is already a valid upper-case 8.3 name.
fn short_form(name: &str) -> Option<[u8; 11]> {
    let (base, ext) = name.split_once('.').unwrap_or((name, ""));
    let valid = |s: &str, max: usize| {
        s.len() <= max
            && s.bytes().all(|b| {
                b.is_ascii_uppercase() || b.is_ascii_digit() || b"_-~!#$%&'(){}^@`".contains(&b)
            })
    };
    if base.is_empty() || !valid(base, 8) || !valid(ext, 3) || ext.contains('.') {
        return None;
    }
    let mut out = [b' '; 11];
    out[..base.len()].copy_from_slice(base.as_bytes());
    out[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
    Some(out)
}

/// Short names for one directory's children: valid 8.3 names as they are, then names that
/// are 8.3 once upper-cased as that (first come in name order), the others `BASENA~N.EXT`
/// (numbered in name order, unique in the directory).
fn assign_short_names(children: &BTreeMap<String, Node>) -> BTreeMap<String, [u8; 11]> {
    let mut taken: HashSet<[u8; 11]> =
        children.keys().filter_map(|name| short_form(name)).collect();
    children
        .keys()
        .map(|name| {
            if let Some(short) = short_form(name) {
                return (name.clone(), short);
            }
            if let Some(upper) = short_form(&name.to_ascii_uppercase())
                && taken.insert(upper)
            {
                return (name.clone(), upper);
            }
            let clean =
                |s: &str| -> Vec<u8> {
                    s.chars()
                        .filter(|c| *c != ' ' && *c != '.')
                        .map(|c| c.to_ascii_uppercase())
                        .map(|c| {
                            if c.is_ascii_uppercase() || c.is_ascii_digit() {
                                c as u8
                            } else {
                                b'_'
                            }
                        })
                        .collect()
                };
            let (base, ext) = match name.rsplit_once('.') {
                Some((base, ext)) if !base.trim_start_matches('.').is_empty() => {
                    (clean(base), clean(ext))
                }
                _ => (clean(name), Vec::new()),
            };
            let base = if base.is_empty() { b"_".to_vec() } else { base };
            let mut short = [b' '; 11];
            for n in 1u32.. {
                let suffix = format!("~{n}");
                let keep = base.len().min(8 - suffix.len());
                short = [b' '; 11];
                short[..keep].copy_from_slice(&base[..keep]);
                short[keep..keep + suffix.len()].copy_from_slice(suffix.as_bytes());
                let ext_len = ext.len().min(3);
                short[8..8 + ext_len].copy_from_slice(&ext[..ext_len]);
                if taken.insert(short) {
                    break;
                }
            }
            (name.clone(), short)
        })
        .collect()
}

/// The directories (breadth-first, root first) and files (in directory order) of `files`.
fn tree(files: &BTreeMap<String, Source>) -> Result<(Vec<Dir>, Vec<FileEntry>), FatError> {
    let root = Dir { parent: 0, children: BTreeMap::new(), first_cluster: 0, clusters: 0 };
    let mut dirs = vec![root];
    let mut entries = Vec::new();
    for (path, source) in files {
        let parts = check_path(path)?;
        let mut at = 0usize;
        for (depth, part) in parts.iter().enumerate() {
            let last = depth + 1 == parts.len();
            match (dirs[at].children.get(*part).copied(), last) {
                (None, true) => {
                    dirs[at].children.insert((*part).to_owned(), Node::File(entries.len()));
                    entries.push(FileEntry {
                        path: parts.join("/"),
                        source: source.clone(),
                        first_cluster: 0,
                        clusters: 0,
                    });
                }
                (None, false) => {
                    let index = dirs.len();
                    dirs.push(Dir {
                        parent: at,
                        children: BTreeMap::new(),
                        first_cluster: 0,
                        clusters: 0,
                    });
                    dirs[at].children.insert((*part).to_owned(), Node::Dir(index));
                    at = index;
                }
                (Some(Node::Dir(index)), false) => at = index,
                _ => return Err(FatError::Conflict { path: parts[..=depth].join("/") }),
            }
        }
    }
    // Renumber breadth-first and files in that order, so clusters follow the tree.
    let mut order = vec![0usize];
    let mut i = 0;
    while i < order.len() {
        for node in dirs[order[i]].children.values() {
            if let Node::Dir(d) = node {
                order.push(*d);
            }
        }
        i += 1;
    }
    let mut new_index = vec![0usize; dirs.len()];
    for (new, old) in order.iter().enumerate() {
        new_index[*old] = new;
    }
    let mut file_order = Vec::new();
    for old in &order {
        for node in dirs[*old].children.values() {
            if let Node::File(f) = node {
                file_order.push(*f);
            }
        }
    }
    let mut new_file = vec![0usize; entries.len()];
    for (new, old) in file_order.iter().enumerate() {
        new_file[*old] = new;
    }
    let mut old_dirs: Vec<Option<Dir>> = dirs.into_iter().map(Some).collect();
    let mut sorted_dirs = Vec::with_capacity(old_dirs.len());
    for old in &order {
        let Some(mut dir) = old_dirs[*old].take() else { continue };
        dir.parent = new_index[dir.parent];
        for node in dir.children.values_mut() {
            *node = match *node {
                Node::Dir(d) => Node::Dir(new_index[d]),
                Node::File(f) => Node::File(new_file[f]),
            };
        }
        sorted_dirs.push(dir);
    }
    let mut old_files: Vec<Option<FileEntry>> = entries.into_iter().map(Some).collect();
    let sorted_files = file_order.iter().filter_map(|old| old_files[*old].take()).collect();
    Ok((sorted_dirs, sorted_files))
}

fn check_path(path: &str) -> Result<Vec<&str>, FatError> {
    let invalid = |reason| FatError::InvalidPath { path: path.to_owned(), reason };
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty() {
        return Err(invalid("empty"));
    }
    let parts: Vec<&str> = trimmed.split('/').collect();
    for part in &parts {
        if part.is_empty() || *part == "." || *part == ".." {
            return Err(invalid("empty, . or .. component"));
        }
        if part.encode_utf16().count() > 255 {
            return Err(invalid("a name is longer than 255 characters"));
        }
        if part.chars().any(|c| c.is_control() || "\"*:<>?\\|".contains(c)) {
            return Err(invalid("a character FAT cannot store"));
        }
        if part.ends_with('.') || part.ends_with(' ') {
            return Err(invalid("a name ends with a dot or space"));
        }
    }
    Ok(parts)
}

fn volume_label(label: &str) -> Result<[u8; 11], FatError> {
    let ok = !label.is_empty()
        && label.len() <= 11
        && label
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b"_-".contains(&b));
    if !ok {
        return Err(FatError::Label(label.to_owned()));
    }
    let mut out = [b' '; 11];
    out[..label.len()].copy_from_slice(label.as_bytes());
    Ok(out)
}

/// DOS date and time of a Unix timestamp, clamped to FAT's 1980-2107 (seconds in steps of 2).
fn dos_date_time(timestamp: i64) -> (u16, u16) {
    let t = time::OffsetDateTime::from_unix_timestamp(timestamp.clamp(315_532_800, 4_354_819_199))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let date =
        ((t.year() - 1980) as u16) << 9 | u16::from(u8::from(t.month())) << 5 | u16::from(t.day());
    let time = u16::from(t.hour()) << 11 | u16::from(t.minute()) << 5 | u16::from(t.second() / 2);
    (date, time)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(files: &[(&str, &[u8])]) -> FatSpec {
        FatSpec {
            label: "CTPF_ESP".into(),
            volume_id: 0x1234_5678,
            timestamp: 1_700_000_000,
            kind: FatKind::Auto,
            size: None,
            hidden_sectors: 0,
            files: files
                .iter()
                .map(|(p, b)| ((*p).to_owned(), Source::Bytes(b.to_vec())))
                .collect(),
        }
    }

    #[test]
    fn short_names_are_kept_or_generated_uniquely() {
        let names = [
            "BOOTX64.EFI",
            "grub.cfg",
            "bootcode.bin",
            "vmlinuz",
            "Mixed.txt",
            "bcm2711-rpi-4-b.dtb",
            "bcm2711-rpi-400.dtb",
            "CONFIG.TXT",
            "config.txt",
            "README",
        ];
        let children: BTreeMap<String, Node> =
            names.iter().map(|n| ((*n).to_owned(), Node::File(0))).collect();
        let short = assign_short_names(&children);
        let text = |n: &str| String::from_utf8(short[n].to_vec()).unwrap();
        assert_eq!(text("BOOTX64.EFI"), "BOOTX64 EFI");
        assert_eq!(text("README"), "README     ");
        assert_eq!(text("bcm2711-rpi-4-b.dtb"), "BCM271~1DTB");
        assert_eq!(text("bcm2711-rpi-400.dtb"), "BCM271~2DTB");
        // Lower-case 8.3 names keep their plain short names, as short-name readers look them up.
        assert_eq!(text("grub.cfg"), "GRUB    CFG");
        assert_eq!(text("bootcode.bin"), "BOOTCODEBIN");
        assert_eq!(text("vmlinuz"), "VMLINUZ    ");
        assert_eq!(text("Mixed.txt"), "MIXED   TXT");
        assert_eq!(text("CONFIG.TXT"), "CONFIG  TXT");
        assert_eq!(text("config.txt"), "CONFIG~1TXT", "its plain short name is taken");
        let flags = |n: &str| case_flags(n, &short[n]);
        assert_eq!(flags("BOOTX64.EFI"), Some(0));
        assert_eq!(flags("grub.cfg"), Some(CASE_LOWER_BASE | CASE_LOWER_EXT));
        assert_eq!(flags("vmlinuz"), Some(CASE_LOWER_BASE));
        for long in ["Mixed.txt", "config.txt", "bcm2711-rpi-4-b.dtb"] {
            assert!(needs_long_name(long, &short[long]), "{long}");
        }
    }

    #[test]
    fn long_names_split_into_13_character_parts() {
        let short = *b"BCM271~1DTB";
        let entries = long_name_entries("bcm2711-rpi-4-b.dtb", &short);
        assert_eq!(entries.len(), 2 * ENTRY);
        assert_eq!(entries[0], 0x42, "last part first, flagged");
        assert_eq!(entries[ENTRY], 0x01);
        assert_eq!(entries[11], ATTR_LONG_NAME);
    }

    #[test]
    fn geometry_picks_the_type_by_cluster_count() {
        let small = Geometry::choose(2048, FatKind::Auto).unwrap();
        assert_eq!(small.fat_type, FatType::Fat12);
        let mid = Geometry::choose(64 * 2048, FatKind::Auto).unwrap();
        assert_eq!(mid.fat_type, FatType::Fat16);
        let big = Geometry::choose(1024 * 2048, FatKind::Fat32).unwrap();
        assert_eq!((big.fat_type, big.sectors_per_cluster), (FatType::Fat32, 8));
        assert!(Geometry::choose(8 * 2048, FatKind::Fat32).is_none(), "too small for FAT32");
    }

    #[test]
    fn two_builds_are_identical_and_bad_input_is_refused() {
        let files: &[(&str, &[u8])] =
            &[("EFI/BOOT/BOOTX64.EFI", b"MZ x64"), ("ctpf/grub.cfg", b"x\n")];
        assert_eq!(build(&spec(files)).unwrap(), build(&spec(files)).unwrap());
        let mut s = spec(&[("a", b"x")]);
        s.label = "lower".into();
        assert!(matches!(build(&s), Err(FatError::Label(_))));
        assert!(matches!(build(&spec(&[("a/../b", b"x")])), Err(FatError::InvalidPath { .. })));
        assert!(matches!(build(&spec(&[("a:b", b"x")])), Err(FatError::InvalidPath { .. })));
        assert!(matches!(
            build(&spec(&[("a", b"x"), ("a/b", b"y")])),
            Err(FatError::Conflict { .. })
        ));
        let mut s = spec(&[("big", &[0u8; 4 * 1024 * 1024])]);
        s.size = Some(1024 * 1024);
        assert!(matches!(build(&s), Err(FatError::TooSmall { .. })));
    }

    #[test]
    fn fat_times_are_clamped_to_the_fat_range() {
        assert_eq!(dos_date_time(0), (1 << 5 | 1, 0));
        let (date, time) = dos_date_time(1_700_000_001);
        assert_eq!(date >> 9, 2023 - 1980);
        assert_eq!(time & 0x1F, 20 / 2, "22:13:20 keeps its even second");
    }
}
