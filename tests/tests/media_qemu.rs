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
//! The media carry a reusable enrollment token; each VM has its own MAC and must enroll as
//! its own host. Needs qemu-system-x86, ovmf, isolinux, GRUB's x86_64-efi modules and the
//! unpacked kernel package that `.ci/run` prepares.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{path::Path, time::Duration};

use ctpf_e2e::{
    CtpfProcess, ctpf_cli,
    qemu::{Firmware, Media, Vm, discovery_agent, discovery_linux},
};
use ctpf_packagers::{
    disk,
    iso9660::Source,
    media::{self, BootFiles, GRUB_EMBEDDED_CONFIG, MediaConfig, Syslinux},
};
use serde_json::Value;

/// Power-on to callback is 13-22 s here when the machine is idle; CI runs two VMs at once.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

struct Up {
    process: CtpfProcess,
    token: String,
}

impl Up {
    fn cli(&self, args: &[&str]) -> Vec<u8> {
        let env = [("CTPF_API", self.process.api()), ("CTPF_TOKEN", self.token.as_str())];
        let out = ctpf_cli(args, &env).unwrap();
        assert!(out.status.success(), "ctpf {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    fn pull(&self, name: &str, to: &Path) -> Source {
        self.cli(&["artifacts", "pull", name, "-o", to.to_str().unwrap()]);
        Source::file(to).unwrap()
    }
}

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
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_owned();
    let up = Up { process, token };
    up.cli(&["datacenter", "add", "home"]);
    let issued: Value = serde_json::from_slice(&up.cli(&[
        "tokens",
        "create",
        "--datacenter",
        "home",
        "--uses",
        "5",
        "--json",
    ]))
    .unwrap();
    let enrollment = issued["token"].as_str().unwrap().to_owned();

    // The medium's parts: ctpf's discovery image and a GRUB built for media.
    let embed = dir.path().join("media-embed.cfg");
    std::fs::write(&embed, GRUB_EMBEDDED_CONFIG).unwrap();
    let grub_build =
        ["build", "grub", "--target", "x86_64-efi", "--config", embed.to_str().unwrap()];
    up.cli(&[&grub_build[..], &["--name", "media"]].concat());
    let files = BootFiles {
        kernel: up.pull("discovery-x86_64-vmlinuz", &dir.path().join("vmlinuz")),
        initrd: up.pull("discovery-x86_64-initrd", &dir.path().join("initrd")),
        efi_x86_64: Some(up.pull("media-grubx64.efi", &dir.path().join("grubx64.efi"))),
        efi_arm64: None,
        syslinux: Some(Syslinux {
            isolinux_bin: Source::file("/usr/lib/ISOLINUX/isolinux.bin").unwrap(),
            ldlinux_c32: Source::file("/usr/lib/syslinux/modules/bios/ldlinux.c32").unwrap(),
            isohdpfx_bin: Source::file("/usr/lib/ISOLINUX/isohdpfx.bin").unwrap(),
        }),
    };
    let port = up.process.api().rsplit(':').next().unwrap().to_owned();
    let config = MediaConfig {
        label: "CTPF_BOOT".into(),
        kernel_words: vec![
            "console=ttyS0".into(),
            format!("ctpf.url=http://10.0.2.2:{port}/"),
            format!("ctpf.token={enrollment}"),
        ],
        timestamp: 1_700_000_000,
        serial: 0xC7F0_0001,
    };
    let iso = dir.path().join("ctpf.iso");
    let plan = media::hybrid_iso(&files, &config).unwrap();
    plan.write(&mut std::io::BufWriter::new(std::fs::File::create(&iso).unwrap())).unwrap();

    let stick = dir.path().join("ctpf-stick.img");
    disk::write_gpt_esp(&stick, &media::usb_esp(&files, &config).unwrap(), config.serial).unwrap();
    assert!(std::fs::metadata(&stick).unwrap().len() > 34 << 20);

    let ways = [
        (Firmware::Bios, Media::Cdrom, &iso, "52:54:00:c7:05:01"),
        (Firmware::Uefi, Media::Cdrom, &iso, "52:54:00:c7:05:02"),
        (Firmware::Bios, Media::UsbStick, &iso, "52:54:00:c7:05:03"),
        (Firmware::Uefi, Media::UsbStick, &iso, "52:54:00:c7:05:04"),
        (Firmware::Uefi, Media::UsbStick, &stick, "52:54:00:c7:05:05"),
    ];
    // The kernel frees the initrd the boot loader handed it, in whole pages.
    let initrd_kib = files.initrd.len().div_ceil(4096) * 4;
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
            vm.stop();
        }
    }
    let hosts: Vec<Value> = serde_json::from_slice(&up.cli(&["hosts", "list", "--json"])).unwrap();
    assert_eq!(hosts.len(), 5, "one identity per machine, all from one reusable token");
}
