//! RFC 9457 problem details, and the request id every response carries.
//!
//! Every error leaves as `application/problem+json` with a `request_id`
//! member equal to the `X-Request-Id` response header, so a user's bug
//! report can be matched to the controller's log line. Errors that axum
//! produces itself (a 405, a rejected path parameter, a JSON body that does
//! not parse) are rewritten into the same shape by [`request_context`], so
//! no handler has to remember to.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::AuthError;
use crate::db::DbError;
use crate::store::StoreError;

pub const PROBLEM_JSON: &str = "application/problem+json";
pub const REQUEST_ID: &str = "x-request-id";

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem (`urn:micromachines:problem:<kind>`).
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The request path.
    pub instance: String,
    /// Also in the `X-Request-Id` header.
    pub request_id: String,
    /// With `quota-exceeded`: the limit the request would break
    /// (`machines`, `vcpus`, `memory_mb` or `snapshot_bytes`), for clients
    /// that act on it without parsing the detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
}

#[derive(Debug, Clone)]
struct RequestContext {
    id: String,
    path: String,
}

tokio::task_local! {
    // The handler runs inside the middleware's future, so errors built
    // anywhere below it can name the request without threading it through.
    static REQUEST: RequestContext;
}

/// An error on its way to becoming a problem response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub detail: String,
    pub retry_after: Option<u64>,
    /// The problem's `limit` member (`quota-exceeded` only).
    pub limit: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError { status, kind, detail: detail.into(), retry_after: None, limit: None }
    }

    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    pub fn invalid(detail: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> ApiError {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    pub fn conflict(detail: impl Into<String>) -> ApiError {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        StoreError::Db(e).into()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let detail = e.to_string();
        match e {
            StoreError::NotFound { .. } => ApiError::not_found(detail),
            StoreError::Conflict(_) => ApiError::conflict(detail),
            StoreError::Transition(_) => ApiError::new(StatusCode::CONFLICT, "invalid-state", detail),
            StoreError::LeaseHeld { .. } => ApiError::new(StatusCode::CONFLICT, "lease-held", detail),
            // Not a 5xx: the controller is fine, the cluster is full (or
            // the constraints match no host), and 5xx would page operators.
            StoreError::NoCapacity(_) | StoreError::SnapshotHost { .. } | StoreError::BranchHost { .. } => {
                ApiError::new(StatusCode::CONFLICT, "insufficient-capacity", detail)
            }
            StoreError::KeyInFlight(_) => {
                let mut e = ApiError::new(StatusCode::CONFLICT, "idempotency-key-in-flight", detail);
                e.retry_after = Some(5);
                e
            }
            StoreError::Invalid(_) => ApiError::invalid(detail),
            // 403 as the issue asks: the caller may do this in general, but
            // not now, and retrying will not help until usage drops or
            // the quota is raised (a 409 would read as a race to retry).
            StoreError::Quota(e) => ApiError {
                limit: Some(e.limit.as_str()),
                ..ApiError::new(StatusCode::FORBIDDEN, "quota-exceeded", detail)
            },
            // As the clone's own error, saying which clone it was.
            StoreError::Forking { error, .. } => ApiError { detail, ..ApiError::from(*error) },
            StoreError::IdempotencyMismatch(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reused", detail)
            }
            StoreError::Db(DbError::Checkout(_)) => {
                tracing::error!("{detail}");
                let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database-unavailable", detail);
                e.retry_after = Some(1);
                e
            }
            // Postgres cannot store NUL; validation should have caught it,
            // and if it did not, it is still the request's fault.
            StoreError::Db(DbError::Query(diesel::result::Error::DatabaseError(_, info)))
                if info.message().contains("invalid byte sequence") || info.message().contains("Unicode escape") =>
            {
                ApiError::bad_request("the request contains text the database cannot store (a NUL byte)")
            }
            StoreError::Db(_) | StoreError::Corrupt(_) => {
                let id = current_request_id().unwrap_or_default();
                tracing::error!(request_id = %id, "{detail}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; the controller's log has the details under this request id",
                )
            }
        }
    }
}

pub(crate) fn current_request_id() -> Option<String> {
    REQUEST.try_with(|r| r.id.clone()).ok()
}

fn title(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("Error")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (request_id, path) = REQUEST.try_with(|r| (r.id.clone(), r.path.clone())).unwrap_or_default();
        let problem = Problem {
            kind: format!("urn:micromachines:problem:{}", self.kind),
            title: title(self.status).to_owned(),
            status: self.status.as_u16(),
            detail: self.detail,
            instance: path,
            request_id,
            limit: self.limit.map(str::to_owned),
        };
        let body = serde_json::to_vec(&problem).expect("a problem always serialises");
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"mm-controller\""));
        }
        response
    }
}

