//! Request extractors: the authenticated caller and the API's headers.
//!
//! Authentication is an extractor, not a middleware layer, so a handler
//! cannot exist without naming the `Caller` it serves, and its RBAC check
//! sits next to the work it guards.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};

use super::AppState;
use super::problem::ApiError;
use crate::auth::{Access, AuthError, Claims, Role};
use crate::ratelimit::retry_after_seconds;
use crate::store::tokens;

pub const LEASE_NONCE: &str = "machine-lease-nonce";
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The bearer of a valid, unrevoked token that is within its rate limit.
#[derive(Debug, Clone)]
pub struct Caller(pub Claims);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let value = parts.headers.get(header::AUTHORIZATION).ok_or(AuthError::Missing)?;
        let value = value.to_str().map_err(|_| AuthError::NotBearer)?;
        let token =
            value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).ok_or(AuthError::NotBearer)?.trim();
        let claims = state.keys.verify(token)?;
        // Both end up in queries and logs; an external issuer's odd claims
        // must not turn into database errors.
        for (claim, value) in [("sub", &claims.sub), ("jti", &claims.jti)] {
            if value.is_empty() || value.len() > 255 || value.chars().any(char::is_control) {
                let why = format!("claim {claim} must be 1 to 255 characters without control characters");
                return Err(AuthError::Malformed(why).into());
            }
        }
        // Before the revocation lookup, so a flood costs no queries.
        if let Err(wait) = state.limiter.check(&claims.jti) {
            let mut error = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                format!("too many requests with this token; retry in {:.1} s", wait.as_secs_f64()),
            );
            error.retry_after = Some(retry_after_seconds(wait));
            return Err(error);
        }
        let jti = claims.jti.clone();
        if state.db.run(move |conn| tokens::is_revoked(conn, &jti)).await? {
            return Err(AuthError::Revoked.into());
        }
        Ok(Caller(claims))
    }
}

impl Caller {
    /// Requires `needed` in `namespace`. A caller with no role there gets
    /// the same 404 as for a namespace that does not exist.
    pub fn require(&self, namespace: &str, needed: Role) -> Result<(), ApiError> {
        if !super::validate::is_name(namespace) {
            return Err(ApiError::not_found(format!("namespace {namespace:?} not found")));
        }
        match self.0.access(namespace, needed) {
            Access::Granted => Ok(()),
            Access::Hidden => Err(ApiError::not_found(format!("namespace {namespace:?} not found"))),
            Access::Forbidden { have } => Err(ApiError::forbidden(format!(
                "your role in namespace {namespace:?} is {}; this needs {}",
                role_name(have),
                role_name(needed)
            ))),
        }
    }

    /// Requires the cluster-admin flag (hosts, namespace lifecycle).
    pub fn require_cluster_admin(&self) -> Result<(), ApiError> {
        if self.0.cluster_admin { Ok(()) } else { Err(ApiError::forbidden("this needs a cluster-admin token")) }
    }
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Viewer => "viewer",
        Role::Operator => "operator",
        Role::Admin => "admin",
    }
}

/// The `Machine-Lease-Nonce` header, if sent.
#[derive(Debug, Clone, Default)]
pub struct LeaseNonce(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for LeaseNonce {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get(LEASE_NONCE) {
            None => Ok(LeaseNonce(None)),
            Some(v) => v
                .to_str()
                .map(|s| LeaseNonce(Some(s.trim().to_owned())))
                .map_err(|_| ApiError::bad_request("Machine-Lease-Nonce is not ASCII")),
        }
    }
}

/// The `Idempotency-Key` header, if sent: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, Default)]
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(IDEMPOTENCY_KEY) else { return Ok(IdempotencyKey(None)) };
        let bad = || ApiError::bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters");
        let key = value.to_str().map_err(|_| bad())?.trim();
        if key.is_empty() || key.len() > 255 || !key.chars().all(|c| c.is_ascii_graphic()) {
            return Err(bad());
        }
        Ok(IdempotencyKey(Some(key.to_owned())))
    }
}
