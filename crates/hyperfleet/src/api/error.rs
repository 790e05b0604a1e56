//! The error envelope `{"error": {"code", "message"}}` and the one mapping from every lower layer's error
//! to an HTTP status and code.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyperfleet_types::{ErrorBody, ErrorDetail};

use crate::keys::KeyError;
use crate::machines::Error as MachineError;
use crate::runtime::RuntimeError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "VALIDATION_ERROR", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }
    pub fn forbidden() -> Self {
        Self::new(StatusCode::FORBIDDEN, "FORBIDDEN", "Insufficient permissions for this action")
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, "{}", self.message);
        }
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_string(), message: self.message } };
        (self.status, Json(body)).into_response()
    }
}

impl From<MachineError> for ApiError {
    fn from(e: MachineError) -> Self {
        use StatusCode as S;
        let message = e.to_string();
        let (status, code) = match &e {
            MachineError::NotFound(_) | MachineError::FileNotFound(_) => (S::NOT_FOUND, "NOT_FOUND"),
            MachineError::InvalidState { .. } | MachineError::BadRequest(_) => (S::BAD_REQUEST, "BAD_REQUEST"),
            MachineError::Validation(_) => (S::BAD_REQUEST, "VALIDATION_ERROR"),
            MachineError::Conflict(_) => (S::CONFLICT, "CONFLICT"),
            MachineError::PoolExhausted { .. } => (S::SERVICE_UNAVAILABLE, "IP_POOL_EXHAUSTED"),
            MachineError::Timeout(_) => (S::GATEWAY_TIMEOUT, "TIMEOUT"),
            MachineError::TooLarge(_) => (S::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
            MachineError::Runtime(RuntimeError::Firecracker { status, .. }) => {
                (if *status == 400 { S::BAD_REQUEST } else { S::BAD_GATEWAY }, "FIRECRACKER_API_ERROR")
            }
            MachineError::Runtime(_) | MachineError::Network(_) => (S::INTERNAL_SERVER_ERROR, "RUNTIME_ERROR"),
            MachineError::Agent(_) => (S::BAD_GATEWAY, "VSOCK_ERROR"),
            MachineError::Store(_) => (S::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR"),
        };
        Self::new(status, code, message)
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        let message = e.to_string();
        match e {
            KeyError::Invalid(_) => Self::validation(message),
            KeyError::Escalation(_) => Self::new(StatusCode::FORBIDDEN, "FORBIDDEN", message),
            KeyError::NotFound(_) => Self::not_found(message),
            KeyError::Unknown | KeyError::Revoked | KeyError::Expired => Self::unauthorized(message),
            KeyError::Store(e) => e.into(),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::internal(e.to_string())
    }
}
