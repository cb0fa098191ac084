//! Writing a disk image to a USB stick, an SD card, a loop device or a regular file, then
//! reading it back and comparing SHA-256 digests (`ctpf flash`).
//!
//! Three steps, each usable alone:
//!
//! 1. **Is it safe?** [`Target::inspect`] finds what the target is; [`SystemSnapshot::gather`]
//!    reads what the decision needs from `/proc/self/mountinfo` and `/sys/dev/block`; [`check`]
//!    is the pure decision over that snapshot. A block device with a mounted filesystem (on it,
//!    on one of its partitions or on a device stacked on them), the disk holding `/` and
//!    devices used by device-mapper/RAID are always refused; a disk that is neither removable
//!    nor on USB is refused unless forced. Loop devices and regular files need no force.
//! 2. **Does it fit?** [`Plan::new`] opens the image, checks again and refuses an image larger
//!    than the device.
//! 3. **Write and verify.** [`Plan::execute`] opens the target with `O_DIRECT` (falling back to
//!    buffered I/O where the kernel refuses it) and, for block devices, `O_EXCL`, so a device
//!    the kernel has in use (mounted in another namespace, swap, LVM) fails to open. A reader
//!    thread reads and hashes the image while the caller's thread writes; the last partial
//!    block is padded with zeros to the device's logical block size. After `fsync` the page
//!    cache is dropped (`BLKFLSBUF` / `posix_fadvise(DONTNEED)`) and exactly the image's length
//!    is read back and hashed.
//!
//! A regular-file target ends up exactly the image: it is created if missing and truncated to
//! the image's length if it was longer (it is a file, not a disk). Progress goes to a
//! [`Progress`] implementation; this module knows nothing of terminals.

use std::{
    collections::BTreeSet,
    fmt, fs,
    fs::File,
    io::{self, Read as _, Seek as _},
    os::unix::fs::{FileExt as _, FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    str::FromStr,
    sync::mpsc,
    time::{Duration, Instant},
};

use ctpf_common::Sha256Digest;
use nix::{
    errno::Errno,
    fcntl::{OFlag, PosixFadviseAdvice, posix_fadvise},
};
use sha2::{Digest as _, Sha256};

/// Bytes per read and write: large enough that per-call overhead vanishes on USB sticks.
const CHUNK: usize = 4 << 20;
/// Buffers in flight: one per stage (read, hash, write or count) and one spare.
const BUFFERS: usize = 4;
/// Buffer alignment and, for regular files, the `O_DIRECT` length granularity.
const PAGE: usize = 4096;

/// Everything that stops a flash. An error from [`Target::inspect`], [`check_target`] or
/// [`Plan::new`], or from [`Plan::execute`] opening the target, means nothing was written;
/// later ones ([`FlashError::Io`], [`FlashError::Image`], [`FlashError::ImageChanged`],
/// [`FlashError::Mismatch`]) may leave a partial image.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error("cannot read the image {}", path.display())]
    Image {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the image {} is empty", path.display())]
    EmptyImage { path: PathBuf },
    #[error("{} does not exist (no such device)", path.display())]
    NoSuchDevice { path: PathBuf },
    #[error("{} is a {what}, not a block device or a regular file", path.display())]
    Unsupported { path: PathBuf, what: &'static str },
    #[error("the image and the target are the same file ({})", path.display())]
    SameFile { path: PathBuf },
    #[error("refusing to write to {}: {reason}; nothing was written", target.display())]
    Refused { target: PathBuf, reason: Refusal },
    #[error(
        "the image ({image_len} bytes) is larger than {} ({device_len} bytes); nothing was written",
        target.display()
    )]
    TooLarge { target: PathBuf, image_len: u64, device_len: u64 },
    #[error(
        "{} is in use by the kernel (mounted, swap, LVM/RAID, or opened exclusively by another \
         program); nothing was written",
        target.display()
    )]
    Busy { target: PathBuf },
    #[error("cannot open {}", target.display())]
    Open {
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("the image changed while it was written: expected {expected} bytes, read {read}")]
    ImageChanged { expected: u64, read: u64 },
    #[error(
        "verification failed: wrote {written}, read back {read_back} ({read_len} of {len} bytes); \
         the medium does not hold the image (failing or fake-capacity medium?)"
    )]
    Mismatch { written: Sha256Digest, read_back: Sha256Digest, read_len: u64, len: u64 },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> FlashError {
    let context = context.into();
    move |source| FlashError::Io { context, source }
}

/// A block device number, `major:minor` as in mountinfo and `/sys/dev/block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl DevNum {
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// From a `st_rdev`/`st_dev` value.
    pub fn from_dev_t(dev: u64) -> Self {
        use nix::sys::stat::{major, minor};
        // Both fit in 32 bits by construction (12+20 and 20+12 bits of `dev_t`).
        Self { major: major(dev) as u32, minor: minor(dev) as u32 }
    }
}

impl fmt::Display for DevNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl FromStr for DevNum {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (major, minor) = s.trim().split_once(':').ok_or(())?;
        Ok(Self { major: major.parse().map_err(drop)?, minor: minor.parse().map_err(drop)? })
    }
}

/// One line of `/proc/self/mountinfo`: which device is mounted where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub device: DevNum,
    /// The mount source (`/dev/sdb1`, `tmpfs`, ...).
    pub source: String,
    pub mount_point: String,
}

