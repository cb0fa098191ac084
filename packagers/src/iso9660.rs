//! ISO 9660 images with Rock Ridge names, El Torito boot entries for BIOS and UEFI, and an
//! isohybrid MBR, so the same file boots as a CD and as a USB disk.
//!
//! The layout is planned first ([`IsoPlan`]: every directory, file and table gets its sector),
//! then written in one sequential pass; file contents are streamed (copied with
//! `copy_file_range` where the kernel can). Every byte is a function of the inputs: names are
//! sorted, dates come from one timestamp, and identifiers and serials are fixed.
//!
//! What it writes, by sector (2048 bytes):
//! - 0-15: system area; with a hybrid MBR, its first 512 bytes are the MBR (isohdpfx code,
//!   the BIOS boot image's address for it, a partition table whose entry 2 is the EFI image);
//! - 16: primary volume descriptor; 17: El Torito boot record (when booting); then the set
//!   terminator;
//! - the path tables (little- then big-endian), the directories, the boot catalog, the files;
//! - zero padding to a whole MiB for hybrid images (the cylinder size of isohybrid's geometry).
//!
//! Names: each file has its ISO 9660 level 1 identifier (8.3, upper case, unique in its
//! directory) and its real name in a Rock Ridge `NM` entry, with `PX` modes (read-only).

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, Read, Write},
    path::PathBuf,
};

use crate::output::Output;

/// Bytes per logical sector.
pub const SECTOR: u64 = 2048;
/// Longest name a file or directory may have (its Rock Ridge entry must fit in its record).
pub const MAX_NAME_LEN: usize = 128;
/// ISO 9660 allows 8 directory levels (the root counts as one).
pub const MAX_DEPTH: usize = 7;
/// Hybrid images are padded to this (64 heads x 32 sectors x 512 bytes).
const HYBRID_ALIGN: u64 = 1024 * 1024;
/// The isohybrid MBR code occupies the first 432 bytes of sector 0.
pub const HYBRID_MBR_CODE_LEN: usize = 432;

const SYSTEM_AREA_SECTORS: u64 = 16;
const RRIP_ID: &[u8] = b"RRIP_1991A";
const RRIP_DESCRIPTOR: &[u8] =
    b"THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS";
const MODE_DIR: u32 = 0o040_555;
const MODE_FILE: u32 = 0o100_444;

#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    #[error("invalid path {path:?} in the image: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("{path} is both a file and a directory in the image")]
    Conflict { path: String },
    #[error("{path} is {size} bytes; ISO 9660 files are limited to 4 GiB - 1 (one extent)")]
    TooLarge { path: String, size: u64 },
    #[error("the image is too large for ISO 9660 ({sectors} sectors)")]
    ImageTooLarge { sectors: u64 },
    #[error("invalid volume id {0:?}: 1 to 32 characters of A-Z, 0-9 and _")]
    VolumeId(String),
    #[error("boot image {path} is not a file in the image")]
    MissingBootImage { path: String },
    #[error("{what} {path} changed while the image was written ({expected} bytes planned)")]
    SourceChanged { what: &'static str, path: String, expected: u64 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Where a file's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    Bytes(Vec<u8>),
    /// A file on disk, read when the image is written; `len` is its size when planned.
    File {
        path: PathBuf,
        len: u64,
    },
}

impl Source {
    pub fn file(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        let len = std::fs::metadata(&path)?.len();
        Ok(Source::File { path, len })
    }

