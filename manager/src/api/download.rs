//! Streaming blob downloads with the HTTP features boot clients and resumable fetches rely
//! on: HEAD without opening the content, one `Range` (206 / 416), and `If-None-Match` /
//! `If-Range` against the digest ETag. Content never changes under a digest, so the ETag is
//! strong and the whole blob can be cached forever.

use axum::{
    body::Body,
    http::{HeaderMap, Method, StatusCode, header},
    response::Response,
};
use ctpf_common::{ArtifactName, Sha256Digest};

use super::{ApiError, AppState};

/// What a `Range` header asks of a blob of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: send everything (also for multi-range requests, which RFC 9110
    /// lets a server answer with the whole representation).
    Full,
    /// Bytes `start..end` (end exclusive).
    Partial { start: u64, end: u64 },
    /// Syntactically fine but outside the blob: 416.
    Unsatisfiable,
}

/// Parses `bytes=A-B`, `bytes=A-` and `bytes=-N`. Anything malformed is ignored (`Full`), as
/// RFC 9110 asks.
pub fn parse_range(value: &str, size: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else { return RangeRequest::Full };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeRequest::Full };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(last) {
            Some(0) => RangeRequest::Unsatisfiable,
            Some(n) if size > 0 => {
                RangeRequest::Partial { start: size.saturating_sub(n), end: size }
            }
            Some(_) => RangeRequest::Unsatisfiable,
            None => RangeRequest::Full,
        },
        // bytes=A-: from A to the end.
        (false, true) => match parse(first) {
            Some(start) if start < size => RangeRequest::Partial { start, end: size },
            Some(_) => RangeRequest::Unsatisfiable,
            None => RangeRequest::Full,
        },
        (false, false) => match (parse(first), parse(last)) {
            (Some(start), Some(last)) if start <= last => {
                if start >= size {
                    RangeRequest::Unsatisfiable
                } else {
                    RangeRequest::Partial { start, end: last.saturating_add(1).min(size) }
                }
            }
            _ => RangeRequest::Full,
        },
        (true, true) => RangeRequest::Full,
    }
}

/// True when a conditional header lists this ETag (or `*`).
fn etag_listed(value: Option<&header::HeaderValue>, etag: &str) -> bool {
    let Some(value) = value.and_then(|v| v.to_str().ok()) else { return false };
    value.split(',').map(|t| t.trim().trim_start_matches("W/")).any(|t| t == "*" || t == etag)
}

pub async fn stream_blob(
    s: &AppState,
    method: &Method,
    headers: &HeaderMap,
    digest: &Sha256Digest,
    name: Option<&ArtifactName>,
) -> Result<Response, ApiError> {
    let etag = format!("\"{digest}\"");
    let size = s
        .artifacts
        .stat(digest)
        .await?
        .ok_or(ctpf_store::artifacts::ArtifactError::NotFound(*digest))?;
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable");
    if let Some(name) = name {
        // ArtifactName admits no quotes or separators, so it is safe inside the header.
        response = response
            .header(header::CONTENT_DISPOSITION, format!("attachment; filename=\"{name}\""));
    }
    if etag_listed(headers.get(header::IF_NONE_MATCH), &etag) {
        return response
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map_err(|e| ApiError::internal(&e));
    }
    // If-Range with another validator means "the content changed: send it all".
    let range_applies = headers.get(header::IF_RANGE).is_none_or(|v| etag_listed(Some(v), &etag));
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(value) if range_applies => parse_range(value, size),
        _ => RangeRequest::Full,
    };
    let (status, start, end) = match range {
        RangeRequest::Full => (StatusCode::OK, 0, size),
        RangeRequest::Partial { start, end } => {
            response =
                response.header(header::CONTENT_RANGE, format!("bytes {start}-{}/{size}", end - 1));
            (StatusCode::PARTIAL_CONTENT, start, end)
        }
        RangeRequest::Unsatisfiable => {
            return response
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .body(Body::empty())
                .map_err(|e| ApiError::internal(&e));
        }
    };
    response = response.status(status).header(header::CONTENT_LENGTH, end - start);
    if method == Method::HEAD {
        return response.body(Body::empty()).map_err(|e| ApiError::internal(&e));
    }
    let blob = if status == StatusCode::OK {
        s.artifacts.get(digest).await?
    } else {
        s.artifacts.get_range(digest, start, end).await?
    };
    let stream = tokio_util::io::ReaderStream::with_capacity(blob.reader, 256 * 1024);
    response.body(Body::from_stream(stream)).map_err(|e| ApiError::internal(&e))
}

#[cfg(test)]
mod tests {
    use super::{RangeRequest::*, parse_range};

    #[test]
    fn ranges_follow_rfc_9110() {
        let cases = [
            ("bytes=0-9", Partial { start: 0, end: 10 }),
            ("bytes=10-", Partial { start: 10, end: 100 }),
            ("bytes=-10", Partial { start: 90, end: 100 }),
            ("bytes=-1000", Partial { start: 0, end: 100 }),
            ("bytes=90-1000", Partial { start: 90, end: 100 }),
            ("bytes=99-99", Partial { start: 99, end: 100 }),
            ("bytes=100-", Unsatisfiable),
            ("bytes=100-200", Unsatisfiable),
            ("bytes=-0", Unsatisfiable),
            // Malformed or unsupported: the whole blob.
            ("bytes=9-0", Full),
            ("bytes=0-1,5-6", Full),
            ("items=0-1", Full),
            ("bytes=a-b", Full),
            ("bytes=-", Full),
            ("bytes=18446744073709551615-", Unsatisfiable),
            ("bytes=0-18446744073709551615", Partial { start: 0, end: 100 }),
        ];
        for (header, want) in cases {
            assert_eq!(parse_range(header, 100), want, "{header}");
        }
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=-5", 0), Unsatisfiable);
    }
}
