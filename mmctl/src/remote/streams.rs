//! `exec` and `logs` through the controller (controller → broker → guest).
//! A controller without these routes answers `no-route`; that becomes
//! "the controller does not offer ... yet" and exit code 8, so a script can
//! tell "not possible here" from "failed".

use std::io::Write;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{Api, ApiError, decode};
use crate::client::{CliError, exit};

fn not_offered(what: &str, e: ApiError) -> CliError {
    if e.is_no_route() {
        return CliError::new(exit::UNSUPPORTED, format!("the controller does not offer {what} yet"));
    }
    e.into()
}

/// Copies the console into stdout as it arrives; with `follow` the
/// controller keeps the answer open until the machine stops.
pub async fn logs(api: &Api, id: &str, follow: bool) -> Result<(), CliError> {
    let mut url = api.machines_url(&[id, "logs"]);
    if follow {
        url.query_pairs_mut().append_pair("follow", "true");
    }
    let mut response =
        api.send(false, || api.request(Method::GET, url.clone())).await.map_err(|e| not_offered("logs", e))?;
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|e| CliError::new(exit::ERROR, format!("the controller's log stream broke off: {e}")))?;
        let Some(chunk) = chunk else { return Ok(()) };
        let mut out = std::io::stdout().lock();
        // A closed stdout (`mmctl logs | head`) ends the stream quietly.
        if out.write_all(&chunk).and_then(|()| out.flush()).is_err() {
            std::process::exit(0);
        }
    }
}

pub struct ExecRequest {
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// The command's end and what it printed.
#[derive(Debug, Deserialize)]
struct ExecResult {
    exit_code: Option<i32>,
    #[serde(default)]
    signal: Option<i32>,
    #[serde(default)]
    stdout: String,
    #[serde(default)]
    stderr: String,
}

/// Runs the command and exits with its code (128 + N after signal N, as
/// shells do), its output copied to ours.
pub async fn exec(api: &Api, id: &str, request: ExecRequest) -> Result<i32, CliError> {
    let mut body = json!({ "command": request.command });
    if !request.env.is_empty() {
        body["env"] = Value::Object(request.env.into_iter().map(|(k, v)| (k, Value::String(v))).collect());
    }
    if let Some(workdir) = request.workdir {
        body["workdir"] = Value::String(workdir);
    }
    if let Some(user) = request.user {
        body["user"] = Value::String(user);
    }
    let url = api.machines_url(&[id, "exec"]);
    let response = api
        .send(false, || api.request(Method::POST, url.clone()).json(&body))
        .await
        .map_err(|e| not_offered("exec", e))?;
    let result: ExecResult = decode(response).await?;
    let _ = std::io::stdout().write_all(result.stdout.as_bytes());
    let _ = std::io::stderr().write_all(result.stderr.as_bytes());
    match (result.exit_code, result.signal) {
        (Some(code), _) => Ok(code),
        (None, Some(signal)) => Ok(128 + signal),
        (None, None) => Err(CliError::new(exit::ERROR, "the controller did not say how the command ended")),
    }
}
