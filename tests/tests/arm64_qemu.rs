//! arm64 acceptance: `ctpf up` builds the arm64 discovery image beside the x86_64 one (two
//! build jobs, from Debian's arm64 kernel package, busybox-static:arm64 and the agent built
//! for aarch64-unknown-linux-musl), the PXE routes serve each architecture its own, and
//! `ctpf image build` turns an `architectures = ["x86_64", "arm64"]` definition into an ISO
//! and a USB stick for both (GRUB as `EFI/BOOT/BOOTX64.EFI` and `BOOTAA64.EFI`, both
//! discovery kernels, a GRUB config choosing by `$grub_cpu`) that an arm64 machine boots to
//! the discovery callback: QEMU `virt` (Cortex-A57, TCG) with AAVMF UEFI firmware, the ISO
//! as a CD and the stick on USB, on QEMU's user-mode network, which reaches `ctpf up` on the
//! host's loopback as 10.0.2.2. Each machine enrolls with the media key as an arm64 host; an
//! x86_64 machine (OVMF) boots the same ISO and enrolls as x86_64.
//! Then a Raspberry Pi medium from the same definition path: QEMU cannot run the Pi's
//! VideoCore firmware, so a `raspi3b` machine starts what the firmware would, read from the
//! image's FAT (kernel, initramfs, the Pi 3B's device tree, `cmdline.txt`), and the discovery
//! image finds its network behind the SoC's dwc2 USB controller (a CDC Ethernet NIC).
//!
//! Needs qemu-system-arm, qemu-efi-aarch64, the unpacked arm64 kernel package and busybox
//! that `.ci/run` prepares, the aarch64-unknown-linux-musl target, and GRUB's arm64-efi
//! modules (`.ci/run` unpacks grub-efi-arm64-bin:arm64; `ctpf up` finds them through
//! `CTPF_GRUB_LIB_PATH`).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{collections::BTreeMap, path::Path, time::Duration};

use ctpf_common::{BootMode, PackageManifest};
use ctpf_e2e::{
    CtpfProcess, UpAdmin,
    qemu::{Firmware, Media, Vm, discovery_agent, discovery_linux, raspi_trees},
    qemu_arm64::{
        AGENT_TARGET_ARM64, Arm64Vm, busybox_arm64, discovery_agent_for, discovery_linux_arm64,
        grub_lib_arm64,
    },
};
use serde_json::Value;

/// Power-on to callback was 11-18 s here (TCG; the two UEFI machines at once on two cores:
/// AAVMF ~3 s, GRUB, the kernel ~2.5 s to /init, DHCP and enrollment). TCG speed varies a lot
/// between machine kinds and loads, hence the margin.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// GET `path` from the API without a token, as a booting machine does.
fn fetch(api: &str, path: &str) -> (u16, Vec<u8>) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let response = reqwest::get(format!("{api}{path}")).await.unwrap();
        let status = response.status().as_u16();
        (status, response.bytes().await.unwrap().to_vec())
    })
}

/// The kernel file (`boot/vmlinuz-*`) of an unpacked linux-image package.
fn kernel_of(linux: &Path) -> Vec<u8> {
    let boot = std::fs::read_dir(linux.join("boot")).unwrap();
    let kernel = boot
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        .unwrap_or_else(|| panic!("no vmlinuz-* in {}/boot", linux.display()));
    std::fs::read(kernel.path()).unwrap()
}

