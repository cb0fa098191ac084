//! Writes a GPT USB stick image (one FAT32 ESP) from files on disk, for trying media by hand:
//! `cargo run -p ctpf-packagers --example usb_stick -- OUT.img VMLINUZ INITRD GRUBX64.EFI WORD...`

use anyhow::Result;
use ctpf_packagers::{
    disk,
    iso9660::Source,
    media::{self, BootFiles, MediaConfig},
};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, kernel, initrd, grub, words @ ..] = args.as_slice() else {
        anyhow::bail!("usage: usb_stick OUT.img VMLINUZ INITRD GRUBX64.EFI WORD...");
    };
    let files = BootFiles {
        kernel: Source::file(kernel)?,
        initrd: Source::file(initrd)?,
        efi_x86_64: Some(Source::file(grub)?),
        arm64: None,
        efi_arm64: None,
        syslinux: None,
    };
    let config = MediaConfig {
        label: "CTPF_BOOT".into(),
        kernel_words: words.to_vec(),
        timestamp: 1_700_000_000,
        serial: 0xC7F0_0001,
    };
    let started = std::time::Instant::now();
    let size = disk::write_gpt_esp(out.as_ref(), &media::usb_esp(&files, &config)?, config.serial)?;
    println!("{out}: {size} bytes in {:?}", started.elapsed());
    Ok(())
}