    pub fn len(&self) -> u64 {
        match self {
            Source::Bytes(b) => b.len() as u64,
            Source::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole content, read now.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        match self {
            Source::Bytes(b) => Ok(b.clone()),
            Source::File { path, .. } => std::fs::read(path),
        }
    }
}

/// The BIOS El Torito entry: a no-emulation boot image (isolinux.bin or GRUB's
/// `eltorito.img`) that the firmware loads at 0x7C00.
#[derive(Debug, Clone)]
pub struct BiosBoot {
    /// Its path in the image, e.g. `isolinux/isolinux.bin`.
    pub image: String,
    /// Patch the El Torito boot information table into the image (isolinux and GRUB need it
    /// to find themselves on the medium).
    pub boot_info_table: bool,
    /// 512-byte sectors the firmware loads (4, one CD sector, for isolinux and GRUB).
    pub load_sectors: u16,
}

/// What goes into an image.
#[derive(Debug, Clone)]
pub struct IsoSpec {
    /// Up to 32 characters of A-Z, 0-9, `_` (what `blkid` shows as the label).
    pub volume_id: String,
    /// Every date in the image (SOURCE_DATE_EPOCH); before 1970 counts as 1970.
    pub timestamp: i64,
    /// Paths (`/`-separated, relative) and their contents.
    pub files: BTreeMap<String, Source>,
    pub bios_boot: Option<BiosBoot>,
    /// Path of a FAT image (an EFI system partition with `EFI/BOOT/BOOT*.EFI`) to boot
    /// under UEFI; also partition 2 of the hybrid MBR.
    pub efi_boot: Option<String>,
    /// isohdpfx code (the first 432 bytes of syslinux's `isohdpfx.bin`) to make the image
    /// boot as a USB disk under BIOS; needs `bios_boot`.
    pub hybrid_mbr: Option<Vec<u8>>,
    /// The MBR disk signature of hybrid images.
    pub disk_signature: u32,
}

#[derive(Debug)]
struct Dir {
    /// Index of the parent in `IsoPlan::dirs` (the root is its own parent).
    parent: usize,
    /// Rock Ridge name ("" for the root).
    name: String,
    /// ISO 9660 identifier.
    identifier: Vec<u8>,
    depth: usize,
    /// Children in identifier order.
    entries: Vec<Entry>,
    lba: u32,
    sectors: u32,
}

#[derive(Debug, Clone)]
enum Entry {
    Dir(usize),
    File(usize),
}

#[derive(Debug)]
struct FileEntry {
    path: String,
    name: String,
    identifier: Vec<u8>,
    source: Source,
    lba: u32,
}

/// Where everything goes; built by [`IsoPlan::new`], written by [`IsoPlan::write`].
#[derive(Debug)]
pub struct IsoPlan {
    spec: IsoSpecHeader,
    /// Breadth-first, in path table order; index 0 is the root.
    dirs: Vec<Dir>,
    files: Vec<FileEntry>,
    path_table_len: u32,
    l_path_table_lba: u32,
    m_path_table_lba: u32,
    catalog_lba: Option<u32>,
    bios_file: Option<usize>,
    efi_file: Option<usize>,
    total_sectors: u64,
}

/// The parts of the spec needed after planning.
#[derive(Debug)]
struct IsoSpecHeader {
    volume_id: String,
    date: RecordingDate,
    bios_boot: Option<BiosBoot>,
    hybrid_mbr: Option<Vec<u8>>,
    disk_signature: u32,
}

impl IsoPlan {
    pub fn new(spec: IsoSpec) -> Result<Self, IsoError> {
        let volume_id = spec.volume_id.clone();
        if volume_id.is_empty()
            || volume_id.len() > 32
            || !volume_id.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(IsoError::VolumeId(volume_id));
        }
        let mut tree = Tree::default();
        for (path, source) in spec.files {
            tree.insert(&path, source)?;
        }
        let (mut dirs, mut files) = tree.flatten();

        let path_table_len: u32 =
            dirs.iter().map(|d| path_table_record_len(&d.identifier) as u32).sum();
        let path_table_sectors = sectors_for(u64::from(path_table_len));
        let boots = spec.bios_boot.is_some() || spec.efi_boot.is_some();
        // PVD, boot record, terminator.
        let mut next = SYSTEM_AREA_SECTORS + if boots { 3 } else { 2 };
        let l_path_table_lba = next;
        next += path_table_sectors;
        let m_path_table_lba = next;
        next += path_table_sectors;
        for index in 0..dirs.len() {
            let sectors = dir_extent_sectors(&dirs, &files, index);
            dirs[index].lba = to_u32(next)?;
            dirs[index].sectors = to_u32(sectors)?;
            next += sectors;
        }
        let catalog_lba = if boots {
            next += 1;
            Some(to_u32(next - 1)?)
        } else {
            None
        };
        let find = |path: &Option<String>| -> Result<Option<usize>, IsoError> {
            path.as_ref()
                .map(|p| {
                    let wanted = normalize(p)?;
                    files
                        .iter()
                        .position(|f| f.path == wanted)
                        .ok_or_else(|| IsoError::MissingBootImage { path: p.clone() })
                })
                .transpose()
        };
        let bios_file = find(&spec.bios_boot.as_ref().map(|b| b.image.clone()))?;
        let efi_file = find(&spec.efi_boot)?;
        if spec.hybrid_mbr.is_some() && bios_file.is_none() {
            return Err(IsoError::MissingBootImage {
                path: "(hybrid MBR without BIOS boot)".into(),
            });
        }
        // Files in path order; empty ones point at where the next file would start.
        for file in &mut files {
            let size = file.source.len();
            if size > u64::from(u32::MAX) {
                return Err(IsoError::TooLarge { path: file.path.clone(), size });
            }
            file.lba = to_u32(next)?;
            next += sectors_for(size);
        }
        let mut total_sectors = next;
        if spec.hybrid_mbr.is_some() {
            total_sectors = (total_sectors * SECTOR).div_ceil(HYBRID_ALIGN) * HYBRID_ALIGN / SECTOR;
        }
        // The hybrid MBR addresses 512-byte sectors with 32 bits.
        if total_sectors * 4 > u64::from(u32::MAX) {
            return Err(IsoError::ImageTooLarge { sectors: total_sectors });
        }
        Ok(Self {
            spec: IsoSpecHeader {
                volume_id,
                date: RecordingDate::from_unix(spec.timestamp),
                bios_boot: spec.bios_boot,
                hybrid_mbr: spec.hybrid_mbr,
                disk_signature: spec.disk_signature,
            },
            dirs,
            files,
            path_table_len,
            l_path_table_lba: to_u32(l_path_table_lba)?,
            m_path_table_lba: to_u32(m_path_table_lba)?,
            catalog_lba,
            bios_file,
            efi_file,
            total_sectors,
        })
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.total_sectors * SECTOR
    }

