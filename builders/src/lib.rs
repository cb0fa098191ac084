//! Builders: today the deterministic discovery initramfs (cpio "newc" + gzip); bootloader
//! builds join later. See ARCHITECTURE.md.

pub mod cpio;
pub mod initramfs;

pub use cpio::{ArchivePath, CpioArchive, CpioError, FileData, NewcWriter};
pub use initramfs::{
    BuiltImage, DiscoveryInputs, HostEncoding, InitramfsEntry, InitramfsError, InitramfsSpec,
    build, discovery_spec, parse_source_date_epoch,
};
