//! `ctpf image build` end to end against `ctpf up`: an image definition becomes media in the
//! artifact store through real build and packaging jobs; an unchanged rebuild is a cache
//! hit, `--no-cache` writes byte-identical media, downloads are verified, and bad
//! definitions, missing artifacts and a corrupt stored input are reported by name. (The
//! media booting is `media_qemu.rs`.)

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{collections::BTreeMap, path::Path};

use ctpf_common::{BootMode, PackageManifest, Sha256Digest};
use ctpf_e2e::{
    CtpfProcess, UpAdmin,
    qemu::{discovery_agent, discovery_linux, raspi_trees},
};
use serde_json::Value;

/// `ctpf --json image build DEFINITION EXTRA...`: each medium's manifest by name.
fn build(up: &UpAdmin, definition: &Path, extra: &[&str]) -> BTreeMap<String, PackageManifest> {
    let args = [&["--json", "image", "build", definition.to_str().unwrap()][..], extra].concat();
    serde_json::from_slice(&up.cli(&args)).unwrap()
}

const DEFINITION: &str = r#"
name = "demo"
architectures = ["x86_64"]
formats = ["iso", "usb", "pxe_bundle"]

[boot]
media_key = "sticks"
manager_url = "http://10.0.2.2:8080/"
kernel_cmdline = ["console=ttyS0"]
"#;

