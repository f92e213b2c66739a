//! The API's one error type, mapped once to an HTTP status and a JSON body:
//! `{"message": ...}` for everything, `{"detail": ...}` for authentication
//! (the contract's DRF shape, which the clients read).

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use serde_json::json;
use shared::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    TooManyJobs(String),
    #[error("{0}")]
    Unavailable(String),
    /// The detail is logged, never sent.
    #[error("Internal server error")]
    Internal(String),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn job_not_found(id: impl std::fmt::Display) -> Self {
        ApiError::NotFound(format!("Job [{id}] not found"))
    }
    pub fn function_not_found(title: &str) -> Self {
        ApiError::NotFound(format!("Qiskit Function {title} doesn't exist."))
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "database unavailable");
            ApiError::Unavailable("The database is unavailable; try again shortly.".into())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyJobs(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn as_response(&self) -> Response {
        if let ApiError::Internal(detail) = self {
            tracing::error!(%detail, "internal error");
        }
        json_error(self.status(), &self.to_string())
    }
}

/// The one place an error body is shaped.
pub fn json_error(status: StatusCode, text: &str) -> Response {
    let body = if status == StatusCode::UNAUTHORIZED {
        json!({ "detail": text })
    } else {
        json!({ "message": text })
    };
    let mut resp = poem::web::Json(body).with_status(status).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            "WWW-Authenticate",
            poem::http::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

/// Turns any error that reached the edge (routing, payload parsing, ours)
/// into the JSON shape. Framework messages are kept: they say what was wrong.
pub async fn to_json(err: poem::Error) -> Response {
    if err.is::<ApiError>() {
        return err.into_response();
    }
    let status = err.status();
    let text = match status {
        StatusCode::NOT_FOUND => "Not found.".to_string(),
        StatusCode::METHOD_NOT_ALLOWED => "Method not allowed.".to_string(),
        StatusCode::UNAUTHORIZED => "Authorization token was not provided.".to_string(),
        StatusCode::PAYLOAD_TOO_LARGE => "The request body is too large.".to_string(),
        s if s.is_server_error() => {
            tracing::error!(error = %err, "unhandled error");
            "Internal server error".to_string()
        }
        _ => err.to_string(),
    };
    json_error(status, &text)
}

/// The documented error body.
#[derive(poem_openapi::Object)]
pub struct ErrorBody {
    pub message: String,
}

/// Documents the error statuses in the OpenAPI document; the bodies are
/// produced by [`json_error`].
impl poem_openapi::ApiResponse for ApiError {
    fn meta() -> poem_openapi::registry::MetaResponses {
        use poem_openapi::payload::Json;
        use poem_openapi::registry::{MetaResponse, MetaResponses};
        let statuses: [(u16, &'static str); 7] = [
            (400, "Invalid input: `{\"message\": ...}`"),
            (401, "Not authenticated: `{\"detail\": ...}`"),
            (403, "Not allowed in the job's state"),
            (404, "No such object for this user"),
            (413, "Artifact or arguments too large"),
            (429, "Active job limit reached"),
            (503, "A backing service is unavailable"),
        ];
        MetaResponses {
            responses: statuses
                .into_iter()
                .map(|(status, description)| MetaResponse {
                    description,
                    status: Some(status),
                    status_range: None,
                    content: <Json<ErrorBody> as poem_openapi::ApiResponse>::meta()
                        .responses
                        .into_iter()
                        .next()
                        .map(|r| r.content)
                        .unwrap_or_default(),
                    headers: vec![],
                })
                .collect(),
        }
    }

    fn register(registry: &mut poem_openapi::registry::Registry) {
        <poem_openapi::payload::Json<ErrorBody> as poem_openapi::ApiResponse>::register(registry);
    }
}