/// Parses mountinfo text; malformed lines are skipped. Mount points are unescaped (`\040`).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mut fields = before.split(' ');
            let device = fields.nth(2)?.parse().ok()?;
            let mount_point = unescape(fields.nth(1)?);
            let source = unescape(after.split(' ').nth(1)?);
            Some(Mount { device, source, mount_point })
        })
        .collect()
}

/// Undoes the kernel's octal escapes of space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                let value = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The device mounted on `/` (the last `/` line wins, as over-mounts come later).
pub fn root_mount(mounts: &[Mount]) -> Option<&Mount> {
    mounts.iter().rev().find(|m| m.mount_point == "/")
}

/// What a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    RegularFile,
    /// A loop device or one of its partitions.
    Loop,
    /// Any other block device (a disk or a partition of one).
    Disk,
}

/// A device stacked on the target or one of its partitions (device-mapper, RAID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub name: String,
    pub device: DevNum,
}

/// What the safety decision looks at. [`SystemSnapshot::gather`] fills it from the running
/// system; tests build it by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemSnapshot {
    pub kind: TargetKind,
    /// The target device (`None` for a regular file).
    pub device: Option<DevNum>,
    /// The whole disk the target is, or is a partition of.
    pub disk: Option<DevNum>,
    /// The partitions of the target, when it is a whole disk.
    pub partitions: Vec<DevNum>,
    /// Devices stacked on the target or its partitions, recursively.
    pub holders: Vec<Holder>,
    pub mounts: Vec<Mount>,
    /// The devices under `/`: its own device, the whole disks of its partitions, and what
    /// device-mapper or RAID builds it from.
    pub root_devices: Vec<DevNum>,
    /// The disk's sysfs `removable` flag, or the disk sits on a USB bus (USB sticks and card
    /// readers that report `removable=0`).
    pub removable: bool,
}

/// Why [`check`] refuses a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it is the disk holding / (the running system)")]
    HoldsRoot,
    #[error("it has mounted filesystems: {}; unmount them first", .mounts.join(", "))]
    Mounted {
        /// `SOURCE on MOUNT_POINT`, one per mount.
        mounts: Vec<String>,
    },
    #[error("it is in use by {} (device-mapper, LVM or RAID); stop that first", .holders.join(", "))]
    InUse { holders: Vec<String> },
    #[error(
        "it is not a removable disk (sysfs removable=0, not on USB); pass --force if it really is \
         the stick or card to erase"
    )]
    NotRemovable,
}

/// The safety decision. `force` lifts only [`Refusal::NotRemovable`].
pub fn check(snapshot: &SystemSnapshot, force: bool) -> Result<(), Refusal> {
    if snapshot.kind == TargetKind::RegularFile {
        return Ok(());
    }
    let own: BTreeSet<DevNum> =
        snapshot.device.iter().chain(&snapshot.partitions).copied().collect();
    let mut family = own.clone();
    family.extend(snapshot.holders.iter().map(|h| h.device));
    let root_mounted = root_mount(&snapshot.mounts).is_some_and(|m| family.contains(&m.device));
    let root_below =
        snapshot.root_devices.iter().any(|d| own.contains(d) || snapshot.disk.as_ref() == Some(d));
    if root_mounted || root_below {
        return Err(Refusal::HoldsRoot);
    }
    let mut mounts: Vec<String> = snapshot
        .mounts
        .iter()
        .filter(|m| family.contains(&m.device))
        .map(|m| format!("{} on {}", m.source, m.mount_point))
        .collect();
    mounts.dedup();
    if !mounts.is_empty() {
        return Err(Refusal::Mounted { mounts });
    }
    if !snapshot.holders.is_empty() {
        let holders = snapshot.holders.iter().map(|h| h.name.clone()).collect();
        return Err(Refusal::InUse { holders });
    }
    if snapshot.kind == TargetKind::Disk && !snapshot.removable && !force {
        return Err(Refusal::NotRemovable);
    }
    Ok(())
}

/// The sysfs directory of a block device (`/sys/devices/.../sdb/sdb1`), if the kernel has one.
fn sysfs_dir(device: DevNum) -> Option<PathBuf> {
    fs::canonicalize(format!("/sys/dev/block/{device}")).ok()
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

fn sysfs_devnum(dir: &Path) -> Option<DevNum> {
    read_trimmed(&dir.join("dev"))?.parse().ok()
}

/// The whole disk's sysfs directory: the parent for a partition, else the device's own.
fn disk_dir(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(parent) if dir.join("partition").exists() => parent.to_owned(),
        _ => dir.to_owned(),
    }
}

/// Names and numbers of the devices in a sysfs `holders` or `slaves` directory.
fn stacked(dir: &Path, which: &str) -> Vec<(String, DevNum)> {
    let Ok(entries) = fs::read_dir(dir.join(which)) else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let device = sysfs_devnum(&fs::canonicalize(e.path()).ok()?)?;
            Some((name, device))
        })
        .collect()
}

fn holders_of(dir: &Path, out: &mut Vec<Holder>, depth: usize) {
    for (name, device) in stacked(dir, "holders") {
        if out.iter().any(|h| h.device == device) {
            continue;
        }
        out.push(Holder { name, device });
        if let Some(sub) = sysfs_dir(device).filter(|_| depth < 8) {
            holders_of(&sub, out, depth + 1);
        }
    }
}

/// The device, its whole disk and, through `slaves`, what it is built from.
fn underlying(device: DevNum, out: &mut BTreeSet<DevNum>, depth: usize) {
    if !out.insert(device) || depth > 8 {
        return;
    }
    let Some(dir) = sysfs_dir(device) else { return };
    if let Some(disk) = sysfs_devnum(&disk_dir(&dir)) {
        out.insert(disk);
    }
    for (_, slave) in stacked(&dir, "slaves") {
        underlying(slave, out, depth + 1);
    }
}