    /// Where a file's data starts (in 2048-byte sectors) and its length, by image path.
    pub fn extent(&self, path: &str) -> Option<(u32, u64)> {
        let wanted = normalize(path).ok()?;
        self.files.iter().find(|f| f.path == wanted).map(|f| (f.lba, f.source.len()))
    }

    /// Writes the image to `out` in one pass; returns the bytes written ([`IsoPlan::size`]).
    pub fn write<W: Write>(&self, out: &mut W) -> Result<u64, IsoError> {
        let mut out = Output::new(out);
        // System area (with the hybrid MBR), then the volume descriptors.
        let mut system_area = vec![0u8; (SYSTEM_AREA_SECTORS * SECTOR) as usize];
        if let Some(code) = &self.spec.hybrid_mbr {
            system_area[..512].copy_from_slice(&self.hybrid_mbr(code));
        }
        out.write_all(&system_area)?;
        out.write_all(&self.primary_volume_descriptor())?;
        if let Some(catalog) = self.catalog_lba {
            out.write_all(&boot_record(catalog))?;
        }
        out.write_all(&terminator())?;
        let (l_table, m_table) = self.path_tables();
        out.write_all(&pad_to_sector(l_table))?;
        out.write_all(&pad_to_sector(m_table))?;
        for index in 0..self.dirs.len() {
            out.write_all(&self.directory_extent(index))?;
        }
        if self.catalog_lba.is_some() {
            out.write_all(&self.boot_catalog())?;
        }
        for (index, file) in self.files.iter().enumerate() {
            debug_assert_eq!(out.written, u64::from(file.lba) * SECTOR);
            let len = file.source.len();
            let patched = self.bios_file == Some(index)
                && self.spec.bios_boot.as_ref().is_some_and(|b| b.boot_info_table);
            if patched {
                let mut bytes = file.source.read_all()?;
                if bytes.len() as u64 != len {
                    return Err(changed("boot image", file));
                }
                patch_boot_info_table(&mut bytes, file.lba);
                out.write_all(&bytes)?;
            } else {
                match &file.source {
                    Source::Bytes(b) => out.write_all(b)?,
                    Source::File { path, .. } => {
                        let mut source = File::open(path)?.take(len);
                        if out.copy_from(&mut source)? != len {
                            return Err(changed("file", file));
                        }
                    }
                }
            }
            let tail = sectors_for(len) * SECTOR - len;
            out.zeros(tail)?;
        }
        out.zeros_to(self.size())?;
        out.flush()?;
        Ok(out.written)
    }

    fn hybrid_mbr(&self, code: &[u8]) -> [u8; 512] {
        let mut mbr = [0u8; 512];
        let n = code.len().min(HYBRID_MBR_CODE_LEN);
        mbr[..n].copy_from_slice(&code[..n]);
        // isohdpfx loads the BIOS boot image from this 512-byte sector address (64 bits).
        let boot_lba = self.bios_file.map_or(0, |i| u64::from(self.files[i].lba) * 4);
        mbr[432..440].copy_from_slice(&boot_lba.to_le_bytes());
        mbr[440..444].copy_from_slice(&self.spec.disk_signature.to_le_bytes());
        // Partition 1 spans the whole image, bootable, type 0 (so UEFI ignores it and the
        // EFI partition it overlaps does not make the table invalid, as in Debian's ISOs).
        let total = self.total_sectors * 4;
        mbr[446..462].copy_from_slice(&crate::mbr::entry(true, 0x00, 0, total));
        if let Some(efi) = self.efi_file {
            let file = &self.files[efi];
            let sectors = file.source.len().div_ceil(512);
            let entry = crate::mbr::entry(false, 0xEF, u64::from(file.lba) * 4, sectors);
            mbr[462..478].copy_from_slice(&entry);
        }
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        mbr
    }

