//! Validation of every value that ends up in an iPXE script, and the askama escaper that
//! refuses anything else.
//!
//! iPXE parses a script line by line: `${...}` expands settings anywhere in a line, a token
//! starting with `#` starts a comment, the tokens `||`, `&&` and `;` chain commands, and `"`,
//! `'` and `\` quote or escape. A value that carried any of these, or a newline, could run
//! commands of its author's choosing on a machine that trusts the script. There is no escape
//! syntax that every deployed iPXE understands (quoting arrived in 2013-era builds and
//! differs in detail), so values are *validated*, never rewritten: a bad value is a
//! [`ParseError`] naming the field, and no script is produced.

use std::fmt;

use ctpf_common::ParseError;

/// Longest URL accepted. iPXE itself has no hard limit, but nothing legitimate comes close and
/// a cap keeps hostile input from bloating scripts and logs.
pub const MAX_URL_LEN: usize = 1024;
/// Longest user-supplied kernel command line. Linux's x86 `COMMAND_LINE_SIZE` is 2048 and
/// ctpf appends its own parameters, so the user gets a bit under half.
pub const MAX_CMDLINE_LEN: usize = 1024;
/// Longest enrollment token.
pub const MAX_TOKEN_LEN: usize = 256;

/// Characters that never reach a script through a value: setting expansion (`$`), braces,
/// comments (`#`), the `;` terminator, quoting (`"`, `'`) and escapes (`\`).
const FORBIDDEN_CHARS: &[char] = &['$', '{', '}', '#', ';', '"', '\'', '\\'];

/// Checks that `text` can sit inside an iPXE command line without changing its meaning:
/// printable ASCII or space, none of [`FORBIDDEN_CHARS`], and no `||`/`&&`. Returns the
/// reason on failure. Both the validators and [`IpxeEscaper`] use this one rule.
pub fn check_script_safe(text: &str) -> Result<(), String> {
    for c in text.chars() {
        if c == '\n' || c == '\r' {
            return Err("must not contain a line break".to_owned());
        }
        if !(c == ' ' || c.is_ascii_graphic()) {
            return Err(format!("must be printable ASCII, found {c:?}"));
        }
        if FORBIDDEN_CHARS.contains(&c) {
            return Err(format!("must not contain {c:?}, which iPXE interprets"));
        }
    }
    for operator in ["||", "&&"] {
        if text.contains(operator) {
            return Err(format!("must not contain {operator:?}, an iPXE command operator"));
        }
    }
    Ok(())
}

/// The askama escaper for `.ipxe` templates (configured in `askama.toml`). It does not
/// rewrite anything: text that fails [`check_script_safe`] fails the whole render, so even a
/// template that interpolated an unvalidated value could not emit an injected command.
#[derive(Debug, Clone, Copy, Default)]
pub struct IpxeEscaper;

impl askama::filters::Escaper for IpxeEscaper {
    fn write_escaped_str<W: fmt::Write>(&self, mut dest: W, string: &str) -> fmt::Result {
        check_script_safe(string).map_err(|_| fmt::Error)?;
        dest.write_str(string)
    }
}

/// The askama escaper for `.cfg` (GRUB) templates: the same check as [`IpxeEscaper`]. Text
/// that passes it has no single quote, and the templates place every value inside single
/// quotes, where GRUB's parser expands and interprets nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrubEscaper;

impl askama::filters::Escaper for GrubEscaper {
    fn write_escaped_str<W: fmt::Write>(&self, dest: W, string: &str) -> fmt::Result {
        IpxeEscaper.write_escaped_str(dest, string)
    }
}

/// An absolute `http://` or `https://` URL that is safe to place in an iPXE script.
///
/// Accepted: lowercase scheme, a host (DNS name, IPv4 or bracketed IPv6), an optional port,
/// and a path (plus a query, where the caller allows one) made of RFC 3986 characters minus
/// those iPXE interprets (`'`, `;`, `$`, `#`, quotes, braces). User info (`user:pass@`) is
/// refused because a script is readable by anyone on the boot network.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpUrl(String);

