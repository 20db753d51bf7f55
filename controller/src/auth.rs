//! JWT verification and minting, and the role model.
//!
//! Tokens are stateless JWTs so any controller can check them without a
//! shared session store; the one piece of state, revocation, is a lookup of
//! the token id (`jti`) in Postgres (done by the API layer, after the rate
//! limiter, so a flood of requests under one token cannot flood the
//! database).
//!
//! Two keys are accepted: an HS256 secret (the controller mints its own
//! tokens with it) and optionally an RS256 public key (tokens minted by an
//! external issuer). The algorithm named in a token's header only selects
//! which of our keys to try, each with a validation that allows that one
//! algorithm, so a token cannot talk us into checking an RS256 key as an
//! HMAC secret.

use std::collections::BTreeMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A role within one namespace. Ordered: each role can do everything the
/// ones before it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read machines and the namespace.
    Viewer,
    /// Also create, start, stop, lease and delete machines.
    Operator,
    /// Also mint and revoke tokens for the namespace.
    Admin,
}

/// What a token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who the token is for (shown as a lease owner, recorded as a token's
    /// creator).
    pub sub: String,
    /// The token id, the handle for revocation and rate limiting.
    pub jti: String,
    /// Expiry, seconds since the epoch. Required: a token that never expires
    /// cannot be forgotten.
    pub exp: i64,
    #[serde(default)]
    pub iat: Option<i64>,
    /// Role per namespace name.
    #[serde(default)]
    pub roles: BTreeMap<String, Role>,
    /// Hosts, namespaces and every namespace's machines.
    #[serde(default)]
    pub cluster_admin: bool,
}

/// How a token relates to one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Granted,
    /// A role in the namespace, but too small for the operation.
    Forbidden {
        have: Role,
    },
    /// No role there at all: the API answers as if the namespace did not
    /// exist (404), so tenants cannot probe each other's namespace names.
    Hidden,
}

impl Claims {
    /// The bearer's role in `namespace` (a cluster admin is admin everywhere).
    pub fn role_in(&self, namespace: &str) -> Option<Role> {
        if self.cluster_admin { Some(Role::Admin) } else { self.roles.get(namespace).copied() }
    }

    /// Whether the bearer may do something that needs `needed` in
    /// `namespace`.
    pub fn access(&self, namespace: &str, needed: Role) -> Access {
        match self.role_in(namespace) {
            None => Access::Hidden,
            Some(have) if have >= needed => Access::Granted,
            Some(have) => Access::Forbidden { have },
        }
    }
}

/// Why a bearer token is not accepted. All of these are 401s; the messages
/// are meant for the person holding the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send 'Authorization: Bearer <jwt>'")]
    Missing,
    #[error("the Authorization header is not 'Bearer <jwt>'")]
    NotBearer,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token algorithm {0:?} is not accepted (HS256, or RS256 when the controller has a public key)")]
    Algorithm(String),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token has been revoked")]
    Revoked,
}

/// Configuration problems with the keys, found at start.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the HS256 secret must be at least 32 bytes (it is {0})")]
    ShortSecret(usize),
    #[error("the RS256 public key is not a PEM RSA public key: {0}")]
    RsaKey(#[source] jsonwebtoken::errors::Error),
}

/// The keys the controller checks tokens with and mints them with.
pub struct Keys {
    hs_decoding: DecodingKey,
    hs_encoding: EncodingKey,
    rs_decoding: Option<DecodingKey>,
}

/// Seconds of clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;

impl Keys {
    pub fn new(hs256_secret: &[u8], rs256_public_pem: Option<&[u8]>) -> Result<Keys, KeyError> {
        if hs256_secret.len() < 32 {
            return Err(KeyError::ShortSecret(hs256_secret.len()));
        }
        let rs_decoding = rs256_public_pem.map(DecodingKey::from_rsa_pem).transpose().map_err(KeyError::RsaKey)?;
        Ok(Keys {
            hs_decoding: DecodingKey::from_secret(hs256_secret),
            hs_encoding: EncodingKey::from_secret(hs256_secret),
            rs_decoding,
        })
    }

    /// Checks the signature and times of `token` (not revocation).
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        let key = match header.alg {
            Algorithm::HS256 => &self.hs_decoding,
            Algorithm::RS256 => self.rs_decoding.as_ref().ok_or(AuthError::Algorithm("RS256".into()))?,
            other => return Err(AuthError::Algorithm(format!("{other:?}"))),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        // No audience is configured; an `aud` claim is not an error.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            _ => AuthError::Malformed(e.to_string()),
        })?;
        Ok(data.claims)
    }

    /// Signs `claims` with the HS256 secret.
    pub fn mint(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.hs_encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn claims(exp_in: i64) -> Claims {
        Claims {
            sub: "alice".into(),
            jti: "t1".into(),
            exp: chrono::Utc::now().timestamp() + exp_in,
            iat: None,
            roles: [("prod".to_string(), Role::Operator)].into(),
            cluster_admin: false,
        }
    }

    #[test]
    fn round_trip_and_roles() {
        let keys = Keys::new(SECRET, None).unwrap();
        let token = keys.mint(&claims(60));
        let back = keys.verify(&token).unwrap();
        assert_eq!(back.sub, "alice");
        assert_eq!(back.access("prod", Role::Viewer), Access::Granted);
        assert_eq!(back.access("prod", Role::Operator), Access::Granted);
        assert_eq!(back.access("prod", Role::Admin), Access::Forbidden { have: Role::Operator });
        assert_eq!(back.access("other", Role::Viewer), Access::Hidden);
    }

    #[test]
    fn cluster_admin_is_admin_everywhere() {
        let mut c = claims(60);
        c.cluster_admin = true;
        assert_eq!(c.access("anything", Role::Admin), Access::Granted);
    }

    #[test]
    fn rejects_expired_and_foreign_tokens() {
        let keys = Keys::new(SECRET, None).unwrap();
        assert_eq!(keys.verify(&keys.mint(&claims(-3600))), Err(AuthError::Expired));
        let other = Keys::new(b"another secret that is long enough!", None).unwrap();
        assert_eq!(keys.verify(&other.mint(&claims(60))), Err(AuthError::BadSignature));
        assert!(matches!(keys.verify("not.a.jwt"), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn rs256_needs_a_configured_key() {
        // The header names RS256; without a public key that is refused
        // before any signature check.
        let header = base64_url(br#"{"alg":"RS256","typ":"JWT"}"#);
        let body = base64_url(br#"{"sub":"x","jti":"y","exp":9999999999}"#);
        let keys = Keys::new(SECRET, None).unwrap();
        assert_eq!(keys.verify(&format!("{header}.{body}.c2ln")), Err(AuthError::Algorithm("RS256".into())));
    }

    #[test]
    fn short_secret_is_refused() {
        assert!(matches!(Keys::new(b"short", None), Err(KeyError::ShortSecret(5))));
    }

    fn base64_url(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }
}
