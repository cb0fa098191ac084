//! The agent's settings arrive on the kernel command line: ctpf's iPXE discovery script writes
//! `ctpf.url= ctpf.token= ctpf.mac= [ctpf.uuid=] [ctpf.datacenter=]` there (see
//! `scripts-svc/src/render.rs`), so `/proc/cmdline` is the only configuration the agent has.

use ctpf_common::{MacAddr, Uuid};

/// What the kernel command line tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    /// Base URL of the ctpf server, without a trailing slash.
    pub url: String,
    /// One-time enrollment token (sent as a bearer token, never printed).
    pub token: String,
    /// The MAC that PXE-booted; reported first so the server matches the boot it saw.
    pub mac: Option<MacAddr>,
    /// The SMBIOS UUID as iPXE saw it; a fallback when sysfs has none.
    pub uuid: Option<Uuid>,
    /// The datacenter the boot was meant for (informational: the token decides).
    pub datacenter: Option<String>,
    /// Optional parameters that were present but malformed and therefore ignored; the agent
    /// prints them, but a bad hint must not stop a machine from enrolling.
    pub ignored: Vec<String>,
}

/// Why the command line cannot be used. The `/init` drops to a shell on any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    #[error("no ctpf.url= on the kernel command line (the ctpf server's base URL)")]
    MissingUrl,
    #[error("no ctpf.token= on the kernel command line (the one-time enrollment token)")]
    MissingToken,
    #[error("ctpf.url={0:?} must be a plain http:// URL (this agent speaks no TLS)")]
    UnsupportedUrl(String),
    #[error("ctpf.token is not a usable bearer token (printable ASCII only)")]
    BadToken,
}

impl BootParams {
    /// Parses the text of `/proc/cmdline`. Parameters are separated by whitespace (quoting is
    /// not needed: ctpf never writes spaces into its values); unknown keys are ignored and a
    /// repeated key takes its last value.
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let mut url = None;
        let mut token = None;
        let mut params = Self {
            url: String::new(),
            token: String::new(),
            mac: None,
            uuid: None,
            datacenter: None,
            ignored: Vec::new(),
        };
        for (key, value) in cmdline.split_whitespace().filter_map(|word| word.split_once('=')) {
            match key {
                "ctpf.url" => url = Some(value),
                "ctpf.token" => token = Some(value),
                "ctpf.mac" => params.mac = params.optional(key, value, |v| v.parse().ok()),
                "ctpf.uuid" => params.uuid = params.optional(key, value, |v| v.parse().ok()),
                "ctpf.datacenter" => {
                    params.datacenter = params.optional(key, value, |v| Some(v.to_owned()))
                }
                _ => {}
            }
        }
        params.url = check_url(url.filter(|u| !u.is_empty()).ok_or(CmdlineError::MissingUrl)?)?;
        params.token =
            check_token(token.filter(|t| !t.is_empty()).ok_or(CmdlineError::MissingToken)?)?;
        Ok(params)
    }

    /// Parses an optional value, remembering it as ignored when it does not parse.
    fn optional<T>(
        &mut self,
        key: &str,
        value: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let parsed = if value.is_empty() { None } else { parse(value) };
        if parsed.is_none() {
            self.ignored.push(format!("{key}={value}"));
        }
        parsed
    }
}

/// Only plain HTTP: the agent is built without TLS to stay small, so an https URL would fail
/// every attempt for five minutes; better to say so at once.
fn check_url(url: &str) -> Result<String, CmdlineError> {
    let rest =
        url.strip_prefix("http://").ok_or_else(|| CmdlineError::UnsupportedUrl(url.into()))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(CmdlineError::UnsupportedUrl(url.into()));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// The token goes into an HTTP header, which must not carry control or non-ASCII bytes.
fn check_token(token: &str) -> Result<String, CmdlineError> {
    if token.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(token.to_owned())
    } else {
        Err(CmdlineError::BadToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ctpf_params_and_ignores_the_rest() {
        let line = "BOOT_IMAGE=vmlinuz initrd=initrd quiet console=ttyS0,115200 \
            ctpf.url=http://10.0.0.1:8080/ ctpf.token=tok_abc-123 ctpf.mac=52:54:00:AB:CD:EF \
            ctpf.uuid=4c4c4544-0035-3010-8052-b4c04f4b4d32 ctpf.datacenter=fra1 ctpf.other=1\n";
        let p = BootParams::parse(line).unwrap();
        assert_eq!(p.url, "http://10.0.0.1:8080");
        assert_eq!(p.token, "tok_abc-123");
        assert_eq!(p.mac, Some(MacAddr::new([0x52, 0x54, 0, 0xab, 0xcd, 0xef])));
        assert_eq!(p.uuid.unwrap().to_string(), "4c4c4544-0035-3010-8052-b4c04f4b4d32");
        assert_eq!(p.datacenter.as_deref(), Some("fra1"));
        assert!(p.ignored.is_empty());
    }

    #[test]
    fn optional_params_may_be_absent_or_malformed() {
        let p = BootParams::parse("ctpf.url=http://h ctpf.token=t ctpf.mac=zz ctpf.uuid=").unwrap();
        assert_eq!((p.mac, p.uuid, p.datacenter), (None, None, None));
        assert_eq!(p.ignored, ["ctpf.mac=zz", "ctpf.uuid="]);
    }

    #[test]
    fn last_value_wins() {
        let p = BootParams::parse("ctpf.url=http://a ctpf.token=1 ctpf.token=2").unwrap();
        assert_eq!(p.token, "2");
    }

    #[test]
    fn url_and_token_are_required() {
        assert_eq!(BootParams::parse("quiet ctpf.token=t"), Err(CmdlineError::MissingUrl));
        assert_eq!(BootParams::parse("ctpf.url=http://h"), Err(CmdlineError::MissingToken));
        assert_eq!(
            BootParams::parse("ctpf.url=http://h ctpf.token="),
            Err(CmdlineError::MissingToken)
        );
        assert_eq!(BootParams::parse(""), Err(CmdlineError::MissingUrl));
    }

    #[test]
    fn only_plain_http_urls() {
        for bad in ["https://h", "ftp://h", "h:8080", "http://", "http:///x"] {
            let line = format!("ctpf.url={bad} ctpf.token=t");
            assert!(
                matches!(BootParams::parse(&line), Err(CmdlineError::UnsupportedUrl(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn tokens_must_fit_in_a_header() {
        assert_eq!(
            BootParams::parse("ctpf.url=http://h ctpf.token=tök"),
            Err(CmdlineError::BadToken)
        );
    }
}
