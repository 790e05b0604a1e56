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
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    pub(crate) fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "VALIDATION_ERROR", message)
    }
    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }
    pub(crate) fn forbidden() -> Self {
        Self::new(StatusCode::FORBIDDEN, "FORBIDDEN", "Insufficient permissions for this action")
    }
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }
    pub(crate) fn internal(message: impl Into<String>) -> Self {
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
        let (status, code) = status_of(e.cause());
        if let MachineError::Store(s) = e.cause()
            && s.is_unavailable()
        {
            return Self::new(status, code, unavailable_message(s));
        }
        Self::new(status, code, e.to_string())
    }
}

/// The one mapping of the orchestration's errors to HTTP.
fn status_of(e: &MachineError) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match e {
        MachineError::NotFound(_)
        | MachineError::FileNotFound { .. }
        | MachineError::VolumeNotFound(_)
        | MachineError::WebhookNotFound(_) => (S::NOT_FOUND, "NOT_FOUND"),
        MachineError::InvalidState { .. }
        | MachineError::NotRunning { .. }
        | MachineError::WaitFailed { .. }
        | MachineError::GuestRefused(_)
        | MachineError::UploadBroken(_) => (S::BAD_REQUEST, "BAD_REQUEST"),
        MachineError::Invalid(_) | MachineError::RuntimeUnavailable { .. } => (S::BAD_REQUEST, "VALIDATION_ERROR"),
        MachineError::NameTaken(_) | MachineError::VolumeNameTaken(_) | MachineError::Conflict(_) => {
            (S::CONFLICT, "CONFLICT")
        }
        MachineError::Image(i) => {
            use crate::machines::images::ImageError as I;
            match i {
                I::Invalid(_) => (S::BAD_REQUEST, "VALIDATION_ERROR"),
                I::NotFound(_) => (S::NOT_FOUND, "NOT_FOUND"),
                // Not 401: that status means the caller's API key here.
                I::Auth(_) => (S::FORBIDDEN, "REGISTRY_UNAUTHORIZED"),
                I::Registry(_) => (S::BAD_GATEWAY, "REGISTRY_ERROR"),
                I::Failed(_) => (S::INTERNAL_SERVER_ERROR, "IMAGE_ERROR"),
                I::NoSpace(_) => (S::INSUFFICIENT_STORAGE, "INSUFFICIENT_STORAGE"),
                I::InUse { .. } => (S::CONFLICT, "CONFLICT"),
            }
        }
        MachineError::Forbidden(_) => (S::FORBIDDEN, "FORBIDDEN"),
        // Answered by forwarding in the handlers; reaching here means the forward itself was refused.
        MachineError::PlacedElsewhere { .. } => (S::CONFLICT, "CONFLICT"),
        MachineError::PoolExhausted { .. } => (S::SERVICE_UNAVAILABLE, "IP_POOL_EXHAUSTED"),
        MachineError::Asleep { .. } | MachineError::WakeFailed { .. } => {
            (S::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE")
        }
        MachineError::WaitTimedOut { .. }
        | MachineError::ExecTimedOut { .. }
        | MachineError::TransferTimedOut { .. } => (S::GATEWAY_TIMEOUT, "TIMEOUT"),
        MachineError::FileTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
        MachineError::GuestDiskFull(_) => (S::INSUFFICIENT_STORAGE, "INSUFFICIENT_STORAGE"),
        MachineError::TooManyExecs { .. } => (S::TOO_MANY_REQUESTS, "TOO_MANY_REQUESTS"),
        MachineError::Runtime(RuntimeError::Firecracker { status, .. }) => {
            (if *status == 400 { S::BAD_REQUEST } else { S::BAD_GATEWAY }, "FIRECRACKER_API_ERROR")
        }
        MachineError::Runtime(RuntimeError::Refused(_)) => (S::BAD_REQUEST, "VALIDATION_ERROR"),
        MachineError::Runtime(_) | MachineError::Network(_) | MachineError::UndoFailed { .. } => {
            (S::INTERNAL_SERVER_ERROR, "RUNTIME_ERROR")
        }
        MachineError::Agent(_) => (S::BAD_GATEWAY, "VSOCK_ERROR"),
        MachineError::Store(e) if e.is_unavailable() => (S::SERVICE_UNAVAILABLE, "DATABASE_UNAVAILABLE"),
        MachineError::Store(e) if e.is_bad_input() => (S::BAD_REQUEST, "VALIDATION_ERROR"),
        MachineError::Store(_) | MachineError::Task { .. } => (S::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR"),
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
        if e.is_unavailable() {
            Self::new(StatusCode::SERVICE_UNAVAILABLE, "DATABASE_UNAVAILABLE", unavailable_message(&e))
        } else if e.is_bad_input() {
            Self::validation(format!("a value the database cannot store: {e}"))
        } else {
            Self::internal(e.to_string())
        }
    }
}

/// What a client is told when the database is unreachable: that, and to retry.
fn unavailable_message(e: &crate::store::StoreError) -> String {
    format!("the database is unavailable, retry later ({e})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperfleet_types::MachineStatus;

    fn mapped(e: MachineError) -> (u16, &'static str) {
        let api = ApiError::from(e);
        (api.status.as_u16(), api.code)
    }

    #[test]
    fn each_error_has_its_documented_status_and_code() {
        assert_eq!(mapped(MachineError::NotFound("x".into())), (404, "NOT_FOUND"));
        assert_eq!(mapped(MachineError::Forbidden("quota exceeded".into())), (403, "FORBIDDEN"));
        assert_eq!(
            mapped(MachineError::InvalidState {
                action: crate::machines::Action::Start,
                status: MachineStatus::Running
            }),
            (400, "BAD_REQUEST")
        );
        assert_eq!(mapped(MachineError::Invalid("name is required".into())), (400, "VALIDATION_ERROR"));
        assert_eq!(mapped(MachineError::NameTaken("a".into())), (409, "CONFLICT"));
        assert_eq!(mapped(MachineError::PoolExhausted { subnet: "s".into(), blocks: 1 }), (503, "IP_POOL_EXHAUSTED"));
        assert_eq!(mapped(MachineError::ExecTimedOut { secs: 1 }), (504, "TIMEOUT"));
        assert_eq!(mapped(MachineError::FileTooLarge { size: None, max: 1 }), (413, "PAYLOAD_TOO_LARGE"));
        let fc = |status| {
            MachineError::Runtime(RuntimeError::Firecracker { action: "PUT /x".into(), status, message: "m".into() })
        };
        assert_eq!(mapped(fc(400)), (400, "FIRECRACKER_API_ERROR"));
        assert_eq!(mapped(fc(500)), (502, "FIRECRACKER_API_ERROR"));
        assert_eq!(mapped(MachineError::Runtime(RuntimeError::Unavailable("x".into()))), (500, "RUNTIME_ERROR"));
        // A failed start whose undo also failed is answered as its cause, with both in the message.
        let undo = MachineError::UndoFailed { cause: Box::new(fc(400)), undo: vec!["remove the interface".into()] };
        let api = ApiError::from(undo);
        assert_eq!((api.status.as_u16(), api.code), (400, "FIRECRACKER_API_ERROR"));
        assert!(api.message.contains("remove the interface"));
    }
}
