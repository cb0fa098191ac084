//! Boot media: what goes where on a hybrid ISO, a USB stick and a Raspberry Pi card, and the
//! boot configs that start the discovery image with the manager's URL and a media key.
//!
//! One layout serves every PC boot path:
//! - `/boot/vmlinuz`, `/boot/initrd.img`: the discovery kernel and initramfs;
//! - `/isolinux/`: isolinux.bin, ldlinux.c32 and `isolinux.cfg` (BIOS, CD and USB);
//! - `/boot/efi.img`: the ESP with `EFI/BOOT/BOOTX64.EFI` / `BOOTAA64.EFI`, GRUB images whose
//!   embedded config ([`GRUB_EMBEDDED_CONFIG`]) finds the medium by `/ctpf/grub.cfg` and reads
//!   it, so one GRUB build serves every medium;
//! - `/ctpf/grub.cfg`: the medium's own GRUB config (kernel command line with the key).
//!
//! The Raspberry Pi (arm64: Pi 3, 4, 400, CM4) boots from its own firmware instead, which
//! reads the first FAT partition of an MBR disk; see [`raspi_partition`].

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

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
    #[error("{dir} lacks {missing} (Raspberry Pi boot files)")]
    RaspiMissing { dir: PathBuf, missing: String },
    #[error("{dir} holds {found}; expected exactly one")]
    RaspiAmbiguous { dir: PathBuf, found: String },
    #[error(
        "{name} on a Raspberry Pi medium is written by ctpf; the firmware files cannot hold it"
    )]
    RaspiReserved { name: String },
    #[error("cmdline.txt would be {len} bytes; at most {max} fit beside the firmware's words")]
    CommandLineTooLong { len: usize, max: usize },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
}

/// The files a medium is made of.
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub kernel: Source,
    pub initrd: Source,
    /// On media that boot both x86_64 and arm64 machines: the arm64 kernel and initrd
    /// (`kernel`/`initrd` are then the x86_64 ones). GRUB picks by `$grub_cpu`.
    pub arm64: Option<KernelFiles>,
    /// GRUB x86_64-efi image built with [`GRUB_EMBEDDED_CONFIG`].
    pub efi_x86_64: Option<Source>,
    /// GRUB arm64-efi image built with [`GRUB_EMBEDDED_CONFIG`].
    pub efi_arm64: Option<Source>,
    /// isolinux.bin, ldlinux.c32 and isohdpfx.bin for BIOS.
    pub syslinux: Option<Syslinux>,
}

/// A kernel and its initramfs.
#[derive(Debug, Clone)]
pub struct KernelFiles {
    pub kernel: Source,
    pub initrd: Source,
}

/// Where the second architecture's kernel and initrd go on dual-architecture media.
const ARM64_KERNEL_PATH: &str = "boot/arm64/vmlinuz";
const ARM64_INITRD_PATH: &str = "boot/arm64/initrd.img";

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
    grub_cfg_for(config, false)
}

/// The medium's GRUB config; with `dual_arch`, arm64 GRUB (`$grub_cpu`) boots
/// `/boot/arm64/` and every other GRUB `/boot/`. (The file is read by `configfile`, whose
/// full parser has `if`.)
pub fn grub_cfg_for(config: &MediaConfig, dual_arch: bool) -> String {
    let words: Vec<String> = config.kernel_words.iter().map(|w| format!("'{w}'")).collect();
    let words = words.join(" ");
    let boot = if dual_arch {
        format!(
            "if [ \"$grub_cpu\" = arm64 ]; then\n\
             \x20 linux /{ARM64_KERNEL_PATH} {words}\n  initrd /{ARM64_INITRD_PATH}\n\
             else\n  linux /boot/vmlinuz {words}\n  initrd /boot/initrd.img\nfi\n"
        )
    } else {
        format!("linux /boot/vmlinuz {words}\ninitrd /boot/initrd.img\n")
    };
    format!(
        "# ctpf boot medium: start the discovery image\n\
         echo 'ctpf: booting the discovery environment from this medium'\n\
         {boot}boot\n\
         echo 'ctpf: booting failed, rebooting in 10 seconds'\nsleep 10\nreboot\n"
    )
}

