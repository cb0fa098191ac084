//! Issue 5's boot acceptance: the x86_64 media the packagers write boot to the discovery
//! callback in five ways: the hybrid ISO as a CD under SeaBIOS (isolinux) and under OVMF
//! (GRUB from the El Torito ESP), and as a USB stick (qemu-xhci + usb-storage) under SeaBIOS
//! (the isohybrid MBR) and under OVMF (MBR partition 2, the ESP); and the GPT stick (one
//! FAT32 ESP holding GRUB, kernel and initrd) under OVMF. The VMs use QEMU's user-mode
//! network, which reaches `ctpf up` on the host's loopback as 10.0.2.2 and nothing else.
//!
//! Every boot also shows that the kernel got the whole initrd from the medium (ISO 9660 or
//! FAT): the size the kernel frees is the initrd's, and it unpacked without error.
//!
//! The media are made the way a user makes them: `ctpf image build` from an image definition
//! (build and packaging jobs of `ctpf up`), downloaded by name. They carry a reusable media
//! key; each VM has its own MAC and must enroll as its own host, with the key's name on it.
//! Needs qemu-system-x86, ovmf, isolinux, GRUB's x86_64-efi modules and the
//! unpacked kernel package that `.ci/run` prepares.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use ctpf_e2e::{
    CtpfProcess, UpAdmin,
    qemu::{Firmware, Media, Vm, discovery_agent, discovery_linux},
};
use serde_json::Value;

/// Power-on to callback is 13-22 s here when the machine is idle; CI runs two VMs at once.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn the_hybrid_iso_and_the_gpt_stick_boot_to_the_discovery_callback() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (linux, agent) = (discovery_linux().unwrap(), discovery_agent().unwrap());
    let process = CtpfProcess::start(
        &[
            "up",
            "--data-dir",
            data.to_str().unwrap(),
            "--api",
            "http://127.0.0.1:0",
            "--discovery-linux",
            linux.to_str().unwrap(),
            "--discovery-agent",
            agent.to_str().unwrap(),
        ],
        &[("SOURCE_DATE_EPOCH", "1700000000")],
        dir.path().join("up.log"),
        "listening on",
    )
    .unwrap();
    let up = UpAdmin::new(process, &data).unwrap();
    up.cli(&["datacenter", "add", "home"]);
    // One reusable media key for every machine; each must still enroll as its own host.
    let secret = String::from_utf8(up.cli(&[
        "media-keys",
        "create",
        "sticks",
        "--datacenter",
        "home",
        "--ttl",
        "1d",
    ]))
    .unwrap();
    assert!(secret.trim().starts_with("ctpf_mk_"), "{secret}");

    // The media, the way a user makes them: an image definition, built by the builder and
    // packager jobs of `ctpf up` (GRUB for media, SYSLINUX, the discovery image).
    let port = up.process.api().rsplit(':').next().unwrap().to_owned();
    let definition = dir.path().join("boot.toml");
    std::fs::write(
        &definition,
        format!(
            "name = \"boot\"\narchitectures = [\"x86_64\"]\nformats = [\"iso\", \"usb\"]\n\
             [boot]\nmedia_key = \"sticks\"\nmanager_url = \"http://10.0.2.2:{port}/\"\n\
             kernel_cmdline = [\"console=ttyS0\"]\n"
        ),
    )
    .unwrap();
    up.cli(&["image", "build", definition.to_str().unwrap()]);
    let iso = dir.path().join("ctpf.iso");
    let stick = dir.path().join("ctpf-stick.img");
    up.cli(&["image", "download", "boot.iso", "-o", iso.to_str().unwrap()]);
    up.cli(&["image", "download", "boot.img", "-o", stick.to_str().unwrap()]);
    assert!(std::fs::metadata(&stick).unwrap().len() > 34 << 20);
    let initrd = dir.path().join("initrd");
    up.cli(&["artifacts", "pull", "discovery-x86_64-initrd", "-o", initrd.to_str().unwrap()]);

    let ways = [
        (Firmware::Bios, Media::Cdrom, &iso, "52:54:00:c7:05:01"),
        (Firmware::Uefi, Media::Cdrom, &iso, "52:54:00:c7:05:02"),
        (Firmware::Bios, Media::UsbStick, &iso, "52:54:00:c7:05:03"),
        (Firmware::Uefi, Media::UsbStick, &iso, "52:54:00:c7:05:04"),
        (Firmware::Uefi, Media::UsbStick, &stick, "52:54:00:c7:05:05"),
    ];
    // The kernel frees the initrd the boot loader handed it, in whole pages.
    let initrd_kib = std::fs::metadata(&initrd).unwrap().len().div_ceil(4096) * 4;
    let whole_initrd = format!("Freeing initrd memory: {initrd_kib}K");
    // Two at a time: one per core.
    for pair in ways.chunks(2) {
        let mut vms: Vec<(Vm, &str, String)> = pair
            .iter()
            .map(|(firmware, media, image, mac)| {
                let file = image.file_name().unwrap().to_string_lossy();
                let name = format!("{file}-{firmware:?}-{media:?}");
                let serial = dir.path().join(format!("{name}.serial.log"));
                (Vm::boot_media(*firmware, *media, image, mac, serial).unwrap(), *mac, name)
            })
            .collect();
        for (vm, mac, name) in &mut vms {
            vm.wait_for(&format!("{name}: the discovery callback"), BOOT_TIMEOUT, |vm| {
                vm.serial_text().contains("ctpf-agent: enrolled host").then_some(())
            })
            .unwrap();
            let serial = vm.serial_text();
            if !serial.contains(&whole_initrd) || serial.contains("Initramfs unpacking failed") {
                panic!(
                    "{name}: the kernel did not get the whole initrd ({whole_initrd}); whole log: \
                     {:?}; serial:\n{}",
                    vm.keep_serial(),
                    vm.serial_tail(80)
                );
            }
            let hosts: Vec<Value> =
                serde_json::from_slice(&up.cli(&["hosts", "list", "--json"])).unwrap();
            let host = hosts
                .iter()
                .find(|h| h["macs"].as_array().is_some_and(|m| m.iter().any(|m| m == *mac)))
                .unwrap_or_else(|| panic!("{name}: no host with {mac}: {hosts:?}"));
            assert_eq!(host["datacenter"], "home", "{name}");
            assert_eq!(host["media_key"], "sticks", "{name}");
            vm.stop();
        }
    }
    let hosts: Vec<Value> = serde_json::from_slice(&up.cli(&["hosts", "list", "--json"])).unwrap();
    assert_eq!(hosts.len(), 5, "one identity per machine, all from one media key");
    let keys: Vec<Value> =
        serde_json::from_slice(&up.cli(&["media-keys", "list", "--json"])).unwrap();
    assert_eq!(keys[0]["enrollments"], 5, "{keys:?}");
}
