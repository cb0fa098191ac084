//! Issue 3's acceptance: QEMU machines (TCG) on a bridge in a namespace of their own
//! network-boot from `ctpf up --boot-interface br0`, run the discovery image ctpf built from
//! a Debian kernel, and enroll: each must appear in `ctpf hosts list --json` with its MAC and
//! architecture. Needs root, qemu-system-x86, ovmf, ipxe, dnsmasq-base and the unpacked
//! kernel package that `.ci/run` prepares.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{fs::Permissions, os::unix::fs::PermissionsExt as _, time::Duration};

use ctpf_e2e::{
    CtpfProcess, ctpf_cli_in,
    qemu::{BootLan, Firmware, Vm, VmSpec, discovery_agent, discovery_linux},
};
use serde_json::Value;

/// Power-on to callback is 12-30 s here when the machine is idle; CI runs VMs side by side.
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

struct Site {
    lan: BootLan,
    up: CtpfProcess,
    token: String,
    dir: tempfile::TempDir,
}

/// `ctpf up` serving DHCP (`dhcp` mode), TFTP and HTTP boot on the LAN's bridge.
fn start_site(lan: BootLan, dhcp: &[&str]) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let linux = discovery_linux().unwrap();
    let agent = discovery_agent().unwrap();
    let api = format!("http://{}:0", lan.server_ip());
    let mut args = vec![
        "up",
        "--data-dir",
        data.to_str().unwrap(),
        "--api",
        &api,
        "--boot-interface",
        "br0",
        "--ipv6-ra",
        "--discovery-linux",
        linux.to_str().unwrap(),
        "--discovery-agent",
        agent.to_str().unwrap(),
        "--discovery-cmdline",
        "console=ttyS0",
    ];
    args.extend_from_slice(dhcp);
    let log = dir.path().join("up.log");
    let up = CtpfProcess::start_in_netns(&lan.netns, &args, &[], log, "(tftp)").unwrap();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_owned();
    Site { lan, up, token, dir }
}