/// The kernels and the GRUB config of a medium, by path.
fn kernel_tree(
    files: &BootFiles,
    config: &MediaConfig,
) -> Result<BTreeMap<String, Source>, MediaError> {
    if files.arm64.is_some() && files.efi_arm64.is_none() {
        return Err(MediaError::Missing("an arm64 GRUB loader for the arm64 kernel"));
    }
    let mut tree = BTreeMap::new();
    tree.insert("boot/vmlinuz".to_owned(), files.kernel.clone());
    tree.insert("boot/initrd.img".to_owned(), files.initrd.clone());
    if let Some(arm64) = &files.arm64 {
        tree.insert(ARM64_KERNEL_PATH.to_owned(), arm64.kernel.clone());
        tree.insert(ARM64_INITRD_PATH.to_owned(), arm64.initrd.clone());
    }
    let cfg = grub_cfg_for(config, files.arm64.is_some());
    tree.insert(GRUB_CONFIG_PATH.to_owned(), Source::Bytes(cfg.into_bytes()));
    Ok(tree)
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
    let mut tree = kernel_tree(files, config)?;
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
    esp.extend(kernel_tree(files, config)?);
    Ok(esp)
}

/// Volume label of the Raspberry Pi boot partition.
pub const RASPI_LABEL: &str = "CTPF_RPI";

/// Where Debian's `raspi-firmware` package (component `non-free-firmware`) keeps the firmware,
/// relative to the package's root.
pub const RASPI_FIRMWARE_DIR: &str = "usr/lib/raspi-firmware";

/// Firmware without which a supported board does not start: `bootcode.bin` (the Pi 3's
/// second stage; the Pi 4 and 5 have it in EEPROM), `start.elf`/`fixup.dat` (Pi 3) and
/// `start4.elf`/`fixup4.dat` (Pi 4, 400, CM4). The other variants (`_cd`, `_db`, `_x`) are
/// taken when present, so `start_file=` can pick them.
const RASPI_REQUIRED_FIRMWARE: [&str; 5] =
    ["bootcode.bin", "fixup.dat", "fixup4.dat", "start.elf", "start4.elf"];

/// Files of a Raspberry Pi medium that ctpf writes itself.
const RASPI_OWN_FILES: [&str; 4] = ["cmdline.txt", "config.txt", "initrd.img", "vmlinuz"];

/// The longest `cmdline.txt` line taken. arm64 kernels cut their command line at 2047 bytes,
/// and the firmware puts words of its own (memory layout, video mode, MAC address: a few
/// hundred bytes) before it, so a longer line could silently lose the last words.
const RASPI_CMDLINE_MAX: usize = 1536;

/// The files of a Raspberry Pi medium.
#[derive(Debug, Clone)]
pub struct RaspiFiles {
    /// An arm64 kernel `Image` (Debian's `vmlinuz` is one: the firmware loads it as is).
    pub kernel: Source,
    pub initrd: Source,
    /// Firmware, device trees and overlays by their path on the partition
    /// ([`collect_raspi_firmware`]).
    pub firmware: BTreeMap<String, Source>,
}

