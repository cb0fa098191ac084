//! A thin client of the manager's REST API, used by the CLI. The CLI never touches a store
//! directly: everything it does, a script can do over HTTP too.

use anyhow::{Context as _, Result, bail};
use serde::{Serialize, de::DeserializeOwned};

#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl ApiClient {
    pub fn new(base: &str, token: Option<String>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("ctpf/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned(), token })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        req
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T> {
        let response = req
            .send()
            .await
            .with_context(|| format!("cannot reach the ctpf API at {}", self.base))?;
        let status = response.status();
        if status.is_success() {
            return response.json().await.context("reading the API's answer");
        }
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let message = body["error"]["message"].as_str().unwrap_or("no details").to_owned();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            bail!("{message} (status 401; pass --token or set CTPF_TOKEN)");
        }
        bail!("{message} (status {})", status.as_u16())
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T> {
        self.send(self.request(reqwest::Method::GET, path).query(query)).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.request(reqwest::Method::POST, path).json(body)).await
    }

    pub async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.send(self.request(reqwest::Method::PATCH, path).json(body)).await
    }

    /// PUTs a streamed body (uploads of any size, never held in memory).
    pub async fn put_stream<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        body: reqwest::Body,
    ) -> Result<T> {
        self.send(self.request(reqwest::Method::PUT, path).query(query).body(body)).await
    }

    /// GETs a body to stream; errors are decoded like the JSON calls'.
    pub async fn get_stream(&self, path: &str) -> Result<reqwest::Response> {
        let response = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .with_context(|| format!("cannot reach the ctpf API at {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let message = body["error"]["message"].as_str().unwrap_or("no details");
        bail!("{message} (status {})", status.as_u16())
    }

    pub async fn delete(&self, path: &str, query: &[(&str, String)]) -> Result<()> {
        let response = self
            .request(reqwest::Method::DELETE, path)
            .query(query)
            .send()
            .await
            .with_context(|| format!("cannot reach the ctpf API at {}", self.base))?;
        if response.status().is_success() {
            return Ok(());
        }
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        bail!(
            "{} (status {})",
            body["error"]["message"].as_str().unwrap_or("no details"),
            status.as_u16()
        )
    }
}