    fn primary_volume_descriptor(&self) -> Vec<u8> {
        let mut d = vec![0u8; SECTOR as usize];
        d[0] = 1;
        d[1..6].copy_from_slice(b"CD001");
        d[6] = 1;
        put_padded(&mut d[8..40], b"LINUX");
        put_padded(&mut d[40..72], self.spec.volume_id.as_bytes());
        put_both_u32(&mut d[80..88], to_u32_lossy(self.total_sectors));
        put_both_u16(&mut d[120..124], 1);
        put_both_u16(&mut d[124..128], 1);
        put_both_u16(&mut d[128..132], SECTOR as u16);
        put_both_u32(&mut d[132..140], self.path_table_len);
        d[140..144].copy_from_slice(&self.l_path_table_lba.to_le_bytes());
        d[148..152].copy_from_slice(&self.m_path_table_lba.to_be_bytes());
        let root = &self.dirs[0];
        let record = directory_record(
            root.lba,
            root.sectors * SECTOR as u32,
            true,
            &[0],
            &[],
            &self.spec.date,
        );
        d[156..190].copy_from_slice(&record);
        put_padded(&mut d[190..318], b"");
        put_padded(&mut d[318..446], b"CTPF");
        put_padded(&mut d[446..574], b"CTPF");
        put_padded(&mut d[574..702], b"CTPF PACKAGER");
        put_padded(&mut d[702..813], b"");
        let date = self.spec.date.volume_format();
        d[813..830].copy_from_slice(&date);
        d[830..847].copy_from_slice(&date);
        d[847..864].copy_from_slice(&VolumeDate::UNSET);
        d[864..881].copy_from_slice(&VolumeDate::UNSET);
        d[881] = 1;
        d
    }

    fn path_tables(&self) -> (Vec<u8>, Vec<u8>) {
        let (mut l, mut m) = (Vec::new(), Vec::new());
        for dir in &self.dirs {
            let parent = (dir.parent + 1) as u16;
            for (table, little) in [(&mut l, true), (&mut m, false)] {
                table.push(dir.identifier.len() as u8);
                table.push(0);
                if little {
                    table.extend_from_slice(&dir.lba.to_le_bytes());
                    table.extend_from_slice(&parent.to_le_bytes());
                } else {
                    table.extend_from_slice(&dir.lba.to_be_bytes());
                    table.extend_from_slice(&parent.to_be_bytes());
                }
                table.extend_from_slice(&dir.identifier);
                if dir.identifier.len() % 2 == 1 {
                    table.push(0);
                }
            }
        }
        (l, m)
    }

    fn directory_extent(&self, index: usize) -> Vec<u8> {
        let records = directory_records(&self.dirs, &self.files, index, &self.spec.date);
        let mut extent = Vec::with_capacity(self.dirs[index].sectors as usize * SECTOR as usize);
        for record in records {
            let used = extent.len() % SECTOR as usize;
            if used + record.len() > SECTOR as usize {
                extent.resize(extent.len() + SECTOR as usize - used, 0);
            }
            extent.extend_from_slice(&record);
        }
        pad_to_sector(extent)
    }

    fn boot_catalog(&self) -> Vec<u8> {
        let mut c = vec![0u8; SECTOR as usize];
        // Validation entry: header, platform x86, id, checksum, key bytes.
        c[0] = 1;
        c[4..8].copy_from_slice(b"CTPF");
        c[30] = 0x55;
        c[31] = 0xAA;
        let sum = c[..32]
            .chunks(2)
            .fold(0u16, |acc, w| acc.wrapping_add(u16::from_le_bytes([w[0], w[1]])));
        c[28..30].copy_from_slice(&0u16.wrapping_sub(sum).to_le_bytes());
        // Default entry: BIOS (or not bootable when there is only an EFI image).
        if let (Some(bios), Some(file)) = (&self.spec.bios_boot, self.bios_file) {
            boot_entry(&mut c[32..64], bios.load_sectors, self.files[file].lba);
        }
        // Section for EFI: final header, platform 0xEF, one entry.
        if let Some(file) = self.efi_file {
            c[64] = 0x91;
            c[65] = 0xEF;
            c[66..68].copy_from_slice(&1u16.to_le_bytes());
            let sectors = self.files[file].source.len().div_ceil(512);
            // Larger than a 16-bit count: 0 tells firmware to use the rest of the medium
            // (the FAT inside knows its own size).
            let count = u16::try_from(sectors).unwrap_or(0);
            boot_entry(&mut c[96..128], count, self.files[file].lba);
        }
        c
    }
}

