//! The machines list, a machine's page, its console log and its actions,
//! each a call of the `/v1` handler that serves the same thing.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, RawQuery, State};
use axum::response::{IntoResponse, Redirect};
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use super::layout::{self, Nav};
use super::session::{Session, Submitted};
use super::{UiError, UiResult};
use crate::api::extract::LeaseNonce;
use crate::api::machines::{self as api, DeleteQuery, Machine};
use crate::api::problem::ApiError;
use crate::api::{AppState, exec, namespaces, snapshots};
use crate::auth::{Access, Role};
use crate::machine::MachineState;

const DEFAULT_PAGE_SIZE: i64 = 50;
/// With a host filter (which the API's listing lacks) the page is filled
/// from successive API pages; this bounds the machines one request reads.
const HOST_SCAN_LIMIT: usize = 5000;
/// Events shown on a machine's page, newest first.
const EVENTS_SHOWN: usize = 200;

/// The list's query string. Empty values (a form's untouched fields) mean
/// "no filter".
#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    namespace: Option<String>,
    state: Option<String>,
    host: Option<String>,
    page_token: Option<String>,
    page_size: Option<i64>,
}

fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn list_url(namespace: &str, params: &ListParams, page_token: Option<&str>) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("namespace", namespace);
    if let Some(state) = given(&params.state) {
        query.append_pair("state", state);
    }
    if let Some(host) = given(&params.host) {
        query.append_pair("host", host);
    }
    if let Some(size) = params.page_size {
        query.append_pair("page_size", &size.to_string());
    }
    if let Some(token) = page_token {
        query.append_pair("page_token", token);
    }
    format!("/ui/machines?{}", query.finish())
}

/// The API listing's query string.
fn api_query(state: Option<&str>, page_size: i64, page_token: Option<&str>) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(state) = state {
        query.append_pair("state", state);
    }
    query.append_pair("page_size", &page_size.to_string());
    if let Some(token) = page_token {
        query.append_pair("page_token", token);
    }
    query.finish()
}

/// One page of a namespace's machines through `GET /v1/.../machines`,
/// filtered by host when asked: then API pages are read until the page is
/// full, the listing ends or `HOST_SCAN_LIMIT` machines were looked at.
/// The page token is always the API's, so every machine shows up once.
async fn machines_page(
    state: &Arc<AppState>,
    session: &Session,
    namespace: &str,
    params: &ListParams,
) -> UiResult<(Vec<Machine>, Option<String>)> {
    let page_size = params.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
    let host = given(&params.host);
    let mut token = given(&params.page_token).map(str::to_owned);
    let (mut machines, mut scanned) = (Vec::new(), 0);
    loop {
        let query = api_query(given(&params.state), page_size, token.as_deref());
        let Json(page) =
            api::list(State(state.clone()), session.caller.clone(), Path(namespace.to_owned()), RawQuery(Some(query)))
                .await?;
        scanned += page.machines.len();
        machines.extend(page.machines.into_iter().filter(|m| host.is_none_or(|h| m.host.as_deref() == Some(h))));
        token = page.next_page_token;
        if host.is_none() || token.is_none() || machines.len() as i64 >= page_size || scanned >= HOST_SCAN_LIMIT {
            return Ok((machines, token));
        }
    }
}

/// `/ui/machines`: one namespace's machines (the first the caller may read
/// unless one is chosen), filtered by state and host, a page at a time.
pub async fn list(
    State(state): State<Arc<AppState>>,
    session: Session,
    Query(params): Query<ListParams>,
) -> UiResult<Markup> {
    let Json(readable) = namespaces::list(State(state.clone()), session.caller.clone()).await?;
    let names: Vec<String> = readable.namespaces.into_iter().map(|n| n.name).collect();
    let Some(namespace) = given(&params.namespace).map(str::to_owned).or_else(|| names.first().cloned()) else {
        let body = html! { h1 { "Machines" } p { "You have no role in any namespace yet." } };
        return Ok(layout::page("Machines", Nav::Machines, &session, body));
    };
    let (machines, next) = machines_page(&state, &session, &namespace, &params).await?;
    let here = list_url(&namespace, &params, given(&params.page_token));
    let body = html! {
        h1 { "Machines" }
        form.filters method="get" action="/ui/machines" role="search" aria-label="Filter machines" {
            label { "Namespace " select name="namespace" {
                @for name in &names { option value=(name) selected[*name == namespace] { (name) } }
            } }
            label { "State " select name="state" {
                option value="" { "any but destroyed" }
                @for s in MachineState::ALL {
                    option value=(s.as_str()) selected[given(&params.state) == Some(s.as_str())] { (s.as_str()) }
                }
            } }
            label { "Host " input type="text" name="host" value=[given(&params.host)] size="16"; }
            @if let Some(size) = params.page_size { input type="hidden" name="page_size" value=(size); }
            button type="submit" { "Filter" }
        }
        table {
            caption { "Machines in " (namespace) @if given(&params.page_token).is_some() { " (a later page)" } }
            thead { tr {
                th scope="col" { "Name" } th scope="col" { "State" } th scope="col" { "Host" }
                th scope="col" { "Image" } th scope="col" { "CPUs" } th scope="col" { "Memory" }
                th scope="col" { "Labels" } th scope="col" { "Updated" }
            } }
            // Re-read every 5 s by htmx (the same URL; only this element is
            // swapped), so states change on screen without a reload.
            tbody #machines hx-get=(here) hx-trigger="every 5s" hx-select="#machines" hx-swap="outerHTML" {
                @for m in &machines {
                    tr {
                        th scope="row" { a href=(format!("/ui/machines/{}/{}", m.namespace, m.id)) { (m.name) } }
                        td { span class=(format!("state state-{}", m.state)) { (m.state) } }
                        td { (m.host.as_deref().unwrap_or("—")) }
                        td { code { (m.config.image) } }
                        td { (m.config.guest.cpus) }
                        td { (layout::mib(m.config.guest.memory_mb)) }
                        td { (layout::labels(&m.labels)) }
                        td { (layout::time(&m.updated_at)) }
                    }
                }
                @if machines.is_empty() { tr { td colspan="8" { "No machines match." } } }
            }
        }
        nav.pages aria-label="Pages" {
            @if given(&params.page_token).is_some() { a href=(list_url(&namespace, &params, None)) { "First page" } " " }
            @if let Some(next) = &next { a href=(list_url(&namespace, &params, Some(next))) rel="next" { "Next page" } }
        }
    };
    Ok(layout::page("Machines", Nav::Machines, &session, body))
}

