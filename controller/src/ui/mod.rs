//! The dashboard under `/ui/`: server-rendered HTML over the REST API's
//! own handlers.
//!
//! **Why maud.** Pages are Rust expressions checked at compile time: no
//! template files to ship or get out of step with the structs they print,
//! and every `(value)` spliced into a page is HTML-escaped unless it is
//! wrapped in `PreEscaped`, which this module uses only for its own
//! constants. Askama would do as well; maud needs no template directory and
//! no second syntax for loops over the API's types.
//!
//! **No second path.** Every page and every action calls the `/v1`
//! handler function itself (`api::machines::stop`, `api::hosts::drain`, …)
//! with the caller the session holds, so RBAC, validation, leases and the
//! state machine are the API's, not a copy of them. Reading is the same:
//! the machines page pages with the API's `page_token`.
//!
//! **Auth** (`session`). `/ui/login` takes an API token and checks it with
//! the API's own `Caller` extractor (signature, expiry, claims, revocation,
//! rate limit); the token is then kept in an HttpOnly, SameSite=Strict,
//! Path=/ui cookie (Secure when the request came over TLS) and every page
//! checks it the same way again, so a revoked token is logged out at once.
//!
//! **CSRF.** Two layers: the cookie is SameSite=Strict, so a cross-site
//! form post carries no session at all; and every POST (but the login,
//! which has no session to ride on) must carry the session's CSRF token in
//! a hidden `csrf` field, checked by the `Submitted` extractor every
//! action handler takes. The token is a SHA-256 of the session's bearer
//! token under a domain tag: unguessable without the cookie, stateless,
//! and useless for anything but this check.
//!
//! **JavaScript** is optional. Pages read and act without it (plain links
//! and forms; each action's GET is its confirmation page). With it, htmx
//! (2.0.11, 0BSD, from the npm registry's `htmx.org` package, compiled in
//! with `include_bytes!`: no CDN, nothing fetched at run time) re-reads the
//! machines table and a machine's state and events every 5 s. htmx's
//! `eval` and inline styles are turned off, so the pages run under a CSP
//! of `script-src 'self'; style-src 'self'`.

mod admin;
mod layout;
mod machines;
mod session;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::api::AppState;
use crate::api::problem::ApiError;

const HTMX: &[u8] = include_bytes!("assets/htmx.min.js");
const STYLE: &str = include_str!("assets/style.css");

/// What a dashboard handler can fail with. Each renders as a page (or,
/// for a missing session, a redirect to the login).
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error("no session: log in")]
    LoggedOut,
    #[error("{}", .0.detail)]
    Api(ApiError),
    #[error("this form is stale or was not sent by this dashboard (CSRF token missing or wrong); reload the page")]
    Csrf,
    #[error("{0}")]
    BadForm(String),
}

impl From<ApiError> for UiError {
    fn from(error: ApiError) -> UiError {
        if error.status == StatusCode::UNAUTHORIZED { UiError::LoggedOut } else { UiError::Api(error) }
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let status = match &self {
            UiError::LoggedOut => return Redirect::to("/ui/login").into_response(),
            UiError::Api(error) => error.status,
            UiError::Csrf => StatusCode::FORBIDDEN,
            UiError::BadForm(_) => StatusCode::BAD_REQUEST,
        };
        let mut response = (status, layout::error_page(status, &self.to_string())).into_response();
        if let UiError::Api(ApiError { retry_after: Some(seconds), .. }) = self {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

pub type UiResult<T = Response> = Result<T, UiError>;

/// The dashboard's routes, with their security headers and the API's
/// request metrics. Merged beside the API's layers rather than under them:
/// the API rewrites every error into a problem document, and the
/// dashboard's errors are pages.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/machines") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/machines") }))
        .route("/ui/assets/htmx.min.js", get(|| async { asset("text/javascript; charset=utf-8", HTMX) }))
        .route("/ui/assets/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE.as_bytes()) }))
        .route("/ui/login", get(session::login_page).post(session::login))
        .route("/ui/logout", post(session::logout))
        .route("/ui/machines", get(machines::list))
        .route("/ui/machines/{namespace}/{id}", get(machines::show))
        .route("/ui/machines/{namespace}/{id}/logs", get(machines::logs))
        .route("/ui/machines/{namespace}/{id}/{action}", get(machines::confirm).post(machines::act))
        .route("/ui/hosts", get(admin::hosts))
        .route("/ui/hosts/{name}/{action}", get(admin::confirm_host).post(admin::host_action))
        .route("/ui/namespaces", get(admin::namespaces).post(admin::create_namespace))
        .route("/ui/namespaces/{namespace}/delete", get(admin::confirm_namespace).post(admin::delete_namespace))
        .route("/ui/tokens", get(admin::tokens).post(admin::create_token))
        .route("/ui/tokens/{jti}/revoke", get(admin::confirm_revoke).post(admin::revoke_token))
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::middleware::from_fn_with_state(state.metrics.clone(), crate::metrics::track))
        .layer(DefaultBodyLimit::max(session::MAX_FORM_BYTES))
        .with_state(state)
}

/// A compiled-in file; cacheable for an hour (it changes only with the
/// binary).
fn asset(content_type: &'static str, bytes: &'static [u8]) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=3600")], bytes).into_response()
}

/// CSP without inline scripts or styles (htmx's are switched off), no
/// framing, no referrer, and no caching of pages (they hold CSRF tokens
/// and, once, a new API token).
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let set = |headers: &mut axum::http::HeaderMap, name, value: &'static str| {
        headers.entry(name).or_insert(HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::REFERRER_POLICY, "no-referrer");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(headers, header::CACHE_CONTROL, "no-store");
    response
}
