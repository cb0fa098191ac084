//! Packagers: boot media written by ctpf itself, so packaging runs anywhere (no xorriso,
//! mtools or mkfs at run time), and `ctpf flash` to put them on a stick.
//!
//! - [`iso9660`]: hybrid ISO 9660 images (Rock Ridge, El Torito BIOS + UEFI, isohybrid MBR);
//! - [`fat`]: FAT file system images (EFI system partitions, Raspberry Pi boot partitions);
//! - [`disk`]: raw disk images (GPT + ESP for UEFI USB sticks, MBR + FAT32 for the Raspberry
//!   Pi);
//! - [`mbr`]: MBR partition entries;
//! - [`media`]: the layout and boot configs of ctpf's boot media;
//! - [`pxe_bundle`]: the deterministic tar of the tree a distributor serves;
//! - [`service`]: the packager a worker with the `packager` role runs (validate, cache,
//!   fetch inputs with their digests checked, write, store with a manifest);
//! - [`flash`]: writes an image to a USB stick, an SD card, a loop device or a file and
//!   verifies it by reading it back.

pub mod disk;
pub mod fat;
pub mod flash;
pub mod iso9660;
pub mod mbr;
pub mod media;
mod output;
pub mod pxe_bundle;
pub mod service;
