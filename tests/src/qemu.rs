//! QEMU machines that network-boot for real (TCG; KVM does not work on CI machines), on a
//! bridge inside a test's own network namespace, and the inputs of the discovery image they
//! boot. Recipes and pitfalls: `shared/testbed.md`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::Netns;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The target directory the test binaries were built into (`.../target`).
fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // .../target/debug/deps/test-HASH
    exe.ancestors().nth(3).map(Path::to_owned).context("test binary outside a target dir")
}

/// The unpacked Debian kernel package the discovery image is built from: `CTPF_DISCOVERY_LINUX`,
/// or where `.ci/run` unpacks it (`TARGET/ctpf-test-cache/linux`).
pub fn discovery_linux() -> Result<PathBuf> {
    let dir = match std::env::var_os("CTPF_DISCOVERY_LINUX") {
        Some(dir) => PathBuf::from(dir),
        None => target_dir()?.join("ctpf-test-cache/linux"),
    };
    if !dir.join("lib/modules").is_dir() {
        bail!(
            "{} holds no unpacked linux-image package; .ci/run prepares it \
             (apt-get download linux-image-...-amd64 && dpkg -x)",
            dir.display()
        );
    }
    Ok(dir)
}

/// The unpacked raspi-firmware and arm64 linux-image packages (kernel and device trees) that
/// `.ci/run` prepares in the test cache (`raspi-firmware`, `linux-arm64`).
pub fn raspi_trees() -> Result<(PathBuf, PathBuf)> {
    let cache = target_dir()?.join("ctpf-test-cache");
    let (firmware, linux) = (cache.join("raspi-firmware"), cache.join("linux-arm64"));
    if !firmware.join("usr/lib/raspi-firmware").is_dir() || !linux.join("boot").is_dir() {
        bail!(
            "no unpacked raspi-firmware/arm64 linux-image in {}; .ci/run prepares them",
            cache.display()
        );
    }
    Ok((firmware, linux))
}

/// A TFTP root holding iPXE 1.21 (Debian 13's `ipxe` package, whose `ipxe.lkrn` runs its
/// command line as a script), which `.ci/run` unpacks into the test cache (`ipxe-1.21`).
pub fn modern_ipxe_root() -> Result<PathBuf> {
    let root = target_dir()?.join("ctpf-test-cache/ipxe-1.21/usr/lib/ipxe");
    if !root.join("ipxe.lkrn").is_file() {
        bail!("no iPXE 1.21 in {}; .ci/run unpacks Debian 13's ipxe package there", root.display());
    }
    Ok(root)
}

/// The static discovery agent, built for musl by cargo (a no-op when it is current).
pub fn discovery_agent() -> Result<PathBuf> {
    const TARGET: &str = "x86_64-unknown-linux-musl";
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let target_dir = target_dir()?;
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--quiet", "--release", "-p", "ctpf-discovery-agent", "--target", TARGET])
        .env("CARGO_TARGET_DIR", &target_dir)
        .stdin(Stdio::null())
        .status()
        .context("running cargo to build the discovery agent")?;
    if !status.success() {
        bail!("building ctpf-agent for {TARGET} failed (rustup target add {TARGET}?)");
    }
    Ok(target_dir.join(TARGET).join("release/ctpf-agent"))
}

/// A bridge `br0` in a namespace of its own, with an IPv4 and an IPv6 address (the latter
/// without duplicate address detection, so it is usable at once), for VMs' tap devices.
#[derive(Debug)]
pub struct BootLan {
    pub netns: Netns,
    pub subnet: u8,
    taps: u32,
}

impl BootLan {
    pub fn create() -> Result<Self> {
        let netns = Netns::create("ctpf-lan")?;
        let suffix = crate::unique_suffix();
        let subnet = 1 + u8::from_str_radix(&suffix[..2], 16)? % 250;
        netns.ip(&["link", "add", "br0", "type", "bridge"])?;
        netns.ip(&["addr", "add", &format!("10.78.{subnet}.1/24"), "dev", "br0"])?;
        netns.ip(&["addr", "add", &format!("fd78:{subnet}::1/64"), "dev", "br0", "nodad"])?;
        netns.ip(&["link", "set", "br0", "up"])?;
        Ok(Self { netns, subnet, taps: 0 })
    }

    /// The bridge's IPv4 address: where ctpf serves.
    pub fn server_ip(&self) -> String {
        format!("10.78.{}.1", self.subnet)
    }

    /// `first-last` host numbers as a range in this LAN.
    pub fn range(&self, first: u8, last: u8) -> String {
        format!("10.78.{0}.{first}-10.78.{0}.{last}", self.subnet)
    }

    /// A new tap device, a port of the bridge.
    pub fn add_tap(&mut self) -> Result<String> {
        let tap = format!("tap{}", self.taps);
        self.taps += 1;
        self.netns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        self.netns.ip(&["link", "set", &tap, "master", "br0", "up"])?;
        Ok(tap)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, which boots the NIC's option ROM (QEMU's are iPXE).
    Bios,
    /// OVMF UEFI.
    Uefi,
}

#[derive(Debug, Clone)]
pub struct VmSpec {
    pub firmware: Firmware,
    /// QEMU device: `virtio-net-pci` or `e1000`.
    pub nic: &'static str,
    pub mac: String,
    pub uuid: String,
    /// Keep the NIC's iPXE option ROM; false (`romfile=`) makes UEFI firmware use its own
    /// PXE client, which fetches `ipxe.efi` over TFTP as real laptops do.
    pub nic_rom: bool,
}

