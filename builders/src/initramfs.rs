//! Deterministic gzip-compressed initramfs builds, and the discovery image's layout.
//!
//! Same spec + same epoch (+ same Cargo.lock, which pins the deflate implementation) → the
//! same bytes, so the image's digest can name it in the artifact store.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ctpf_common::Sha256Digest;
use flate2::{Compression, GzBuilder};
use sha2::{Digest as _, Sha256};

use crate::cpio::{ArchivePath, CpioArchive, CpioError, FileData};

/// gzip level. Fixed: a different level gives different (still valid) bytes.
const GZIP_LEVEL: u32 = 9;
/// gzip header OS byte 255 ("unknown"), set explicitly rather than left to the library.
const GZIP_OS_UNKNOWN: u8 = 255;

/// Where the discovery image's kernel modules go, and the file listing their load order.
pub const MODULES_DIR: &str = "lib/modules";
pub const MODULE_LOAD_ORDER_FILE: &str = "lib/modules/load-order";

/// Busybox applets the discovery `/init` may call, installed as symlinks to `/bin/busybox`.
pub const DISCOVERY_APPLETS: &[&str] = &[
    "[",
    "awk",
    "cat",
    "chmod",
    "cp",
    "cut",
    "date",
    "dmesg",
    "echo",
    "env",
    "grep",
    "head",
    "hostname",
    "ifconfig",
    "insmod",
    "ip",
    "kill",
    "ln",
    "ls",
    "lsmod",
    "mdev",
    "mkdir",
    "mknod",
    "modprobe",
    "mount",
    "mv",
    "poweroff",
    "ps",
    "reboot",
    "rm",
    "sed",
    "seq",
    "sh",
    "sleep",
    "sort",
    "switch_root",
    "sync",
    "tail",
    "tee",
    "test",
    "timeout",
    "tr",
    "udhcpc",
    "umount",
    "uname",
    "wc",
    "wget",
];

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error(transparent)]
    Cpio(#[from] CpioError),
    #[error("cannot read {path}: {source}")]
    ReadHostFile { path: PathBuf, source: io::Error },
    #[error("cannot decompress {path}: {reason}")]
    Decompress { path: PathBuf, reason: String },
    #[error("{path} is not a kernel module: {reason}")]
    NotAKernelModule { path: PathBuf, reason: &'static str },
    #[error("kernel modules {first} and {second} would both be installed as {name}")]
    DuplicateModuleName { name: String, first: PathBuf, second: PathBuf },
    #[error("SOURCE_DATE_EPOCH {value:?} is not a whole number of seconds since 1970")]
    InvalidSourceDateEpoch { value: String },
    #[error("writing the initramfs: {0}")]
    Io(#[from] io::Error),
}

/// How a host file is stored on disk; compressed ones are unpacked into the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostEncoding {
    Plain,
    Xz,
    Gzip,
}

/// One entry of an initramfs. Paths are archive paths (relative: `bin/busybox`, not
/// `/bin/busybox`); missing parent directories are added with mode 0755.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitramfsEntry {
    HostFile { path: ArchivePath, source: PathBuf, encoding: HostEncoding, mode: u32 },
    Bytes { path: ArchivePath, contents: Vec<u8>, mode: u32 },
    Symlink { path: ArchivePath, target: String },
    Dir { path: ArchivePath, mode: u32 },
    CharDevice { path: ArchivePath, mode: u32, major: u32, minor: u32 },
}

/// What an initramfs contains; entry order does not matter (the archive is sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitramfsSpec {
    pub entries: Vec<InitramfsEntry>,
}

/// Digest and size of the compressed image as written to `out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltImage {
    pub digest: Sha256Digest,
    pub compressed_size: u64,
    pub cpio_size: u64,
}

/// Writes `spec` as a gzip-compressed newc cpio to `out`, every entry with mtime `epoch`
/// (the caller's SOURCE_DATE_EPOCH; 0 when it has none). Host files are read here.
pub fn build(
    spec: &InitramfsSpec,
    epoch: u64,
    out: impl Write,
) -> Result<BuiltImage, InitramfsError> {
    let archive = to_archive(spec)?;
    let mut hashing = HashingWriter { inner: out, hasher: Sha256::new(), written: 0 };
    // No file name, no comment, mtime 0: the gzip header carries nothing host-specific.
    let mut gzip = GzBuilder::new()
        .mtime(0)
        .operating_system(GZIP_OS_UNKNOWN)
        .write(&mut hashing, Compression::new(GZIP_LEVEL));
    let cpio_size = archive.write(epoch, &mut gzip)?;
    gzip.finish()?;
    hashing.inner.flush()?;
    Ok(BuiltImage {
        digest: Sha256Digest::from_bytes(hashing.hasher.finalize().into()),
        compressed_size: hashing.written,
        cpio_size,
    })
}

