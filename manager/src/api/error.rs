//! The one place where errors become HTTP responses. Clients get a status, a stable code, a
//! message and (for bad input) the field at fault; internal details go to the log only.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use ctpf_common::ParseError;
use ctpf_registries::RegistryError;
use ctpf_store::artifacts::ArtifactError;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code: invalid_input, unauthorized, forbidden, not_found,
    /// conflict, unavailable, internal.
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, for invalid_input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_input",
            message: message.into(),
            field: Some(field.into()),
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "a valid bearer token is required (Authorization: Bearer ...)".into(),
            field: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
            field: None,
        }
    }

    /// Logs the real cause and answers with a generic message.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "internal error; see the server log".into(),
            field: None,
        }
    }

    fn unavailable(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "backend unavailable");
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: "a storage backend is unavailable; retry later".into(),
            field: None,
        }
    }
}

impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        Self::invalid(e.field.clone(), e.to_string())
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        use ctpf_store::state::StateError;
        match e {
            RegistryError::NotFound { .. } => Self::not_found(e.to_string()),
            RegistryError::AlreadyExists { .. } | RegistryError::Refused(_) => Self {
                status: StatusCode::CONFLICT,
                code: "conflict",
                message: e.to_string(),
                field: None,
            },
            RegistryError::Invalid(p) => p.into(),
            RegistryError::Forbidden(_) => Self {
                status: StatusCode::FORBIDDEN,
                code: "forbidden",
                message: e.to_string(),
                field: None,
            },
            RegistryError::State(StateError::Unavailable(_)) | RegistryError::Bus(_) => {
                Self::unavailable(&e)
            }
            RegistryError::State(StateError::InvalidKey { .. }) => {
                Self::invalid("id", e.to_string())
            }
            RegistryError::State(_) | RegistryError::Corrupt { .. } => Self::internal(&e),
        }
    }
}

impl From<ArtifactError> for ApiError {
    fn from(e: ArtifactError) -> Self {
        match e {
            ArtifactError::NotFound(_) => Self::not_found(e.to_string()),
            ArtifactError::DigestMismatch { .. } => Self::invalid("digest", e.to_string()),
            ArtifactError::InvalidRange { .. } => Self {
                status: StatusCode::RANGE_NOT_SATISFIABLE,
                code: "invalid_input",
                message: e.to_string(),
                field: Some("range".into()),
            },
            ArtifactError::Upload(_) => Self::invalid("body", e.to_string()),
            ArtifactError::S3 { .. } => Self::unavailable(&e),
            ArtifactError::InvalidRef(_) => Self::invalid("ref", e.to_string()),
            ArtifactError::Io(_) | ArtifactError::CorruptRef { .. } => Self::internal(&e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail { code: self.code, message: self.message, field: self.field },
        };
        (self.status, Json(body)).into_response()
    }
}