/// The device number of a mount source that is a block device path.
fn source_devnum(source: &str) -> Option<DevNum> {
    if !source.starts_with('/') {
        return None;
    }
    let meta = fs::metadata(source).ok()?;
    meta.file_type().is_block_device().then(|| DevNum::from_dev_t(meta.rdev()))
}

impl SystemSnapshot {
    /// Reads `/proc/self/mountinfo` and sysfs for `target`.
    pub fn gather(target: &Target) -> Result<Self, FlashError> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_error("reading /proc/self/mountinfo"))?;
        let mut mounts = parse_mountinfo(&mountinfo);
        // btrfs and some others show an anonymous device number: add the source's too.
        let by_source: Vec<Mount> = mounts
            .iter()
            .filter_map(|m| {
                let device = source_devnum(&m.source).filter(|d| *d != m.device)?;
                Some(Mount { device, ..m.clone() })
            })
            .collect();
        mounts.extend(by_source);
        let mut root_devices = BTreeSet::new();
        if let Some(root) = root_mount(&mounts) {
            underlying(root.device, &mut root_devices, 0);
            if let Some(device) = source_devnum(&root.source) {
                underlying(device, &mut root_devices, 0);
            }
        }
        let mut snapshot = Self {
            kind: target.kind,
            device: target.device,
            disk: None,
            partitions: Vec::new(),
            holders: Vec::new(),
            mounts,
            root_devices: root_devices.into_iter().collect(),
            removable: false,
        };
        let Some(device) = target.device else { return Ok(snapshot) };
        let Some(dir) = sysfs_dir(device) else { return Ok(snapshot) };
        let disk = disk_dir(&dir);
        snapshot.disk = sysfs_devnum(&disk);
        snapshot.removable = read_trimmed(&disk.join("removable")).as_deref() == Some("1")
            || disk.to_string_lossy().contains("/usb");
        holders_of(&dir, &mut snapshot.holders, 0);
        if disk == dir {
            for entry in fs::read_dir(&dir).into_iter().flatten().filter_map(Result::ok) {
                let path = entry.path();
                if path.join("partition").exists()
                    && let Some(partition) = sysfs_devnum(&path)
                {
                    snapshot.partitions.push(partition);
                    holders_of(&path, &mut snapshot.holders, 0);
                }
            }
        }
        snapshot.partitions.sort();
        Ok(snapshot)
    }
}

/// The block-device ioctls: the only unsafe code in the workspace.
#[allow(unsafe_code)]
mod blkdev {
    use std::{fs::File, io, os::fd::AsRawFd as _};

    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), nix::libc::c_int);
    nix::ioctl_none!(blkflsbuf, 0x12, 97);

    /// The device's size in bytes (BLKGETSIZE64).
    pub fn size(file: &File) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: the fd stays open for the call (borrowed `File`); the kernel writes one u64,
        // the type `size` has.
        unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }?;
        Ok(size)
    }

    /// The device's logical block size (BLKSSZGET): the unit of `O_DIRECT` I/O.
    pub fn logical_block_size(file: &File) -> io::Result<u32> {
        let mut size: nix::libc::c_int = 0;
        // SAFETY: as above; the kernel writes one int.
        unsafe { blksszget(file.as_raw_fd(), &mut size) }?;
        u32::try_from(size).map_err(|_| io::Error::other(format!("logical block size {size}")))
    }

    /// Writes back and drops the device's buffer cache (BLKFLSBUF).
    pub fn flush_buffers(file: &File) -> io::Result<()> {
        // SAFETY: the fd stays open for the call; BLKFLSBUF takes no argument.
        unsafe { blkflsbuf(file.as_raw_fd()) }?;
        Ok(())
    }
}

/// [`check`] on a fresh [`SystemSnapshot`] of `target`, as [`FlashError::Refused`].
pub fn check_target(target: &Target, force: bool) -> Result<(), FlashError> {
    let snapshot = SystemSnapshot::gather(target)?;
    check(&snapshot, force)
        .map_err(|reason| FlashError::Refused { target: target.path.clone(), reason })
}

/// What will be written to.
#[derive(Debug, Clone)]
pub struct Target {
    pub path: PathBuf,
    pub kind: TargetKind,
    /// The block device's number (`None` for a regular file).
    pub device: Option<DevNum>,
    /// The device's size, once [`Plan::new`] has measured it (`BLKGETSIZE64`); `None` for
    /// regular files, which grow to the image.
    pub size: Option<u64>,
    /// The unit of `O_DIRECT` writes: the device's logical block size (`BLKSSZGET`, measured
    /// by [`Plan::new`]), or a page for files.
    pub block_size: u32,
    /// Whether the target exists already (a missing regular file is created).
    pub exists: bool,
    /// The disk's model from sysfs (`device/model`), when it has one.
    pub model: Option<String>,
    /// A loop device's backing file.
    pub backing_file: Option<PathBuf>,
    /// `(st_dev, st_ino)` of a regular file, to refuse flashing an image onto itself.
    identity: Option<(u64, u64)>,
}

