//! Hostile input never yields a script: every case is an error naming the field.
#![allow(clippy::unwrap_used)]

use ctpf_scripts::{
    BootQuery, BootRequest, Profile, ScriptArch, ScriptContext, ScriptError, render_machine,
};

/// Values an attacker (or a careless profile author) might send, each of which would change
/// what iPXE executes if it reached a script verbatim.
const HOSTILE: &[&str] = &[
    "x\nshell",
    "x\r\nshell",
    "x\rshell",
    "${net0/ip}",
    "$x",
    "${",
    "a || shell",
    "a||shell",
    "a && shell",
    "a ; shell",
    "a;shell",
    "#comment",
    "\"quoted\"",
    "'quoted'",
    "back\\slash",
    "tab\there",
    "nul\0",
    "ünïcode",
    "\u{202e}rtl",
    "{{ inject }}",
    "{% raw %}",
];

fn context() -> ScriptContext {
    ScriptContext::new("http://10.0.2.2:8080", "token").unwrap()
}

fn request() -> BootRequest {
    BootRequest {
        mac: "52:54:00:12:34:56".parse().unwrap(),
        uuid: None,
        arch: ScriptArch::X86_64Efi,
        datacenter: None,
    }
}

fn install(kernel_url: &str, initrd_url: &str, cmdline: &str) -> Profile {
    Profile::Install {
        kernel_url: kernel_url.into(),
        initrd_url: initrd_url.into(),
        cmdline: cmdline.into(),
    }
}

fn assert_rejected(result: Result<String, ScriptError>, field: &str, input: &str) {
    match result {
        Ok(script) => panic!("{field} = {input:?} produced a script:\n{script}"),
        Err(err) => {
            assert_eq!(err.field(), Some(field), "{input:?}: {err}");
            assert!(err.to_string().contains(field), "{err}");
        }
    }
}

#[test]
fn hostile_profile_values_are_rejected_by_field() {
    let good = "http://mirror/k";
    let long = "a".repeat(5000);
    let mut inputs: Vec<&str> = HOSTILE.to_vec();
    inputs.push(&long);
    for &bad in &inputs {
        let url = format!("http://mirror/k{bad}");
        let result = render_machine(&context(), &request(), &install(&url, good, ""));
        assert_rejected(result, "profile.kernel_url", &url);
        let result = render_machine(&context(), &request(), &install(good, &url, ""));
        assert_rejected(result, "profile.initrd_url", &url);
        let cmdline = format!("quiet {bad}");
        let result = render_machine(&context(), &request(), &install(good, good, &cmdline));
        assert_rejected(result, "profile.cmdline", &cmdline);
    }
}

#[test]
fn hostile_context_values_are_rejected_by_field() {
    for &bad in HOSTILE {
        let base = format!("http://10.0.2.2:8080/{bad}");
        assert_eq!(ScriptContext::new(&base, "t").unwrap_err().field(), Some("base_url"));
        let token = format!("t{bad}");
        let err = ScriptContext::new("http://h", &token).unwrap_err();
        assert_eq!(err.field(), Some("enrollment_token"));
    }
}

#[test]
fn hostile_query_values_are_rejected_by_field() {
    for &bad in HOSTILE {
        let query = |mac: &str, uuid: &str, arch: &str, platform: &str, dc: &str| BootQuery {
            mac: mac.into(),
            uuid: Some(uuid.into()),
            arch: arch.into(),
            platform: platform.into(),
            datacenter: Some(dc.into()),
        };
        let ok = ("52-54-00-12-34-56", "", "x86_64", "efi", "home");
        let cases = [
            ("mac", query(bad, ok.1, ok.2, ok.3, ok.4)),
            ("uuid", query(ok.0, bad, ok.2, ok.3, ok.4)),
            ("arch", query(ok.0, ok.1, bad, ok.3, ok.4)),
            ("platform", query(ok.0, ok.1, ok.2, bad, ok.4)),
            ("datacenter", query(ok.0, ok.1, ok.2, ok.3, bad)),
        ];
        for (field, query) in cases {
            let err = query.into_request().unwrap_err();
            assert_eq!(err.field, field, "{bad:?}");
        }
    }
}

/// Defence in depth: templates never bypass the escaper with `|safe`, and every template is
/// rendered with `IpxeEscaper` or `GrubEscaper` (the `.ipxe` / `.cfg` extension selects it).
#[test]
fn templates_do_not_bypass_the_escaper() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let extension = path.extension().unwrap();
        assert!(extension == "ipxe" || extension == "cfg", "{}", path.display());
        let text = std::fs::read_to_string(&path).unwrap();
        for bypass in ["|safe", "| safe", "escape(", "e(\"none", "e(\"txt"] {
            assert!(!text.contains(bypass), "{} uses {bypass}", path.display());
        }
    }
    let config = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/askama.toml"));
    let config = config.unwrap();
    assert!(config.contains("crate::escape::IpxeEscaper"));
    assert!(config.contains("crate::escape::GrubEscaper"));
}
