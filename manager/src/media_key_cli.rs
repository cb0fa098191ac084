//! `ctpf media-keys create|list|show|revoke`: reusable enrollment credentials for boot media.

use anyhow::Result;
use clap::Subcommand;
use ctpf_common::{MediaKey, MediaKeyWithSecret, Name, NewMediaKey, OffsetDateTime};

use crate::cli::{Cli, client, or_dash, print};

#[derive(Debug, Subcommand)]
pub enum MediaKeysCmd {
    /// Create a media key: machines booting media that carry it (ctpf.token=) enroll into
    /// DATACENTER, each as its own host, until it expires or is revoked. Prints the secret.
    Create {
        /// A lowercase DNS label, e.g. lab-usb.
        name: String,
        /// The datacenter machines enrolling with it join.
        #[arg(long)]
        datacenter: String,
        /// How long it stays valid: seconds, or a number with s, m, h or d (30d); at most 365d.
        #[arg(long, value_parser = parse_ttl)]
        ttl: u64,
    },
    /// List media keys (without their secrets).
    List {
        /// Only the keys of this datacenter.
        #[arg(long)]
        datacenter: Option<String>,
    },
    /// Print a media key's secret (the same every time, so rebuilt media embed the same key).
    Show { name: String },
    /// Revoke a media key: machines enrolling with it are refused from now on.
    Revoke { name: String },
}

/// A TTL as `--ttl` takes it: plain seconds, or a number followed by s, m, h or d.
pub(crate) fn parse_ttl(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?}: expected seconds or a number with s, m, h or d (e.g. 30d)");
    let (digits, unit) = match text.strip_suffix(|c: char| c.is_ascii_alphabetic()) {
        Some(digits) => (digits, &text[digits.len()..]),
        None => (text, "s"),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let unit: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|s| (1..=NewMediaKey::MAX_TTL_SECONDS).contains(s))
        .ok_or_else(|| format!("{text:?}: must be from 1s to 365d"))
}

/// A time to the second, RFC 3339.
fn when(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// The secret alone on stdout, so scripts can capture it; what it is on stderr.
fn print_secret(cli: &Cli, key: &MediaKeyWithSecret, created: bool) -> Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(key)?);
        return Ok(());
    }
    println!("{}", key.secret.expose());
    let k = &key.key;
    let mut status = format!("expires {}", when(k.expires_at));
    if let Some(at) = k.revoked_at {
        status = format!("revoked {}", when(at));
    } else if k.expires_at <= OffsetDateTime::now_utc() {
        status = format!("expired {}", when(k.expires_at));
    }
    let (verb, hint) =
        if created { (" created", "; boot media take it as ctpf.token=SECRET") } else { ("", "") };
    eprintln!(
        "media key {}{verb}: datacenter {}, {status}, {} enrollment(s){hint}",
        k.name, k.datacenter, k.enrollments
    );
    Ok(())
}

pub(crate) async fn media_keys(cli: &Cli, cmd: &MediaKeysCmd) -> Result<()> {
    let api = client(cli)?;
    match cmd {
        MediaKeysCmd::Create { name, datacenter, ttl } => {
            let new = NewMediaKey {
                name: Name::parse("name", name)?,
                datacenter: Name::parse("datacenter", datacenter)?,
                ttl_seconds: *ttl,
            };
            let key: MediaKeyWithSecret = api.post("/v1/media-keys", &new).await?;
            print_secret(cli, &key, true)
        }
        MediaKeysCmd::List { datacenter } => {
            let mut query = Vec::new();
            if let Some(dc) = datacenter {
                query.push(("datacenter", Name::parse("datacenter", dc)?.to_string()));
            }
            let keys: Vec<MediaKey> = api.get("/v1/media-keys", &query).await?;
            let now = OffsetDateTime::now_utc();
            print(
                cli.json,
                &keys,
                &["NAME", "DATACENTER", "EXPIRES", "REVOKED", "ENROLLMENTS"],
                |k| {
                    let mut expires = when(k.expires_at);
                    if k.expires_at <= now {
                        expires.push_str(" (expired)");
                    }
                    vec![
                        k.name.to_string(),
                        k.datacenter.to_string(),
                        expires,
                        or_dash(k.revoked_at.map(when)),
                        k.enrollments.to_string(),
                    ]
                },
            )
        }
        MediaKeysCmd::Show { name } => {
            let name = Name::parse("name", name)?;
            let key: MediaKeyWithSecret = api.get(&format!("/v1/media-keys/{name}"), &[]).await?;
            print_secret(cli, &key, false)
        }
        MediaKeysCmd::Revoke { name } => {
            let name = Name::parse("name", name)?;
            let path = format!("/v1/media-keys/{name}/revoke");
            let key: MediaKey = api.post(&path, &serde_json::json!({})).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&key)?);
            } else {
                println!("media key {name} revoked; media carrying it no longer enroll machines");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_take_plain_seconds_and_simple_suffixes() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("12h"), Ok(43_200));
        assert_eq!(parse_ttl("30d"), Ok(2_592_000));
        assert_eq!(parse_ttl("365d"), Ok(NewMediaKey::MAX_TTL_SECONDS));
        for bad in
            ["", "d", "0", "0d", "366d", "1w", "1.5d", "-1", "1 d", "1dd", "99999999999999999999"]
        {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }
}