impl Target {
    /// Finds out what `path` is from its metadata and sysfs, without opening it. A missing
    /// path becomes a new regular file, except under `/dev`, where it is a mistyped device.
    pub fn inspect(path: &Path) -> Result<Self, FlashError> {
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if path.starts_with("/dev") {
                    return Err(FlashError::NoSuchDevice { path: path.to_owned() });
                }
                return Ok(Self::regular_file(path, false, None));
            }
            Err(source) => return Err(FlashError::Open { target: path.to_owned(), source }),
        };
        let file_type = meta.file_type();
        if file_type.is_file() {
            return Ok(Self::regular_file(path, true, Some((meta.dev(), meta.ino()))));
        }
        if !file_type.is_block_device() {
            let what = match () {
                () if file_type.is_dir() => "directory",
                () if file_type.is_char_device() => "character device",
                () if file_type.is_fifo() => "named pipe",
                () if file_type.is_socket() => "socket",
                () => "special file",
            };
            return Err(FlashError::Unsupported { path: path.to_owned(), what });
        }
        let device = DevNum::from_dev_t(meta.rdev());
        let disk = sysfs_dir(device).map(|dir| disk_dir(&dir));
        let is_loop = disk.as_ref().is_some_and(|d| d.join("loop").is_dir());
        Ok(Self {
            path: path.to_owned(),
            kind: if is_loop { TargetKind::Loop } else { TargetKind::Disk },
            device: Some(device),
            size: None,
            block_size: 512,
            exists: true,
            model: disk.as_ref().and_then(|d| read_trimmed(&d.join("device/model"))),
            backing_file: disk
                .as_ref()
                .and_then(|d| read_trimmed(&d.join("loop/backing_file")))
                .map(PathBuf::from),
            identity: None,
        })
    }

    fn regular_file(path: &Path, exists: bool, identity: Option<(u64, u64)>) -> Self {
        Self {
            path: path.to_owned(),
            kind: TargetKind::RegularFile,
            device: None,
            size: None,
            block_size: PAGE as u32,
            exists,
            model: None,
            backing_file: None,
            identity,
        }
    }
}

/// Which part of a flash is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Write,
    Verify,
}

/// Receives progress; called from the thread that runs [`Plan::execute`].
pub trait Progress {
    /// A phase starts; `total` bytes will pass.
    fn start(&mut self, phase: Phase, total: u64);
    /// `done` of the phase's bytes have passed.
    fn update(&mut self, done: u64);
    /// The phase is over (for [`Phase::Write`], after `fsync`).
    fn finish(&mut self);
    /// Something the user should know, e.g. that `O_DIRECT` was refused.
    fn note(&mut self, _message: &str) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&mut self, _: Phase, _: u64) {}
    fn update(&mut self, _: u64) {}
    fn finish(&mut self) {}
}

/// What a verified flash did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashReport {
    pub bytes: u64,
    pub digest: Sha256Digest,
    /// Whether the writes bypassed the page cache (`O_DIRECT`).
    pub direct: bool,
    /// Writing, `fsync` included.
    pub write_time: Duration,
    /// Dropping caches, reading back and hashing.
    pub verify_time: Duration,
}

/// A checked flash, ready to run.
#[derive(Debug)]
pub struct Plan {
    image_path: PathBuf,
    image: File,
    image_len: u64,
    target: Target,
}

impl Plan {
    /// Opens the image, runs [`check`] on a fresh snapshot and refuses an image that does not
    /// fit. Writes nothing.
    pub fn new(image_path: &Path, target: Target, force: bool) -> Result<Self, FlashError> {
        let image_error = |source| FlashError::Image { path: image_path.to_owned(), source };
        let mut image = File::open(image_path).map_err(image_error)?;
        let meta = image.metadata().map_err(image_error)?;
        let image_len = if meta.file_type().is_block_device() {
            image.seek(io::SeekFrom::End(0)).map_err(image_error)?
        } else if meta.is_file() {
            meta.len()
        } else {
            let error = io::Error::other("not a regular file or a block device");
            return Err(image_error(error));
        };
        if image_len == 0 {
            return Err(FlashError::EmptyImage { path: image_path.to_owned() });
        }
        let same_device = meta.file_type().is_block_device()
            && target.device == Some(DevNum::from_dev_t(meta.rdev()));
        if same_device || target.identity == Some((meta.dev(), meta.ino())) {
            return Err(FlashError::SameFile { path: target.path.clone() });
        }
        check_target(&target, force)?;
        let mut target = target;
        if target.kind != TargetKind::RegularFile {
            let fail = |source| open_error(&target.path, source);
            let device = File::open(&target.path).map_err(fail)?;
            target.size = Some(blkdev::size(&device).map_err(fail)?);
            target.block_size = blkdev::logical_block_size(&device).map_err(fail)?.max(512);
        }
        if let Some(device_len) = target.size
            && image_len > device_len
        {
            return Err(FlashError::TooLarge {
                target: target.path.clone(),
                image_len,
                device_len,
            });
        }
        Ok(Self { image_path: image_path.to_owned(), image, image_len, target })
    }