/// The epoch for [`build`] from a SOURCE_DATE_EPOCH value (reproducible-builds.org): unset
/// or empty means 0, so builds never pick up the wall clock.
pub fn parse_source_date_epoch(value: Option<&str>) -> Result<u64, InitramfsError> {
    match value.map(str::trim) {
        None | Some("") => Ok(0),
        Some(text) => text
            .parse()
            .map_err(|_| InitramfsError::InvalidSourceDateEpoch { value: text.to_owned() }),
    }
}

fn to_archive(spec: &InitramfsSpec) -> Result<CpioArchive, InitramfsError> {
    let mut archive = CpioArchive::new();
    for entry in &spec.entries {
        match entry {
            InitramfsEntry::HostFile { path, source, encoding: HostEncoding::Plain, mode } => {
                archive.add_file(path, *mode, FileData::HostPath(source.clone()))?
            }
            InitramfsEntry::HostFile { path, source, encoding, mode } => {
                // Compressed inputs (kernel modules) are small: unpack in memory.
                let contents = read_decompressed(source, *encoding)?;
                archive.add_file(path, *mode, FileData::Bytes(contents))?;
            }
            InitramfsEntry::Bytes { path, contents, mode } => {
                archive.add_file(path, *mode, FileData::Bytes(contents.clone()))?
            }
            InitramfsEntry::Symlink { path, target } => archive.add_symlink(path, target)?,
            InitramfsEntry::Dir { path, mode } => archive.add_dir(path, *mode)?,
            InitramfsEntry::CharDevice { path, mode, major, minor } => {
                archive.add_char_device(path, *mode, *major, *minor)?
            }
        }
    }
    Ok(archive)
}