impl RaspiFiles {
    /// The files from unpacked Debian packages (`dpkg -x`): `firmware_root` holds
    /// `raspi-firmware`, `kernel_root` one arm64 `linux-image-VERSION` package, whose kernel
    /// (`boot/vmlinuz-VERSION`) and device trees go on the medium.
    pub fn from_debian(
        firmware_root: &Path,
        kernel_root: &Path,
        initrd: Source,
    ) -> Result<Self, MediaError> {
        let lib = kernel_root.join("usr/lib");
        let versions: Vec<String> = list(&lib, |_| true)?
            .into_iter()
            .filter_map(|name| name.strip_prefix("linux-image-").map(str::to_owned))
            .collect();
        let version = match versions.as_slice() {
            [one] => one,
            [] => {
                return Err(MediaError::RaspiMissing {
                    dir: lib,
                    missing: "linux-image-VERSION/ (an unpacked arm64 linux-image package)".into(),
                });
            }
            _ => {
                return Err(MediaError::RaspiAmbiguous {
                    dir: lib,
                    found: versions
                        .iter()
                        .map(|v| format!("linux-image-{v}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        };
        let kernel = kernel_root.join(format!("boot/vmlinuz-{version}"));
        let kernel =
            Source::file(&kernel).map_err(|source| MediaError::Read { path: kernel, source })?;
        let firmware = collect_raspi_firmware(
            &firmware_root.join(RASPI_FIRMWARE_DIR),
            &lib.join(format!("linux-image-{version}/broadcom")),
        )?;
        Ok(Self { kernel, initrd, firmware })
    }
}

/// The firmware, device trees and overlays of a Raspberry Pi medium, by their path on the
/// partition: from `firmware_dir` `bootcode.bin`, `start*.elf` and `fixup*.dat`; from
/// `dtb_dir` the Raspberry Pi device trees (`bcm*-rpi-*.dtb`) and, if there is one, its
/// `overlays/` directory.
///
/// The device trees come with the kernel, not the firmware: a device tree must match the
/// kernel's bindings. Debian's arm64 kernel is an upstream one and ships upstream trees
/// (`usr/lib/linux-image-VERSION/broadcom/bcm2711-rpi-4-b.dtb`, `bcm2837-rpi-3-b.dtb`, ...;
/// Debian's own raspi-firmware hook copies them from there too), while `raspi-firmware` ships
/// none (Raspberry Pi's `bcm2710-*.dtb` and `overlays/` belong to their downstream kernel,
/// and Debian's kernel ships no overlays). A tree laid out like Raspberry Pi's firmware
/// repository (`boot/`: trees, `overlays/` and firmware in one directory) works as both.
pub fn collect_raspi_firmware(
    firmware_dir: &Path,
    dtb_dir: &Path,
) -> Result<BTreeMap<String, Source>, MediaError> {
    let firmware = pick_raspi_firmware(&list(firmware_dir, Path::is_file)?)
        .map_err(|missing| MediaError::RaspiMissing { dir: firmware_dir.to_owned(), missing })?;
    let dtbs = pick_raspi_dtbs(&list(dtb_dir, Path::is_file)?)
        .map_err(|missing| MediaError::RaspiMissing { dir: dtb_dir.to_owned(), missing })?;
    let overlay_dir = dtb_dir.join("overlays");
    let overlays = if overlay_dir.is_dir() {
        pick_raspi_overlays(&list(&overlay_dir, Path::is_file)?)
    } else {
        Vec::new()
    };
    let mut files = BTreeMap::new();
    let sources = firmware
        .iter()
        .map(|name| (name.clone(), firmware_dir.join(name)))
        .chain(dtbs.iter().map(|name| (name.clone(), dtb_dir.join(name))))
        .chain(overlays.iter().map(|name| (format!("overlays/{name}"), overlay_dir.join(name))));
    for (name, path) in sources {
        let source = Source::file(&path).map_err(|source| MediaError::Read { path, source })?;
        files.insert(name, source);
    }
    Ok(files)
}

/// The firmware among a directory's file names (`bootcode.bin`, `start*.elf`, `fixup*.dat`),
/// sorted; or the required ones that are missing.
fn pick_raspi_firmware(names: &[String]) -> Result<Vec<String>, String> {
    let missing: Vec<&str> = RASPI_REQUIRED_FIRMWARE
        .into_iter()
        .filter(|required| !names.iter().any(|name| name == required))
        .collect();
    if !missing.is_empty() {
        return Err(missing.join(", "));
    }
    Ok(sorted(names.iter().filter(|name| {
        *name == "bootcode.bin"
            || (name.starts_with("start") && name.ends_with(".elf"))
            || (name.starts_with("fixup") && name.ends_with(".dat"))
    })))
}

/// The Raspberry Pi device trees among a directory's file names, sorted; at least one. The
/// firmware loads `bcm<SoC>-rpi-<board>.dtb` (upstream `bcm2837-rpi-3-b.dtb`,
/// `bcm2711-rpi-4-b.dtb`, downstream `bcm2710-rpi-3-b.dtb`, `bcm2712-rpi-5-b.dtb`), so those
/// are the names taken; other Broadcom boards' trees in the same directory are not.
fn pick_raspi_dtbs(names: &[String]) -> Result<Vec<String>, String> {
    let dtbs = sorted(names.iter().filter(|name| {
        name.strip_prefix("bcm").and_then(|rest| rest.split_once("-rpi-")).is_some_and(
            |(soc, board)| {
                !soc.is_empty()
                    && soc.bytes().all(|b| b.is_ascii_digit())
                    && board.len() > ".dtb".len()
                    && board.ends_with(".dtb")
            },
        )
    }));
    if dtbs.is_empty() {
        return Err("Raspberry Pi device trees (bcm*-rpi-*.dtb)".into());
    }
    Ok(dtbs)
}

/// The overlays (`*.dtbo`, and `overlay_map.dtb`, which maps them per board) among a
/// directory's file names, sorted.
fn pick_raspi_overlays(names: &[String]) -> Vec<String> {
    sorted(names.iter().filter(|name| name.ends_with(".dtbo") || *name == "overlay_map.dtb"))
}

fn sorted<'a>(names: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut names: Vec<String> = names.cloned().collect();
    names.sort();
    names
}

/// The UTF-8 names in `dir` whose paths pass `keep` (other names cannot be firmware).
fn list(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<String>, MediaError> {
    let read = |source| MediaError::Read { path: dir.to_owned(), source };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let entry = entry.map_err(read)?;
        if let Some(name) = entry.file_name().to_str()
            && keep(&entry.path())
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The Pi firmware's `config.txt`: start Debian's arm64 kernel with the initramfs.
pub fn raspi_config_txt() -> String {
    "# ctpf boot medium: start the discovery image (Raspberry Pi 3, 4, 400, CM4; arm64)\n\
     # Start the CPU in 64-bit mode: the kernel is an arm64 Image.\n\
     arm_64bit=1\n\
     # The kernel is an upstream one (Debian's): take the upstream device trees\n\
     # (bcm2837-rpi-3-b.dtb rather than Raspberry Pi's bcm2710-rpi-3-b.dtb).\n\
     upstream_kernel=1\n\
     # Serial console on GPIO 14/15 (the mini UART, its clock held steady).\n\
     enable_uart=1\n\
     kernel=vmlinuz\n\
     initramfs initrd.img followkernel\n"
        .to_owned()
}

/// The Pi firmware's `cmdline.txt`: the kernel command line, one line.
///
/// `ttyS1` rather than the usual `serial0`: the firmware rewrites `serial0` to `ttyS0`, the
/// GPIO 14/15 mini UART's name under Raspberry Pi's downstream trees (whose bootargs limit
/// the kernel to one 8250 port, `8250.nr_uarts=1`). Debian's upstream trees have no such
/// bootargs and give the mini UART alias `serial1`, so Debian's kernel names it `ttyS1` (the
/// trees' `stdout-path` too; Debian's raspi-firmware hook writes `ttyS1`, and QEMU's
/// `raspi3b` shows it). Only one `ttyS` console can be named: the 8250 driver has one. `tty1`
/// (HDMI) comes last and is `/dev/console`, unless `kernel_words` name a console of their own.
pub fn raspi_cmdline_txt(config: &MediaConfig) -> String {
    let mut line = String::from("console=ttyS1,115200 console=tty1");
    for word in &config.kernel_words {
        line.push(' ');
        line.push_str(word);
    }
    line.push('\n');
    line
}

/// The Raspberry Pi boot partition: firmware, device trees, `config.txt`, `cmdline.txt`,
/// `vmlinuz` and `initrd.img` in the root of a FAT32 file system (written into an MBR disk
/// from [`crate::disk::ALIGN_SECTORS`] by [`crate::disk::write_mbr_fat`]). It fills whole
/// MiB, as its partition does.
pub fn raspi_partition(files: &RaspiFiles, config: &MediaConfig) -> Result<FatPlan, MediaError> {
    let spec = FatSpec {
        label: RASPI_LABEL.into(),
        volume_id: config.serial,
        timestamp: config.timestamp,
        kind: FatKind::Fat32,
        size: None,
        hidden_sectors: crate::disk::ALIGN_SECTORS as u32,
        files: raspi_tree(files, config)?,
    };
    let fitted = FatPlan::new(&spec)?.size();
    Ok(FatPlan::new(&FatSpec { size: Some(fitted.next_multiple_of(1024 * 1024)), ..spec })?)
}

/// Every file of the Raspberry Pi boot partition by path.
pub fn raspi_tree(
    files: &RaspiFiles,
    config: &MediaConfig,
) -> Result<BTreeMap<String, Source>, MediaError> {
    check_kernel_words(&config.kernel_words)?;
    let cmdline = raspi_cmdline_txt(config);
    let len = cmdline.trim_end().len();
    if len > RASPI_CMDLINE_MAX {
        return Err(MediaError::CommandLineTooLong { len, max: RASPI_CMDLINE_MAX });
    }
    // FAT names are case-insensitive: `Config.txt` would shadow ctpf's `config.txt`.
    if let Some(name) = files
        .firmware
        .keys()
        .find(|name| RASPI_OWN_FILES.iter().any(|own| own.eq_ignore_ascii_case(name)))
    {
        return Err(MediaError::RaspiReserved { name: name.clone() });
    }
    let mut tree = files.firmware.clone();
    tree.insert("config.txt".to_owned(), Source::Bytes(raspi_config_txt().into_bytes()));
    tree.insert("cmdline.txt".to_owned(), Source::Bytes(cmdline.into_bytes()));
    tree.insert("vmlinuz".to_owned(), files.kernel.clone());
    tree.insert("initrd.img".to_owned(), files.initrd.clone());
    Ok(tree)
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
        let dual = grub_cfg_for(&config, true);
        assert!(
            dual.contains(
                "if [ \"$grub_cpu\" = arm64 ]; then\n  linux /boot/arm64/vmlinuz 'console=ttyS0' \
                 'ctpf.token=k'\n  initrd /boot/arm64/initrd.img\nelse\n  linux /boot/vmlinuz"
            ),
            "{dual}"
        );
    }

    fn raspi_config(words: &[&str]) -> MediaConfig {
        MediaConfig {
            label: "CTPF".into(),
            kernel_words: words.iter().map(|w| (*w).to_owned()).collect(),
            timestamp: 1_700_000_000,
            serial: 0xC7F0_0005,
        }
    }

    fn raspi_files(firmware: &[&str]) -> RaspiFiles {
        RaspiFiles {
            kernel: Source::Bytes(b"MZ arm64 Image".to_vec()),
            initrd: Source::Bytes(b"070701".to_vec()),
            firmware: firmware
                .iter()
                .map(|name| ((*name).to_owned(), Source::Bytes(name.as_bytes().to_vec())))
                .collect(),
        }
    }

    #[test]
    fn raspi_config_txt_starts_the_arm64_kernel_with_its_initramfs() {
        let config = raspi_config_txt();
        let lines: Vec<&str> = config.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "arm_64bit=1",
                "upstream_kernel=1",
                "enable_uart=1",
                "kernel=vmlinuz",
                "initramfs initrd.img followkernel"
            ]
        );
    }

    #[test]
    fn raspi_cmdline_txt_is_one_line_with_the_consoles_first() {
        let config = raspi_config(&["ctpf.url=http://10.0.2.2:8080/", "ctpf.token=mk_Abc-1.2"]);
        assert_eq!(
            raspi_cmdline_txt(&config),
            "console=ttyS1,115200 console=tty1 ctpf.url=http://10.0.2.2:8080/ \
             ctpf.token=mk_Abc-1.2\n"
        );
        assert_eq!(raspi_cmdline_txt(&raspi_config(&[])), "console=ttyS1,115200 console=tty1\n");
    }

    #[test]
    fn a_raspi_medium_refuses_hostile_words_and_overlong_lines() {
        let files = raspi_files(&["start4.elf"]);
        // A newline would end cmdline.txt and hide the rest; a space would split a word.
        for bad in ["a\nroot=/dev/sda", "a b", "init=/bin/sh;reboot", "x'y", ""] {
            let err = raspi_partition(&files, &raspi_config(&[bad])).unwrap_err();
            assert!(matches!(err, MediaError::KernelWord { .. }), "{bad:?}: {err}");
        }
        let long = "x".repeat(1000);
        let err = raspi_partition(&files, &raspi_config(&[&long, &long])).unwrap_err();
        assert!(matches!(err, MediaError::CommandLineTooLong { max: 1536, .. }), "{err}");
    }

    #[test]
    fn a_raspi_medium_keeps_its_own_files_to_itself() {
        for name in ["config.txt", "CMDLINE.TXT", "vmlinuz", "Initrd.img"] {
            let err = raspi_partition(&raspi_files(&[name]), &raspi_config(&[])).unwrap_err();
            assert!(matches!(err, MediaError::RaspiReserved { .. }), "{name}: {err}");
        }
        let plan = raspi_partition(&raspi_files(&["start4.elf"]), &raspi_config(&[])).unwrap();
        assert_eq!(plan.size() % (1024 * 1024), 0, "the file system fills its partition");
        assert_eq!(plan.hidden_sectors(), 2048);
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn raspi_firmware_is_picked_by_name_and_missing_files_are_named() {
        let listing = names(&[
            "start_x.elf",
            "start4.elf",
            "bootcode.bin",
            "fixup4.dat",
            "fixup.dat",
            "start.elf",
            "LICENCE.broadcom",
            "README",
        ]);
        assert_eq!(
            pick_raspi_firmware(&listing).unwrap(),
            names(&[
                "bootcode.bin",
                "fixup.dat",
                "fixup4.dat",
                "start.elf",
                "start4.elf",
                "start_x.elf"
            ])
        );
        assert_eq!(
            pick_raspi_firmware(&names(&["start.elf", "fixup.dat"])).unwrap_err(),
            "bootcode.bin, fixup4.dat, start4.elf"
        );
        let dtbs = names(&[
            "bcm2837-rpi-3-b.dtb",
            "bcm2711-rpi-4-b.dtb",
            "bcm4908-asus-gt-ac5300.dtb",
            "bcm-rpi-.dtb",
            "overlays",
        ]);
        assert_eq!(
            pick_raspi_dtbs(&dtbs).unwrap(),
            names(&["bcm2711-rpi-4-b.dtb", "bcm2837-rpi-3-b.dtb"])
        );
        assert!(
            pick_raspi_dtbs(&names(&["meson-gxl.dtb"])).unwrap_err().contains("bcm*-rpi-*.dtb")
        );
        let overlays = names(&["vc4-kms-v3d.dtbo", "README", "overlay_map.dtb", "disable-bt.dtbo"]);
        assert_eq!(
            pick_raspi_overlays(&overlays),
            names(&["disable-bt.dtbo", "overlay_map.dtb", "vc4-kms-v3d.dtbo"])
        );
    }

    #[test]
    fn raspi_files_come_from_unpacked_packages_and_a_missing_one_is_named() {
        let root = tempfile::tempdir().unwrap();
        let firmware = root.path().join("fw");
        let kernel = root.path().join("linux");
        let fw_dir = firmware.join(RASPI_FIRMWARE_DIR);
        let dtb_dir = kernel.join("usr/lib/linux-image-6.1.0-9-arm64/broadcom");
        std::fs::create_dir_all(&fw_dir).unwrap();
        std::fs::create_dir_all(dtb_dir.join("overlays")).unwrap();
        std::fs::create_dir_all(kernel.join("boot")).unwrap();
        for name in RASPI_REQUIRED_FIRMWARE {
            std::fs::write(fw_dir.join(name), name).unwrap();
        }
        std::fs::write(dtb_dir.join("bcm2711-rpi-4-b.dtb"), "dtb").unwrap();
        std::fs::write(dtb_dir.join("overlays/disable-bt.dtbo"), "dtbo").unwrap();
        std::fs::write(kernel.join("boot/vmlinuz-6.1.0-9-arm64"), "MZ").unwrap();
        let initrd = Source::Bytes(Vec::new());

        let files = RaspiFiles::from_debian(&firmware, &kernel, initrd.clone()).unwrap();
        let paths: Vec<&str> = files.firmware.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "bcm2711-rpi-4-b.dtb",
                "bootcode.bin",
                "fixup.dat",
                "fixup4.dat",
                "overlays/disable-bt.dtbo",
                "start.elf",
                "start4.elf"
            ]
        );
        assert_eq!(files.kernel.len(), 2);

        std::fs::remove_file(fw_dir.join("start4.elf")).unwrap();
        let err = RaspiFiles::from_debian(&firmware, &kernel, initrd.clone()).unwrap_err();
        assert!(err.to_string().contains("lacks start4.elf"), "{err}");
        std::fs::create_dir_all(kernel.join("usr/lib/linux-image-6.1.0-10-arm64")).unwrap();
        let err = RaspiFiles::from_debian(&firmware, &kernel, initrd).unwrap_err();
        assert!(matches!(err, MediaError::RaspiAmbiguous { .. }), "{err}");
    }
}
