//! cpio "newc" (magic `070701`) writer, the format the Linux kernel unpacks as an initramfs.
//!
//! Two layers:
//! - [`NewcWriter`] encodes entries in the order it is given them (headers, NUL-terminated
//!   names, 4-byte padding, the `TRAILER!!!` entry). It does no sorting.
//! - [`CpioArchive`] is the deterministic front end: it validates paths, refuses duplicates,
//!   adds missing parent directories, sorts by path and writes with a fixed mtime, uid/gid 0
//!   and sequential inode numbers, so the same entries always give the same bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::PathBuf;

/// Every newc header is this many bytes: the magic plus 13 eight-digit hex fields.
pub const HEADER_LEN: usize = 110;
const MAGIC: &[u8; 6] = b"070701";
const TRAILER_NAME: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const PERMISSION_BITS: u32 = 0o7777;

/// Mode given to directories the archive creates because an entry needs them as parents.
pub const IMPLICIT_DIR_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("archive path {path:?} is invalid: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("archive path {path:?} is given twice")]
    DuplicatePath { path: String },
    #[error("archive path {parent:?} is not a directory but {child:?} needs it as one")]
    ParentNotDirectory { parent: String, child: String },
    #[error("mode {mode:#o} of {path:?} has bits outside the permission bits 0o7777")]
    InvalidMode { path: String, mode: u32 },
    #[error("symlink {path:?} has an invalid target {target:?}: {reason}")]
    InvalidSymlinkTarget { path: String, target: String, reason: &'static str },
    #[error("{path:?} is {size} bytes; the newc format holds at most 4 GiB - 1 per file")]
    FileTooLarge { path: String, size: u64 },
    #[error("mtime {mtime} does not fit the newc format's 32-bit field")]
    MtimeOutOfRange { mtime: u64 },
    #[error("{path:?}: its source announced {expected} bytes but gave {actual}")]
    SizeMismatch { path: String, expected: u64, actual: u64 },
    #[error("{path:?}: cannot read host file {source_path}: {source}")]
    HostFile { path: String, source_path: PathBuf, source: io::Error },
    #[error("writing the archive: {0}")]
    Io(#[from] io::Error),
}

/// A validated path inside the archive: relative, `/`-separated, no empty, `.` or `..`
/// components, no NUL. Stored without a leading `/` (the kernel and `cpio
/// --no-absolute-filenames` both expect that).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArchivePath(String);

impl ArchivePath {
    pub fn new(path: &str) -> Result<Self, CpioError> {
        let invalid = |reason| CpioError::InvalidPath { path: path.to_owned(), reason };
        if path.is_empty() {
            return Err(invalid("empty"));
        }
        if path.starts_with('/') {
            return Err(invalid("must be relative (no leading '/')"));
        }
        if path.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        if path == TRAILER_NAME {
            return Err(invalid("is the cpio end-of-archive marker"));
        }
        for component in path.split('/') {
            match component {
                // Aliases like "a//b", "a/./b" or "a/" would let one file be added twice.
                "" => return Err(invalid("has an empty component ('//' or trailing '/')")),
                "." => return Err(invalid("has a '.' component")),
                ".." => return Err(invalid("has a '..' component")),
                _ => {}
            }
        }
        Ok(Self(path.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parent directory, `None` for a top-level entry.
    pub fn parent(&self) -> Option<ArchivePath> {
        self.0.rsplit_once('/').map(|(parent, _)| ArchivePath(parent.to_owned()))
    }

    /// Every ancestor directory, outermost first (`a/b/c` → `a`, `a/b`).
    pub fn ancestors(&self) -> Vec<ArchivePath> {
        let mut ancestors = Vec::new();
        let mut current = self.parent();
        while let Some(dir) = current {
            current = dir.parent();
            ancestors.push(dir);
        }
        ancestors.reverse();
        ancestors
    }
}

impl fmt::Display for ArchivePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a regular file's contents come from.
pub enum FileData {
    Bytes(Vec<u8>),
    /// A stream that must yield exactly `size` bytes (checked while writing).
    Reader {
        size: u64,
        reader: Box<dyn Read>,
    },
    /// A host file, opened only while the archive is written so large trees hold no fds.
    HostPath(PathBuf),
}

impl fmt::Debug for FileData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bytes(bytes) => write!(f, "Bytes({} bytes)", bytes.len()),
            Self::Reader { size, .. } => write!(f, "Reader({size} bytes)"),
            Self::HostPath(path) => write!(f, "HostPath({})", path.display()),
        }
    }
}

#[derive(Debug)]
enum EntryKind {
    /// `implicit`: created only as a parent; an explicit directory entry replaces it.
    Dir {
        implicit: bool,
    },
    File(FileData),
    Symlink(String),
    CharDevice {
        major: u32,
        minor: u32,
    },
}

#[derive(Debug)]
struct Entry {
    permissions: u32,
    kind: EntryKind,
}

/// Deterministic archive under construction: add entries in any order, then [`Self::write`].
#[derive(Debug, Default)]
pub struct CpioArchive {
    // BTreeMap ordering is plain byte order of the path, which puts every directory before
    // everything under it (a prefix sorts first), so the kernel never meets a child first.
    entries: BTreeMap<ArchivePath, Entry>,
}

impl CpioArchive {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_dir(&mut self, path: &ArchivePath, permissions: u32) -> Result<(), CpioError> {
        check_permissions(path, permissions)?;
        self.ensure_parents(path)?;
        match self.entries.get_mut(path) {
            Some(existing) if matches!(existing.kind, EntryKind::Dir { implicit: true }) => {
                existing.kind = EntryKind::Dir { implicit: false };
                existing.permissions = permissions;
                Ok(())
            }
            Some(_) => Err(CpioError::DuplicatePath { path: path.to_string() }),
            None => {
                self.entries.insert(
                    path.clone(),
                    Entry { permissions, kind: EntryKind::Dir { implicit: false } },
                );
                Ok(())
            }
        }
    }

    pub fn add_file(
        &mut self,
        path: &ArchivePath,
        permissions: u32,
        data: FileData,
    ) -> Result<(), CpioError> {
        check_permissions(path, permissions)?;
        let size = match &data {
            FileData::Bytes(bytes) => Some(bytes.len() as u64),
            FileData::Reader { size, .. } => Some(*size),
            FileData::HostPath(_) => None,
        };
        if let Some(size) = size {
            check_file_size(path, size)?;
        }
        self.insert_leaf(path, permissions, EntryKind::File(data))
    }

    /// `target` is stored verbatim; relative targets keep the image relocatable.
    pub fn add_symlink(&mut self, path: &ArchivePath, target: &str) -> Result<(), CpioError> {
        let invalid = |reason| CpioError::InvalidSymlinkTarget {
            path: path.to_string(),
            target: target.to_owned(),
            reason,
        };
        if target.is_empty() {
            return Err(invalid("empty"));
        }
        if target.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        self.insert_leaf(path, 0o777, EntryKind::Symlink(target.to_owned()))
    }

    pub fn add_char_device(
        &mut self,
        path: &ArchivePath,
        permissions: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        check_permissions(path, permissions)?;
        self.insert_leaf(path, permissions, EntryKind::CharDevice { major, minor })
    }

    /// Number of entries the archive will write, implicit directories included, trailer not.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes all entries sorted by path, then the trailer. Returns the archive's size in bytes.
    pub fn write<W: Write>(self, mtime: u64, out: W) -> Result<u64, CpioError> {
        let mtime = u32::try_from(mtime).map_err(|_| CpioError::MtimeOutOfRange { mtime })?;
        let mut writer = NewcWriter::new(out, mtime);
        for (path, entry) in self.entries {
            match entry.kind {
                EntryKind::Dir { .. } => writer.write_dir(&path, entry.permissions)?,
                EntryKind::File(FileData::Bytes(bytes)) => {
                    writer.write_file_bytes(&path, entry.permissions, &bytes)?;
                }
                EntryKind::File(FileData::Reader { size, mut reader }) => {
                    writer.write_file_reader(&path, entry.permissions, size, &mut reader)?;
                }
                EntryKind::File(FileData::HostPath(source_path)) => {
                    let host_error = |source| CpioError::HostFile {
                        path: path.to_string(),
                        source_path: source_path.clone(),
                        source,
                    };
                    let mut file = std::fs::File::open(&source_path).map_err(host_error)?;
                    let size = file.metadata().map_err(host_error)?.len();
                    writer.write_file_reader(&path, entry.permissions, size, &mut file)?;
                }
                EntryKind::Symlink(target) => writer.write_symlink(&path, &target)?,
                EntryKind::CharDevice { major, minor } => {
                    writer.write_char_device(&path, entry.permissions, major, minor)?;
                }
            }
        }
        let (_, size) = writer.finish()?;
        Ok(size)
    }

    fn insert_leaf(
        &mut self,
        path: &ArchivePath,
        permissions: u32,
        kind: EntryKind,
    ) -> Result<(), CpioError> {
        self.ensure_parents(path)?;
        if let Some(existing) = self.entries.get(path) {
            // An implicit directory here means something was already added beneath this path.
            return Err(match existing.kind {
                EntryKind::Dir { implicit: true } => CpioError::ParentNotDirectory {
                    parent: path.to_string(),
                    child: self.first_child_of(path),
                },
                _ => CpioError::DuplicatePath { path: path.to_string() },
            });
        }
        self.entries.insert(path.clone(), Entry { permissions, kind });
        Ok(())
    }

    fn ensure_parents(&mut self, path: &ArchivePath) -> Result<(), CpioError> {
        for ancestor in path.ancestors() {
            match self.entries.get(&ancestor) {
                Some(Entry { kind: EntryKind::Dir { .. }, .. }) => {}
                Some(_) => {
                    return Err(CpioError::ParentNotDirectory {
                        parent: ancestor.to_string(),
                        child: path.to_string(),
                    });
                }
                None => {
                    self.entries.insert(
                        ancestor,
                        Entry {
                            permissions: IMPLICIT_DIR_MODE,
                            kind: EntryKind::Dir { implicit: true },
                        },
                    );
                }
            }
        }
        Ok(())
    }

    fn first_child_of(&self, dir: &ArchivePath) -> String {
        let prefix = format!("{dir}/");
        self.entries
            .keys()
            .find(|key| key.as_str().starts_with(&prefix))
            .map_or_else(|| prefix.clone(), ToString::to_string)
    }
}

fn check_permissions(path: &ArchivePath, permissions: u32) -> Result<(), CpioError> {
    if permissions & !PERMISSION_BITS != 0 {
        return Err(CpioError::InvalidMode { path: path.to_string(), mode: permissions });
    }
    Ok(())
}

fn check_file_size(path: &ArchivePath, size: u64) -> Result<u32, CpioError> {
    u32::try_from(size).map_err(|_| CpioError::FileTooLarge { path: path.to_string(), size })
}

/// Streaming newc encoder: writes each entry as it is given (no sorting or duplicate checks;
/// use [`CpioArchive`] for that). Inode numbers count up from 1 in output order; uid, gid and
/// device numbers of the archived filesystem are 0; every entry gets the same `mtime`.
#[derive(Debug)]
pub struct NewcWriter<W: Write> {
    out: W,
    mtime: u32,
    next_inode: u32,
    offset: u64,
}

struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    file_size: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

impl<W: Write> NewcWriter<W> {
    pub fn new(out: W, mtime: u32) -> Self {
        Self { out, mtime, next_inode: 1, offset: 0 }
    }

    pub fn write_dir(&mut self, path: &ArchivePath, permissions: u32) -> Result<(), CpioError> {
        check_permissions(path, permissions)?;
        self.write_header(&Header {
            name: path.as_str(),
            mode: S_IFDIR | permissions,
            nlink: 2,
            file_size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        })
    }

    pub fn write_file_bytes(
        &mut self,
        path: &ArchivePath,
        permissions: u32,
        contents: &[u8],
    ) -> Result<(), CpioError> {
        self.write_file_reader(path, permissions, contents.len() as u64, &mut &contents[..])
    }

    /// `reader` must yield exactly `size` bytes; fewer or more is a [`CpioError::SizeMismatch`]
    /// (the archive is then unusable: the header already promised `size`).
    pub fn write_file_reader(
        &mut self,
        path: &ArchivePath,
        permissions: u32,
        size: u64,
        reader: &mut dyn Read,
    ) -> Result<(), CpioError> {
        check_permissions(path, permissions)?;
        let file_size = check_file_size(path, size)?;
        self.write_header(&Header {
            name: path.as_str(),
            mode: S_IFREG | permissions,
            nlink: 1,
            file_size,
            rdev_major: 0,
            rdev_minor: 0,
        })?;
        let copied = io::copy(&mut reader.take(size), &mut self.out)?;
        let mismatch =
            |actual| CpioError::SizeMismatch { path: path.to_string(), expected: size, actual };
        if copied != size {
            return Err(mismatch(copied));
        }
        // A file that grew after its size was taken would silently lose its tail otherwise.
        if reader.read(&mut [0u8; 1])? != 0 {
            return Err(mismatch(size + 1));
        }
        self.offset += copied;
        self.pad()
    }

    pub fn write_symlink(&mut self, path: &ArchivePath, target: &str) -> Result<(), CpioError> {
        let file_size = check_file_size(path, target.len() as u64)?;
        self.write_header(&Header {
            name: path.as_str(),
            mode: S_IFLNK | 0o777,
            nlink: 1,
            file_size,
            rdev_major: 0,
            rdev_minor: 0,
        })?;
        self.write_padded_data(target.as_bytes())
    }

    pub fn write_char_device(
        &mut self,
        path: &ArchivePath,
        permissions: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        check_permissions(path, permissions)?;
        self.write_header(&Header {
            name: path.as_str(),
            mode: S_IFCHR | permissions,
            nlink: 1,
            file_size: 0,
            rdev_major: major,
            rdev_minor: minor,
        })
    }

    /// Writes the `TRAILER!!!` entry and returns the inner writer and the archive's size.
    pub fn finish(mut self) -> Result<(W, u64), CpioError> {
        // The trailer is conventionally all zeros except nlink 1 (as GNU cpio writes it).
        self.write_raw_header(
            0,
            &Header {
                name: TRAILER_NAME,
                mode: 0,
                nlink: 1,
                file_size: 0,
                rdev_major: 0,
                rdev_minor: 0,
            },
            0,
        )?;
        self.out.flush()?;
        Ok((self.out, self.offset))
    }

    fn write_header(&mut self, header: &Header<'_>) -> Result<(), CpioError> {
        let inode = self.next_inode;
        self.next_inode += 1;
        self.write_raw_header(inode, header, self.mtime)
    }

    fn write_raw_header(
        &mut self,
        inode: u32,
        header: &Header<'_>,
        mtime: u32,
    ) -> Result<(), CpioError> {
        let name_size = header.name.len() + 1; // the count includes the terminating NUL
        let name_size = u32::try_from(name_size).map_err(|_| CpioError::InvalidPath {
            path: header.name.to_owned(),
            reason: "too long",
        })?;
        let fields = [
            inode,
            header.mode,
            0, // uid
            0, // gid
            header.nlink,
            mtime,
            header.file_size,
            0, // dev major of the archived filesystem
            0, // dev minor
            header.rdev_major,
            header.rdev_minor,
            name_size,
            0, // check: only used by the "crc" (070702) variant
        ];
        let mut encoded = Vec::with_capacity(HEADER_LEN + name_size as usize + 3);
        encoded.extend_from_slice(MAGIC);
        for field in fields {
            encoded.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        encoded.extend_from_slice(header.name.as_bytes());
        encoded.push(0);
        self.write_padded_data(&encoded)
    }

    fn write_padded_data(&mut self, data: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(data)?;
        self.offset += data.len() as u64;
        self.pad()
    }

    /// Header+name and data each end on a 4-byte boundary of the archive.
    fn pad(&mut self) -> Result<(), CpioError> {
        let padding = (4 - self.offset % 4) % 4;
        // padding < 4, so the slice index cannot overflow.
        let zeros = [0u8; 3];
        self.out.write_all(&zeros[..padding as usize])?;
        self.offset += padding;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn path(text: &str) -> ArchivePath {
        ArchivePath::new(text).unwrap()
    }

    /// Parsed newc entries: (name, mode, ino, nlink, mtime, rdev, data).
    type Parsed = Vec<(String, u32, u32, u32, u32, (u32, u32), Vec<u8>)>;

    fn parse(archive: &[u8]) -> Parsed {
        let mut entries = Vec::new();
        let mut offset = 0;
        loop {
            assert_eq!(offset % 4, 0, "header not aligned at {offset}");
            let header = &archive[offset..offset + HEADER_LEN];
            assert_eq!(&header[..6], MAGIC);
            let field = |index: usize| {
                let start = 6 + index * 8;
                u32::from_str_radix(std::str::from_utf8(&header[start..start + 8]).unwrap(), 16)
                    .unwrap()
            };
            let name_size = field(11) as usize;
            let file_size = field(6) as usize;
            let name_start = offset + HEADER_LEN;
            let name = String::from_utf8(archive[name_start..name_start + name_size - 1].to_vec())
                .unwrap();
            assert_eq!(archive[name_start + name_size - 1], 0);
            let data_start = (name_start + name_size).next_multiple_of(4);
            let data = archive[data_start..data_start + file_size].to_vec();
            offset = (data_start + file_size).next_multiple_of(4);
            if name == TRAILER_NAME {
                assert_eq!(offset, archive.len(), "bytes after the trailer");
                return entries;
            }
            entries.push((
                name,
                field(1),
                field(0),
                field(4),
                field(5),
                (field(9), field(10)),
                data,
            ));
        }
    }

    #[test]
    fn tiny_archive_matches_hand_computed_bytes() {
        let mut archive = CpioArchive::new();
        archive.add_file(&path("a"), 0o644, FileData::Bytes(b"hi\n".to_vec())).unwrap();
        let mut out = Vec::new();
        let size = archive.write(0x5F5E_1000, &mut out).unwrap();

        let mut expected = Vec::new();
        // ino 1, mode 0100644, uid 0, gid 0, nlink 1, mtime, size 3, dev 0:0, rdev 0:0,
        // namesize 2 ("a\0"), check 0.
        expected.extend_from_slice(
            b"070701\
              00000001000081A4000000000000000000000001\
              5F5E10000000000300000000000000000000000000000000\
              0000000200000000",
        );
        // 110 + 2 = 112 bytes: already aligned, no name padding.
        expected.extend_from_slice(b"a\0");
        // 3 data bytes + 1 padding byte.
        expected.extend_from_slice(b"hi\n\0");
        // Trailer: all zero but nlink 1 and namesize 11; 110 + 11 = 121 → 3 padding bytes.
        expected.extend_from_slice(
            b"070701\
              00000000000000000000000000000000000000010000000000000000\
              00000000000000000000000000000000\
              0000000B00000000TRAILER!!!\0\0\0\0",
        );
        assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected));
        assert_eq!(out, expected);
        assert_eq!(size, expected.len() as u64);
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn names_and_data_are_padded_to_four_bytes() {
        // Name lengths 1..=4 and data lengths 0..=4 cover every padding amount.
        let mut archive = CpioArchive::new();
        for name_len in 1..=4 {
            for data_len in 0..=4 {
                let name = format!("{}{data_len}", "n".repeat(name_len));
                archive
                    .add_file(&path(&name), 0o600, FileData::Bytes(vec![b'x'; data_len]))
                    .unwrap();
            }
        }
        let mut out = Vec::new();
        archive.write(0, &mut out).unwrap();
        let entries = parse(&out); // asserts alignment of every header
        assert_eq!(entries.len(), 20);
        for (name, _, _, _, _, _, data) in entries {
            let expected_len: usize = name[name.len() - 1..].parse().unwrap();
            assert_eq!(data, vec![b'x'; expected_len], "{name}");
        }
    }

    #[test]
    fn entries_are_sorted_with_implicit_parents_and_sequential_inodes() {
        let mut archive = CpioArchive::new();
        archive.add_file(&path("usr/lib/x"), 0o644, FileData::Bytes(b"x".to_vec())).unwrap();
        archive.add_symlink(&path("bin/sh"), "busybox").unwrap();
        archive.add_char_device(&path("dev/console"), 0o600, 5, 1).unwrap();
        // An explicit directory replaces the implicit one, keeping its own mode.
        archive.add_dir(&path("usr"), 0o700).unwrap();
        archive.add_file(&path("init"), 0o755, FileData::Bytes(b"#!/bin/sh\n".to_vec())).unwrap();
        let mut out = Vec::new();
        archive.write(7, &mut out).unwrap();

        let entries = parse(&out);
        let summary: Vec<(&str, u32, u32)> =
            entries.iter().map(|(name, mode, ino, ..)| (name.as_str(), *mode, *ino)).collect();
        assert_eq!(
            summary,
            vec![
                ("bin", 0o040_755, 1),
                ("bin/sh", 0o120_777, 2),
                ("dev", 0o040_755, 3),
                ("dev/console", 0o020_600, 4),
                ("init", 0o100_755, 5),
                ("usr", 0o040_700, 6),
                ("usr/lib", 0o040_755, 7),
                ("usr/lib/x", 0o100_644, 8),
            ]
        );
        let (_, _, _, nlink, mtime, rdev, target) = &entries[1];
        assert_eq!((*nlink, *mtime, *rdev), (1, 7, (0, 0)));
        assert_eq!(target, b"busybox");
        assert_eq!(entries[3].5, (5, 1));
        assert_eq!(entries[0].3, 2, "directories have nlink 2");
    }

    #[test]
    fn hostile_and_aliased_paths_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../etc/passwd",
            "a/../../b",
            "a/..",
            "a/./b",
            ".",
            "a//b",
            "a/",
            "a\0b",
            "TRAILER!!!",
        ] {
            let error = ArchivePath::new(bad).unwrap_err();
            assert!(
                matches!(&error, CpioError::InvalidPath { path, .. } if path == bad),
                "{bad:?}: {error}"
            );
        }
        // Names that merely look odd are fine.
        for good in ["..a", "a..", "...", ".hidden", "a b"] {
            ArchivePath::new(good).unwrap();
        }
    }

    #[test]
    fn duplicates_and_files_used_as_directories_are_refused() {
        let mut archive = CpioArchive::new();
        archive.add_file(&path("a"), 0o644, FileData::Bytes(Vec::new())).unwrap();
        let duplicate = archive.add_symlink(&path("a"), "b").unwrap_err();
        assert!(
            matches!(&duplicate, CpioError::DuplicatePath { path } if path == "a"),
            "{duplicate}"
        );
        let duplicate_dir = archive.add_dir(&path("a"), 0o755).unwrap_err();
        assert!(matches!(duplicate_dir, CpioError::DuplicatePath { .. }));
        let under_file = archive.add_dir(&path("a/b"), 0o755).unwrap_err();
        assert!(
            matches!(&under_file, CpioError::ParentNotDirectory { parent, child }
                if parent == "a" && child == "a/b"),
            "{under_file}"
        );

        archive.add_dir(&path("d"), 0o755).unwrap();
        assert!(matches!(
            archive.add_dir(&path("d"), 0o755).unwrap_err(),
            CpioError::DuplicatePath { .. }
        ));
        archive.add_symlink(&path("x/y"), "z").unwrap();
        let file_over_dir =
            archive.add_file(&path("x"), 0o644, FileData::Bytes(Vec::new())).unwrap_err();
        assert!(
            matches!(&file_over_dir, CpioError::ParentNotDirectory { parent, child }
                if parent == "x" && child == "x/y"),
            "{file_over_dir}"
        );
    }

    #[test]
    fn bad_modes_targets_and_epochs_are_refused() {
        let mut archive = CpioArchive::new();
        assert!(matches!(
            archive.add_file(&path("f"), 0o100_644, FileData::Bytes(Vec::new())),
            Err(CpioError::InvalidMode { .. })
        ));
        assert!(matches!(
            archive.add_symlink(&path("l"), ""),
            Err(CpioError::InvalidSymlinkTarget { .. })
        ));
        assert!(matches!(
            archive.add_symlink(&path("l"), "a\0b"),
            Err(CpioError::InvalidSymlinkTarget { .. })
        ));
        assert!(matches!(
            CpioArchive::new().write(u64::from(u32::MAX) + 1, Vec::new()),
            Err(CpioError::MtimeOutOfRange { .. })
        ));
    }

    #[test]
    fn reader_size_mismatches_are_reported() {
        for (announced, actual) in [(5u64, 3usize), (2, 3)] {
            let mut archive = CpioArchive::new();
            let reader = Box::new(io::Cursor::new(vec![0u8; actual]));
            archive
                .add_file(&path("f"), 0o644, FileData::Reader { size: announced, reader })
                .unwrap();
            let error = archive.write(0, Vec::new()).unwrap_err();
            assert!(
                matches!(&error, CpioError::SizeMismatch { path, expected, .. }
                    if path == "f" && *expected == announced),
                "{error}"
            );
        }
    }

    #[test]
    fn missing_host_file_names_both_paths() {
        let mut archive = CpioArchive::new();
        archive
            .add_file(&path("bin/tool"), 0o755, FileData::HostPath("/nonexistent/tool".into()))
            .unwrap();
        let error = archive.write(0, Vec::new()).unwrap_err().to_string();
        assert!(error.contains("bin/tool") && error.contains("/nonexistent/tool"), "{error}");
    }

    #[test]
    fn same_entries_in_any_order_give_identical_bytes() {
        let build = |reversed: bool, mtime: u64| {
            let mut adds: Vec<fn(&mut CpioArchive)> = vec![
                |a| {
                    a.add_file(&path("b/f"), 0o644, FileData::Bytes(b"1".to_vec())).unwrap();
                },
                |a| a.add_symlink(&path("a/l"), "../b/f").unwrap(),
                |a| a.add_dir(&path("c"), 0o711).unwrap(),
            ];
            if reversed {
                adds.reverse();
            }
            let mut archive = CpioArchive::new();
            for add in adds {
                add(&mut archive);
            }
            let mut out = Vec::new();
            archive.write(mtime, &mut out).unwrap();
            out
        };
        assert_eq!(build(false, 1), build(true, 1));
        assert_ne!(build(false, 1), build(false, 2));
    }
}
