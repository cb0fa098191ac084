//! Request extractors that turn bad input into 400s naming the field.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::request::Parts,
};
use ctpf_common::{Name, Tag};
use ctpf_registries::Filter;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON body whose errors name the JSON path of the bad field (`macs[1]`).
#[derive(Debug)]
pub struct ValidJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !is_json {
            return Err(ApiError::invalid(
                "content-type",
                "expected Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::invalid("body", e.body_text()))?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize(de) {
            Ok(v) => Ok(Self(v)),
            Err(e) => {
                let path = e.path().to_string();
                let field = if path == "." { "body".to_owned() } else { path };
                Err(ApiError::invalid(field, e.into_inner().to_string()))
            }
        }
    }
}

/// The query parameters of list endpoints: repeated `tag=k=v`, `datacenter=NAME`, and the
/// rest as raw pairs for endpoints that take more.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub filter: Filter,
    pub other: Vec<(String, String)>,
}

impl ListQuery {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.other.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Rejects parameters an endpoint does not know, so a typo is not silently ignored.
    pub fn only(self, allowed: &[&str]) -> Result<Self, ApiError> {
        if let Some((k, _)) = self.other.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            let mut known = vec!["tag", "datacenter"];
            known.extend_from_slice(allowed);
            return Err(ApiError::invalid(
                k.clone(),
                format!("unknown query parameter {k:?}; known: {}", known.join(", ")),
            ));
        }
        Ok(self)
    }

    pub fn parse_num<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, ApiError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| ApiError::invalid(key, format!("{key} must be a number, got {v:?}"))),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ListQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let mut query = ListQuery::default();
        let raw = parts.uri.query().unwrap_or("");
        for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
            match key.as_ref() {
                "tag" => query.filter.tags.push(Tag::parse("tag", &value)?),
                "datacenter" => query.filter.datacenter = Some(Name::parse("datacenter", &value)?),
                _ => query.other.push((key.into_owned(), value.into_owned())),
            }
        }
        Ok(query)
    }
}