impl HttpUrl {
    /// Parses a URL to a file (kernel, initrd): a query string is allowed.
    pub fn parse(field: &str, value: &str) -> Result<Self, ParseError> {
        parse_http_url(field, value, true).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// ctpf's own base URL as machines reach it (`http://10.0.0.1:8080` or
/// `https://ctpf.example/prefix`): like [`HttpUrl`] but without a query, and with trailing
/// slashes removed so `{base}/boot/...` never has `//`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BaseUrl(String);

impl BaseUrl {
    pub fn parse(field: &str, value: &str) -> Result<Self, ParseError> {
        let url = parse_http_url(field, value, false)?;
        let (scheme, rest) = url.split_once("://").unwrap_or(("", &url));
        let trimmed = rest.trim_end_matches('/');
        Ok(Self(format!("{scheme}://{trimmed}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn parse_http_url(field: &str, value: &str, allow_query: bool) -> Result<String, ParseError> {
    let bad = |reason: &str| ParseError::new(field, value, reason);
    if value.len() > MAX_URL_LEN {
        return Err(bad(&format!("must be at most {MAX_URL_LEN} characters")));
    }
    check_script_safe(value).map_err(|reason| bad(&reason))?;
    let rest = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"))
        .ok_or_else(|| bad("must start with http:// or https://"))?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path_and_query) = rest.split_at(authority_end);
    check_authority(authority).map_err(bad)?;
    if !allow_query && path_and_query.contains('?') {
        return Err(bad("must not have a query string"));
    }
    let bytes = path_and_query.as_bytes();
    for (index, &byte) in bytes.iter().enumerate() {
        if !is_url_path_byte(byte) {
            return Err(bad(&format!("must not contain {:?} in its path", byte as char)));
        }
        // A stray `%` would make iPXE's URI decoder guess; require proper `%XX`.
        if byte == b'%'
            && !(bytes.get(index + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(index + 2).is_some_and(u8::is_ascii_hexdigit))
        {
            return Err(bad("has a '%' that is not followed by two hex digits"));
        }
    }
    Ok(value.to_owned())
}

/// RFC 3986 path/query characters, minus `'` and `;` (iPXE syntax); `$`, `#` and the rest
/// are already excluded by [`check_script_safe`] or by not being URL characters at all.
fn is_url_path_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(
            byte,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'/'
                | b'?'
                | b':'
                | b'@'
                | b'!'
                | b'&'
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b'%'
        )
}

fn check_authority(authority: &str) -> Result<(), &'static str> {
    if authority.is_empty() {
        return Err("must name a host");
    }
    if authority.contains('@') {
        return Err("must not carry user info (user:password@)");
    }
    let port = if let Some(bracketed) = authority.strip_prefix('[') {
        let (v6, after) = bracketed.split_once(']').ok_or("has an unclosed '[' in its host")?;
        if v6.is_empty() || !v6.bytes().all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.')) {
            return Err("has a malformed IPv6 host");
        }
        match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or("has junk after its IPv6 host")?),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => {
                check_host_name(host)?;
                Some(port)
            }
            None => {
                check_host_name(authority)?;
                None
            }
        }
    };
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !valid {
            return Err("has a port that is not a number from 1 to 65535");
        }
    }
    Ok(())
}

/// A DNS name or IPv4 address: dot-separated labels of `[A-Za-z0-9-]`, not starting or ending
/// with `-`.
fn check_host_name(host: &str) -> Result<(), &'static str> {
    if host.is_empty() || host.len() > 253 {
        return Err("must have a host name of 1 to 253 characters");
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    for label in host.split('.') {
        let well_formed = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !well_formed {
            return Err("has a malformed host name");
        }
    }
    Ok(())
}

/// The token a booting machine presents when it calls back to enrol: `[A-Za-z0-9_-]`, 1 to
/// [`MAX_TOKEN_LEN`] characters (base64url fits).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EnrollmentToken(String);

impl EnrollmentToken {
    pub fn parse(field: &str, value: &str) -> Result<Self, ParseError> {
        // The value is a secret: never echo it back in the error.
        let bad = |reason: &str| ParseError::new(field, "<redacted>", reason);
        if value.is_empty() || value.len() > MAX_TOKEN_LEN {
            return Err(bad(&format!("must be 1 to {MAX_TOKEN_LEN} characters")));
        }
        if !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')) {
            return Err(bad("may contain only A-Z, a-z, 0-9, '_' and '-'"));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnrollmentToken(<redacted>)")
    }
}

impl fmt::Display for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Kernel parameters ctpf sets itself; a user command line may not set them too, because which
/// copy wins depends on who parses `/proc/cmdline`.
pub const RESERVED_KERNEL_PARAMS: &[&str] =
    &["initrd", "ctpf.url", "ctpf.token", "ctpf.mac", "ctpf.uuid", "ctpf.datacenter"];

/// A user-supplied kernel command line, checked by [`check_script_safe`] and normalised to
/// single spaces (iPXE splits on whitespace anyway; one spelling keeps scripts stable).
///
/// `;`, `||` and `&&` are refused rather than quoted: as separate tokens iPXE would run what
/// follows as a new command, and kernel parameters have no legitimate use for them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct KernelCmdline(String);

