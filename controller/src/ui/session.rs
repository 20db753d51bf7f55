//! The dashboard's session: an API token in a cookie, checked on every
//! request by the API's own `Caller` extractor, and the CSRF token derived
//! from it.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::{UiError, UiResult, layout};
use crate::api::AppState;
use crate::api::extract::Caller;

pub const COOKIE: &str = "mm_session";
/// The hidden form field every POST but the login carries.
pub const CSRF_FIELD: &str = "csrf";
/// A form body larger than this is refused (the biggest form is the token
/// form, well under 4 KiB).
pub const MAX_FORM_BYTES: usize = 16 * 1024;

/// A logged-in dashboard user: the API's `Caller` for the cookie's token.
#[derive(Debug, Clone)]
pub struct Session {
    pub caller: Caller,
    token: String,
    pub csrf: String,
}

impl Session {
    /// Checks `token` exactly as the API checks a bearer token, by running
    /// the API's `Caller` extractor on a request carrying it.
    async fn open(state: &Arc<AppState>, token: &str) -> UiResult<Session> {
        let caller = Caller::from_request_parts(&mut bearer_parts(token)?, state).await?;
        Ok(Session { caller, token: token.to_owned(), csrf: csrf_for(token) })
    }

    /// Headers for an API handler that reads them (logs forwards the
    /// caller's `Authorization` to the controller holding the host).
    pub fn bearer_headers(&self) -> HeaderMap {
        bearer_parts(&self.token).map(|p| p.headers).unwrap_or_default()
    }
}

/// A request's parts with only `Authorization: Bearer <token>`.
fn bearer_parts(token: &str) -> UiResult<Parts> {
    let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| UiError::LoggedOut)?;
    let (parts, ()) =
        Request::builder().header(header::AUTHORIZATION, value).body(()).map_err(|_| UiError::LoggedOut)?.into_parts();
    Ok(parts)
}

/// The session's CSRF token. Derived rather than stored: a cross-site page
/// can read neither the cookie nor this, and a leaked form reveals nothing
/// about the bearer token (SHA-256 is one-way).
fn csrf_for(token: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(b"mm-ui-csrf\0");
    hash.update(token.as_bytes());
    URL_SAFE_NO_PAD.encode(hash.finalize())
}

/// Compares without an early exit, so timing says nothing about how much
/// of a guess was right.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|value| !value.is_empty())
}

impl FromRequestParts<Arc<AppState>> for Session {
    type Rejection = UiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let token = cookie_token(&parts.headers).ok_or(UiError::LoggedOut)?;
        Session::open(state, &token).await
    }
}

/// A POSTed form from a logged-in session whose CSRF field matches. Every
/// action handler takes one, so none can skip the check.
pub struct Submitted {
    pub session: Session,
    pub fields: HashMap<String, String>,
}

impl Submitted {
    pub fn field(&self, name: &str) -> &str {
        self.fields.get(name).map(String::as_str).unwrap_or("")
    }
}

async fn form_fields(request: Request, state: &Arc<AppState>) -> UiResult<HashMap<String, String>> {
    let bytes = Bytes::from_request(request, state).await.map_err(|e| UiError::BadForm(e.body_text()))?;
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

impl FromRequest<Arc<AppState>> for Submitted {
    type Rejection = UiError;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = request.into_parts();
        let session = Session::from_request_parts(&mut parts, state).await?;
        let fields = form_fields(Request::from_parts(parts, body), state).await?;
        let sent = fields.get(CSRF_FIELD).map(String::as_str).unwrap_or("");
        if !same(sent, &session.csrf) {
            return Err(UiError::Csrf);
        }
        Ok(Submitted { session, fields })
    }
}

/// Whether the request reached us over TLS: the controller serves plain
/// HTTP, so that means a TLS-terminating proxy that says so.
fn over_tls(headers: &HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    header("x-forwarded-proto") == "https" || header("forwarded").contains("proto=https")
}

fn session_cookie(value: &str, max_age: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    HeaderValue::from_str(&cookie).expect("token characters were checked")
}

pub async fn login_page(session: Result<Session, UiError>) -> Response {
    match session {
        Ok(_) => Redirect::to("/ui/machines").into_response(),
        Err(_) => layout::login_page(None).into_response(),
    }
}

/// Checks the token and sets the cookie. No CSRF field here: there is no
/// session yet for a forged post to ride on.
pub async fn login(State(state): State<Arc<AppState>>, headers: HeaderMap, request: Request) -> UiResult {
    let fields = form_fields(request, &state).await?;
    let token = fields.get("token").map(|t| t.trim()).unwrap_or("");
    let refused = |why: &str| (StatusCode::UNAUTHORIZED, layout::login_page(Some(why))).into_response();
    // JWTs are base64url and dots; anything else could not be a cookie
    // value (and is no token this API issued).
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Ok(refused("That is not an API token."));
    }
    let session = match Session::open(&state, token).await {
        Ok(session) => session,
        Err(UiError::LoggedOut) => return Ok(refused("That token was refused (invalid, expired or revoked).")),
        Err(other) => return Err(other),
    };
    let max_age = (session.caller.0.exp - chrono::Utc::now().timestamp()).max(0);
    let mut response = Redirect::to("/ui/machines").into_response();
    response.headers_mut().insert(header::SET_COOKIE, session_cookie(token, max_age, over_tls(&headers)));
    Ok(response)
}

/// Forgets the cookie (the token itself stays valid: it is the user's,
/// and may be in use elsewhere; revoke it on the tokens page).
pub async fn logout(headers: HeaderMap, _: Submitted) -> Response {
    let mut response = Redirect::to("/ui/login").into_response();
    response.headers_mut().insert(header::SET_COOKIE, session_cookie("", 0, over_tls(&headers)));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_parsing_and_csrf() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=b; mm_session=tok.en; c=d"));
        assert_eq!(cookie_token(&headers).as_deref(), Some("tok.en"));
        headers.insert(header::COOKIE, HeaderValue::from_static("mm_session="));
        assert_eq!(cookie_token(&headers), None);
        assert!(same(&csrf_for("x"), &csrf_for("x")));
        assert!(!same(&csrf_for("x"), &csrf_for("y")));
        assert!(!same("", &csrf_for("x")));
    }
}
