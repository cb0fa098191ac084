//! Boot media: what goes where on a hybrid ISO (and later the disk images), and the boot
//! configs that start the discovery image with the manager's URL and a media key.
//!
//! One layout serves every boot path:
//! - `/boot/vmlinuz`, `/boot/initrd.img`: the discovery kernel and initramfs;
//! - `/isolinux/`: isolinux.bin, ldlinux.c32 and `isolinux.cfg` (BIOS, CD and USB);
//! - `/boot/efi.img`: the ESP with `EFI/BOOT/BOOTX64.EFI` / `BOOTAA64.EFI`, GRUB images whose
//!   embedded config ([`GRUB_EMBEDDED_CONFIG`]) finds the medium by `/ctpf/grub.cfg` and reads
//!   it, so one GRUB build serves every medium;
//! - `/ctpf/grub.cfg`: the medium's own GRUB config (kernel command line with the key).

use std::collections::BTreeMap;

use crate::{
    fat::{self, FatKind, FatPlan, FatSpec},
    iso9660::{BiosBoot, IsoPlan, IsoSpec, Source},
};

/// The config to embed in GRUB EFI images for media (`ctpf build grub --config`): find the
/// medium this GRUB came from by its config file, then read that with the full parser. GRUB
/// runs an embedded config with its rescue parser (no `if`), so a failed search falls
/// through `configfile` (file not found) to the message and a reboot.
pub const GRUB_EMBEDDED_CONFIG: &str = "\
search --no-floppy --file /ctpf/grub.cfg --set=root
configfile /ctpf/grub.cfg
echo 'ctpf: no ctpf medium found (looked for /ctpf/grub.cfg); rebooting in 10 seconds'
sleep 10
reboot
";

