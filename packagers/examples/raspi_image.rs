//! Writes a Raspberry Pi SD card / USB image (MBR, one FAT32 boot partition) from unpacked
//! Debian packages, for trying media by hand:
//! `cargo run -p ctpf-packagers --example raspi_image -- OUT.img RASPI_FIRMWARE_ROOT
//! ARM64_LINUX_ROOT INITRD WORD...`, the roots being `dpkg -x` trees of `raspi-firmware` and
//! `linux-image-*-arm64` (what `.ci/run` unpacks into `TARGET/ctpf-test-cache/`).

use anyhow::Result;
use ctpf_packagers::{
    disk,
    iso9660::Source,
    media::{self, MediaConfig, RaspiFiles},
};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, firmware, linux, initrd, words @ ..] = args.as_slice() else {
        anyhow::bail!(
            "usage: raspi_image OUT.img RASPI_FIRMWARE_ROOT ARM64_LINUX_ROOT INITRD WORD..."
        );
    };
    let files = RaspiFiles::from_debian(firmware.as_ref(), linux.as_ref(), Source::file(initrd)?)?;
    let config = MediaConfig {
        label: media::RASPI_LABEL.into(),
        kernel_words: words.to_vec(),
        timestamp: 1_700_000_000,
        serial: 0xC7F0_0001,
    };
    let started = std::time::Instant::now();
    let partition = media::raspi_partition(&files, &config)?;
    let size = disk::write_mbr_fat(out.as_ref(), &partition, config.serial)?;
    println!("{out}: {size} bytes in {:?}", started.elapsed());
    Ok(())
}
