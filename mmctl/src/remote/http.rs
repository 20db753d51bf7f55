//! The controller's REST API as mmctl calls it: URLs built segment by
//! segment (a name with a `/` cannot reach another route), the bearer
//! token, the retries that are safe, and RFC 9457 problem documents turned
//! into one line and one of mmctl's exit codes.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::client::{CliError, exit};

/// 429 and 503 answers waited out (each as long as `Retry-After` says,
/// capped by `MAX_RETRY_WAIT`) before giving up: enough to ride out a burst
/// of a script's calls, not so many that a stuck controller hangs a user.
const MAX_BUSY_RETRIES: u32 = 5;
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);
/// A 503 is retried only when it asks for at most this long: a controller
/// shutting down or a database connection blip (1 s) passes quickly; a
/// host whose broker is not connected (5 s) is better reported at once.
const MAX_UNAVAILABLE_WAIT: Duration = Duration::from_secs(2);
/// The pause before the one retry after a failed connection.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// Connecting is quick or broken; reading is bounded per call instead
/// (waits hold a request open for as long as they ask).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the controller says went wrong (RFC 9457), as far as mmctl cares.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Problem {
    /// `urn:micromachines:problem:<kind>`.
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub request_id: String,
}

impl Problem {
    /// The kind without its URN prefix (`not-found`, `no-route`, ...).
    pub fn short_kind(&self) -> &str {
        self.kind.strip_prefix("urn:micromachines:problem:").unwrap_or(&self.kind)
    }

    /// An answer without a problem document (a proxy's error page, say).
    fn plain(status: StatusCode, body: &str) -> Problem {
        let text: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
        let detail = if text.is_empty() || text.len() > 200 {
            status.canonical_reason().unwrap_or("error").to_string()
        } else {
            text
        };
        Problem { kind: String::new(), status: status.as_u16(), detail, request_id: String::new() }
    }
}

/// A call that did not succeed.
#[derive(Debug)]
pub enum ApiError {
    /// The controller answered with an error.
    Problem(Problem),
    /// No usable answer: `unreachable` when no connection could be made.
    Transport { message: String, unreachable: bool },
}

impl ApiError {
    /// True when the controller has no such route: an older controller
    /// lacking a verb (the router's fallback says `no-route`).
    pub fn is_no_route(&self) -> bool {
        matches!(self, ApiError::Problem(p) if p.short_kind() == "no-route"
            || p.status == StatusCode::METHOD_NOT_ALLOWED.as_u16())
    }
}

impl From<ApiError> for CliError {
    fn from(e: ApiError) -> CliError {
        let p = match e {
            ApiError::Transport { message, unreachable: true } => return CliError::new(exit::NO_BROKER, message),
            ApiError::Transport { message, unreachable: false } => return CliError::new(exit::ERROR, message),
            ApiError::Problem(p) => p,
        };
        let code = match (p.status, p.short_kind()) {
            (401 | 403, _) => exit::NOT_AUTHORIZED,
            (404, "no-route") => exit::UNSUPPORTED,
            (404, _) => exit::NOT_FOUND,
            // Like a local broker that lacks the memory: no host has room.
            (409, "insufficient-capacity") => exit::NO_MEMORY,
            (409, _) => exit::CONFLICT,
            (400 | 413 | 415 | 422, _) => exit::INVALID,
            // The machine's broker has no session with the controller.
            (503, "host-unavailable") => exit::NO_BROKER,
            _ => exit::ERROR,
        };
        let message = match p.status {
            401 => format!("not authorized: {}", p.detail),
            // Says what it is ("quota exceeded: machines: ...").
            403 if p.short_kind() == "quota-exceeded" => p.detail,
            403 => format!("not allowed: {}", p.detail),
            // A server error is the operator's to look into: the request id
            // finds the controller's log line.
            500.. if !p.request_id.is_empty() => format!("{} (request id {})", p.detail, p.request_id),
            _ => p.detail,
        };
        CliError::new(code, message)
    }
}

