//! API errors and their Kubernetes `Status` form.

use serde_json::json;
use weft_model::{FieldError, Kind};

/// Everything a request can fail with; each maps to a `Status` with a reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{kind} \"{name}\" is invalid: {}", render_causes(.causes))]
    Invalid {
        kind: Kind,
        name: String,
        causes: Vec<FieldError>,
    },
    #[error("{resource} \"{name}\" not found")]
    NotFound { resource: String, name: String },
    #[error("{} \"{name}\" already exists", .kind.plural())]
    AlreadyExists { kind: Kind, name: String },
    #[error("Operation cannot be fulfilled on {} \"{name}\": {reason}", .kind.plural())]
    Conflict {
        kind: Kind,
        name: String,
        reason: String,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error("Unauthorized")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error("the server could not find the requested resource")]
    NoRoute,
    #[error(
        "the body of the request was in an unknown format - accepted media types include: {0}"
    )]
    UnsupportedMediaType(String),
    #[error("the request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("too old resource version: {requested} ({oldest})")]
    Gone { requested: u64, oldest: u64 },
    #[error("Internal error occurred: {0}")]
    Internal(String),
    #[error("the control plane cannot accept writes: {0}")]
    Unavailable(String),
}

fn render_causes(causes: &[FieldError]) -> String {
    match causes {
        [one] => one.to_string(),
        many => format!(
            "[{}]",
            many.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

impl ApiError {
    pub fn code(&self) -> u16 {
        match self {
            ApiError::Invalid { .. } => 422,
            ApiError::NotFound { .. } | ApiError::NoRoute => 404,
            ApiError::AlreadyExists { .. } | ApiError::Conflict { .. } => 409,
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized => 401,
            ApiError::Forbidden(_) => 403,
            ApiError::MethodNotAllowed => 405,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::TooLarge(_) => 413,
            ApiError::Gone { .. } => 410,
            ApiError::Internal(_) => 500,
            ApiError::Unavailable(_) => 503,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Invalid { .. } => "Invalid",
            ApiError::NotFound { .. } | ApiError::NoRoute => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::MethodNotAllowed => "MethodNotAllowed",
            ApiError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            ApiError::TooLarge(_) => "RequestEntityTooLarge",
            ApiError::Gone { .. } => "Expired",
            ApiError::Internal(_) => "InternalError",
            ApiError::Unavailable(_) => "ServiceUnavailable",
        }
    }

    /// The Kubernetes `Status` object for this error.
    pub fn status(&self) -> serde_json::Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        let details = match self {
            ApiError::Invalid { kind, name, causes } => Some(json!({
                "name": name,
                "kind": kind.name(),
                "causes": causes.iter().map(|c| json!({
                    "reason": c.reason(),
                    "message": c.message(),
                    "field": c.field,
                })).collect::<Vec<_>>(),
            })),
            ApiError::NotFound { resource, name } => Some(json!({"name": name, "kind": resource})),
            ApiError::AlreadyExists { kind, name } | ApiError::Conflict { kind, name, .. } => {
                Some(json!({"name": name, "kind": kind.plural()}))
            }
            _ => None,
        };
        if let Some(d) = details {
            status["details"] = d;
        }
        status
    }

    pub fn not_found(kind: Kind, name: &str) -> ApiError {
        ApiError::NotFound {
            resource: kind.plural().into(),
            name: name.into(),
        }
    }

    pub fn invalid(kind: Kind, name: &str, causes: Vec<FieldError>) -> ApiError {
        ApiError::Invalid {
            kind,
            name: name.into(),
            causes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_model::FieldErrorKind;

    #[test]
    fn invalid_status_has_field_path() {
        let e = ApiError::invalid(
            Kind::Service,
            "web",
            vec![FieldError {
                kind: FieldErrorKind::Invalid,
                field: "spec.ports[0].port".into(),
                value: Some("70000".into()),
                detail: "must be between 1 and 65535, inclusive".into(),
            }],
        );
        let s = e.status();
        assert_eq!(s["code"], 422);
        assert_eq!(s["reason"], "Invalid");
        assert_eq!(
            s["message"],
            "Service \"web\" is invalid: spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive"
        );
        assert_eq!(s["details"]["causes"][0]["field"], "spec.ports[0].port");
        assert_eq!(s["details"]["causes"][0]["reason"], "FieldValueInvalid");
        let nf = ApiError::not_found(Kind::Service, "x").status();
        assert_eq!(nf["message"], "services \"x\" not found");
        assert_eq!(nf["code"], 404);
    }
}