impl Site {
    /// The CLI, run inside the LAN's namespace where the API listens.
    fn cli(&self, args: &[&str]) -> Vec<u8> {
        let env = [("CTPF_API", self.up.api()), ("CTPF_TOKEN", self.token.as_str())];
        let out = ctpf_cli_in(&self.lan.netns, args, &env).unwrap();
        assert!(out.status.success(), "ctpf {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    fn hosts(&self) -> Vec<Value> {
        serde_json::from_slice(&self.cli(&["hosts", "list", "--json"])).unwrap()
    }

    fn hosts_with_mac(&self, mac: &str) -> Vec<Value> {
        self.hosts()
            .into_iter()
            .filter(|host| host["macs"].as_array().is_some_and(|m| m.iter().any(|m| m == mac)))
            .collect()
    }

    fn boot(&mut self, spec: &VmSpec, name: &str) -> Vm {
        let serial = self.dir.path().join(format!("{name}.serial.log"));
        Vm::start(&mut self.lan, spec, serial).unwrap()
    }

    /// Waits for the VM's callback: the agent's line on its console, then the host record.
    fn wait_enrolled(&self, vm: &mut Vm, spec: &VmSpec) -> Value {
        let enrolled = vm.wait_for("host callback", BOOT_TIMEOUT, |vm| {
            vm.serial_text().contains("ctpf-agent: enrolled host").then_some(())
        });
        if let Err(e) = enrolled {
            panic!("{e}\nctpf log:\n{}", tail(&self.up.log_text(), 40));
        }
        let hosts = self.hosts_with_mac(&spec.mac);
        assert_eq!(hosts.len(), 1, "one host record for {}: {hosts:#?}", spec.mac);
        let host = hosts.into_iter().next().unwrap();
        assert_eq!(host["arch"], "x86_64", "{host:#}");
        assert_eq!(host["smbios_uuid"], spec.uuid, "{host:#}");
        host
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn spec(firmware: Firmware, nic: &'static str, nic_rom: bool, n: u8) -> VmSpec {
    VmSpec {
        firmware,
        nic,
        mac: format!("52:54:00:78:00:{n:02x}"),
        uuid: format!("7c0a3f52-1b9e-4d55-8a61-0000000000{n:02x}"),
        nic_rom,
    }
}

fn authoritative(lan: &BootLan) -> Vec<String> {
    vec!["--dhcp".into(), "authoritative".into(), "--dhcp-range".into(), lan.range(100, 150)]
}

#[test]
fn bios_virtio_enrolls_keeps_one_identity_and_an_installed_host_boots_its_disk() {
    let lan = BootLan::create().unwrap();
    let dhcp = authoritative(&lan);
    let mut site = start_site(lan, &dhcp.iter().map(String::as_str).collect::<Vec<_>>());
    let machine = spec(Firmware::Bios, "virtio-net-pci", true, 0x10);

    let mut vm = site.boot(&machine, "bios-1");
    let first = site.wait_enrolled(&mut vm, &machine);
    vm.stop();

    // Same machine, second power-on: the same record, not a second one.
    let mut vm = site.boot(&machine, "bios-2");
    let second = site.wait_enrolled(&mut vm, &machine);
    vm.stop();
    assert_eq!(first["id"], second["id"]);
    assert_eq!(site.hosts().len(), 1);

    // Installed: the next boot gets the local-disk script instead of discovery.
    site.cli(&["hosts", "set", first["id"].as_str().unwrap(), "--state", "installed"]);
    let mut vm = site.boot(&machine, "bios-3");
    let up = &site.up;
    vm.wait_for("local-disk script", BOOT_TIMEOUT, |_| {
        up.log_text().contains("local disk boot").then_some(())
    })
    .unwrap();
    vm.wait_for("sanboot attempt", Duration::from_secs(60), |vm| {
        vm.serial_text().contains("ctpf: booting from the local disk").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn uefi_firmware_pxe_fetches_ipxe_over_tftp_then_boots_over_http() {
    let lan = BootLan::create().unwrap();
    let dhcp = authoritative(&lan);
    let mut site = start_site(lan, &dhcp.iter().map(String::as_str).collect::<Vec<_>>());
    // virtio-net without its ROM: OVMF's own PXE client, DHCP arch 7, TFTP `ipxe.efi`.
    let native = spec(Firmware::Uefi, "virtio-net-pci", false, 0x20);
    let mut vm = site.boot(&native, "uefi-virtio");
    site.wait_enrolled(&mut vm, &native);
    vm.stop();
    // The firmware's own PXE loaded iPXE over TFTP (not UEFI HTTP boot, its next option).
    let log = site.up.log_text();
    let transfers: Vec<&str> = log.lines().filter(|l| l.contains("tftp transfer")).collect();
    assert!(
        transfers.iter().any(|l| l.contains("ipxe.efi") && l.contains("completed")),
        "no complete TFTP transfer of ipxe.efi: {transfers:#?}\nserial:\n{}",
        vm.serial_tail(40)
    );
    // The same boot, stage by stage, in the event stream: the firmware's DHCP answer and
    // TFTP transfer of iPXE, then iPXE's HTTP fetch of the discovery kernel.
    let events: Vec<Value> = String::from_utf8(site.cli(&["--json", "events"]))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let has = |wanted: &dyn Fn(&Value) -> bool| events.iter().any(wanted);
    assert!(
        has(&|e| e["type"] == "dhcp_replied"
            && e["mac"] == native.mac.as_str()
            && e["reply"] == "ack"
            && e["boot_file"] == "ipxe.efi"),
        "{events:#?}"
    );
    assert!(
        has(&|e| e["type"] == "tftp_transfer"
            && e["file"] == "ipxe.efi"
            && e["outcome"] == "completed"),
        "{events:#?}"
    );
    assert!(
        has(&|e| e["type"] == "http_boot"
            && e["path"] == "/boot/discovery/x86_64/vmlinuz"
            && e["status"] == 200),
        "{events:#?}"
    );

    // A second NIC model: e1000 with QEMU's iPXE ROM (OVMF has no e1000 driver of its own).
    let e1000 = spec(Firmware::Uefi, "e1000", true, 0x21);
    let mut vm = site.boot(&e1000, "uefi-e1000");
    site.wait_enrolled(&mut vm, &e1000);
}

/// The network's own DHCP server, a "home router": dnsmasq in a namespace of its own, joined
/// to the bridge by a veth pair (so it and ctpf each own a port 67), handing out addresses
/// from .160-.200 plus whatever `extra` options say. Its log is `dir/dnsmasq.log`.
/// Fields drop in order: dnsmasq is stopped before its namespace goes.
struct HomeRouter {
    _daemon: ctpf_e2e::Daemon,
    _netns: ctpf_e2e::Netns,
    log: std::path::PathBuf,
}

impl HomeRouter {
    fn start(lan: &BootLan, dir: &std::path::Path, extra: &[String]) -> Self {
        let router = ctpf_e2e::Netns::create("ctpf-router").unwrap();
        let subnet = lan.subnet;
        lan.netns
            .ip(&[
                "link",
                "add",
                "rlan",
                "type",
                "veth",
                "peer",
                "name",
                "r0",
                "netns",
                router.name(),
            ])
            .unwrap();
        lan.netns.ip(&["link", "set", "rlan", "master", "br0", "up"]).unwrap();
        router.ip(&["addr", "add", &format!("10.78.{subnet}.254/24"), "dev", "r0"]).unwrap();
        router.ip(&["link", "set", "r0", "up"]).unwrap();
        let leases = dir.join("dnsmasq.leases");
        let mut dnsmasq = router.command("dnsmasq");
        dnsmasq
            .args(["--keep-in-foreground", "--no-daemon", "--port=0", "--no-resolv", "--no-hosts"])
            .args(["--interface=r0", "--bind-interfaces", "--dhcp-authoritative", "--log-dhcp"])
            .arg(format!("--dhcp-range=10.78.{subnet}.160,10.78.{subnet}.200,255.255.255.0,10m"))
            .arg(format!("--dhcp-leasefile={}", leases.display()))
            .arg("--pid-file=")
            .args(extra);
        let log = dir.join("dnsmasq.log");
        let mut daemon = router.spawn(&mut dnsmasq, &log).unwrap();
        router.wait_listening("udp", 67, &mut daemon).unwrap();
        Self { _daemon: daemon, _netns: router, log }
    }

    fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 30)
    }
}

#[test]
fn proxy_dhcp_boots_beside_a_home_router_handing_out_addresses() {
    let lan = BootLan::create().unwrap();
    let subnet = lan.subnet;
    let site_dir = tempfile::tempdir().unwrap();
    let router = HomeRouter::start(&lan, site_dir.path(), &[]);

    let mut site = start_site(lan, &["--dhcp", "proxy"]);
    let machine = spec(Firmware::Uefi, "virtio-net-pci", false, 0x30);
    let mut vm = site.boot(&machine, "uefi-proxy");
    let host = site.wait_enrolled(&mut vm, &machine);
    // The address came from the router's range, not from ctpf.
    let addresses = host["addresses"].as_array().cloned().unwrap_or_default();
    let from_router = addresses.iter().filter_map(Value::as_str).any(|a| {
        a.strip_prefix(&format!("10.78.{subnet}."))
            .and_then(|n| n.parse::<u8>().ok())
            .is_some_and(|n| (160..=200).contains(&n))
    });
    assert!(from_router, "{addresses:?}; dnsmasq log:\n{}", router.log_tail());
    drop(router);
}

/// `--pxe-loader grub`: ctpf builds GRUB images with its URL embedded and hands them out
/// instead of iPXE; GRUB's own network stack then loads the discovery kernel over HTTP.
#[test]
fn grub_images_built_by_ctpf_boot_uefi_and_bios_machines_to_the_callback() {
    let lan = BootLan::create().unwrap();
    let mut dhcp = authoritative(&lan);
    dhcp.extend(["--pxe-loader".to_owned(), "grub".to_owned()]);
    let mut site = start_site(lan, &dhcp.iter().map(String::as_str).collect::<Vec<_>>());
    let transferred = |site: &Site, file: &str| {
        site.up
            .log_text()
            .lines()
            .any(|l| l.contains("tftp transfer") && l.contains(file) && l.contains("completed"))
    };

    // UEFI firmware PXE → TFTP grubx64.efi → GRUB DHCP → HTTP config → kernel and initrd.
    let uefi = spec(Firmware::Uefi, "virtio-net-pci", false, 0x40);
    let mut vm = site.boot(&uefi, "grub-uefi");
    site.wait_enrolled(&mut vm, &uefi);
    vm.stop();
    assert!(transferred(&site, "grubx64.efi"), "{}", tail(&site.up.log_text(), 30));

    // BIOS: the NIC's PXE ROM loads core.0 over TFTP (QEMU's ROM is iPXE, which with GRUB
    // as the loader is served like any PXE firmware).
    let bios = spec(Firmware::Bios, "virtio-net-pci", true, 0x41);
    let mut vm = site.boot(&bios, "grub-bios");
    site.wait_enrolled(&mut vm, &bios);
    assert!(transferred(&site, "core.0"), "{}", tail(&site.up.log_text(), 30));
}

/// `ctpf build grub --chain-ipxe` for a site whose own DHCP and TFTP (dnsmasq here) hand out
/// GRUB: the BIOS machine's PXE ROM loads ctpf's `core.0` from dnsmasq, GRUB loads iPXE 1.21
/// (`ipxe.lkrn`) from ctpf over HTTP and starts it with `dhcp && chain BASE/boot.ipxe`, and
/// iPXE goes on to the discovery image and the callback. ctpf itself answers no DHCP.
#[test]
fn a_grub_image_that_chains_ipxe_boots_a_bios_machine_from_the_sites_own_dhcp() {
    let ipxe = ctpf_e2e::qemu::modern_ipxe_root().unwrap();
    let lan = BootLan::create().unwrap();
    let mut site = start_site(lan, &["--dhcp", "off", "--tftp-root", ipxe.to_str().unwrap()]);

    // The image, built by ctpf for its own URL, goes where the site's TFTP server serves.
    let out = String::from_utf8(site.cli(&[
        "build",
        "grub",
        "--target",
        "i386-pc-pxe",
        "--chain-ipxe",
        "--name",
        "chain",
    ]))
    .unwrap();
    assert!(out.contains("core.0") && out.contains("succeeded"), "{out}");
    let tftp = tempfile::tempdir().unwrap();
    // dnsmasq serves TFTP as nobody.
    std::fs::set_permissions(tftp.path(), Permissions::from_mode(0o755)).unwrap();
    let image = tftp.path().join("core.0");
    site.cli(&["artifacts", "pull", "chain-core.0", "-o", image.to_str().unwrap()]);
    std::fs::set_permissions(&image, Permissions::from_mode(0o644)).unwrap();
    let router_options = [
        "--enable-tftp".to_owned(),
        format!("--tftp-root={}", tftp.path().display()),
        "--dhcp-boot=core.0".to_owned(),
    ];
    let router = HomeRouter::start(&site.lan, site.dir.path(), &router_options);

    let machine = spec(Firmware::Bios, "virtio-net-pci", true, 0x50);
    let mut vm = site.boot(&machine, "grub-chain-ipxe");
    let enrolled = vm.wait_for("host callback", BOOT_TIMEOUT, |vm| {
        vm.serial_text().contains("ctpf-agent: enrolled host").then_some(())
    });
    if let Err(e) = enrolled {
        panic!(
            "{e}\nctpf log:\n{}\ndnsmasq log:\n{}",
            tail(&site.up.log_text(), 40),
            router.log_tail()
        );
    }
    let serial = vm.serial_text();
    // GRUB ran, then the iPXE it loaded (not the NIC's own ROM, which is older).
    let grub = serial.find("ctpf: loading iPXE").expect("GRUB's line on the console");
    assert!(serial[grub..].contains("iPXE 1.21"), "{}", vm.serial_tail(30));
    let hosts = site.hosts_with_mac(&machine.mac);
    assert_eq!(hosts.len(), 1, "{hosts:#?}");
    drop(router);
}