/// What a machine's action URLs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Start,
    Stop,
    Delete,
    ForceDelete,
}

impl Act {
    fn parse(segment: &str) -> Result<Act, UiError> {
        Ok(match segment {
            "start" => Act::Start,
            "stop" => Act::Stop,
            "delete" => Act::Delete,
            "force-delete" => Act::ForceDelete,
            _ => return Err(UiError::Api(ApiError::not_found(format!("no action {segment:?}")))),
        })
    }

    fn path(self) -> &'static str {
        match self {
            Act::Start => "start",
            Act::Stop => "stop",
            Act::Delete => "delete",
            Act::ForceDelete => "force-delete",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Act::Start => "Start",
            Act::Stop => "Stop",
            Act::Delete => "Delete",
            Act::ForceDelete => "Force-delete",
        }
    }

    /// The actions that make sense in `state` (the API decides; this only
    /// keeps pointless buttons off the page).
    fn offered(state: MachineState) -> &'static [Act] {
        use MachineState::*;
        match state {
            Created | Stopped | Failed => &[Act::Start, Act::Delete],
            Suspended => &[Act::Start, Act::Delete, Act::ForceDelete],
            Starting | Started | Suspending => &[Act::Stop, Act::ForceDelete],
            Stopping => &[Act::ForceDelete],
            Destroying | Destroyed => &[],
        }
    }
}

fn machine_url(m: &Machine) -> String {
    format!("/ui/machines/{}/{}", m.namespace, m.id)
}