/// A client's own request id is kept if it is 1-64 of `[A-Za-z0-9-]`
/// (a UUID, a trace id); anything else is replaced, so the id is always
/// safe to log, echo and put in a header.
pub fn accept_request_id(value: Option<&HeaderValue>) -> Option<String> {
    let value = value?.to_str().ok()?;
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '-';
    (!value.is_empty() && value.len() <= 64 && value.chars().all(plain)).then(|| value.to_owned())
}

/// Kinds for statuses axum produces on its own.
fn kind_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad-request",
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid-request",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// Middleware: assigns the request id, runs the request with it in scope,
/// turns any non-problem error response into a problem, and sets
/// `X-Request-Id`.
pub async fn request_context(request: Request, next: Next) -> Response {
    let id = accept_request_id(request.headers().get(REQUEST_ID)).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let context = RequestContext { id: id.clone(), path: request.uri().path().to_owned() };
    let method = request.method().clone();
    let started = std::time::Instant::now();
    // Every line logged while serving the request carries its id.
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = REQUEST
        .scope(
            context.clone(),
            tracing::Instrument::instrument(
                async move {
                    let response = next.run(request).await;
                    let status = response.status();
                    let is_problem = response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v == PROBLEM_JSON);
                    if !(status.is_client_error() || status.is_server_error()) || is_problem {
                        return response;
                    }
                    let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
                    // axum's own rejections explain themselves in a short text body.
                    let text = axum::body::to_bytes(response.into_body(), 4096).await.unwrap_or_default();
                    let detail = String::from_utf8_lossy(&text).trim().to_owned();
                    let detail = if detail.is_empty() { title(status).to_owned() } else { detail };
                    let mut rewritten = ApiError::new(status, kind_for(status), detail).into_response();
                    if let Some(value) = retry_after {
                        rewritten.headers_mut().insert(header::RETRY_AFTER, value);
                    }
                    rewritten
                },
                span,
            ),
        )
        .await;
    // The access log: one line per request, findable by the id users see.
    tracing::info!(
        request_id = %id,
        %method,
        path = %context.path,
        status = response.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    response.headers_mut().insert(REQUEST_ID, value);
    response
}

/// The router's fallback: a path no route matches.
pub async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no-route", "no such API route; see /v1/openapi.json")
}

/// An empty body with a status (the body limit is enforced on it too).
pub fn empty(status: StatusCode) -> Response {
    (status, Body::empty()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(value: &str) -> Option<String> {
        accept_request_id(Some(&HeaderValue::from_str(value).unwrap()))
    }

    #[test]
    fn only_plain_short_request_ids_are_echoed() {
        assert_eq!(accepted("client-123").as_deref(), Some("client-123"));
        assert_eq!(
            accepted("0b8a2f5e-6c4d-4e8f-9a1b-2c3d4e5f6a7b").as_deref(),
            Some("0b8a2f5e-6c4d-4e8f-9a1b-2c3d4e5f6a7b")
        );
        assert_eq!(accepted(&"a".repeat(64)).as_deref(), Some("a".repeat(64).as_str()));
        for bad in ["", "a b", "a\"b", "a_b", "a.b", "x;y", "%41", "é"] {
            if let Ok(value) = HeaderValue::from_str(bad) {
                assert_eq!(accept_request_id(Some(&value)), None, "{bad:?}");
            }
        }
        assert_eq!(accepted(&"a".repeat(65)), None);
        assert_eq!(accept_request_id(None), None);
    }
}