    pub fn image_len(&self) -> u64 {
        self.image_len
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Writes the image, syncs, drops the caches, reads it back and compares digests.
    pub fn execute(self, progress: &mut dyn Progress) -> Result<FlashReport, FlashError> {
        let Self { image_path, image, image_len, target } = self;
        let mut out = Output::open(&target, progress)?;
        let block = target.block_size as usize;
        let align = PAGE.max(block);

        // Write: one thread reads the image, one hashes it, this one writes.
        let started = Instant::now();
        progress.start(Phase::Write, image_len);
        let _ = posix_fadvise(&image, 0, 0, PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL);
        let mut read = 0u64;
        let mut written = 0u64;
        let image_digest = pipeline(
            align,
            |buf| {
                let n = fill(&image, buf)
                    .map_err(|source| FlashError::Image { path: image_path.clone(), source })?;
                let n = n.min(usize::try_from(image_len - read).unwrap_or(usize::MAX));
                read += n as u64;
                Ok(n)
            },
            |buf, n| {
                out.write(buf, n, written, progress)?;
                written += n as u64;
                progress.update(written);
                Ok(())
            },
        )?;
        if read != image_len {
            return Err(FlashError::ImageChanged { expected: image_len, read });
        }
        let target_name = target.path.display().to_string();
        if target.kind == TargetKind::RegularFile {
            out.file
                .set_len(image_len)
                .map_err(io_error(format!("truncating {target_name} to the image's length")))?;
        }
        out.file.sync_all().map_err(io_error(format!("syncing {target_name}")))?;
        let write_time = started.elapsed();
        progress.finish();

        // Verify: drop what the page cache holds of the target, then read it back.
        let started = Instant::now();
        progress.start(Phase::Verify, image_len);
        if target.kind == TargetKind::RegularFile {
            posix_fadvise(&out.file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
                .map_err(|e| io_error(format!("dropping the cache of {target_name}"))(e.into()))?;
        } else {
            blkdev::flush_buffers(&out.file)
                .map_err(io_error(format!("dropping the buffer cache of {target_name}")))?;
        }
        let mut offset = 0u64;
        let mut checked = 0u64;
        let file = &out.file;
        let direct = out.direct;
        let read_back = pipeline(
            align,
            |buf| {
                let left = image_len - offset;
                let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let ask = if direct { want.next_multiple_of(block).min(buf.len()) } else { want };
                let n = read_at(file, &mut buf[..ask], offset)
                    .map_err(io_error(format!("reading back {target_name} at byte {offset}")))?;
                let n = n.min(want);
                offset += n as u64;
                Ok(n)
            },
            |_, n| {
                checked += n as u64;
                progress.update(checked);
                Ok(())
            },
        )?;
        let verify_time = started.elapsed();
        progress.finish();
        let written = image_digest;
        if written != read_back || checked != image_len {
            return Err(FlashError::Mismatch {
                written,
                read_back,
                read_len: checked,
                len: image_len,
            });
        }
        Ok(FlashReport {
            bytes: image_len,
            digest: written,
            direct: out.direct,
            write_time,
            verify_time,
        })
    }
}

/// The open target.
struct Output {
    file: File,
    path: PathBuf,
    kind: TargetKind,
    block: usize,
    direct: bool,
}

impl Output {
    /// Opens read-write (reading back goes through the same descriptor, so a block device
    /// stays claimed until verified), with `O_DIRECT` unless the kernel refuses it.
    fn open(target: &Target, progress: &mut dyn Progress) -> Result<Self, FlashError> {
        let mut direct = true;
        let opened = match open_target(&target.path, target.kind, true) {
            Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                progress.note(&format!(
                    "{} does not support direct I/O (O_DIRECT); writing through the page cache",
                    target.path.display()
                ));
                direct = false;
                open_target(&target.path, target.kind, false)
            }
            other => other,
        };
        let file = opened.map_err(|source| open_error(&target.path, source))?;
        Ok(Self {
            file,
            path: target.path.clone(),
            kind: target.kind,
            block: target.block_size as usize,
            direct,
        })
    }

    /// Writes `buf[..n]` at `offset`; with `O_DIRECT`, a short last block is padded with zeros
    /// (`buf` is a whole aligned buffer, so the padding fits).
    fn write(
        &mut self,
        buf: &mut [u8],
        n: usize,
        offset: u64,
        progress: &mut dyn Progress,
    ) -> Result<(), FlashError> {
        let len = if self.direct { n.next_multiple_of(self.block).min(buf.len()) } else { n };
        buf[n..len].fill(0);
        match self.file.write_all_at(&buf[..len], offset) {
            Ok(()) => Ok(()),
            Err(e) if self.direct && e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                // Some filesystems accept O_DIRECT at open and refuse it on write.
                progress.note(&format!(
                    "{} refused a direct write; writing through the page cache",
                    self.path.display()
                ));
                self.file = open_target(&self.path, self.kind, false)
                    .map_err(|source| open_error(&self.path, source))?;
                self.direct = false;
                self.write(buf, n, offset, progress)
            }
            Err(source) => Err(FlashError::Io {
                context: format!("writing {} at byte {offset}", self.path.display()),
                source,
            }),
        }
    }
}

fn open_error(path: &Path, source: io::Error) -> FlashError {
    if source.raw_os_error() == Some(Errno::EBUSY as i32) {
        return FlashError::Busy { target: path.to_owned() };
    }
    FlashError::Open { target: path.to_owned(), source }
}