/// Path of the medium's GRUB config, which [`GRUB_EMBEDDED_CONFIG`] looks for.
pub const GRUB_CONFIG_PATH: &str = "ctpf/grub.cfg";

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("kernel command line word {word:?} is not allowed: {reason}")]
    KernelWord { word: String, reason: &'static str },
    #[error("a hybrid ISO needs {0}")]
    Missing(&'static str),
    #[error(transparent)]
    Iso(#[from] crate::iso9660::IsoError),
    #[error(transparent)]
    Fat(#[from] fat::FatError),
}

/// The files a medium is made of.
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub kernel: Source,
    pub initrd: Source,
    /// GRUB x86_64-efi image built with [`GRUB_EMBEDDED_CONFIG`].
    pub efi_x86_64: Option<Source>,
    /// GRUB arm64-efi image built with [`GRUB_EMBEDDED_CONFIG`].
    pub efi_arm64: Option<Source>,
    /// isolinux.bin, ldlinux.c32 and isohdpfx.bin for BIOS.
    pub syslinux: Option<Syslinux>,
}

#[derive(Debug, Clone)]
pub struct Syslinux {
    pub isolinux_bin: Source,
    pub ldlinux_c32: Source,
    pub isohdpfx_bin: Source,
}

/// How the medium boots.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// ISO volume id / FAT label base (A-Z, 0-9, _).
    pub label: String,
    /// Kernel command line words (checked by [`check_kernel_words`]).
    pub kernel_words: Vec<String>,
    /// SOURCE_DATE_EPOCH.
    pub timestamp: i64,
    /// Seeds the volume serials and disk signature, so they are fixed for fixed inputs.
    pub serial: u32,
}

/// A word can go on both isolinux's `APPEND` line (no quoting at all) and, single-quoted,
/// on GRUB's `linux` line: printable ASCII without spaces or quotes.
pub fn check_kernel_words(words: &[String]) -> Result<(), MediaError> {
    for word in words {
        let reason = if word.is_empty() {
            Some("empty")
        } else if word.len() > 1024 {
            Some("longer than 1024 bytes")
        } else if !word.bytes().all(|b| b.is_ascii_graphic()) {
            Some("only printable ASCII without spaces")
        } else if word.bytes().any(|b| b"'\"\\`$;{}".contains(&b)) {
            Some("no quotes, backslashes, $, ;, braces or backticks")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(MediaError::KernelWord { word: word.clone(), reason });
        }
    }
    Ok(())
}

pub fn isolinux_cfg(config: &MediaConfig) -> String {
    format!(
        "# ctpf boot medium: start the discovery image\n\
         SERIAL 0 115200\nDEFAULT ctpf\nPROMPT 0\nTIMEOUT 0\n\
         LABEL ctpf\n  KERNEL /boot/vmlinuz\n  INITRD /boot/initrd.img\n  APPEND {}\n",
        config.kernel_words.join(" ")
    )
}

pub fn grub_cfg(config: &MediaConfig) -> String {
    let words: Vec<String> = config.kernel_words.iter().map(|w| format!("'{w}'")).collect();
    format!(
        "# ctpf boot medium: start the discovery image\n\
         echo 'ctpf: booting the discovery environment from this medium'\n\
         linux /boot/vmlinuz {}\ninitrd /boot/initrd.img\nboot\n\
         echo 'ctpf: booting failed, rebooting in 10 seconds'\nsleep 10\nreboot\n",
        words.join(" ")
    )
}

/// The GRUB EFI images as the removable-media default loaders of an ESP.
fn efi_loaders(files: &BootFiles) -> BTreeMap<String, Source> {
    let mut esp = BTreeMap::new();
    if let Some(x64) = &files.efi_x86_64 {
        esp.insert("EFI/BOOT/BOOTX64.EFI".to_owned(), x64.clone());
    }
    if let Some(aa64) = &files.efi_arm64 {
        esp.insert("EFI/BOOT/BOOTAA64.EFI".to_owned(), aa64.clone());
    }
    esp
}

/// The ESP inside a hybrid ISO: just the loaders (the rest is read from ISO 9660).
pub fn efi_system_partition(
    files: &BootFiles,
    config: &MediaConfig,
) -> Result<Vec<u8>, MediaError> {
    let esp = efi_loaders(files);
    Ok(fat::build(&FatSpec {
        label: "CTPF_EFI".into(),
        volume_id: config.serial ^ 0x4546_4900,
        timestamp: config.timestamp,
        kind: FatKind::Auto,
        size: None,
        hidden_sectors: 0,
        files: esp,
    })?)
}

/// The hybrid ISO: BIOS via isolinux (CD, and USB through the isohybrid MBR), UEFI via the
/// ESP (CD through El Torito, USB through MBR partition 2).
pub fn hybrid_iso(files: &BootFiles, config: &MediaConfig) -> Result<IsoPlan, MediaError> {
    let tree = iso_tree(files, config)?;
    let mut bios_boot = None;
    let mut hybrid_mbr = None;
    if let Some(syslinux) = &files.syslinux {
        bios_boot = Some(BiosBoot {
            image: "isolinux/isolinux.bin".into(),
            boot_info_table: true,
            load_sectors: 4,
        });
        let code = syslinux.isohdpfx_bin.read_all().map_err(crate::iso9660::IsoError::Io)?;
        hybrid_mbr = Some(code);
    }
    let efi_boot = tree.contains_key(ISO_ESP_PATH).then(|| ISO_ESP_PATH.to_owned());
    Ok(IsoPlan::new(IsoSpec {
        volume_id: config.label.clone(),
        timestamp: config.timestamp,
        files: tree,
        bios_boot,
        efi_boot,
        hybrid_mbr,
        disk_signature: config.serial,
    })?)
}

/// Where the ESP image sits inside the hybrid ISO.
const ISO_ESP_PATH: &str = "boot/efi.img";

/// Every file of the hybrid ISO by path (what [`hybrid_iso`] writes, and what a manifest
/// lists).
pub fn iso_tree(
    files: &BootFiles,
    config: &MediaConfig,
) -> Result<BTreeMap<String, Source>, MediaError> {
    check_kernel_words(&config.kernel_words)?;
    if files.syslinux.is_none() && files.efi_x86_64.is_none() && files.efi_arm64.is_none() {
        return Err(MediaError::Missing("a BIOS (syslinux) or UEFI (GRUB) loader"));
    }
    let mut tree = BTreeMap::new();
    tree.insert("boot/vmlinuz".to_owned(), files.kernel.clone());
    tree.insert("boot/initrd.img".to_owned(), files.initrd.clone());
    tree.insert(GRUB_CONFIG_PATH.to_owned(), Source::Bytes(grub_cfg(config).into_bytes()));
    if let Some(syslinux) = &files.syslinux {
        tree.insert("isolinux/isolinux.bin".to_owned(), syslinux.isolinux_bin.clone());
        tree.insert("isolinux/ldlinux.c32".to_owned(), syslinux.ldlinux_c32.clone());
        tree.insert(
            "isolinux/isolinux.cfg".to_owned(),
            Source::Bytes(isolinux_cfg(config).into_bytes()),
        );
    }
    if files.efi_x86_64.is_some() || files.efi_arm64.is_some() {
        tree.insert(ISO_ESP_PATH.to_owned(), Source::Bytes(efi_system_partition(files, config)?));
    }
    Ok(tree)
}

/// The UEFI USB stick: one FAT32 ESP holding the GRUB loaders, the medium's GRUB config and
/// the discovery image (written into a GPT disk by [`crate::disk::write_gpt_esp`]).
pub fn usb_esp(files: &BootFiles, config: &MediaConfig) -> Result<FatPlan, MediaError> {
    Ok(FatPlan::new(&FatSpec {
        label: "CTPF_BOOT".into(),
        volume_id: config.serial,
        timestamp: config.timestamp,
        kind: FatKind::Fat32,
        size: None,
        hidden_sectors: crate::disk::ALIGN_SECTORS as u32,
        files: usb_esp_tree(files, config)?,
    })?)
}

/// Every file of the USB stick's ESP by path.
pub fn usb_esp_tree(
    files: &BootFiles,
    config: &MediaConfig,
) -> Result<BTreeMap<String, Source>, MediaError> {
    check_kernel_words(&config.kernel_words)?;
    if files.efi_x86_64.is_none() && files.efi_arm64.is_none() {
        return Err(MediaError::Missing("a UEFI (GRUB) loader"));
    }
    let mut esp = efi_loaders(files);
    esp.insert("boot/vmlinuz".to_owned(), files.kernel.clone());
    esp.insert("boot/initrd.img".to_owned(), files.initrd.clone());
    esp.insert(GRUB_CONFIG_PATH.to_owned(), Source::Bytes(grub_cfg(config).into_bytes()));
    Ok(esp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_kernel_words_are_refused() {
        for bad in ["a b", "x'y", "\"", "ctpf.url=$(reboot)", "a;b", "", "tab\there", "é"] {
            let err = check_kernel_words(&[bad.to_owned()]);
            assert!(matches!(err, Err(MediaError::KernelWord { .. })), "{bad:?}");
        }
        let good = ["console=ttyS0", "ctpf.url=http://10.0.2.2:8080/", "ctpf.token=mk_Abc-1.2"];
        assert!(check_kernel_words(&good.map(str::to_owned)).is_ok());
    }

    #[test]
    fn configs_carry_every_word() {
        let config = MediaConfig {
            label: "CTPF".into(),
            kernel_words: vec!["console=ttyS0".into(), "ctpf.token=k".into()],
            timestamp: 0,
            serial: 1,
        };
        assert!(isolinux_cfg(&config).contains("  APPEND console=ttyS0 ctpf.token=k\n"));
        assert!(grub_cfg(&config).contains("linux /boot/vmlinuz 'console=ttyS0' 'ctpf.token=k'\n"));
    }
}