/// One controller, one token, one namespace.
pub struct Api {
    http: reqwest::Client,
    base: Url,
    token: String,
    pub namespace: String,
}

fn invalid(message: impl Into<String>) -> CliError {
    CliError::new(exit::INVALID, message)
}

impl Api {
    pub fn new(server: &str, token: Option<String>, namespace: String) -> Result<Api, CliError> {
        let base =
            Url::parse(server).ok().filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host()).ok_or_else(
                || invalid(format!("--server {server:?} is not an http(s) URL (e.g. https://controller:8080)")),
            )?;
        let token = token.filter(|t| !t.trim().is_empty()).ok_or_else(|| {
            CliError::new(exit::NOT_AUTHORIZED, "--server needs a token: set MM_TOKEN (or pass --token)")
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("mmctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::new(exit::ERROR, format!("cannot set up HTTP: {e}")))?;
        Ok(Api { http, base, token: token.trim().to_string(), namespace })
    }

    /// The URL of `segments` under the server's base (each one escaped),
    /// e.g. `["v1", "namespaces", ns, "machines"]`.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.set_query(None);
        url.set_fragment(None);
        {
            let mut path = url.path_segments_mut().expect("an http(s) URL has a path");
            path.pop_if_empty();
            path.extend(segments);
        }
        url
    }

    /// `/v1/namespaces/{ns}/machines[/rest...]`.
    pub fn machines_url(&self, rest: &[&str]) -> Url {
        let mut segments = vec!["v1", "namespaces", &self.namespace, "machines"];
        segments.extend_from_slice(rest);
        self.url(&segments)
    }

    /// Sends `build()`'s request and returns the successful response.
    /// Retries: once after a connection that could not be made (the request
    /// never left), or after any transport failure when `idempotent` (a
    /// create with an `Idempotency-Key`, whose replay returns the same
    /// machine); and after 429/503 as long as `Retry-After` says.
    pub async fn send(&self, idempotent: bool, build: impl Fn() -> RequestBuilder) -> Result<Response, ApiError> {
        let mut reconnected = false;
        let mut busy = 0;
        loop {
            let response = match build().bearer_auth(&self.token).send().await {
                Ok(response) => response,
                Err(e) if !reconnected && (e.is_connect() || idempotent) => {
                    reconnected = true;
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
                Err(e) => return Err(self.transport(e)),
            };
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            let retry_after = retry_after(&response);
            let problem = read_problem(response).await;
            let retryable = status == StatusCode::TOO_MANY_REQUESTS
                || (status == StatusCode::SERVICE_UNAVAILABLE
                    && retry_after.is_some_and(|wait| wait <= MAX_UNAVAILABLE_WAIT));
            if retryable && busy < MAX_BUSY_RETRIES {
                busy += 1;
                tokio::time::sleep(retry_after.unwrap_or(Duration::from_secs(1)).min(MAX_RETRY_WAIT)).await;
                continue;
            }
            return Err(ApiError::Problem(problem));
        }
    }

    fn transport(&self, e: reqwest::Error) -> ApiError {
        // reqwest's Display stops at the outermost layer ("error sending
        // request"); the cause (connection refused, certificate, ...) is
        // what the user needs.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            message = format!("{message}: {cause}");
            source = cause.source();
        }
        if e.is_connect() {
            ApiError::Transport {
                message: format!("cannot reach mm-controller at {}: {message}", self.base),
                unreachable: true,
            }
        } else {
            ApiError::Transport {
                message: format!("talking to mm-controller at {}: {message}", self.base),
                unreachable: false,
            }
        }
    }

    /// The bearer token (for requests reqwest does not make: the exec
    /// WebSocket).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The server's URL as given.
    pub fn base(&self) -> &Url {
        &self.base
    }

    pub fn request(&self, method: Method, url: Url) -> RequestBuilder {
        self.http.request(method, url)
    }

    /// A JSON answer to a request without a body.
    pub async fn get_json<T: DeserializeOwned>(&self, method: Method, url: Url) -> Result<T, CliError> {
        let response = self.send(false, || self.request(method.clone(), url.clone())).await?;
        decode(response).await
    }
}

/// The answer's JSON as `T`, or a clear error if it is not what the API
/// documents.
pub async fn decode<T: DeserializeOwned>(response: Response) -> Result<T, CliError> {
    let url = response.url().path().to_string();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| CliError::new(exit::ERROR, format!("reading the controller's answer to {url}: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        CliError::new(exit::ERROR, format!("the controller's answer to {url} is not what mmctl expects: {e}"))
    })
}

/// `Retry-After` in seconds (the controller never sends an HTTP date).
fn retry_after(response: &Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

async fn read_problem(response: Response) -> Problem {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<Problem>(&text) {
        Ok(mut p) if !p.detail.is_empty() => {
            p.status = status.as_u16();
            // One line, whatever the detail holds.
            p.detail = p.detail.split_whitespace().collect::<Vec<_>>().join(" ");
            p
        }
        _ => Problem::plain(status, &text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(status: u16, kind: &str, detail: &str) -> CliError {
        ApiError::Problem(Problem {
            kind: format!("urn:micromachines:problem:{kind}"),
            status,
            detail: detail.into(),
            request_id: "r1".into(),
        })
        .into()
    }

    #[test]
    fn statuses_map_to_exit_codes() {
        let cases = [
            (400, "bad-request", exit::INVALID),
            (401, "unauthorized", exit::NOT_AUTHORIZED),
            (403, "forbidden", exit::NOT_AUTHORIZED),
            (404, "not-found", exit::NOT_FOUND),
            (404, "no-route", exit::UNSUPPORTED),
            (408, "wait-timeout", exit::ERROR),
            (409, "conflict", exit::CONFLICT),
            (409, "invalid-state", exit::CONFLICT),
            (409, "insufficient-capacity", exit::NO_MEMORY),
            (413, "payload-too-large", exit::INVALID),
            (422, "invalid-request", exit::INVALID),
            (429, "rate-limited", exit::ERROR),
            (500, "internal", exit::ERROR),
            (503, "database-unavailable", exit::ERROR),
            (503, "host-unavailable", exit::NO_BROKER),
        ];
        for (status, kind, code) in cases {
            assert_eq!(problem(status, kind, "x").code, code, "{status} {kind}");
        }
        assert_eq!(problem(401, "unauthorized", "token expired").message, "not authorized: token expired");
        assert_eq!(problem(500, "internal", "boom").message, "boom (request id r1)");
        assert_eq!(problem(404, "not-found", "machine not found").message, "machine not found");
    }

    #[test]
    fn urls_escape_each_segment() {
        let api = Api::new("http://127.0.0.1:1/base/", Some("t".into()), "a/b".into()).unwrap();
        assert_eq!(api.machines_url(&["x y"]).as_str(), "http://127.0.0.1:1/base/v1/namespaces/a%2Fb/machines/x%20y");
        let api = Api::new("https://c.example", Some("t".into()), "prod".into()).unwrap();
        assert_eq!(api.machines_url(&[]).as_str(), "https://c.example/v1/namespaces/prod/machines");
    }

    #[test]
    fn bad_server_or_missing_token() {
        assert_eq!(Api::new("127.0.0.1:8080", Some("t".into()), "d".into()).err().unwrap().code, exit::INVALID);
        assert_eq!(Api::new("ftp://x", Some("t".into()), "d".into()).err().unwrap().code, exit::INVALID);
        assert_eq!(Api::new("http://x", None, "d".into()).err().unwrap().code, exit::NOT_AUTHORIZED);
        assert_eq!(Api::new("http://x", Some(" ".into()), "d".into()).err().unwrap().code, exit::NOT_AUTHORIZED);
    }

    #[test]
    fn plain_error_pages_become_one_line() {
        let p = Problem::plain(StatusCode::BAD_GATEWAY, "<html>\n bad\n gateway </html>");
        assert_eq!(p.detail, "<html> bad gateway </html>");
        let p = Problem::plain(StatusCode::BAD_GATEWAY, &"x".repeat(500));
        assert_eq!(p.detail, "Bad Gateway");
    }
}