pub(crate) fn read_decompressed(
    path: &Path,
    encoding: HostEncoding,
) -> Result<Vec<u8>, InitramfsError> {
    let read_error = |source| InitramfsError::ReadHostFile { path: path.to_owned(), source };
    let decompress_error =
        |reason: String| InitramfsError::Decompress { path: path.to_owned(), reason };
    let compressed = std::fs::read(path).map_err(read_error)?;
    let mut contents = Vec::new();
    match encoding {
        HostEncoding::Plain => return Ok(compressed),
        HostEncoding::Xz => lzma_rs::xz_decompress(&mut &compressed[..], &mut contents)
            .map_err(|error| decompress_error(error.to_string()))?,
        HostEncoding::Gzip => {
            flate2::read::GzDecoder::new(&compressed[..])
                .read_to_end(&mut contents)
                .map_err(|error| decompress_error(error.to_string()))?;
        }
    }
    Ok(contents)
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Inputs of the discovery image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryInputs {
    /// A statically linked busybox (Debian `busybox-static`: `/bin/busybox`).
    pub busybox: PathBuf,
    /// Kernel modules in load order: `.ko`, `.ko.xz` or `.ko.gz` (unpacked into the image,
    /// since busybox `insmod` cannot be relied on to decompress).
    pub kernel_modules: Vec<PathBuf>,
    /// The rendered `/init` script, installed with mode 0755.
    pub init_script: Vec<u8>,
    /// The static agent binary, installed as `bin/ctpf-agent`.
    pub agent: Option<PathBuf>,
    /// Further executable files (archive path, contents), e.g. `etc/udhcpc.script`.
    pub extra_files: Vec<(String, Vec<u8>)>,
}

/// The discovery image's layout:
/// - `bin/busybox` plus a symlink `bin/<applet>` → `busybox` for each of [`DISCOVERY_APPLETS`];
///   `sbin`, `usr/bin`, `usr/sbin` are symlinks to `bin` so any conventional PATH works;
/// - `lib/modules/<name>.ko` for each module, and `lib/modules/load-order` listing the file
///   names one per line in the given order (`/init` insmods them in that order);
/// - `dev/console` (char 5:1, mode 0600: the kernel opens it for init's stdio before devtmpfs
///   is mounted), empty `proc`, `sys`, `run`, `tmp` (1777), `etc`, `root` (0700);
/// - `init`, mode 0755; `bin/ctpf-agent` and the extra files, mode 0755.
pub fn discovery_spec(inputs: &DiscoveryInputs) -> Result<InitramfsSpec, InitramfsError> {
    let mut entries = vec![
        InitramfsEntry::HostFile {
            path: ArchivePath::new("bin/busybox")?,
            source: inputs.busybox.clone(),
            encoding: HostEncoding::Plain,
            mode: 0o755,
        },
        InitramfsEntry::Bytes {
            path: ArchivePath::new("init")?,
            contents: inputs.init_script.clone(),
            mode: 0o755,
        },
        InitramfsEntry::CharDevice {
            path: ArchivePath::new("dev/console")?,
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    ];
    if let Some(agent) = &inputs.agent {
        entries.push(InitramfsEntry::HostFile {
            path: ArchivePath::new("bin/ctpf-agent")?,
            source: agent.clone(),
            encoding: HostEncoding::Plain,
            mode: 0o755,
        });
    }
    for (path, contents) in &inputs.extra_files {
        entries.push(InitramfsEntry::Bytes {
            path: ArchivePath::new(path)?,
            contents: contents.clone(),
            mode: 0o755,
        });
    }
    for applet in DISCOVERY_APPLETS {
        entries.push(InitramfsEntry::Symlink {
            path: ArchivePath::new(&format!("bin/{applet}"))?,
            target: "busybox".to_owned(),
        });
    }
    for (link, target) in [("sbin", "bin"), ("usr/bin", "../bin"), ("usr/sbin", "../bin")] {
        entries.push(InitramfsEntry::Symlink {
            path: ArchivePath::new(link)?,
            target: target.to_owned(),
        });
    }
    for (dir, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("etc", 0o755),
        ("root", 0o700),
    ] {
        entries.push(InitramfsEntry::Dir { path: ArchivePath::new(dir)?, mode });
    }

    let mut load_order = String::new();
    let mut installed: Vec<(String, &PathBuf)> = Vec::new();
    for source in &inputs.kernel_modules {
        let (name, encoding) = module_name_and_encoding(source)?;
        if let Some((_, first)) = installed.iter().find(|(other, _)| *other == name) {
            return Err(InitramfsError::DuplicateModuleName {
                name,
                first: (*first).clone(),
                second: source.clone(),
            });
        }
        entries.push(InitramfsEntry::HostFile {
            path: ArchivePath::new(&format!("{MODULES_DIR}/{name}"))?,
            source: source.clone(),
            encoding,
            mode: 0o644,
        });
        load_order.push_str(&name);
        load_order.push('\n');
        installed.push((name, source));
    }
    entries.push(InitramfsEntry::Bytes {
        path: ArchivePath::new(MODULE_LOAD_ORDER_FILE)?,
        contents: load_order.into_bytes(),
        mode: 0o644,
    });
    Ok(InitramfsSpec { entries })
}

/// `virtio_net.ko.xz` → (`virtio_net.ko`, Xz). Other suffixes (`.ko.zst`, ...) are refused.
pub(crate) fn module_name_and_encoding(
    source: &Path,
) -> Result<(String, HostEncoding), InitramfsError> {
    let not_module = |reason| InitramfsError::NotAKernelModule { path: source.to_owned(), reason };
    let file_name = source
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| not_module("no UTF-8 file name"))?;
    let (stem, encoding) = if let Some(stem) = file_name.strip_suffix(".ko.xz") {
        (stem, HostEncoding::Xz)
    } else if let Some(stem) = file_name.strip_suffix(".ko.gz") {
        (stem, HostEncoding::Gzip)
    } else if let Some(stem) = file_name.strip_suffix(".ko") {
        (stem, HostEncoding::Plain)
    } else {
        return Err(not_module("name must end in .ko, .ko.xz or .ko.gz"));
    };
    if stem.is_empty() {
        return Err(not_module("empty module name"));
    }
    Ok((format!("{stem}.ko"), encoding))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample_spec(dir: &Path) -> InitramfsSpec {
        let host_file = dir.join("tool");
        std::fs::write(&host_file, b"tool contents").unwrap();
        InitramfsSpec {
            entries: vec![
                InitramfsEntry::HostFile {
                    path: ArchivePath::new("bin/tool").unwrap(),
                    source: host_file,
                    encoding: HostEncoding::Plain,
                    mode: 0o755,
                },
                InitramfsEntry::Bytes {
                    path: ArchivePath::new("etc/motd").unwrap(),
                    contents: b"hello\n".to_vec(),
                    mode: 0o644,
                },
                InitramfsEntry::Symlink {
                    path: ArchivePath::new("bin/t").unwrap(),
                    target: "tool".to_owned(),
                },
            ],
        }
    }

    #[test]
    fn builds_are_byte_identical_and_digest_matches_output() {
        let dir = tempfile::tempdir().unwrap();
        let spec = sample_spec(dir.path());
        let mut first = Vec::new();
        let mut second = Vec::new();
        let built = build(&spec, 1_700_000_000, &mut first).unwrap();
        build(&spec, 1_700_000_000, &mut second).unwrap();
        assert_eq!(first, second);
        assert_eq!(built.digest, Sha256Digest::of(&first));
        assert_eq!(built.compressed_size, first.len() as u64);
        // gzip header: magic, deflate, no flags (no file name), mtime 0, OS 255.
        assert_eq!(&first[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&first[4..8], &[0, 0, 0, 0]);
        assert_eq!(first[9], GZIP_OS_UNKNOWN);

        let mut other_epoch = Vec::new();
        let rebuilt = build(&spec, 1_700_000_001, &mut other_epoch).unwrap();
        assert_ne!(first, other_epoch);
        assert_ne!(built.digest, rebuilt.digest);
    }

    #[test]
    fn decompressed_size_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Vec::new();
        let built = build(&sample_spec(dir.path()), 0, &mut out).unwrap();
        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(&out[..]).read_to_end(&mut cpio).unwrap();
        assert_eq!(built.cpio_size, cpio.len() as u64);
        assert!(cpio.starts_with(b"070701"));
    }

    #[test]
    fn source_date_epoch_defaults_to_zero() {
        assert_eq!(parse_source_date_epoch(None).unwrap(), 0);
        assert_eq!(parse_source_date_epoch(Some("")).unwrap(), 0);
        assert_eq!(parse_source_date_epoch(Some("1700000000")).unwrap(), 1_700_000_000);
        for bad in ["-1", "1.5", "yesterday"] {
            assert!(matches!(
                parse_source_date_epoch(Some(bad)),
                Err(InitramfsError::InvalidSourceDateEpoch { .. })
            ));
        }
    }

    #[test]
    fn kernel_style_xz_modules_are_unpacked() {
        // `xz --check=crc32 --lzma2=dict=1MiB`, the flags the kernel's modules_install uses.
        const KERNEL_STYLE_XZ: &str = "fd377a585a0000016922de360200210110000000a8708e86e002c300\
            1a5d003f9145846c9a0a769e1fc32507b0062ce6f934de1eccf14e20000000008d4e4f09000132c4\
            0500000052ccaca13e300d8b020000000001595a";
        let compressed: Vec<u8> = (0..KERNEL_STYLE_XZ.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&KERNEL_STYLE_XZ[at..at + 2], 16).unwrap())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let module = dir.path().join("virtio_net.ko.xz");
        std::fs::write(&module, compressed).unwrap();
        let mut expected = b"\x7fELF".to_vec();
        expected.extend_from_slice(&b"virtio_net ".repeat(64));
        assert_eq!(read_decompressed(&module, HostEncoding::Xz).unwrap(), expected);

        std::fs::write(&module, b"not xz").unwrap();
        let error = read_decompressed(&module, HostEncoding::Xz).unwrap_err();
        assert!(
            matches!(&error, InitramfsError::Decompress { path, .. } if *path == module),
            "{error}"
        );
    }

    #[test]
    fn module_names_and_encodings() {
        let cases = [
            ("/m/kernel/virtio_net.ko.xz", "virtio_net.ko", HostEncoding::Xz),
            ("e1000.ko", "e1000.ko", HostEncoding::Plain),
            ("failover.ko.gz", "failover.ko", HostEncoding::Gzip),
        ];
        for (source, name, encoding) in cases {
            assert_eq!(
                module_name_and_encoding(Path::new(source)).unwrap(),
                (name.to_owned(), encoding)
            );
        }
        for bad in ["virtio.ko.zst", "virtio", ".ko", "x.ko.bz2"] {
            assert!(module_name_and_encoding(Path::new(bad)).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn discovery_layout_lists_modules_in_load_order() {
        let inputs = DiscoveryInputs {
            busybox: "/bin/busybox".into(),
            kernel_modules: vec!["/k/virtio.ko.xz".into(), "/k/failover.ko".into()],
            init_script: b"#!/bin/sh\n".to_vec(),
            agent: None,
            extra_files: Vec::new(),
        };
        let spec = discovery_spec(&inputs).unwrap();
        let load_order = spec.entries.iter().find_map(|entry| match entry {
            InitramfsEntry::Bytes { path, contents, .. }
                if path.as_str() == MODULE_LOAD_ORDER_FILE =>
            {
                Some(contents.clone())
            }
            _ => None,
        });
        assert_eq!(load_order.unwrap(), b"virtio.ko\nfailover.ko\n");

        let duplicate = DiscoveryInputs {
            kernel_modules: vec!["/a/virtio.ko".into(), "/b/virtio.ko.xz".into()],
            ..inputs
        };
        assert!(matches!(
            discovery_spec(&duplicate).unwrap_err(),
            InitramfsError::DuplicateModuleName { .. }
        ));
    }
}