/// How a VM sees a boot medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    Cdrom,
    /// A USB mass-storage disk on an xHCI controller.
    UsbStick,
}

/// Adds the firmware to `cmd`: nothing for SeaBIOS (QEMU's default), OVMF's code and a
/// private copy of its variable store for UEFI (kept alive by the returned file).
fn firmware_vars(cmd: &mut Command, firmware: Firmware) -> Result<Option<tempfile::NamedTempFile>> {
    match firmware {
        Firmware::Bios => Ok(None),
        Firmware::Uefi => {
            let vars = tempfile::NamedTempFile::new()?;
            std::fs::copy(OVMF_VARS, vars.path()).context("copying OVMF vars (apt ovmf)")?;
            cmd.args(["-drive", &format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}")])
                .args(["-drive", &format!("if=pflash,format=raw,file={}", vars.path().display())]);
            Ok(Some(vars))
        }
    }
}

/// A running VM; killed on drop. Its serial console goes to a file.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    pub serial: PathBuf,
    /// When QEMU started (for power-on-to-callback times).
    pub started: Instant,
    _vars: Option<tempfile::NamedTempFile>,
}

impl Vm {
    pub fn start(lan: &mut BootLan, spec: &VmSpec, serial: PathBuf) -> Result<Self> {
        let tap = lan.add_tap()?;
        let mut cmd = lan.netns.command("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "512", "-nographic", "-monitor", "none"])
            .args(["-uuid", &spec.uuid])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(["-netdev", &format!("tap,id=n0,ifname={tap},script=no,downscript=no")]);
        let rom = if spec.nic_rom { "" } else { ",romfile=" };
        let device = format!("{},netdev=n0,mac={}{rom},bootindex=1", spec.nic, spec.mac);
        cmd.args(["-device", &device]);
        if spec.firmware == Firmware::Bios {
            cmd.args(["-boot", "n"]);
        }
        let vars = firmware_vars(&mut cmd, spec.firmware)?;
        Self::spawn(cmd, serial, vars)
    }

    /// Boots `image` as a CD or a USB stick, with QEMU's user-mode network: the guest
    /// reaches the host's loopback as 10.0.2.2 and nothing else is exposed.
    pub fn boot_media(
        firmware: Firmware,
        media: Media,
        image: &std::path::Path,
        mac: &str,
        serial: PathBuf,
    ) -> Result<Self> {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "1024", "-nographic", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(["-netdev", "user,id=n0"])
            // No NIC boot ROM: the medium is the only way to boot.
            .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac},romfile=")]);
        let drive = format!("if=none,id=media,format=raw,readonly=on,file={}", image.display());
        match media {
            Media::Cdrom => {
                cmd.args(["-drive", &drive]).args(["-device", "ide-cd,drive=media,bootindex=0"]);
            }
            Media::UsbStick => {
                cmd.args(["-device", "qemu-xhci"])
                    .args(["-drive", &drive])
                    .args(["-device", "usb-storage,drive=media,bootindex=0"]);
            }
        }
        let vars = firmware_vars(&mut cmd, firmware)?;
        Self::spawn(cmd, serial, vars)
    }

    /// Starts a QEMU command line (any architecture) whose serial console goes to
    /// `serial`; `vars` is the UEFI vars copy it uses, kept alive with the machine.
    pub(crate) fn spawn(
        mut cmd: Command,
        serial: PathBuf,
        vars: Option<tempfile::NamedTempFile>,
    ) -> Result<Self> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("starting {program} (apt-get install qemu-system-x86 or qemu-system-arm)")
            })?;
        Ok(Self { child, serial, started: Instant::now(), _vars: vars })
    }

    pub fn serial_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// The last `lines` lines of the serial console, for failure messages.
    pub fn serial_tail(&self, lines: usize) -> String {
        let text = self.serial_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until `check` passes, failing with the serial tail after `timeout` or when QEMU
    /// exits. A failure keeps the whole serial log (see [`Vm::keep_serial`]).
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check(self) {
                return Ok(found);
            }
            let failure = if let Some(status) = self.child.try_wait()? {
                format!("QEMU exited ({status}) before {what}")
            } else if Instant::now() >= deadline {
                format!("no {what} within {timeout:?}")
            } else {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            };
            let kept = match self.keep_serial() {
                Ok(path) => format!("whole log: {}", path.display()),
                Err(e) => format!("the whole log could not be kept: {e:#}"),
            };
            bail!("{failure}; {kept}; serial:\n{}", self.serial_tail(60));
        }
    }

    /// Copies the serial log to `TARGET/ctpf-test-logs/`, where it outlives the test's
    /// temporary directory, and returns the copy's path.
    pub fn keep_serial(&self) -> Result<PathBuf> {
        let dir = target_dir()?.join("ctpf-test-logs");
        std::fs::create_dir_all(&dir)?;
        let name = self.serial.file_name().context("serial log without a name")?;
        let kept = dir.join(format!("{}-{}", crate::unique_suffix(), name.to_string_lossy()));
        std::fs::copy(&self.serial, &kept)?;
        Ok(kept)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}
