//! Renders every profile × arch combination and the entry script and compares them with
//! `tests/golden/*.ipxe`. `UPDATE_GOLDEN=1 cargo test -p ctpf-scripts --test golden`
//! rewrites the files; review the diff like code.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use ctpf_scripts::{
    BootRequest, Profile, ScriptArch, ScriptContext, render_entry, render_grub_chain_ipxe,
    render_grub_entry, render_grub_machine, render_machine,
};

fn context() -> ScriptContext {
    ScriptContext::new("http://10.0.2.2:8080/", "tok_EN-r0ll").unwrap()
}

fn request(arch: ScriptArch) -> BootRequest {
    BootRequest {
        mac: "52:54:00:12:34:56".parse().unwrap(),
        uuid: Some("8a7c3e0e-5e2f-4f3a-9d51-0b6c6d1f2a11".parse().unwrap()),
        arch,
        datacenter: Some("home".parse().unwrap()),
    }
}

fn install_profile(arch: ScriptArch) -> Profile {
    let cpu = arch.cpu_name();
    Profile::Install {
        kernel_url: format!("https://mirror.example/debian/{cpu}/linux?v=12&flavour=netboot"),
        initrd_url: format!("https://mirror.example/debian/{cpu}/initrd.gz"),
        cmdline: "auto=true  priority=critical console=ttyS0,115200n8 url=http://10.0.2.2:8080/preseed/x.cfg"
            .into(),
    }
}

/// (golden file name, rendered script) for every case.
fn all_scripts() -> Vec<(String, String)> {
    let context = context();
    let mut scripts = vec![("entry.ipxe".to_owned(), render_entry(&context.base_url).unwrap())];
    for arch in ScriptArch::ALL {
        for profile in [
            Profile::Discovery { cmdline: String::new() },
            install_profile(arch),
            Profile::LocalDisk,
        ] {
            let name = format!("{}-{}.ipxe", profile.kind(), arch);
            scripts.push((name, render_machine(&context, &request(arch), &profile).unwrap()));
        }
        let entry = render_grub_entry(&context.base_url, arch).unwrap();
        scripts.push((format!("grub-entry-{arch}.cfg"), entry));
        let chain = render_grub_chain_ipxe(&context.base_url, arch).unwrap();
        scripts.push((format!("grub-chain-ipxe-{arch}.cfg"), chain));
        for profile in [Profile::Discovery { cmdline: "console=ttyS0".into() }, Profile::LocalDisk]
        {
            let name = format!("grub-{}-{}.cfg", profile.kind(), arch);
            scripts.push((name, render_grub_machine(&context, &request(arch), &profile).unwrap()));
        }
    }
    scripts
}

/// The iPXE scripts only.
fn ipxe_scripts() -> Vec<(String, String)> {
    all_scripts().into_iter().filter(|(name, _)| name.ends_with(".ipxe")).collect()
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

#[test]
fn scripts_match_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut mismatched = Vec::new();
    for (name, script) in all_scripts() {
        let path = golden_dir().join(&name);
        if update {
            std::fs::write(&path, &script).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("{}: {err} (run with UPDATE_GOLDEN=1)", path.display()));
        if want != script {
            eprintln!("--- {name} (golden)\n{want}\n+++ {name} (rendered)\n{script}");
            mismatched.push(name);
        }
    }
    assert!(
        mismatched.is_empty(),
        "differ from golden files: {mismatched:?} (UPDATE_GOLDEN=1 rewrites)"
    );
}

#[test]
fn no_stale_golden_files() {
    let expected: Vec<String> = all_scripts().into_iter().map(|(name, _)| name).collect();
    for entry in std::fs::read_dir(golden_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(expected.contains(&name), "golden file {name} is not rendered by any case");
    }
}

/// Without an `ipxe` binary there is no syntax checker; these are the checks we can make.
#[test]
fn scripts_are_plausible_ipxe() {
    for (name, script) in ipxe_scripts() {
        assert!(script.starts_with("#!ipxe\n"), "{name}: must start with #!ipxe");
        assert!(script.ends_with('\n') && !script.ends_with("\n\n"), "{name}: one final newline");
        for marker in ["{{", "}}", "{%", "%}", "{#", "#}"] {
            assert!(!script.contains(marker), "{name}: unexpanded template marker {marker}");
        }
        let mut labels = Vec::new();
        let mut gotos = Vec::new();
        for (number, line) in script.lines().enumerate() {
            let at = format!("{name}:{}", number + 1);
            assert!(line.bytes().all(|b| b == b' ' || b.is_ascii_graphic()), "{at}: stray byte");
            assert!(!line.ends_with(' ') && !line.starts_with(' '), "{at}: stray whitespace");
            assert!(!line.contains('\\') && !line.contains('"') && !line.contains('\''), "{at}");
            if let Some(label) = line.strip_prefix(':') {
                labels.push(label.to_owned());
            }
            if let Some((_, target)) = line.split_once("goto ") {
                gotos.push((at.clone(), target.split_whitespace().next().unwrap().to_owned()));
            }
            // `${` must always be closed on the same line (iPXE expands settings per line).
            assert_eq!(line.matches("${").count(), line.matches('}').count(), "{at}: ${{...}}");
        }
        for (at, target) in gotos {
            assert!(labels.contains(&target), "{at}: goto {target} has no label");
        }
    }
}

