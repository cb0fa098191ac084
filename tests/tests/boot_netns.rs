//! Network boot from `ctpf up --boot-interface` against real clients: two network
//! namespaces joined by a veth pair, `ctpf up` in one serving authoritative DHCP and TFTP,
//! busybox `udhcpc` posing as a BIOS PXE client and tftp-hpa fetching the boot file in the
//! other. Needs root, iproute2, busybox(-static) and tftp-hpa (`.ci/run` installs them).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Stdio},
};

use ctpf_e2e::{CtpfProcess, Netns, unique_suffix};

/// Bytes no real boot file has, so a match proves the transfer, not a coincidence.
fn boot_file_bytes() -> Vec<u8> {
    // Several blocks and a partial last one, to exercise block sequencing.
    (0..5000u32).map(|i| (i.wrapping_mul(31) % 251) as u8).collect()
}

/// Runs a command to completion (with a generous `timeout`), failing with its output.
fn run(netns: &Netns, program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("timeout");
    cmd.arg("120").args(["ip", "netns", "exec", netns.name(), program]).args(args);
    let output = cmd.stdin(Stdio::null()).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{cmd:?} failed ({}):\n{text}", output.status);
    text
}

/// One PXE-style DHCP exchange with busybox udhcpc; returns what its script was given.
fn pxe_dhcp(
    client: &Netns,
    interface: &str,
    dir: &Path,
    up: &CtpfProcess,
) -> BTreeMap<String, String> {
    let result = dir.join("udhcpc.env");
    let _ = std::fs::remove_file(&result);
    let script = dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\n\
             printf 'ip=%s\\nsiaddr=%s\\nboot_file=%s\\nserverid=%s\\nrouter=%s\\ndns=%s\\n' \
             \"$ip\" \"$siaddr\" \"$boot_file\" \"$serverid\" \"$router\" \"$dns\" > '{}'\n",
            result.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    // -f foreground, -q quit once bound, -n give up (non-zero) without a lease; option 60
    // and option 93 (arch 0: BIOS) make it look like PXE firmware.
    let mut cmd = Command::new("timeout");
    cmd.arg("120")
        .args(["ip", "netns", "exec", client.name(), "busybox", "udhcpc", "-i", interface])
        .args(["-f", "-q", "-n", "-t", "10", "-T", "2"])
        .args(["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "93:0000"])
        .arg("-s")
        .arg(&script);
    let output = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        output.status.success(),
        "udhcpc got no lease ({}):\n{}{}\nctpf log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        up.log_text()
    );
    std::fs::read_to_string(&result)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn start_up(server: &Netns, args: &[&str], log: &Path) -> CtpfProcess {
    let mut up = vec!["up"];
    up.extend_from_slice(args);
    // tftp is the last socket bound: once it is listening, everything is.
    CtpfProcess::start_in_netns(server, &up, &[], log.to_owned(), "(tftp)").unwrap()
}

#[test]
fn pxe_client_gets_a_lease_and_its_boot_file_and_keeps_the_lease_across_restarts() {
    let suffix = unique_suffix();
    let subnet = 1 + u8::from_str_radix(&suffix[..2], 16).unwrap() % 250;
    let server_ip = format!("10.77.{subnet}.1");
    let (server_if, client_if) = (format!("vsrv{suffix}"), format!("vcli{suffix}"));

    // Namespaces first: dropped last, after the processes inside them are killed.
    let server = Netns::create("ctpf-srv").unwrap();
    let client = Netns::create("ctpf-cli").unwrap();
    server.ip(&["link", "add", &server_if, "type", "veth", "peer", "name", &client_if]).unwrap();
    server.ip(&["link", "set", &client_if, "netns", client.name()]).unwrap();
    server.ip(&["addr", "add", &format!("{server_ip}/24"), "dev", &server_if]).unwrap();
    server.ip(&["link", "set", &server_if, "up"]).unwrap();
    client.ip(&["link", "set", &client_if, "up"]).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tftp_root = dir.path().join("tftp");
    std::fs::create_dir_all(&tftp_root).unwrap();
    std::fs::write(tftp_root.join("undionly.kpxe"), boot_file_bytes()).unwrap();
    let api = format!("http://{server_ip}:0");
    let range = format!("10.77.{subnet}.100-10.77.{subnet}.150");
    let router = format!("10.77.{subnet}.254");
    let args = [
        "--data-dir",
        data.to_str().unwrap(),
        "--api",
        &api,
        "--boot-interface",
        &server_if,
        "--dhcp",
        "authoritative",
        "--dhcp-range",
        &range,
        "--dhcp-router",
        &router,
        "--dhcp-dns",
        "9.9.9.9",
        "--tftp-root",
        tftp_root.to_str().unwrap(),
    ];
    let mut up = start_up(&server, &args, &dir.path().join("up1.log"));

    let lease = pxe_dhcp(&client, &client_if, dir.path(), &up);
    let ip: std::net::Ipv4Addr = lease["ip"].parse().unwrap();
    let [a, b, c, d] = ip.octets();
    assert_eq!((a, b, c), (10, 77, subnet), "{lease:?}");
    assert!((100..=150).contains(&d), "address outside the range: {lease:?}");
    assert_eq!(lease["boot_file"], "undionly.kpxe", "{lease:?}");
    assert_eq!(lease["siaddr"], server_ip, "next-server: {lease:?}");
    assert_eq!(lease["serverid"], server_ip, "{lease:?}");
    assert_eq!((lease["router"].as_str(), lease["dns"].as_str()), (router.as_str(), "9.9.9.9"));

    // Fetch the boot file from the leased address, as the PXE ROM would.
    client.ip(&["addr", "add", &format!("{ip}/24"), "dev", &client_if]).unwrap();
    let fetched = dir.path().join("fetched.kpxe");
    let fetched_arg = fetched.to_str().unwrap();
    run(&client, "tftp", &["-m", "binary", &server_ip, "-c", "get", "undionly.kpxe", fetched_arg]);
    let bytes = std::fs::read(&fetched).unwrap_or_default();
    assert!(bytes == boot_file_bytes(), "TFTP gave {} bytes, expected 5000", bytes.len());

    // A power cut of the server: the ACK was only sent once the lease was on disk, so the
    // restarted server knows it and gives the same MAC the same address.
    up.kill9().unwrap();
    drop(up);
    client.ip(&["addr", "flush", "dev", &client_if]).unwrap();
    let mut up = start_up(&server, &args, &dir.path().join("up2.log"));
    let again = pxe_dhcp(&client, &client_if, dir.path(), &up);
    assert_eq!(again["ip"], lease["ip"], "lease lost across restart: {again:?}");
    // The DHCP and TFTP loops and the lease journal stop cleanly with the rest.
    assert!(up.terminate().unwrap(), "unclean exit on SIGTERM:\n{}", up.log_text());
}