impl KernelCmdline {
    pub fn parse(field: &str, value: &str) -> Result<Self, ParseError> {
        let bad = |reason: &str| ParseError::new(field, value, reason);
        if value.len() > MAX_CMDLINE_LEN {
            return Err(bad(&format!("must be at most {MAX_CMDLINE_LEN} characters")));
        }
        check_script_safe(value).map_err(|reason| bad(&reason))?;
        for param in value.split_whitespace() {
            let key = param.split_once('=').map_or(param, |(key, _)| key);
            if RESERVED_KERNEL_PARAMS.contains(&key) {
                return Err(bad(&format!("must not set {key:?}: ctpf sets it itself")));
            }
        }
        Ok(Self(value.split_whitespace().collect::<Vec<_>>().join(" ")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for KernelCmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use askama::filters::Escaper;

    use super::*;

    #[test]
    fn script_safe_text_passes() {
        for ok in ["", "console=ttyS0,115200n8 quiet", "a|b", "a&b", "x=1 y=(2)"] {
            assert_eq!(check_script_safe(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn script_unsafe_text_fails() {
        for bad in [
            "a\nb",
            "a\rb",
            "a\tb",
            "${net0/mac}",
            "$x",
            "a || b",
            "a&&b",
            "a ; b",
            "#x",
            "\"",
            "'",
            "a\\b",
            "{",
            "}",
            "é",
            "\0",
        ] {
            assert!(check_script_safe(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn escaper_refuses_instead_of_rewriting() {
        let mut out = String::new();
        assert!(IpxeEscaper.write_escaped_str(&mut out, "quiet splash").is_ok());
        assert_eq!(out, "quiet splash");
        assert!(IpxeEscaper.write_escaped_str(&mut out, "x\nshell").is_err());
        assert!(IpxeEscaper.write_escaped_char(&mut out, '$').is_err());
        assert_eq!(out, "quiet splash", "nothing written on refusal");
    }

    #[test]
    fn urls_accept_usual_forms() {
        for ok in [
            "http://10.0.0.1",
            "http://10.0.0.1:8080/ctpf/",
            "https://ctpf.example.org/a/b-c_d.e~f",
            "http://[fd00::1]:8080/x",
            "http://host/path%20x",
        ] {
            assert!(BaseUrl::parse("u", ok).is_ok(), "{ok}");
        }
        assert_eq!(BaseUrl::parse("u", "http://h:1/p//").unwrap().as_str(), "http://h:1/p");
        assert!(HttpUrl::parse("u", "http://h/k?v=1&a=b").is_ok());
    }

    #[test]
    fn urls_refuse_and_name_the_field() {
        for bad in [
            "",
            "ftp://h/x",
            "HTTP://h",
            "http://",
            "http:///x",
            "http://user:pw@h/",
            "http://h:0/",
            "http://h:65536/",
            "http://h:80a/",
            "http://-h/",
            "http://h_1/",
            "http://[fd00::1/",
            "http://[]/",
            "http://h/a b",
            "http://h/a'b",
            "http://h/a;b",
            "http://h/a#frag",
            "http://h/${x}",
            "http://h/%zz",
            "http://h/%2",
            "http://h/a\nchain http://evil",
            "http://h/ü",
            "http://h/a<b",
        ] {
            let err = HttpUrl::parse("profile.kernel_url", bad).unwrap_err();
            assert_eq!(err.field, "profile.kernel_url", "{bad:?}");
        }
        assert!(BaseUrl::parse("base_url", "http://h/x?y=1").is_err(), "no query in base URL");
        let long = format!("http://h/{}", "a".repeat(MAX_URL_LEN));
        assert!(HttpUrl::parse("u", &long).is_err());
    }

    #[test]
    fn tokens_are_a_narrow_charset_and_never_echoed() {
        assert!(EnrollmentToken::parse("t", "abc_DEF-123").is_ok());
        for bad in ["", "a b", "a=b", "a.b", "a$b", "ä", &"a".repeat(MAX_TOKEN_LEN + 1)] {
            let err = EnrollmentToken::parse("enrollment_token", bad).unwrap_err();
            assert_eq!(err.field, "enrollment_token");
            assert_eq!(err.value, "<redacted>");
        }
        let token = EnrollmentToken::parse("t", "secret").unwrap();
        assert!(!format!("{token:?}").contains("secret"));
    }

    #[test]
    fn cmdlines_are_normalised_and_reserved_params_refused() {
        let cmdline = KernelCmdline::parse("c", "  quiet   console=ttyS0 ").unwrap();
        assert_eq!(cmdline.as_str(), "quiet console=ttyS0");
        assert!(KernelCmdline::parse("c", "").unwrap().is_empty());
        for bad in ["initrd=x", "quiet ctpf.token=abc", "ctpf.url", "a;b", "a || b", "x && y"] {
            assert!(KernelCmdline::parse("c", bad).is_err(), "{bad:?}");
        }
        let long = "a".repeat(MAX_CMDLINE_LEN + 1);
        assert!(KernelCmdline::parse("c", &long).is_err());
    }
}