/// Read-write; a regular file is created if missing; a block device is opened exclusively
/// (`O_EXCL`), which fails with `EBUSY` while the kernel uses it.
fn open_target(path: &Path, kind: TargetKind, direct: bool) -> io::Result<File> {
    let mut flags = OFlag::empty();
    if direct {
        flags |= OFlag::O_DIRECT;
    }
    if kind != TargetKind::RegularFile {
        flags |= OFlag::O_EXCL;
    }
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(kind == TargetKind::RegularFile)
        .custom_flags(flags.bits())
        .open(path)
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn fill(mut file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Like [`fill`], from `offset` (`buf.len()` is a multiple of the block size with `O_DIRECT`).
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A [`CHUNK`]-byte buffer at an `align`-byte boundary, as `O_DIRECT` needs (over-allocated
/// and offset, which needs no unsafe code).
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new(align: usize) -> Self {
        let storage = vec![0u8; CHUNK + align];
        let address = storage.as_ptr().addr();
        let start = address.next_multiple_of(align) - address;
        Self { storage, start }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + CHUNK]
    }
}

/// Three stages over [`BUFFERS`] aligned buffers: `produce` on a thread of its own fills a
/// buffer and returns how many bytes it holds (0, or less than a whole buffer, ends the
/// stream); a second thread hashes those bytes; `consume` runs on this thread. Each stage
/// works on a different buffer at once, so reading, hashing and writing overlap. The first
/// error stops all three. Returns the SHA-256 of every byte produced.
fn pipeline<P, C>(align: usize, mut produce: P, mut consume: C) -> Result<Sha256Digest, FlashError>
where
    P: FnMut(&mut [u8]) -> Result<usize, FlashError> + Send,
    C: FnMut(&mut [u8], usize) -> Result<(), FlashError>,
{
    let (hash_tx, hash_rx) = mpsc::sync_channel::<(AlignedBuf, usize)>(BUFFERS);
    let (full_tx, full_rx) = mpsc::sync_channel::<(AlignedBuf, usize)>(BUFFERS);
    let (empty_tx, empty_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..BUFFERS {
        // Cannot fail: the receiver is alive.
        let _ = empty_tx.send(AlignedBuf::new(align));
    }
    std::thread::scope(|scope| {
        let producer = scope.spawn(move || -> Result<(), FlashError> {
            while let Ok(mut buf) = empty_rx.recv() {
                let n = produce(buf.as_mut())?;
                if n == 0 {
                    break;
                }
                // A closed channel means a later stage stopped; its error is the one reported.
                if hash_tx.send((buf, n)).is_err() || n < CHUNK {
                    break;
                }
            }
            Ok(())
        });
        let hasher = scope.spawn(move || {
            let mut hash = Sha256::new();
            for (mut buf, n) in hash_rx {
                hash.update(&buf.as_mut()[..n]);
                if full_tx.send((buf, n)).is_err() {
                    break;
                }
            }
            Sha256Digest::from_bytes(hash.finalize().into())
        });
        let mut consumed = Ok(());
        for (mut buf, n) in &full_rx {
            if let Err(e) = consume(buf.as_mut(), n) {
                consumed = Err(e);
                break;
            }
            let _ = empty_tx.send(buf);
        }
        drop(full_rx);
        drop(empty_tx);
        let stopped = || FlashError::Io {
            context: "a flash thread stopped".into(),
            source: io::Error::other("panicked"),
        };
        let produced = producer.join().unwrap_or_else(|_| Err(stopped()));
        let digest = hasher.join().map_err(|_| stopped());
        consumed.and(produced).and(digest)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A laptop's mountinfo: `/` on an NVMe partition, a USB stick's partition mounted under
    /// a path with a space, a btrfs mount (anonymous device number), tmpfs.
    const MOUNTINFO: &str = "\
22 28 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
28 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
30 28 0:25 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=1620000k
31 28 259:1 / /boot/efi rw,relatime shared:29 - vfat /dev/nvme0n1p1 rw,fmask=0077
97 30 8:17 / /run/media/ann/MY\\040STICK rw,nosuid,nodev,relatime shared:51 - vfat /dev/sdb1 rw
98 28 0:48 /@data /data rw,relatime shared:60 - btrfs /dev/sdc1 rw,space_cache=v2
this line is not mountinfo
";

    fn mounts() -> Vec<Mount> {
        parse_mountinfo(MOUNTINFO)
    }

    fn disk(device: DevNum, partitions: &[DevNum]) -> SystemSnapshot {
        SystemSnapshot {
            kind: TargetKind::Disk,
            device: Some(device),
            disk: Some(device),
            partitions: partitions.to_vec(),
            holders: Vec::new(),
            mounts: mounts(),
            root_devices: vec![DevNum::new(259, 0), DevNum::new(259, 2)],
            removable: true,
        }
    }

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let mounts = mounts();
        assert_eq!(mounts.len(), 6, "the malformed line is skipped");
        assert_eq!(
            mounts[4],
            Mount {
                device: DevNum::new(8, 17),
                source: "/dev/sdb1".into(),
                mount_point: "/run/media/ann/MY STICK".into(),
            }
        );
        assert_eq!(mounts[5].device, DevNum::new(0, 48));
        assert_eq!(mounts[5].source, "/dev/sdc1");
        assert_eq!(root_mount(&mounts).unwrap().source, "/dev/nvme0n1p2");
        assert_eq!(unescape(r"a\011b\134c\012"), "a\tb\\c\n");
        assert_eq!(unescape(r"trailing\04"), r"trailing\04");
        assert_eq!(parse_mountinfo(""), Vec::new());
    }

    #[test]
    fn devnums_parse_and_print() {
        assert_eq!("8:17".parse(), Ok(DevNum::new(8, 17)));
        assert_eq!("8".parse::<DevNum>(), Err(()));
        assert_eq!("a:1".parse::<DevNum>(), Err(()));
        assert_eq!(DevNum::new(259, 3).to_string(), "259:3");
        // makedev(8, 17) and makedev(259, 65536) in the kernel's 64-bit encoding.
        assert_eq!(DevNum::from_dev_t(0x811), DevNum::new(8, 17));
        assert_eq!(DevNum::from_dev_t(0x1001_0300), DevNum::new(259, 65536));
        let null = fs::metadata("/dev/null").unwrap();
        assert_eq!(DevNum::from_dev_t(null.rdev()), DevNum::new(1, 3));
    }

    #[test]
    fn a_regular_file_is_always_allowed() {
        let snapshot = SystemSnapshot {
            kind: TargetKind::RegularFile,
            device: None,
            disk: None,
            partitions: Vec::new(),
            holders: Vec::new(),
            mounts: mounts(),
            root_devices: vec![DevNum::new(259, 2)],
            removable: false,
        };
        assert_eq!(check(&snapshot, false), Ok(()));
    }

    #[test]
    fn an_unmounted_removable_disk_is_allowed() {
        assert_eq!(check(&disk(DevNum::new(8, 32), &[DevNum::new(8, 33)]), false), Ok(()));
    }

    #[test]
    fn a_disk_with_a_mounted_partition_is_refused_naming_the_mount_point() {
        let snapshot = disk(DevNum::new(8, 16), &[DevNum::new(8, 17), DevNum::new(8, 18)]);
        let refusal = check(&snapshot, true).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::Mounted { mounts: vec!["/dev/sdb1 on /run/media/ann/MY STICK".into()] }
        );
        assert!(refusal.to_string().contains("/run/media/ann/MY STICK"), "{refusal}");
        // The partition itself, too.
        let mut partition = disk(DevNum::new(8, 17), &[]);
        partition.disk = Some(DevNum::new(8, 16));
        assert!(matches!(check(&partition, true), Err(Refusal::Mounted { .. })));
    }

    #[test]
    fn a_mount_by_source_counts_like_one_by_number() {
        // btrfs shows 0:48 in mountinfo; gather() adds the source's own number.
        let mut snapshot = disk(DevNum::new(8, 32), &[DevNum::new(8, 33)]);
        let btrfs = snapshot.mounts[5].clone();
        snapshot.mounts.push(Mount { device: DevNum::new(8, 33), ..btrfs });
        assert_eq!(
            check(&snapshot, false),
            Err(Refusal::Mounted { mounts: vec!["/dev/sdc1 on /data".into()] })
        );
    }

    #[test]
    fn the_disk_holding_root_is_refused_even_when_forced() {
        let nvme = disk(DevNum::new(259, 0), &[DevNum::new(259, 1), DevNum::new(259, 2)]);
        assert_eq!(check(&nvme, true), Err(Refusal::HoldsRoot));
        // Its other partition, with nothing mounted on it: still the system disk.
        let mut other = disk(DevNum::new(259, 3), &[]);
        other.disk = Some(DevNum::new(259, 0));
        assert_eq!(check(&other, true), Err(Refusal::HoldsRoot));
        // `/` on device-mapper over this disk: root_devices has the disk, mountinfo only dm-0.
        let mut lvm = disk(DevNum::new(8, 0), &[DevNum::new(8, 1)]);
        lvm.root_devices = vec![DevNum::new(253, 0), DevNum::new(8, 1), DevNum::new(8, 0)];
        assert_eq!(check(&lvm, true), Err(Refusal::HoldsRoot));
        assert!(Refusal::HoldsRoot.to_string().contains("holding /"));
    }

    #[test]
    fn root_mounted_on_a_holder_is_refused() {
        let mut snapshot = disk(DevNum::new(8, 0), &[DevNum::new(8, 1)]);
        snapshot.root_devices.clear();
        snapshot.mounts = parse_mountinfo("28 1 253:0 / / rw - ext4 /dev/mapper/vg-root rw\n");
        snapshot.holders = vec![Holder { name: "dm-0".into(), device: DevNum::new(253, 0) }];
        assert_eq!(check(&snapshot, true), Err(Refusal::HoldsRoot));
    }

    #[test]
    fn a_disk_used_by_device_mapper_is_refused() {
        let mut snapshot = disk(DevNum::new(8, 32), &[DevNum::new(8, 33)]);
        snapshot.holders = vec![Holder { name: "dm-3".into(), device: DevNum::new(253, 3) }];
        let refusal = check(&snapshot, true).unwrap_err();
        assert_eq!(refusal, Refusal::InUse { holders: vec!["dm-3".into()] });
        // A filesystem on the holder is reported as mounted.
        snapshot
            .mounts
            .extend(parse_mountinfo("99 28 253:3 / /srv rw - xfs /dev/mapper/crypt rw\n"));
        assert_eq!(
            check(&snapshot, true),
            Err(Refusal::Mounted { mounts: vec!["/dev/mapper/crypt on /srv".into()] })
        );
    }

    #[test]
    fn a_fixed_disk_needs_force() {
        let mut snapshot = disk(DevNum::new(8, 48), &[]);
        snapshot.removable = false;
        let refusal = check(&snapshot, false).unwrap_err();
        assert_eq!(refusal, Refusal::NotRemovable);
        assert!(refusal.to_string().contains("--force"));
        assert_eq!(check(&snapshot, true), Ok(()));
    }

    #[test]
    fn loop_devices_need_no_force_but_are_refused_when_mounted() {
        let mut snapshot = disk(DevNum::new(7, 0), &[DevNum::new(259, 8)]);
        snapshot.kind = TargetKind::Loop;
        snapshot.removable = false;
        assert_eq!(check(&snapshot, false), Ok(()));
        snapshot
            .mounts
            .extend(parse_mountinfo("120 28 259:8 / /var/tmp/x\\040y rw - ext4 /dev/loop0p1 rw\n"));
        assert_eq!(
            check(&snapshot, true),
            Err(Refusal::Mounted { mounts: vec!["/dev/loop0p1 on /var/tmp/x y".into()] })
        );
    }

    #[test]
    fn errors_say_that_nothing_was_written() {
        let error = FlashError::Refused { target: "/dev/sdb".into(), reason: Refusal::HoldsRoot };
        assert_eq!(
            error.to_string(),
            "refusing to write to /dev/sdb: it is the disk holding / (the running system); \
             nothing was written"
        );
        let error =
            FlashError::TooLarge { target: "/dev/loop3".into(), image_len: 10, device_len: 9 };
        assert!(error.to_string().contains("larger than /dev/loop3"), "{error}");
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for align in [512, 4096, 8192] {
            let mut buf = AlignedBuf::new(align);
            assert_eq!(buf.as_mut().as_ptr().addr() % align, 0);
            assert_eq!(buf.as_mut().len(), CHUNK);
        }
    }

    #[test]
    fn pipeline_passes_every_byte_in_order_and_stops_at_the_first_error() {
        let data: Vec<u8> = (0..CHUNK * 2 + 1000).map(|i| (i % 251) as u8).collect();
        let mut at = 0;
        let mut out = Vec::new();
        let digest = pipeline(
            PAGE,
            |buf| {
                let n = buf.len().min(data.len() - at);
                buf[..n].copy_from_slice(&data[at..at + n]);
                at += n;
                Ok(n)
            },
            |buf, n| {
                out.extend_from_slice(&buf[..n]);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(out, data);
        assert_eq!(digest, Sha256Digest::of(&data));
        let mut calls = 0;
        let failed = pipeline(
            PAGE,
            |buf| Ok(buf.len()),
            |_, _| {
                calls += 1;
                Err(FlashError::EmptyImage { path: "x".into() })
            },
        );
        assert!(matches!(failed, Err(FlashError::EmptyImage { .. })));
        assert_eq!(calls, 1);
        let failed =
            pipeline(PAGE, |_| Err(FlashError::EmptyImage { path: "y".into() }), |_, _| Ok(()));
        assert!(matches!(failed, Err(FlashError::EmptyImage { .. })));
    }

    #[test]
    fn targets_are_inspected() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Target::inspect(&dir.path().join("new.img")).unwrap();
        assert_eq!(
            (missing.kind, missing.exists, missing.size),
            (TargetKind::RegularFile, false, None)
        );
        let existing = dir.path().join("old.img");
        fs::write(&existing, b"x").unwrap();
        assert!(Target::inspect(&existing).unwrap().exists);
        let error = Target::inspect(dir.path()).unwrap_err();
        assert!(error.to_string().contains("is a directory, not a block device"), "{error}");
        let error = Target::inspect(Path::new("/dev/null")).unwrap_err();
        assert!(error.to_string().contains("character device"), "{error}");
        let error = Target::inspect(Path::new("/dev/ctpf-no-such-disk")).unwrap_err();
        assert!(matches!(error, FlashError::NoSuchDevice { .. }), "{error}");
    }

    /// Records what a flash reports, to check the calls' order.
    #[derive(Debug, Default)]
    struct Recorder(Vec<String>);

    impl Progress for Recorder {
        fn start(&mut self, phase: Phase, total: u64) {
            self.0.push(format!("start {phase:?} {total}"));
        }
        fn update(&mut self, done: u64) {
            self.0.push(format!("update {done}"));
        }
        fn finish(&mut self) {
            self.0.push("finish".into());
        }
    }

    #[test]
    fn flashing_a_file_writes_exactly_the_image_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.img");
        // Two whole chunks and an odd tail, so the last write is padded and truncated.
        let data: Vec<u8> = (0..2 * CHUNK + 1234).map(|i| (i * 7 % 253) as u8).collect();
        fs::write(&image, &data).unwrap();
        let target_path = dir.path().join("target.img");
        fs::write(&target_path, vec![0xee; 3 * CHUNK]).unwrap();
        let target = Target::inspect(&target_path).unwrap();
        let plan = Plan::new(&image, target, false).unwrap();
        assert_eq!(plan.image_len(), data.len() as u64);
        let mut progress = Recorder::default();
        let report = plan.execute(&mut progress).unwrap();
        assert_eq!(report.bytes, data.len() as u64);
        assert_eq!(report.digest, Sha256Digest::of(&data));
        assert_eq!(fs::read(&target_path).unwrap(), data, "longer file truncated to the image");
        let total = data.len();
        let expected: Vec<String> = [
            format!("start Write {total}"),
            format!("update {CHUNK}"),
            format!("update {}", 2 * CHUNK),
            format!("update {total}"),
            "finish".into(),
            format!("start Verify {total}"),
            format!("update {CHUNK}"),
            format!("update {}", 2 * CHUNK),
            format!("update {total}"),
            "finish".into(),
        ]
        .into();
        assert_eq!(progress.0, expected);
    }

    #[test]
    fn an_image_onto_itself_and_an_empty_image_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.img");
        fs::write(&image, b"data").unwrap();
        let error = Plan::new(&image, Target::inspect(&image).unwrap(), false).unwrap_err();
        assert!(matches!(error, FlashError::SameFile { .. }), "{error}");
        let empty = dir.path().join("empty.img");
        fs::write(&empty, b"").unwrap();
        let target = Target::inspect(&dir.path().join("out.img")).unwrap();
        let error = Plan::new(&empty, target.clone(), false).unwrap_err();
        assert!(matches!(error, FlashError::EmptyImage { .. }), "{error}");
        let error = Plan::new(&dir.path().join("missing.img"), target, false).unwrap_err();
        assert!(error.to_string().starts_with("cannot read the image"), "{error}");
    }
}
