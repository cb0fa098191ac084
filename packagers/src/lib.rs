//! Packagers: boot media. [`flash`] writes an image to a USB stick, an SD card, a loop device
//! or a file and verifies it by reading it back.

pub mod flash;