fn changed(what: &'static str, file: &FileEntry) -> IsoError {
    IsoError::SourceChanged { what, path: file.path.clone(), expected: file.source.len() }
}

fn boot_entry(entry: &mut [u8], load_sectors: u16, lba: u32) {
    entry[0] = 0x88; // bootable
    entry[1] = 0; // no emulation
    entry[6..8].copy_from_slice(&load_sectors.to_le_bytes());
    entry[8..12].copy_from_slice(&lba.to_le_bytes());
}

/// The El Torito boot information table at bytes 8..64 of a boot image: where the PVD is,
/// where the image is, its length, and a checksum of its bytes from 64 on.
fn patch_boot_info_table(image: &mut [u8], image_lba: u32) {
    if image.len() < 64 {
        return;
    }
    let checksum = image[64..].chunks(4).fold(0u32, |acc, word| {
        let mut w = [0u8; 4];
        w[..word.len()].copy_from_slice(word);
        acc.wrapping_add(u32::from_le_bytes(w))
    });
    let len = to_u32_lossy(image.len() as u64);
    image[8..12].copy_from_slice(&(SYSTEM_AREA_SECTORS as u32).to_le_bytes());
    image[12..16].copy_from_slice(&image_lba.to_le_bytes());
    image[16..20].copy_from_slice(&len.to_le_bytes());
    image[20..24].copy_from_slice(&checksum.to_le_bytes());
    image[24..64].fill(0);
}

fn boot_record(catalog_lba: u32) -> Vec<u8> {
    let mut d = vec![0u8; SECTOR as usize];
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d[7..7 + 23].copy_from_slice(b"EL TORITO SPECIFICATION");
    d[71..75].copy_from_slice(&catalog_lba.to_le_bytes());
    d
}

fn terminator() -> Vec<u8> {
    let mut d = vec![0u8; SECTOR as usize];
    d[0] = 255;
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d
}

/// The records of directory `index`: `.`, `..`, then its entries in identifier order.
fn directory_records(
    dirs: &[Dir],
    files: &[FileEntry],
    index: usize,
    date: &RecordingDate,
) -> Vec<Vec<u8>> {
    let dir = &dirs[index];
    let parent = &dirs[dir.parent];
    let mut dot_su = Vec::new();
    if index == 0 {
        dot_su.extend_from_slice(&susp_sp());
        dot_su.extend_from_slice(&susp_er());
    }
    dot_su.extend_from_slice(&rr_px(MODE_DIR, dir_links(dirs, index)));
    let extent_len = |d: &Dir| d.sectors * SECTOR as u32;
    let mut records = vec![
        directory_record(dir.lba, extent_len(dir), true, &[0], &dot_su, date),
        directory_record(
            parent.lba,
            extent_len(parent),
            true,
            &[1],
            &rr_px(MODE_DIR, dir_links(dirs, dir.parent)),
            date,
        ),
    ];
    for entry in &dir.entries {
        records.push(match *entry {
            Entry::Dir(child) => {
                let d = &dirs[child];
                let mut su = rr_px(MODE_DIR, dir_links(dirs, child));
                su.extend_from_slice(&rr_nm(&d.name));
                directory_record(d.lba, extent_len(d), true, &d.identifier, &su, date)
            }
            Entry::File(f) => {
                let file = &files[f];
                let mut su = rr_px(MODE_FILE, 1);
                su.extend_from_slice(&rr_nm(&file.name));
                let len = to_u32_lossy(file.source.len());
                directory_record(file.lba, len, false, &file.identifier, &su, date)
            }
        });
    }
    records
}

fn dir_extent_sectors(dirs: &[Dir], files: &[FileEntry], index: usize) -> u64 {
    // Sizes only: dates and addresses do not change a record's length.
    let date = RecordingDate::from_unix(0);
    let mut used = 0u64;
    for record in directory_records(dirs, files, index, &date) {
        let in_sector = used % SECTOR;
        if in_sector + record.len() as u64 > SECTOR {
            used += SECTOR - in_sector;
        }
        used += record.len() as u64;
    }
    sectors_for(used).max(1)
}

/// A directory's link count: itself, its `.`, and each subdirectory's `..`.
fn dir_links(dirs: &[Dir], index: usize) -> u32 {
    2 + dirs[index].entries.iter().filter(|e| matches!(e, Entry::Dir(_))).count() as u32
}