#[test]
fn an_image_definition_becomes_reproducible_media() {
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
        &[],
        dir.path().join("up.log"),
        "listening on",
    )
    .unwrap();
    let up = UpAdmin::new(process, &data).unwrap();
    up.cli(&["datacenter", "add", "home"]);
    let secret = String::from_utf8(up.cli(&[
        "media-keys",
        "create",
        "sticks",
        "--datacenter",
        "home",
        "--ttl",
        "1d",
    ]))
    .unwrap()
    .trim()
    .to_owned();

    // What `ctpf up --boot-interface` stores from Debian's ipxe package, for the PXE bundle.
    for file in ["ipxe.efi", "undionly.kpxe"] {
        let path = format!("/usr/lib/ipxe/{file}");
        up.cli(&[
            "artifacts",
            "push",
            &path,
            "--name",
            &format!("boot-{file}"),
            "--kind",
            "bootloader",
        ]);
    }
    let definition = dir.path().join("demo.toml");
    std::fs::write(&definition, DEFINITION).unwrap();
    let media = build(&up, &definition, &[]);
    assert_eq!(
        media.keys().map(String::as_str).collect::<Vec<_>>(),
        ["demo.img", "demo.iso", "demo.tar"]
    );
    let iso = &media["demo.iso"];
    assert!(!iso.cached);
    assert_eq!(
        iso.boot_modes,
        [
            BootMode::BiosCdrom,
            BootMode::BiosUsb,
            BootMode::UefiX86_64Cdrom,
            BootMode::UefiX86_64Usb
        ]
    );
    assert_eq!(media["demo.img"].boot_modes, [BootMode::UefiX86_64Usb]);
    let bundle: Vec<&str> = media["demo.tar"].contents.iter().map(|e| e.path.as_str()).collect();
    assert!(bundle.contains(&"discovery/x86_64/vmlinuz"), "{bundle:?}");
    assert!(bundle.contains(&"ipxe.efi") && bundle.contains(&"undionly.kpxe"), "{bundle:?}");

    // The medium carries the manager's URL and the media key.
    let iso_file = dir.path().join("demo.iso");
    up.cli(&["image", "download", "demo.iso", "-o", iso_file.to_str().unwrap()]);
    let bytes = std::fs::read(&iso_file).unwrap();
    assert_eq!(Sha256Digest::of(&bytes), iso.digest);
    let words = format!("ctpf.url=http://10.0.2.2:8080/ ctpf.token={secret}");
    assert!(bytes.windows(words.len()).any(|w| w == words.as_bytes()), "{words} not on the ISO");

    // Unchanged: answered from the cache. --no-cache: written again, the same bytes.
    let again = build(&up, &definition, &[]);
    for (name, medium) in &again {
        assert!(medium.cached, "{name}");
        assert_eq!(medium.digest, media[name].digest, "{name}");
    }
    let rewritten = build(&up, &definition, &["--no-cache"]);
    for (name, medium) in &rewritten {
        assert!(!medium.cached, "{name}");
        assert_eq!(medium.digest, media[name].digest, "{name}: not reproducible");
    }

    let listed: Vec<Value> = serde_json::from_slice(&up.cli(&["--json", "image", "list"])).unwrap();
    let names: Vec<&str> = listed.iter().filter_map(|a| a["name"].as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    for name in ["demo.iso", "demo.img", "demo.tar"] {
        assert!(names.contains(&name), "{names:?}");
    }

    // Bad definitions are refused naming what is wrong.
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, DEFINITION.replace("kernel_cmdline", "kernel_cmdlnie")).unwrap();
    let err = up.refused(&["image", "build", typo.to_str().unwrap()]);
    assert!(err.contains("kernel_cmdlnie"), "{err}");
    let missing = dir.path().join("missing.toml");
    std::fs::write(&missing, format!("{DEFINITION}\n[artifacts]\nkernel = \"no-such-kernel\"\n"))
        .unwrap();
    let err = up.refused(&["image", "build", missing.to_str().unwrap()]);
    assert!(err.contains("no artifact named no-such-kernel"), "{err}");
    let no_key = dir.path().join("no-key.toml");
    std::fs::write(&no_key, DEFINITION.replace("\"sticks\"", "\"gone\"")).unwrap();
    let err = up.refused(&["image", "build", no_key.to_str().unwrap()]);
    assert!(err.contains("media key gone"), "{err}");

    // A Raspberry Pi image: the firmware through the raspi_firmware build, Debian's arm64
    // kernel and a stand-in initrd as stored artifacts (this test builds no arm64 discovery
    // image; arm64_qemu.rs boots the real one).
    let (firmware, linux) = raspi_trees().unwrap();
    let kernel = std::fs::read_dir(linux.join("boot")).unwrap().next().unwrap().unwrap().path();
    let initrd = dir.path().join("pi-initrd");
    std::fs::write(&initrd, vec![0x1f; 100_000]).unwrap();
    up.cli(&[
        "artifacts",
        "push",
        kernel.to_str().unwrap(),
        "--name",
        "pi-vmlinuz",
        "--kind",
        "kernel",
    ]);
    up.cli(&[
        "artifacts",
        "push",
        initrd.to_str().unwrap(),
        "--name",
        "pi-initrd",
        "--kind",
        "initrd",
    ]);
    let pi = dir.path().join("pi.toml");
    std::fs::write(
        &pi,
        format!(
            "name = \"pi\"\narchitectures = [\"arm64\"]\nformats = [\"raspi\"]\n\
             [boot]\nmedia_key = \"sticks\"\nmanager_url = \"http://10.0.2.2:8080/\"\n\
             [artifacts]\nkernel = \"pi-vmlinuz\"\ninitrd = \"pi-initrd\"\n\
             [raspi]\nfirmware = {:?}\nlinux = {:?}\n",
            firmware.to_str().unwrap(),
            linux.to_str().unwrap()
        ),
    )
    .unwrap();
    let media = build(&up, &pi, &[]);
    let image = &media["pi.img"];
    assert_eq!(image.boot_modes, [BootMode::RaspberryPi]);
    let files: Vec<&str> = image.contents.iter().map(|e| e.path.as_str()).collect();
    for file in ["bootcode.bin", "start4.elf", "config.txt", "cmdline.txt", "vmlinuz", "initrd.img"]
    {
        assert!(files.contains(&file), "{file} not in {files:?}");
    }
    assert!(files.iter().any(|f| f.starts_with("bcm") && f.ends_with(".dtb")), "{files:?}");
    let image_file = dir.path().join("pi.img");
    up.cli(&["image", "download", "pi.img", "-o", image_file.to_str().unwrap()]);
    let cmdline = std::process::Command::new("mtype")
        .arg("-i")
        .arg(format!("{}@@1M", image_file.display()))
        .arg("::cmdline.txt")
        .output()
        .unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline.stdout);
    assert!(cmdline.contains(&format!("ctpf.token={secret}")), "{cmdline}");
    assert!(build(&up, &pi, &[])["pi.img"].cached);

    // A stored input that went bad stops the packaging job, naming it.
    let initrd = iso.contents.iter().find(|e| e.path == "boot/initrd.img").unwrap();
    let hex = initrd.digest.hex();
    let blob = data.join("artifacts/sha256").join(&hex[..2]).join(&hex);
    let mut corrupt = std::fs::read(&blob).unwrap();
    corrupt[4096] ^= 0xff;
    std::fs::write(&blob, corrupt).unwrap();
    let err = up.refused(&["image", "build", definition.to_str().unwrap(), "--no-cache"]);
    assert!(err.contains("input initrd") && err.contains("corrupt"), "{err}");
}
