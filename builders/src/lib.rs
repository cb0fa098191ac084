//! Builders: the discovery image (a Debian kernel plus a deterministic cpio "newc" + gzip
//! initramfs with the NIC drivers and the agent), running build tools under control
//! (`process`) and the iPXE make frontend (`ipxe`). See ARCHITECTURE.md.

pub mod cpio;
pub mod digest;
pub mod discovery;
pub mod grub;
pub mod initramfs;
pub mod ipxe;
pub mod kmod;
pub mod machine;
pub mod process;
pub mod service;
pub mod single_flight;
pub mod source;
pub mod syslinux;
pub mod tools;

pub use cpio::{ArchivePath, CpioArchive, CpioError, FileData, NewcWriter};
pub use discovery::{DiscoveryError, DiscoveryPlan, DiscoverySources};
pub use initramfs::{
    BuiltImage, DiscoveryInputs, HostEncoding, InitramfsEntry, InitramfsError, InitramfsSpec,
    build, discovery_spec, parse_source_date_epoch,
};
pub use service::{BuildError, BuildLog, Builder, BuilderConfig};
