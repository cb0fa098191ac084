//! arm64 machines for the tests: QEMU's `virt` board under TCG with UEFI firmware (Debian's
//! qemu-efi-aarch64, AAVMF) booting ctpf media, and a Raspberry Pi 3B (`raspi3b`); and the
//! arm64 discovery image's inputs that `.ci/run` prepares (Debian's arm64 kernel package and
//! busybox-static:arm64) or cargo builds (the agent for `aarch64-unknown-linux-musl`).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::qemu::{Media, Vm};

const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";

/// The Rust target of the arm64 discovery agent.
pub const AGENT_TARGET_ARM64: &str = "aarch64-unknown-linux-musl";

/// The target directory the test binaries were built into (`.../target`).
fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // .../target/debug/deps/test-HASH
    exe.ancestors().nth(3).map(Path::to_owned).context("test binary outside a target dir")
}

fn test_cache() -> Result<PathBuf> {
    Ok(target_dir()?.join("ctpf-test-cache"))
}

/// The static discovery agent built by cargo for `target` (a no-op when it is current):
/// `x86_64-unknown-linux-musl` or [`AGENT_TARGET_ARM64`] (linked by rust-lld, see
/// `.cargo/config.toml`).
pub fn discovery_agent_for(target: &str) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let target_dir = target_dir()?;
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--quiet", "--release", "-p", "ctpf-discovery-agent", "--target", target])
        .env("CARGO_TARGET_DIR", &target_dir)
        .stdin(Stdio::null())
        .status()
        .context("running cargo to build the discovery agent")?;
    if !status.success() {
        bail!("building ctpf-agent for {target} failed (rustup target add {target}?)");
    }
    Ok(target_dir.join(target).join("release/ctpf-agent"))
}

/// The unpacked arm64 linux-image package with its modules: `CTPF_DISCOVERY_LINUX_ARM64`, or
/// where `.ci/run` unpacks it (`TARGET/ctpf-test-cache/linux-arm64-full`; `linux-arm64`
/// beside it holds only the kernel and device trees, for the Raspberry Pi tests).
pub fn discovery_linux_arm64() -> Result<PathBuf> {
    let dir = match std::env::var_os("CTPF_DISCOVERY_LINUX_ARM64") {
        Some(dir) => PathBuf::from(dir),
        None => test_cache()?.join("linux-arm64-full"),
    };
    if !dir.join("lib/modules").is_dir() {
        bail!(
            "{} holds no unpacked arm64 linux-image package with modules; .ci/run prepares it \
             (apt-get download linux-image-...-arm64:arm64 && dpkg -x)",
            dir.display()
        );
    }
    Ok(dir)
}

/// bin/busybox of Debian's busybox-static:arm64, unpacked by `.ci/run` into
/// `TARGET/ctpf-test-cache/busybox-arm64`.
pub fn busybox_arm64() -> Result<PathBuf> {
    let busybox = test_cache()?.join("busybox-arm64/bin/busybox");
    if !busybox.is_file() {
        bail!(
            "no {}; .ci/run prepares it (apt-get download busybox-static:arm64 && dpkg -x)",
            busybox.display()
        );
    }
    Ok(busybox)
}

/// GRUB's arm64-efi modules: Debian's grub-efi-arm64-bin:arm64, unpacked by `.ci/run` into
/// `TARGET/ctpf-test-cache/grub-arm64`; the directory to put in `CTPF_GRUB_LIB_PATH`.
pub fn grub_lib_arm64() -> Result<PathBuf> {
    let lib = test_cache()?.join("grub-arm64/usr/lib/grub");
    if !lib.join("arm64-efi/moddep.lst").is_file() {
        bail!(
            "no arm64 GRUB modules in {}; .ci/run unpacks grub-efi-arm64-bin:arm64 there",
            lib.display()
        );
    }
    Ok(lib)
}

/// The CPU the `virt` machine emulates. `max` would add pointer authentication, whose TCG
/// emulation (QARMA) makes every function call of the kernel slow.
pub const CPU: &str = "cortex-a57";

/// An arm64 VM (QEMU `virt`, AAVMF UEFI, TCG) booting a medium, with QEMU's user-mode
/// network (the guest reaches the host's loopback as 10.0.2.2) and a virtio NIC without a
/// boot ROM; killed on drop. Its serial console (the PL011, `ttyAMA0` in Linux) goes to a
/// file. The machine is a [`Vm`] (same waiting, logs and clean-up); this only builds its
/// command lines.
#[derive(Debug)]
pub struct Arm64Vm;

impl Arm64Vm {
    /// Boots `image` as a CD (virtio-scsi) or a USB stick (qemu-xhci + usb-storage).
    pub fn boot_media(media: Media, image: &Path, mac: &str, serial: PathBuf) -> Result<Vm> {
        // Each VM has its own UEFI variable store: the firmware writes boot entries there.
        let vars = tempfile::NamedTempFile::new()?;
        std::fs::copy(AAVMF_VARS, vars.path())
            .context("copying AAVMF vars (apt-get install qemu-efi-aarch64)")?;
        let mut cmd = Command::new("qemu-system-aarch64");
        cmd.args(["-M", "virt", "-cpu", CPU, "-accel", "tcg", "-smp", "2", "-m", "1024"])
            .args(["-nographic", "-monitor", "none"])
            .args(["-drive", &format!("if=pflash,format=raw,readonly=on,file={AAVMF_CODE}")])
            .args(["-drive", &format!("if=pflash,format=raw,file={}", vars.path().display())])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(["-netdev", "user,id=n0"])
            // No NIC boot ROM: the medium is the only way to boot.
            .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac},romfile=")]);
        let drive = format!("if=none,id=media,format=raw,readonly=on,file={}", image.display());
        cmd.args(["-drive", &drive]);
        match media {
            Media::Cdrom => {
                cmd.args(["-device", "virtio-scsi-pci,id=scsi"])
                    .args(["-device", "scsi-cd,drive=media,bootindex=0"]);
            }
            Media::UsbStick => {
                cmd.args(["-device", "qemu-xhci"])
                    .args(["-device", "usb-storage,drive=media,bootindex=0"]);
            }
        }
        Vm::spawn(cmd, serial, Some(vars))
    }

    /// A Raspberry Pi 3B (QEMU `raspi3b`) started the way the Pi's firmware starts a ctpf
    /// medium: `kernel`, `initrd`, the board's device tree and `cmdline` (QEMU cannot run the
    /// VideoCore firmware itself). Its network is a USB NIC (`usb-net`, CDC Ethernet) on the
    /// SoC's dwc2 USB controller, on QEMU's user-mode network; the serial console is the mini
    /// UART (`ttyS1`, the second QEMU serial port).
    pub fn boot_raspi3b(
        kernel: &Path,
        dtb: &Path,
        initrd: &Path,
        cmdline: &str,
        mac: &str,
        serial: PathBuf,
    ) -> Result<Vm> {
        let mut cmd = Command::new("qemu-system-aarch64");
        cmd.args(["-M", "raspi3b", "-m", "1G", "-accel", "tcg"])
            .args(["-nographic", "-monitor", "none"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-dtb")
            .arg(dtb)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", cmdline])
            .args(["-serial", "null"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(["-netdev", "user,id=n0"])
            .args(["-device", &format!("usb-net,netdev=n0,mac={mac}")]);
        Vm::spawn(cmd, serial, None)
    }
}
