//! `POST /v1/enroll`: the report goes to the server with the one-time token as bearer.
//! The network may not be ready when the agent starts (DHCP still settling, the server
//! restarting), so transport errors and 5xx are retried with backoff; a 4xx is the server's
//! final word about this token or report and is not.

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use ctpf_common::HostReport;
use serde::Deserialize;

use crate::cmdline::BootParams;
use crate::say;

/// How long and how often to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Pause after the first failure; doubled after each further one.
    pub first_delay: Duration,
    /// Longest pause between attempts.
    pub max_delay: Duration,
    /// No new attempt starts once it could not begin before this much time has passed.
    pub give_up_after: Duration,
    /// Limit for one whole request (connect, send, answer).
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
            give_up_after: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The pause after failed attempt number `attempt` (1-based): 1 s, 2 s, 4 s, ... capped.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.first_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// The host record the server created (201) or found (200) for this machine.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Enrolled {
    /// The host's id.
    pub id: String,
    /// The datacenter the token enrolled it into.
    pub datacenter: String,
    /// False when the server already knew the machine (a re-enrollment).
    #[serde(skip)]
    pub created: bool,
    /// A site worker queued the callback for the manager (HTTP 202); `id` is not a host id.
    #[serde(default)]
    pub queued: bool,
}

/// Why enrollment ended without a host.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("cannot encode the report: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the server refused enrollment with HTTP {status}: {message}")]
    Rejected { status: u16, message: String },
    #[error("the server answered HTTP {status} with a body that is not a host: {message}")]
    BadResponse { status: u16, message: String },
    #[error("gave up after {attempts} attempts over {seconds} s; last failure: {last}")]
    GaveUp { attempts: u32, seconds: u64, last: String },
}

/// One attempt's outcome.
enum Attempt {
    Done(Enrolled),
    Retry(String),
    Fatal(EnrollError),
}

/// Posts `report` to `{params.url}/v1/enroll` until the server accepts or refuses it, or
/// `policy` runs out. Progress lines go to `out`.
pub fn enroll(
    params: &BootParams,
    report: &HostReport,
    policy: &RetryPolicy,
    out: &mut dyn Write,
) -> Result<Enrolled, EnrollError> {
    let body = serde_json::to_vec(report)?;
    let agent = http_agent(policy);
    let url = format!("{}/v1/enroll", params.url);
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let failure = match attempt(&agent, &url, &params.token, &body) {
            Attempt::Done(enrolled) => return Ok(enrolled),
            Attempt::Fatal(err) => return Err(err),
            Attempt::Retry(failure) => failure,
        };
        let delay = policy.delay(attempts);
        if started.elapsed() + delay > policy.give_up_after {
            let seconds = started.elapsed().as_secs();
            return Err(EnrollError::GaveUp { attempts, seconds, last: failure });
        }
        say(out, &format!("attempt {attempts} failed: {failure}; retrying in {delay:?}"));
        thread::sleep(delay);
    }
}

/// A client for plain HTTP that reports every status as a response (so 4xx bodies can be
/// shown), follows no redirects (a POST must not silently turn into a GET) and ignores
/// proxy variables (the provisioning network has none, tests must not pick one up).
fn http_agent(policy: &RetryPolicy) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(policy.request_timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .proxy(None)
        .user_agent(concat!("ctpf-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// Longest response body read; a host record is a few KiB.
const MAX_RESPONSE: u64 = 1 << 20;

fn attempt(agent: &ureq::Agent, url: &str, token: &str, body: &[u8]) -> Attempt {
    let sent = agent
        .post(url)
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/json")
        .header("Accept", "application/json")
        .send(body);
    let mut response = match sent {
        Ok(response) => response,
        Err(err) => return Attempt::Retry(err.to_string()),
    };
    let status = response.status().as_u16();
    let text = match response.body_mut().with_config().limit(MAX_RESPONSE).read_to_string() {
        Ok(text) => text,
        Err(err) if status >= 500 || (200..300).contains(&status) => {
            return Attempt::Retry(format!("HTTP {status}, reading the answer failed: {err}"));
        }
        Err(_) => String::new(),
    };
    classify(status, &text)
}

/// What a status and body mean for the agent. 202: a site worker took the callback and
/// queued it for the manager (it may be unreachable); the host id comes later.
fn classify(status: u16, text: &str) -> Attempt {
    match status {
        200..=202 => match serde_json::from_str::<Enrolled>(text) {
            Ok(enrolled) => Attempt::Done(Enrolled { created: status != 200, ..enrolled }),
            Err(err) => Attempt::Fatal(EnrollError::BadResponse {
                status,
                message: format!("{err}: {}", excerpt(text)),
            }),
        },
        500.. => Attempt::Retry(format!("HTTP {status}: {}", server_message(text))),
        _ => Attempt::Fatal(EnrollError::Rejected { status, message: server_message(text) }),
    }
}

/// ctpf's error body (`{"error":{"code","message","field"}}`) in one line, or an excerpt
/// of whatever else answered (a proxy's HTML page, say).
fn server_message(text: &str) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: ErrorDetail,
    }
    #[derive(Deserialize)]
    struct ErrorDetail {
        code: String,
        message: String,
        field: Option<String>,
    }
    match serde_json::from_str::<ErrorBody>(text) {
        Ok(ErrorBody { error: ErrorDetail { code, message, field: Some(field) } }) => {
            format!("{code}: {message} (field {field})")
        }
        Ok(ErrorBody { error: ErrorDetail { code, message, field: None } }) => {
            format!("{code}: {message}")
        }
        Err(_) if text.trim().is_empty() => "(empty body)".to_owned(),
        Err(_) => excerpt(text),
    }
}

/// At most 300 bytes of `text` on one line, for a console.
fn excerpt(text: &str) -> String {
    crate::inventory::clean_text(text, 300).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = RetryPolicy::default();
        let secs: Vec<u64> = (1..=7).map(|n| policy.delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 10, 10, 10]);
        assert_eq!(policy.delay(100), Duration::from_secs(10));
    }

    #[test]
    fn statuses_are_classified() {
        let host = r#"{"id":"0190a1b2-0000-7000-8000-000000000001","datacenter":"fra1","state":"discovered"}"#;
        assert!(matches!(classify(201, host), Attempt::Done(Enrolled { created: true, .. })));
        assert!(matches!(classify(200, host), Attempt::Done(Enrolled { created: false, .. })));
        let queued = r#"{"id":"queued","datacenter":"dc-a","queued":true}"#;
        assert!(matches!(classify(202, queued), Attempt::Done(Enrolled { created: true, .. })));
        assert!(matches!(classify(200, "<html>"), Attempt::Fatal(EnrollError::BadResponse { .. })));
        assert!(matches!(classify(503, ""), Attempt::Retry(_)));
        for status in [400, 401, 403, 404, 302] {
            assert!(matches!(classify(status, ""), Attempt::Fatal(EnrollError::Rejected { .. })));
        }
    }

    #[test]
    fn server_errors_are_summarised() {
        let body = r#"{"error":{"code":"forbidden","message":"token used"}}"#;
        assert_eq!(server_message(body), "forbidden: token used");
        let body = r#"{"error":{"code":"invalid_input","message":"bad","field":"macs"}}"#;
        assert_eq!(server_message(body), "invalid_input: bad (field macs)");
        assert_eq!(server_message("<h1>Bad\nGateway</h1>"), "<h1>Bad Gateway</h1>");
        assert_eq!(server_message(""), "(empty body)");
    }
}