fn directory_record(
    lba: u32,
    len: u32,
    is_dir: bool,
    identifier: &[u8],
    system_use: &[u8],
    date: &RecordingDate,
) -> Vec<u8> {
    let id_len = identifier.len();
    let pad = usize::from(id_len.is_multiple_of(2));
    let mut r = vec![0u8; 33 + id_len + pad];
    put_both_u32(&mut r[2..10], lba);
    put_both_u32(&mut r[10..18], len);
    r[18..25].copy_from_slice(&date.record_format());
    r[25] = if is_dir { 0x02 } else { 0 };
    put_both_u16(&mut r[28..32], 1);
    r[32] = id_len as u8;
    r[33..33 + id_len].copy_from_slice(identifier);
    r.extend_from_slice(system_use);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r[0] = r.len() as u8;
    r
}

fn path_table_record_len(identifier: &[u8]) -> usize {
    8 + identifier.len() + identifier.len() % 2
}

fn susp_sp() -> [u8; 7] {
    [b'S', b'P', 7, 1, 0xBE, 0xEF, 0]
}

fn susp_er() -> Vec<u8> {
    let mut e = vec![b'E', b'R', 0, 1, RRIP_ID.len() as u8, RRIP_DESCRIPTOR.len() as u8, 0, 1];
    e.extend_from_slice(RRIP_ID);
    e.extend_from_slice(RRIP_DESCRIPTOR);
    e[2] = e.len() as u8;
    e
}

/// POSIX attributes (RRIP 1.10 layout: mode, links, uid, gid).
fn rr_px(mode: u32, links: u32) -> Vec<u8> {
    let mut e = vec![b'P', b'X', 36, 1];
    for value in [mode, links, 0, 0] {
        let mut both = [0u8; 8];
        put_both_u32(&mut both, value);
        e.extend_from_slice(&both);
    }
    e
}

fn rr_nm(name: &str) -> Vec<u8> {
    let mut e = vec![b'N', b'M', (5 + name.len()) as u8, 1, 0];
    e.extend_from_slice(name.as_bytes());
    e
}

/// The tree of paths as given, before identifiers are assigned.
#[derive(Debug, Default)]
struct Tree {
    children: BTreeMap<String, TreeNode>,
}

#[derive(Debug)]
enum TreeNode {
    Dir(Tree),
    File(String, Source),
}

impl Tree {
    fn insert(&mut self, path: &str, source: Source) -> Result<(), IsoError> {
        let normalized = normalize(path)?;
        let parts: Vec<&str> = normalized.split('/').collect();
        let mut node = self;
        for (depth, part) in parts.iter().enumerate() {
            let last = depth == parts.len() - 1;
            if last {
                if node.children.contains_key(*part) {
                    return Err(IsoError::Conflict { path: normalized.clone() });
                }
                node.children
                    .insert((*part).to_owned(), TreeNode::File(normalized.clone(), source));
                return Ok(());
            }
            let entry = node
                .children
                .entry((*part).to_owned())
                .or_insert_with(|| TreeNode::Dir(Tree::default()));
            node = match entry {
                TreeNode::Dir(tree) => tree,
                TreeNode::File(..) => {
                    return Err(IsoError::Conflict { path: parts[..=depth].join("/") });
                }
            };
        }
        Ok(())
    }

    /// Breadth-first directories (path table order) and files in the order of their
    /// directories and identifiers.
    fn flatten(self) -> (Vec<Dir>, Vec<FileEntry>) {
        let mut dirs = vec![Dir {
            parent: 0,
            name: String::new(),
            identifier: vec![0],
            depth: 0,
            entries: Vec::new(),
            lba: 0,
            sectors: 0,
        }];
        let mut files = Vec::new();
        let mut queue = std::collections::VecDeque::from([(0usize, self)]);
        while let Some((index, tree)) = queue.pop_front() {
            let names: Vec<(String, bool)> = tree
                .children
                .iter()
                .map(|(name, node)| (name.clone(), matches!(node, TreeNode::Dir(_))))
                .collect();
            let identifiers = assign_identifiers(&names);
            let mut entries: Vec<(Vec<u8>, String, TreeNode)> = tree
                .children
                .into_iter()
                .zip(identifiers)
                .map(|((name, node), id)| (id, name, node))
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (identifier, name, node) in entries {
                match node {
                    TreeNode::Dir(sub) => {
                        let child = dirs.len();
                        dirs.push(Dir {
                            parent: index,
                            name,
                            identifier,
                            depth: dirs[index].depth + 1,
                            entries: Vec::new(),
                            lba: 0,
                            sectors: 0,
                        });
                        dirs[index].entries.push(Entry::Dir(child));
                        queue.push_back((child, sub));
                    }
                    TreeNode::File(path, source) => {
                        dirs[index].entries.push(Entry::File(files.len()));
                        files.push(FileEntry { path, name, identifier, source, lba: 0 });
                    }
                }
            }
        }
        (dirs, files)
    }
}