/// `/ui/machines/{namespace}/{id}`: config, state, events, snapshots and
/// (for operators) the actions. The state and events re-read every 5 s.
pub async fn show(
    State(state): State<Arc<AppState>>,
    session: Session,
    Path((namespace, id)): Path<(String, Uuid)>,
) -> UiResult<Markup> {
    let at = || Path((namespace.clone(), id));
    let Json(m) = api::get(State(state.clone()), session.caller.clone(), at()).await?;
    let Json(events) = api::events(State(state.clone()), session.caller.clone(), at()).await?;
    let query = snapshots::ListQuery { page_size: Some(100), page_token: None };
    let Json(snaps) = snapshots::list_machine(State(state.clone()), session.caller.clone(), at(), Query(query)).await?;
    let operator = session.caller.0.access(&namespace, Role::Operator) == Access::Granted;
    let url = machine_url(&m);
    let has_console = !matches!(m.state, MachineState::Created | MachineState::Destroyed);
    let body = html! {
        h1 { "Machine " (m.name) }
        div #live hx-get=(url) hx-trigger="every 5s" hx-select="#live" hx-swap="outerHTML" {
            p { "State: " strong class=(format!("state state-{}", m.state)) { (m.state) }
                @if let Some(before) = m.previous_state { " (was " (before) ")" } }
            @if operator && !Act::offered(m.state).is_empty() {
                ul.actions aria-label="Actions" {
                    @for act in Act::offered(m.state) {
                        li { a.button href=(format!("{url}/{}", act.path())) { (act.verb()) "…" } }
                    }
                }
            }
            h2 { "Events" }
            table {
                caption.visually-hidden { "State changes, newest first" }
                thead { tr { th scope="col" { "At" } th scope="col" { "State" } th scope="col" { "From" } th scope="col" { "Why" } } }
                tbody {
                    @for e in events.events.iter().rev().take(EVENTS_SHOWN) {
                        tr {
                            td { (layout::time(&e.at)) } td { (e.state) }
                            td { (e.previous_state.map(|s| s.as_str()).unwrap_or("—")) } td { (e.reason) }
                        }
                    }
                }
            }
        }
        @if has_console {
            h2 { "Console" }
            p { a href=(format!("{url}/logs")) { "Console log" } " · "
                a href=(format!("{url}/logs?follow=true")) { "Follow the console live" } }
        }
        h2 { "Configuration" }
        dl.config {
            dt { "Id" } dd { code { (m.id) } }
            dt { "Namespace" } dd { (m.namespace) }
            dt { "Host" } dd { (m.host.as_deref().unwrap_or("—")) }
            dt { "Image" } dd { code { (m.config.image) } }
            dt { "Size" } dd { (m.config.guest.cpus) " vCPUs, " (layout::mib(m.config.guest.memory_mb)) }
            dt { "Command" } dd { @if m.config.command.is_empty() { span.muted { "the image's" } }
                @else { code { (m.config.command.join(" ")) } } }
            dt { "Environment" } dd { (layout::labels(&m.config.env)) }
            dt { "Labels" } dd { (layout::labels(&m.labels)) }
            dt { "Host labels required" } dd { (layout::labels(&m.placement.host_labels)) }
            @if let Some(lease) = &m.lease {
                dt { "Lease" } dd { "held by " (lease.owner) " until " (layout::time(&lease.expires_at)) }
            }
            @if let Some(snapshot) = &m.from_snapshot { dt { "Restored from" } dd { code { (snapshot) } } }
            @if let Some(parent) = m.branch_of { dt { "Branch of" } dd { code { (parent) } } }
            dt { "Created" } dd { (layout::time(&m.created_at)) }
            dt { "Updated" } dd { (layout::time(&m.updated_at)) }
        }
        @if !snaps.snapshots.is_empty() {
            h2 { "Snapshots" }
            table {
                thead { tr { th scope="col" { "Id" } th scope="col" { "Name" } th scope="col" { "Host" }
                    th scope="col" { "Size" } th scope="col" { "Taken" } } }
                tbody { @for s in &snaps.snapshots { tr {
                    td { code { (s.id) } } td { (s.name.as_deref().unwrap_or("—")) } td { (s.host) }
                    td { (s.disk_bytes / (1 << 20)) " MiB" } td { (layout::time(&s.created_at)) }
                } } }
            }
        }
        p { a href=(format!("/ui/machines?namespace={}", m.namespace)) { "All machines in " (m.namespace) } }
    };
    Ok(layout::page(&format!("Machine {}", m.name), Nav::Machines, &session, body))
}

#[derive(Debug, Deserialize)]
pub struct LogParams {
    #[serde(default)]
    follow: bool,
}

/// The console log as plain text (`follow=true`: streamed as the guest
/// writes it), straight from `GET /v1/.../logs`.
pub async fn logs(
    State(state): State<Arc<AppState>>,
    session: Session,
    Path((namespace, id)): Path<(String, Uuid)>,
    Query(params): Query<LogParams>,
) -> UiResult {
    let query = exec::LogsQuery { follow: params.follow };
    let headers = session.bearer_headers();
    Ok(exec::logs(State(state), session.caller, Path((namespace, id)), Query(query), headers).await?)
}

/// The confirmation page of an action.
pub async fn confirm(
    State(state): State<Arc<AppState>>,
    session: Session,
    Path((namespace, id, action)): Path<(String, Uuid, String)>,
) -> UiResult<Markup> {
    let act = Act::parse(&action)?;
    let Json(m) = api::get(State(state), session.caller.clone(), Path((namespace, id))).await?;
    let detail = html! {
        p { "Machine " strong { (m.name) } " in " (m.namespace) " is " strong { (m.state) }
            @if let Some(host) = &m.host { " on host " (host) } "." }
        @match act {
            Act::ForceDelete => p { "Force-deleting destroys it even while it runs: its guest is killed and its disk removed." },
            Act::Delete => p { "Deleting destroys the machine and its disk." },
            _ => {},
        }
    };
    let question = format!("{} machine {}?", act.verb(), m.name);
    Ok(layout::confirm(
        &session,
        Nav::Machines,
        &question,
        detail,
        &format!("{} {}", act.verb(), m.name),
        &machine_url(&m),
    ))
}

/// Runs an action through the API's handler for it, then shows the
/// machine again.
pub async fn act(
    State(state): State<Arc<AppState>>,
    Path((namespace, id, action)): Path<(String, Uuid, String)>,
    form: Submitted,
) -> UiResult {
    let act = Act::parse(&action)?;
    let (caller, at) = (form.session.caller, Path((namespace.clone(), id)));
    let nonce = LeaseNonce(None);
    let Json(m) = match act {
        Act::Start => api::start(State(state), caller, at, nonce).await?,
        Act::Stop => api::stop(State(state), caller, at, nonce).await?,
        Act::Delete => api::delete(State(state), caller, at, Query(DeleteQuery { force: false }), nonce).await?,
        Act::ForceDelete => api::delete(State(state), caller, at, Query(DeleteQuery { force: true }), nonce).await?,
    };
    Ok(Redirect::to(&machine_url(&m)).into_response())
}
