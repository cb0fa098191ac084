//! Writes a hybrid ISO from files on disk, for trying media by hand:
//! `cargo run -p ctpf-packagers --example hybrid_iso -- OUT.iso VMLINUZ INITRD GRUBX64.EFI WORD...`

use anyhow::{Context, Result};
use ctpf_packagers::{
    iso9660::Source,
    media::{self, BootFiles, MediaConfig, Syslinux},
};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, kernel, initrd, grub, words @ ..] = args.as_slice() else {
        anyhow::bail!("usage: hybrid_iso OUT.iso VMLINUZ INITRD GRUBX64.EFI WORD...");
    };
    let files = BootFiles {
        kernel: Source::file(kernel)?,
        initrd: Source::file(initrd)?,
        efi_x86_64: Some(Source::file(grub)?),
        arm64: None,
        efi_arm64: None,
        syslinux: Some(Syslinux {
            isolinux_bin: Source::file("/usr/lib/ISOLINUX/isolinux.bin")?,
            ldlinux_c32: Source::file("/usr/lib/syslinux/modules/bios/ldlinux.c32")?,
            isohdpfx_bin: Source::file("/usr/lib/ISOLINUX/isohdpfx.bin")?,
        }),
    };
    let config = MediaConfig {
        label: "CTPF_BOOT".into(),
        kernel_words: words.to_vec(),
        timestamp: 1_700_000_000,
        serial: 0xC7F0_0001,
    };
    let plan = media::hybrid_iso(&files, &config)?;
    let started = std::time::Instant::now();
    let mut file = std::io::BufWriter::new(std::fs::File::create(out).context("creating OUT")?);
    let size = plan.write(&mut file)?;
    println!("{out}: {size} bytes in {:?}", started.elapsed());
    Ok(())
}