/// Checks and normalizes an image path: relative, `/`-separated, no empty, `.` or `..`
/// components, names of printable characters up to [`MAX_NAME_LEN`] bytes, at most
/// [`MAX_DEPTH`] levels.
fn normalize(path: &str) -> Result<String, IsoError> {
    let invalid = |reason| IsoError::InvalidPath { path: path.to_owned(), reason };
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty() {
        return Err(invalid("empty"));
    }
    let parts: Vec<&str> = trimmed.split('/').collect();
    if parts.len() > MAX_DEPTH {
        return Err(invalid("deeper than ISO 9660 allows (7 directory levels)"));
    }
    for part in &parts {
        if part.is_empty() || *part == "." || *part == ".." {
            return Err(invalid("empty, . or .. component"));
        }
        if part.len() > MAX_NAME_LEN {
            return Err(invalid("a name is longer than 128 bytes"));
        }
        if part.chars().any(char::is_control) {
            return Err(invalid("control character in a name"));
        }
    }
    Ok(parts.join("/"))
}

/// Level 1 identifiers (`NAME.EXT;1` for files, `NAME` for directories, 8.3 upper case),
/// unique within one directory; collisions get a numbered suffix. Deterministic: names are
/// taken in order.
fn assign_identifiers(names: &[(String, bool)]) -> Vec<Vec<u8>> {
    let mut taken = std::collections::HashSet::new();
    names
        .iter()
        .map(|(name, is_dir)| {
            let (base, ext) = match (is_dir, name.rsplit_once('.')) {
                (false, Some((base, ext))) if !base.is_empty() => (base, ext),
                _ => (name.as_str(), ""),
            };
            let mut base = d_chars(base, 8);
            if base.is_empty() {
                base.push('_');
            }
            let ext = d_chars(ext, 3);
            let make = |base: &str| {
                if *is_dir { base.to_owned() } else { format!("{base}.{ext};1") }
            };
            let mut candidate = make(&base);
            let mut n = 1u32;
            while taken.contains(&candidate) {
                let suffix = format!("_{n}");
                let keep = base.len().min(8 - suffix.len());
                candidate = make(&format!("{}{suffix}", &base[..keep]));
                n += 1;
            }
            taken.insert(candidate.clone());
            candidate.into_bytes()
        })
        .collect()
}

/// Upper-cased, anything outside A-Z 0-9 _ replaced by `_`, at most `max` characters.
fn d_chars(text: &str, max: usize) -> String {
    text.chars()
        .map(|c| c.to_ascii_uppercase())
        .map(|c| if c.is_ascii_uppercase() || c.is_ascii_digit() { c } else { '_' })
        .take(max)
        .collect()
}

/// A date as ISO 9660 writes it, all from one UTC timestamp.
#[derive(Debug, Clone, Copy)]
struct RecordingDate(time::OffsetDateTime);

struct VolumeDate;

impl VolumeDate {
    /// "Not specified": sixteen '0' digits and a zero offset.
    const UNSET: [u8; 17] = *b"0000000000000000\0";
}

impl RecordingDate {
    fn from_unix(seconds: i64) -> Self {
        let clamped = seconds.clamp(0, 253_402_300_799); // up to 9999-12-31
        Self(
            time::OffsetDateTime::from_unix_timestamp(clamped)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
        )
    }

    /// 7 bytes: years since 1900, month, day, hour, minute, second, UTC offset.
    fn record_format(&self) -> [u8; 7] {
        let t = self.0;
        let years = u8::try_from(t.year() - 1900).unwrap_or(u8::MAX);
        [years, u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second(), 0]
    }

