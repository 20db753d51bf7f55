//! `logs` through the controller (controller → broker → guest console).
//!
//! Without `-f` the controller answers the console's last 4 MiB; with it,
//! `?follow=true` streams all of it and then new output as it is written,
//! until the microVM stops. A controller without the route answers
//! `no-route`; that becomes "the controller does not offer ... yet" and
//! exit code 8, so a script can tell "not possible here" from "failed".
//! (`exec` is `exec_ws`.)

use std::io::Write;
use std::time::Duration;

use reqwest::Method;

use super::http::{Api, ApiError};
use crate::client::{CliError, exit};

/// After the stream ends the machine's state catches up (the broker
/// reports the stop): how long to wait for it, and how often to look.
const SETTLE: Duration = Duration::from_secs(10);
const SETTLE_POLL: Duration = Duration::from_millis(250);

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

fn broken(e: reqwest::Error) -> CliError {
    CliError::new(exit::ERROR, format!("the console log from the controller broke off: {e}"))
}

/// Prints the console; with `follow`, streams it until the microVM stops.
/// Returns the machine's state at the end when following.
pub async fn logs(api: &Api, id: &str, follow: bool) -> Result<Option<String>, CliError> {
    let mut url = api.machines_url(&[id, "logs"]);
    if follow {
        url.set_query(Some("follow=true"));
    }
    let mut response =
        api.send(false, || api.request(Method::GET, url.clone())).await.map_err(|e| not_offered("logs", e))?;
    while let Some(chunk) = response.chunk().await.map_err(broken)? {
        print(&chunk);
    }
    if !follow {
        return Ok(None);
    }
    // The microVM has stopped; its machine leaves `started` once the
    // broker's report is in.
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let state = super::get(api, id).await?.state;
        if !matches!(state.as_str(), "starting" | "started") || tokio::time::Instant::now() >= deadline {
            return Ok(Some(state));
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}
