//! `exec` and `logs` through the controller (controller → broker → guest).
//!
//! The controller answers both in one piece: exec once the command has
//! ended (its output in the answer), logs as the console's last 4 MiB. So
//! `logs -f` (and a foreground `run`) polls, printing what is new, until the
//! machine stops. A controller without these routes answers `no-route`;
//! that becomes "the controller does not offer ... yet" and exit code 8, so
//! a script can tell "not possible here" from "failed".

use std::io::{Read, Write};
use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{Api, ApiError, decode};
use crate::client::{CliError, exit};

/// How often `logs -f` asks again.
const FOLLOW_POLL: Duration = Duration::from_secs(1);
/// The end of what was printed that a new snapshot is aligned on.
const OVERLAP: usize = 4096;
/// The controller's limits: stdin of an exec, and its longest timeout (an
/// admin's command should not die after the default 30 s; local exec has
/// no limit at all).
const MAX_STDIN: usize = 65536;
const EXEC_TIMEOUT_SECS: u64 = 300;

fn not_offered(what: &str, e: ApiError) -> CliError {
    if e.is_no_route() {
        return CliError::new(exit::UNSUPPORTED, format!("the controller does not offer {what} yet"));
    }
    e.into()
}

fn print(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (`mmctl logs | head`) ends the stream quietly.
    if out.write_all(bytes).and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

async fn snapshot(api: &Api, id: &str) -> Result<Vec<u8>, ApiError> {
    let url = api.machines_url(&[id, "logs"]);
    let response = api.send(false, || api.request(Method::GET, url.clone())).await?;
    let bytes = response.bytes().await.map_err(|e| ApiError::Transport {
        message: format!("reading the console log from the controller: {e}"),
        unreachable: false,
    })?;
    Ok(bytes.to_vec())
}

/// What of `snapshot` follows `tail`, the end of what was printed, which
/// ended at byte `end` of the previous snapshot. The snapshot is the
/// console's last few MiB, so between two polls it may gain bytes at its end
/// and lose as many at its start: `tail` is searched for at `end` or before
/// it (the nearest such place, so a repeated line is not mistaken for the
/// last one printed). `None` when they no longer overlap (more was written
/// between two polls than the controller keeps).
fn new_part<'a>(tail: &[u8], end: usize, snapshot: &'a [u8]) -> Option<&'a [u8]> {
    if tail.is_empty() {
        return Some(&snapshot[end.min(snapshot.len())..]);
    }
    let last = end.checked_sub(tail.len())?.min(snapshot.len().checked_sub(tail.len())?);
    (0..=last).rev().find(|&i| &snapshot[i..i + tail.len()] == tail).map(|i| &snapshot[i + tail.len()..])
}

/// Prints the console; with `follow`, polls for more until the machine is
/// no longer starting or started. Returns the machine's state at the end
/// when following.
pub async fn logs(api: &Api, id: &str, follow: bool) -> Result<Option<String>, CliError> {
    let first = snapshot(api, id).await.map_err(|e| not_offered("logs", e))?;
    print(&first);
    if !follow {
        return Ok(None);
    }
    let mut tail = first[first.len().saturating_sub(OVERLAP)..].to_vec();
    let mut end = first.len();
    loop {
        tokio::time::sleep(FOLLOW_POLL).await;
        // The state first: a machine seen stopped has written its last.
        let state = super::get(api, id).await?.state;
        let running = matches!(state.as_str(), "starting" | "started");
        let next = match snapshot(api, id).await {
            Ok(next) => next,
            // Gone from its host (stopped and cleaned up, destroyed).
            Err(ApiError::Problem(p)) if p.status == 409 && !running => return Ok(Some(state)),
            Err(e) => return Err(e.into()),
        };
        match new_part(&tail, end, &next) {
            Some(new) => print(new),
            None => {
                print(b"\n[mmctl: more was logged between two polls than the controller keeps; some is missing]\n");
                print(&next);
            }
        }
        end = next.len();
        tail = next[next.len().saturating_sub(OVERLAP)..].to_vec();
        if !running {
            return Ok(Some(state));
        }
    }
}

pub struct ExecRequest {
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Forward our stdin (read to its end first: the controller takes it
    /// whole, with the request).
    pub stdin: bool,
}

/// The command's end and what it printed.
#[derive(Debug, Deserialize)]
struct ExecResult {
    exit_code: Option<i32>,
    #[serde(default)]
    exit_signal: Option<i32>,
    #[serde(default)]
    stdout: String,
    #[serde(default)]
    stderr: String,
    #[serde(default)]
    truncated: bool,
}

/// Runs the command and exits with its code (128 + N after signal N, as
/// shells do), its output copied to ours.
pub async fn exec(api: &Api, id: &str, request: ExecRequest) -> Result<i32, CliError> {
    let mut body = json!({ "command": request.command, "timeout": EXEC_TIMEOUT_SECS });
    if !request.env.is_empty() {
        body["env"] = Value::Object(request.env.into_iter().map(|(k, v)| (k, Value::String(v))).collect());
    }
    if request.stdin {
        let mut input = Vec::new();
        std::io::stdin()
            .take(MAX_STDIN as u64 + 1)
            .read_to_end(&mut input)
            .map_err(|e| CliError::new(exit::ERROR, format!("reading stdin: {e}")))?;
        if input.len() > MAX_STDIN {
            return Err(CliError::new(
                exit::INVALID,
                format!("exec through the controller takes at most {MAX_STDIN} bytes of stdin"),
            ));
        }
        let text = String::from_utf8(input)
            .map_err(|_| CliError::new(exit::INVALID, "exec through the controller takes text (UTF-8) on stdin"))?;
        body["stdin"] = Value::String(text);
    }
    let url = api.machines_url(&[id, "exec"]);
    let response = api
        .send(false, || api.request(Method::POST, url.clone()).json(&body))
        .await
        .map_err(|e| not_offered("exec", e))?;
    let result: ExecResult = decode(response).await?;
    print(result.stdout.as_bytes());
    let _ = std::io::stderr().write_all(result.stderr.as_bytes());
    if result.truncated {
        eprintln!("mmctl: note: the controller dropped output beyond 1 MiB per stream");
    }
    match (result.exit_code, result.exit_signal) {
        (Some(code), _) => Ok(code),
        (None, Some(signal)) => Ok(128 + signal),
        (None, None) => Err(CliError::new(exit::ERROR, "the controller did not say how the command ended")),
    }
}

#[cfg(test)]
mod tests {
    use super::new_part;

    #[test]
    fn follows_a_growing_and_rolling_log() {
        assert_eq!(new_part(b"", 0, b"abc"), Some(&b"abc"[..]));
        assert_eq!(new_part(b"abc", 3, b"abcdef"), Some(&b"def"[..]));
        assert_eq!(new_part(b"abc", 3, b"abc"), Some(&b""[..]));
        // Two bytes rolled off the start, three came at the end.
        assert_eq!(new_part(b"cd", 4, b"cdefg"), Some(&b"efg"[..]));
        // Rolled past what was printed.
        assert_eq!(new_part(b"bc", 3, b"defgh"), None);
        // A line repeated after what was printed is new, not the old one.
        assert_eq!(new_part(b"x\n", 2, b"x\nx\ny"), Some(&b"x\ny"[..]));
    }
}