    /// 17 bytes: "YYYYMMDDHHMMSScc" and the UTC offset.
    fn volume_format(&self) -> [u8; 17] {
        let t = self.0;
        let text = format!(
            "{:04}{:02}{:02}{:02}{:02}{:02}00",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
        let mut out = [0u8; 17];
        out[..16].copy_from_slice(&text.as_bytes()[..16]);
        out
    }
}

fn put_padded(field: &mut [u8], text: &[u8]) {
    field.fill(b' ');
    let n = text.len().min(field.len());
    field[..n].copy_from_slice(&text[..n]);
}

fn put_both_u16(field: &mut [u8], value: u16) {
    field[..2].copy_from_slice(&value.to_le_bytes());
    field[2..4].copy_from_slice(&value.to_be_bytes());
}

fn put_both_u32(field: &mut [u8], value: u32) {
    field[..4].copy_from_slice(&value.to_le_bytes());
    field[4..8].copy_from_slice(&value.to_be_bytes());
}

fn sectors_for(bytes: u64) -> u64 {
    bytes.div_ceil(SECTOR)
}

fn pad_to_sector(mut bytes: Vec<u8>) -> Vec<u8> {
    let len = (sectors_for(bytes.len() as u64) * SECTOR) as usize;
    bytes.resize(len.max(SECTOR as usize), 0);
    bytes
}

fn to_u32(value: u64) -> Result<u32, IsoError> {
    u32::try_from(value).map_err(|_| IsoError::ImageTooLarge { sectors: value })
}

/// For values already checked to fit.
fn to_u32_lossy(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_8_3_upper_case_and_unique() {
        let names = [
            ("grubx64.efi", false),
            ("GRUBX64.EFI.bak", false),
            ("initrd.img", false),
            ("isolinux", true),
            ("very-long-name.config", false),
            ("very-long-name.conf", false),
            ("noext", false),
            (".hidden", false),
            ("a.b.c", true),
        ];
        let names: Vec<(String, bool)> = names.iter().map(|(n, d)| ((*n).to_owned(), *d)).collect();
        let ids: Vec<String> =
            assign_identifiers(&names).into_iter().map(|b| String::from_utf8(b).unwrap()).collect();
        assert_eq!(
            ids,
            [
                "GRUBX64.EFI;1",
                "GRUBX64_.BAK;1",
                "INITRD.IMG;1",
                "ISOLINUX",
                "VERY_LON.CON;1",
                "VERY_L_1.CON;1",
                "NOEXT.;1",
                "_HIDDEN.;1",
                "A_B_C",
            ]
        );
    }

    #[test]
    fn hostile_paths_are_refused() {
        for path in ["", "/", "a//b", "../etc/passwd", "a/./b", "a/\u{1}b", &"x".repeat(129)] {
            assert!(normalize(path).is_err(), "{path:?}");
        }
        assert_eq!(normalize("/boot/vmlinuz").unwrap(), "boot/vmlinuz");
        assert!(normalize("a/b/c/d/e/f/g/h").is_err(), "too deep");
    }

    #[test]
    fn a_file_cannot_also_be_a_directory() {
        let mut tree = Tree::default();
        tree.insert("boot", Source::Bytes(vec![1])).unwrap();
        assert!(matches!(
            tree.insert("boot/x", Source::Bytes(vec![])),
            Err(IsoError::Conflict { .. })
        ));
        assert!(matches!(
            tree.insert("boot", Source::Bytes(vec![])),
            Err(IsoError::Conflict { .. })
        ));
    }

    #[test]
    fn boot_info_table_has_the_addresses_and_checksum() {
        let mut image = vec![0u8; 2048];
        image[64..68].copy_from_slice(&7u32.to_le_bytes());
        image[2044..2048].copy_from_slice(&5u32.to_le_bytes());
        patch_boot_info_table(&mut image, 40);
        assert_eq!(u32::from_le_bytes(image[8..12].try_into().unwrap()), 16);
        assert_eq!(u32::from_le_bytes(image[12..16].try_into().unwrap()), 40);
        assert_eq!(u32::from_le_bytes(image[16..20].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(image[20..24].try_into().unwrap()), 12);
    }

    #[test]
    fn records_never_cross_a_sector() {
        let files: BTreeMap<String, Source> = (0..100)
            .map(|i| {
                (format!("dir/file-with-a-long-name-{i:03}.txt"), Source::Bytes(vec![b'x'; i]))
            })
            .collect();
        let spec = IsoSpec {
            volume_id: "TEST".into(),
            timestamp: 0,
            files,
            bios_boot: None,
            efi_boot: None,
            hybrid_mbr: None,
            disk_signature: 0,
        };
        let plan = IsoPlan::new(spec).unwrap();
        let dir = plan.dirs.iter().position(|d| d.name == "dir").unwrap();
        assert!(plan.dirs[dir].sectors > 1, "100 records need more than one sector");
        let extent = plan.directory_extent(dir);
        assert_eq!(extent.len() as u32, plan.dirs[dir].sectors * SECTOR as u32);
        // Walk it as a reader does: a zero length byte means "next sector".
        let (mut at, mut seen) = (0usize, 0usize);
        while at < extent.len() {
            let len = extent[at] as usize;
            if len == 0 {
                at = (at / SECTOR as usize + 1) * SECTOR as usize;
                continue;
            }
            assert_eq!(at / SECTOR as usize, (at + len - 1) / SECTOR as usize, "record at {at}");
            at += len;
            seen += 1;
        }
        assert_eq!(seen, 102);
    }
}