#[test]
fn discovery_kernel_line_names_its_initrd() {
    let script = render_machine(
        &context(),
        &request(ScriptArch::X86_64Efi),
        &Profile::Discovery { cmdline: String::new() },
    )
    .unwrap();
    let kernel = script.lines().find(|l| l.starts_with("kernel ")).unwrap();
    assert!(kernel.starts_with("kernel http://10.0.2.2:8080/boot/discovery/x86_64/vmlinuz "));
    for param in ["initrd=initrd", "ctpf.url=http://10.0.2.2:8080", "ctpf.token=tok_EN-r0ll"] {
        assert!(kernel.split_whitespace().any(|w| w == param), "{param} in {kernel}");
    }
    assert!(kernel.contains("ctpf.mac=52:54:00:12:34:56"));
    assert!(
        script.contains("initrd --name initrd http://10.0.2.2:8080/boot/discovery/x86_64/initrd")
    );
}

#[test]
fn discovery_extra_parameters_come_before_ctpfs_and_are_checked() {
    let profile = Profile::Discovery { cmdline: "console=ttyS0,115200 quiet".into() };
    let script = render_machine(&context(), &request(ScriptArch::X86_64Bios), &profile).unwrap();
    let kernel = script.lines().find(|l| l.starts_with("kernel ")).unwrap();
    assert!(kernel.contains("initrd=initrd console=ttyS0,115200 quiet ctpf.url="), "{kernel}");
    for hostile in ["quiet || shell", "ctpf.token=stolen", "a\nchain http://evil/"] {
        let profile = Profile::Discovery { cmdline: hostile.into() };
        let err =
            render_machine(&context(), &request(ScriptArch::X86_64Bios), &profile).unwrap_err();
        assert_eq!(err.field(), Some("discovery.cmdline"), "{hostile}: {err}");
    }
}

#[test]
fn local_disk_boot_depends_on_firmware() {
    let bios =
        render_machine(&context(), &request(ScriptArch::X86_64Bios), &Profile::LocalDisk).unwrap();
    assert!(bios.contains("sanboot --no-describe --drive 0x80"));
    for arch in [ScriptArch::X86_64Efi, ScriptArch::Arm64Efi] {
        let efi = render_machine(&context(), &request(arch), &Profile::LocalDisk).unwrap();
        assert!(!efi.contains("sanboot"), "{arch}");
        assert!(efi.lines().any(|l| l == "exit 1"), "{arch}");
    }
}

/// GRUB scripts: every interpolated value is single-quoted, only GRUB's own variables are
/// expanded, and `if`/`fi`, `for`/`done` balance.
#[test]
fn grub_scripts_are_plausible() {
    for (name, script) in all_scripts().into_iter().filter(|(name, _)| name.ends_with(".cfg")) {
        assert!(script.ends_with('\n') && !script.ends_with("\n\n"), "{name}: one final newline");
        for marker in ["{{", "}}", "{%", "%}", "{#", "#}"] {
            assert!(!script.contains(marker), "{name}: unexpanded template marker {marker}");
        }
        for (number, line) in script.lines().enumerate() {
            let at = format!("{name}:{}", number + 1);
            assert_eq!(line.matches('\'').count() % 2, 0, "{at}: unbalanced single quotes");
            for variable in line.split("${").skip(1) {
                let name = variable.split('}').next().unwrap();
                assert!(
                    ["net_default_mac", "ctpf_uuid"].contains(&name),
                    "{at}: unexpected expansion ${{{name}}}"
                );
            }
        }
        let count = |word: &str| script.split_whitespace().filter(|w| *w == word).count();
        assert_eq!(count("if"), count("fi"), "{name}: if/fi");
        assert_eq!(count("do"), count("done"), "{name}: do/done");
    }
}

#[test]
fn grub_needs_a_plain_http_root_url_and_refuses_install_profiles() {
    let https = ScriptContext::new("https://ctpf.example", "tok").unwrap();
    let err = render_grub_entry(&https.base_url, ScriptArch::X86_64Efi).unwrap_err();
    assert_eq!(err.field(), Some("base_url"), "{err}");
    let install = install_profile(ScriptArch::X86_64Efi);
    let err =
        render_grub_machine(&context(), &request(ScriptArch::X86_64Efi), &install).unwrap_err();
    assert_eq!(err.field(), Some("profile"), "{err}");
    let hostile = Profile::Discovery { cmdline: "quiet' ; reboot '".into() };
    let err =
        render_grub_machine(&context(), &request(ScriptArch::X86_64Bios), &hostile).unwrap_err();
    assert_eq!(err.field(), Some("discovery.cmdline"), "{err}");
}