#[test]
fn an_arm64_machine_boots_ctpf_media_to_the_discovery_callback() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (linux_arm64, busybox_arm64) = (discovery_linux_arm64().unwrap(), busybox_arm64().unwrap());
    let agent_arm64 = discovery_agent_for(AGENT_TARGET_ARM64).unwrap();
    let (linux, agent) = (discovery_linux().unwrap(), discovery_agent().unwrap());
    let grub_lib = grub_lib_arm64().unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let args = [
        "up".to_owned(),
        "--data-dir".into(),
        path(&data),
        "--api".into(),
        "http://127.0.0.1:0".into(),
        "--discovery-linux".into(),
        path(&linux),
        "--discovery-agent".into(),
        path(&agent),
        "--discovery-linux-arm64".into(),
        path(&linux_arm64),
        "--discovery-busybox-arm64".into(),
        path(&busybox_arm64),
        "--discovery-agent-arm64".into(),
        path(&agent_arm64),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let process = CtpfProcess::start(
        &args,
        &[("SOURCE_DATE_EPOCH", "1700000000"), ("CTPF_GRUB_LIB_PATH", &path(&grub_lib))],
        dir.path().join("up.log"),
        "listening on",
    )
    .unwrap();
    let up = UpAdmin::new(process, &data).unwrap();
    let api = up.process.api().to_owned();

    // Two discovery images, each served to its own architecture.
    let (status, arm64_kernel) = fetch(&api, "/boot/discovery/arm64/vmlinuz");
    assert_eq!(status, 200);
    assert!(arm64_kernel == kernel_of(&linux_arm64), "the arm64 route serves the arm64 kernel");
    let (status, x86_kernel) = fetch(&api, "/boot/discovery/x86_64/vmlinuz");
    assert_eq!(status, 200);
    assert!(x86_kernel == kernel_of(&linux), "the x86_64 route serves the x86_64 kernel");
    let (status, initrd) = fetch(&api, "/boot/discovery/arm64/initrd");
    assert_eq!(status, 200);
    assert_eq!(&initrd[..2], b"\x1f\x8b", "a gzip initramfs");
    let query = "/boot/ipxe?mac=52:54:00:a6:40:09&arch=arm64&platform=efi";
    let (status, script) = fetch(&api, query);
    let script = String::from_utf8(script).unwrap();
    assert_eq!(status, 200, "{script}");
    assert!(script.contains("/boot/discovery/arm64/vmlinuz"), "{script}");
    let builds: Vec<Value> =
        serde_json::from_slice(&up.cli(&["--json", "builds", "list"])).unwrap();
    let arches: Vec<&str> =
        builds.iter().filter_map(|b| b["manifest"]["inputs"]["arch"].as_str()).collect();
    assert!(arches.contains(&"arm64") && arches.contains(&"x86_64"), "{builds:?}");

    // Media through the product path: a media key and an image definition.
    up.cli(&["datacenter", "add", "home"]);
    up.cli(&["media-keys", "create", "arm-sticks", "--datacenter", "home", "--ttl", "1d"]);
    let port = api.rsplit(':').next().unwrap();
    let definition = dir.path().join("arm.toml");
    std::fs::write(
        &definition,
        format!(
            "name = \"arm\"\narchitectures = [\"x86_64\", \"arm64\"]\n\
             formats = [\"iso\", \"usb\"]\n\
             [boot]\nmedia_key = \"arm-sticks\"\nmanager_url = \"http://10.0.2.2:{port}/\"\n\
             kernel_cmdline = [\"console=ttyS0\", \"console=ttyAMA0\"]\n"
        ),
    )
    .unwrap();
    let media: BTreeMap<String, PackageManifest> = serde_json::from_slice(&up.cli(&[
        "--json",
        "image",
        "build",
        definition.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(
        media["arm.iso"].boot_modes,
        [
            BootMode::BiosCdrom,
            BootMode::BiosUsb,
            BootMode::UefiX86_64Cdrom,
            BootMode::UefiX86_64Usb,
            BootMode::UefiArm64Cdrom,
            BootMode::UefiArm64Usb
        ]
    );
    assert_eq!(media["arm.img"].boot_modes, [BootMode::UefiX86_64Usb, BootMode::UefiArm64Usb]);
    let stick: Vec<&str> = media["arm.img"].contents.iter().map(|e| e.path.as_str()).collect();
    for file in
        ["EFI/BOOT/BOOTAA64.EFI", "EFI/BOOT/BOOTX64.EFI", "boot/arm64/vmlinuz", "boot/vmlinuz"]
    {
        assert!(stick.contains(&file), "{file} not in {stick:?}");
    }
    let (iso, img) = (dir.path().join("arm.iso"), dir.path().join("arm.img"));
    up.cli(&["image", "download", "arm.iso", "-o", iso.to_str().unwrap()]);
    up.cli(&["image", "download", "arm.img", "-o", img.to_str().unwrap()]);

    // Both machines at once: one per core.
    let ways =
        [(Media::Cdrom, &iso, "52:54:00:a6:40:01"), (Media::UsbStick, &img, "52:54:00:a6:40:02")];
    let mut vms: Vec<(Vm, &str, String)> = ways
        .iter()
        .map(|(media, image, mac)| {
            let name = format!("{}-{media:?}", image.file_name().unwrap().to_string_lossy());
            let serial = dir.path().join(format!("{name}.serial.log"));
            (Arm64Vm::boot_media(*media, image, mac, serial).unwrap(), *mac, name)
        })
        .collect();
    for (vm, mac, name) in &mut vms {
        vm.wait_for(&format!("{name}: the discovery callback"), BOOT_TIMEOUT, |vm| {
            vm.serial_text().contains("ctpf-agent: enrolled host").then_some(())
        })
        .unwrap();
        eprintln!("{name}: power-on to callback in {:.0?}", vm.started.elapsed());
        let hosts: Vec<Value> =
            serde_json::from_slice(&up.cli(&["hosts", "list", "--json"])).unwrap();
        let host = hosts
            .iter()
            .find(|h| h["macs"].as_array().is_some_and(|m| m.iter().any(|m| m == *mac)))
            .unwrap_or_else(|| panic!("{name}: no host with {mac}: {hosts:?}"));
        assert_eq!(host["arch"], "arm64", "{name}");
        assert_eq!(host["datacenter"], "home", "{name}");
        assert_eq!(host["media_key"], "arm-sticks", "{name}");
        vm.stop();
    }

    // The same ISO on an x86_64 machine: GRUB's x86_64 branch, the x86_64 kernel.
    let mac = "52:54:00:a6:40:04";
    let serial = dir.path().join("arm.iso-x86_64.serial.log");
    let mut vm = Vm::boot_media(Firmware::Uefi, Media::Cdrom, &iso, mac, serial).unwrap();
    vm.wait_for("arm.iso on x86_64: the discovery callback", BOOT_TIMEOUT, |vm| {
        vm.serial_text().contains("ctpf-agent: enrolled host").then_some(())
    })
    .unwrap();
    let hosts: Vec<Value> = serde_json::from_slice(&up.cli(&["hosts", "list", "--json"])).unwrap();
    let host = hosts
        .iter()
        .find(|h| h["macs"].as_array().is_some_and(|m| m.iter().any(|m| m == mac)))
        .unwrap_or_else(|| panic!("no host with {mac}: {hosts:?}"));
    assert_eq!(host["arch"], "x86_64");
    vm.stop();

    // A Raspberry Pi medium (firmware from Debian's raspi-firmware, the device trees of the
    // same arm64 kernel package), its boot files read back from the FAT partition at 1 MiB.
    // Naming the serial console again makes it /dev/console (the medium's default is HDMI's
    // tty1), so /init's and the agent's lines reach the serial log.
    let (firmware, _) = raspi_trees().unwrap();
    let pi_definition = dir.path().join("pi.toml");
    std::fs::write(
        &pi_definition,
        format!(
            "name = \"pi\"\narchitectures = [\"arm64\"]\nformats = [\"raspi\"]\n\
             [boot]\nmedia_key = \"arm-sticks\"\nmanager_url = \"http://10.0.2.2:{port}/\"\n\
             kernel_cmdline = [\"console=ttyS1,115200\"]\n[raspi]\nfirmware = {:?}\nlinux = {:?}\n",
            path(&firmware),
            path(&linux_arm64),
        ),
    )
    .unwrap();
    up.cli(&["image", "build", pi_definition.to_str().unwrap()]);
    let pi = dir.path().join("pi.img");
    up.cli(&["image", "download", "pi.img", "-o", pi.to_str().unwrap()]);
    let boot = dir.path().join("pi-boot");
    std::fs::create_dir(&boot).unwrap();
    for file in ["vmlinuz", "initrd.img", "bcm2837-rpi-3-b.dtb", "cmdline.txt"] {
        let out = std::process::Command::new("mcopy")
            .arg("-i")
            .arg(format!("{}@@1M", pi.display()))
            .arg(format!("::{file}"))
            .arg(boot.join(file))
            .output()
            .expect("mcopy (apt-get install mtools)");
        assert!(out.status.success(), "mcopy {file}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        std::fs::read(boot.join("vmlinuz")).unwrap() == kernel_of(&linux_arm64),
        "the Pi medium carries the arm64 discovery kernel"
    );
    let cmdline = std::fs::read_to_string(boot.join("cmdline.txt")).unwrap();
    let mac = "52:54:00:a6:40:03";
    let mut vm = Arm64Vm::boot_raspi3b(
        &boot.join("vmlinuz"),
        &boot.join("bcm2837-rpi-3-b.dtb"),
        &boot.join("initrd.img"),
        cmdline.trim(),
        mac,
        dir.path().join("pi-raspi3b.serial.log"),
    )
    .unwrap();
    vm.wait_for("pi.img-raspi3b: the discovery callback", BOOT_TIMEOUT, |vm| {
        vm.serial_text().contains("ctpf-agent: enrolled host").then_some(())
    })
    .unwrap();
    eprintln!("pi.img-raspi3b: power-on to callback in {:.0?}", vm.started.elapsed());
    let serial = vm.serial_text();
    assert!(serial.contains("DHCP on usb0"), "the dwc2 USB NIC: {}", vm.serial_tail(40));
    let hosts: Vec<Value> = serde_json::from_slice(&up.cli(&["hosts", "list", "--json"])).unwrap();
    let host = hosts
        .iter()
        .find(|h| h["macs"].as_array().is_some_and(|m| m.iter().any(|m| m == mac)))
        .unwrap_or_else(|| panic!("raspi3b: no host with {mac}: {hosts:?}"));
    assert_eq!(host["arch"], "arm64");
    assert_eq!(host["media_key"], "arm-sticks");
    assert_eq!(hosts.len(), 4, "one host per machine");
}
