//! Hosts (cluster admins), namespaces and tokens: each page and action a
//! call of the `/v1` handler that does the same, so who may do what is
//! exactly the API's rule (a namespace admin sees the tokens of their
//! namespaces; a viewer sees their own).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect};
use maud::{Markup, html};

use super::layout::{self, Nav, csrf_field};
use super::session::{Session, Submitted};
use super::{UiError, UiResult};
use crate::api::problem::ApiError;
use crate::api::{AppState, hosts, namespaces, tokens};
use crate::auth::Role;

/// A URL path segment: everything but RFC 3986's unreserved characters
/// percent-encoded (token ids from an external issuer may hold anything).
fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `/ui/hosts`: capacity, labels and status, with cordon, drain and
/// uncordon (cluster admins; others get the API's 403).
pub async fn hosts(State(state): State<Arc<AppState>>, session: Session) -> UiResult<Markup> {
    let Json(list) = hosts::list(State(state), session.caller.clone()).await?;
    let body = html! {
        h1 { "Hosts" }
        table {
            caption.visually-hidden { "Hosts and their capacity" }
            thead { tr {
                th scope="col" { "Name" } th scope="col" { "Status" } th scope="col" { "CPUs used" }
                th scope="col" { "Memory used" } th scope="col" { "Machines" } th scope="col" { "Labels" }
                th scope="col" { "Last heartbeat" } th scope="col" { "Actions" }
            } }
            tbody #hosts hx-get="/ui/hosts" hx-trigger="every 5s" hx-select="#hosts" hx-swap="outerHTML" {
                @for h in &list.hosts {
                    tr {
                        th scope="row" { (h.name) br; small.muted { (h.address) } }
                        td { (h.status) @if let Some(why) = &h.drain_blocked { br; small { (why) } } }
                        td { (h.used_cpus) " / " (h.cpus) }
                        td { (layout::mib(h.used_memory_mb)) " / " (layout::mib(h.memory_mb)) }
                        td { (h.machines) }
                        td { (layout::labels(&h.labels)) }
                        td { @if let Some(at) = &h.last_heartbeat_at { (layout::time(at)) } @else { "—" } }
                        td { ul.actions {
                            @if !h.cordoned { li { a href=(format!("/ui/hosts/{}/cordon", h.name)) { "Cordon…" } } }
                            @if !h.draining { li { a href=(format!("/ui/hosts/{}/drain", h.name)) { "Drain…" } } }
                            @if h.cordoned || h.draining {
                                li { a href=(format!("/ui/hosts/{}/uncordon", h.name)) { "Uncordon…" } }
                            }
                        } }
                    }
                }
                @if list.hosts.is_empty() { tr { td colspan="8" { "No host has registered." } } }
            }
        }
    };
    Ok(layout::page("Hosts", Nav::Hosts, &session, body))
}

fn host_verb(action: &str) -> Result<(&'static str, &'static str), UiError> {
    Ok(match action {
        "cordon" => ("Cordon", "No new machines will be placed on it; the ones there stay."),
        "drain" => (
            "Drain",
            "It is cordoned and its machines are moved to other hosts: running ones are stopped here and started there with a fresh root disk from their image.",
        ),
        "uncordon" => (
            "Uncordon",
            "It takes new machines again, and a drain ends (machines it stopped start again where they are).",
        ),
        _ => return Err(UiError::Api(ApiError::not_found(format!("no host action {action:?}")))),
    })
}

pub async fn confirm_host(
    State(state): State<Arc<AppState>>,
    session: Session,
    Path((name, action)): Path<(String, String)>,
) -> UiResult<Markup> {
    let (verb, what) = host_verb(&action)?;
    let Json(host) = hosts::get(State(state), session.caller.clone(), Path(name)).await?;
    let detail = html! {
        p { "Host " strong { (host.name) } " is " (host.status) " with " (host.machines) " machines." }
        p { (what) }
    };
    let question = format!("{verb} host {}?", host.name);
    Ok(layout::confirm(&session, Nav::Hosts, &question, detail, &format!("{verb} {}", host.name), "/ui/hosts"))
}

pub async fn host_action(
    State(state): State<Arc<AppState>>,
    Path((name, action)): Path<(String, String)>,
    form: Submitted,
) -> UiResult {
    host_verb(&action)?;
    let (caller, at) = (form.session.caller, Path(name));
    let Json(_host) = match action.as_str() {
        "cordon" => hosts::cordon(State(state), caller, at).await?,
        "drain" => hosts::drain(State(state), caller, at).await?,
        _ => hosts::uncordon(State(state), caller, at).await?,
    };
    Ok(Redirect::to("/ui/hosts").into_response())
}

/// `/ui/namespaces`: the namespaces the caller has a role in (all, for a
/// cluster admin, who also creates and deletes them here).
pub async fn namespaces(State(state): State<Arc<AppState>>, session: Session) -> UiResult<Markup> {
    let Json(list) = namespaces::list(State(state), session.caller.clone()).await?;
    let admin = session.caller.0.cluster_admin;
    let body = html! {
        h1 { "Namespaces" }
        table {
            caption.visually-hidden { "Namespaces and your role in each" }
            thead { tr { th scope="col" { "Name" } th scope="col" { "Your role" } th scope="col" { "Created" }
                @if admin { th scope="col" { "Actions" } } } }
            tbody { @for ns in &list.namespaces { tr {
                th scope="row" { a href=(format!("/ui/machines?namespace={}", ns.name)) { (ns.name) } }
                td { (ns.role) } td { (layout::time(&ns.created_at)) }
                @if admin { td { a href=(format!("/ui/namespaces/{}/delete", ns.name)) { "Delete…" } } }
            } } }
        }
        @if admin {
            h2 { "New namespace" }
            form method="post" action="/ui/namespaces" {
                (csrf_field(&session))
                label for="ns-name" { "Name" }
                " "
                input #ns-name type="text" name="name" required maxlength="63" pattern="[a-z0-9]([a-z0-9\\-]{0,61}[a-z0-9])?"
                    aria-describedby="ns-help";
                " "
                button type="submit" { "Create" }
                p #ns-help.help { "1 to 63 lowercase letters, digits or hyphens." }
            }
        }
    };
    Ok(layout::page("Namespaces", Nav::Namespaces, &session, body))
}

pub async fn create_namespace(State(state): State<Arc<AppState>>, form: Submitted) -> UiResult {
    let body = namespaces::CreateNamespace { name: form.field("name").trim().to_owned() };
    let (_, Json(_created)) = namespaces::create(State(state), form.session.caller, Json(body)).await?;
    Ok(Redirect::to("/ui/namespaces").into_response())
}

pub async fn confirm_namespace(
    State(state): State<Arc<AppState>>,
    session: Session,
    Path(namespace): Path<String>,
) -> UiResult<Markup> {
    let Json(ns) = namespaces::get(State(state), session.caller.clone(), Path(namespace)).await?;
    let detail = html! { p { "Only a namespace whose machines are all destroyed can be deleted." } };
    let question = format!("Delete namespace {}?", ns.name);
    Ok(layout::confirm(&session, Nav::Namespaces, &question, detail, &format!("Delete {}", ns.name), "/ui/namespaces"))
}

pub async fn delete_namespace(
    State(state): State<Arc<AppState>>,
    Path(namespace): Path<String>,
    form: Submitted,
) -> UiResult {
    namespaces::delete(State(state), form.session.caller, Path(namespace)).await?;
    Ok(Redirect::to("/ui/namespaces").into_response())
}

fn roles_text(roles: &BTreeMap<String, Role>) -> String {
    roles.iter().map(|(ns, r)| format!("{ns}={}", crate::api::extract::role_name(*r))).collect::<Vec<_>>().join(", ")
}

/// `/ui/tokens`: the tokens the caller could have minted and their own,
/// a form to mint one (one namespace role; more through the API or
/// `mmctl token create`), and revocation.
pub async fn tokens(State(state): State<Arc<AppState>>, session: Session) -> UiResult<Markup> {
    let Json(list) = tokens::list(State(state.clone()), session.caller.clone()).await?;
    let Json(spaces) = namespaces::list(State(state), session.caller.clone()).await?;
    let claims = &session.caller.0;
    let grantable: Vec<&str> = spaces
        .namespaces
        .iter()
        .map(|n| n.name.as_str())
        .filter(|n| claims.cluster_admin || claims.role_in(n) == Some(Role::Admin))
        .collect();
    let body = html! {
        h1 { "Tokens" }
        table {
            caption.visually-hidden { "API tokens" }
            thead { tr {
                th scope="col" { "Subject" } th scope="col" { "Roles" } th scope="col" { "Description" }
                th scope="col" { "Created by" } th scope="col" { "Expires" } th scope="col" { "Id" } th scope="col" { "Actions" }
            } }
            tbody { @for t in &list.tokens { tr {
                th scope="row" { (t.subject) @if t.jti == claims.jti { " " small { "(this session)" } } }
                td { @if t.cluster_admin { "cluster admin" @if !t.roles.is_empty() { ", " } } (roles_text(&t.roles)) }
                td { (t.description) }
                td { (t.created_by) }
                td { (layout::time(&t.expires_at)) }
                td { code { (t.jti) } }
                td { @if t.revoked { "revoked" } @else { a href=(format!("/ui/tokens/{}/revoke", segment(&t.jti))) { "Revoke…" } } }
            } } }
        }
        @if claims.cluster_admin || !grantable.is_empty() {
            h2 { "New token" }
            form.stack method="post" action="/ui/tokens" {
                (csrf_field(&session))
                p { label for="t-subject" { "Subject" } br; input #t-subject type="text" name="subject" required maxlength="255"; }
                p { label for="t-description" { "Description" } br; input #t-description type="text" name="description" maxlength="256"; }
                p { label for="t-namespace" { "Namespace" } br;
                    select #t-namespace name="namespace" {
                        option value="" { "none" }
                        @for ns in &grantable { option value=(ns) { (ns) } }
                    } }
                p { label for="t-role" { "Role there" } br;
                    select #t-role name="role" { option value="viewer" { "viewer" } option value="operator" { "operator" }
                        option value="admin" { "admin" } } }
                @if claims.cluster_admin {
                    p { input #t-admin type="checkbox" name="cluster_admin" value="true"; " " label for="t-admin" { "Cluster admin" } }
                }
                p { label for="t-ttl" { "Valid for (hours)" } br; input #t-ttl type="number" name="ttl_hours" min="1" max="8784" value="24" required; }
                button type="submit" { "Create token" }
            }
        }
    };
    Ok(layout::page("Tokens", Nav::Tokens, &session, body))
}

/// Mints through `POST /v1/tokens` and shows the token this once (the page
/// is `no-store`, like every dashboard page).
pub async fn create_token(State(state): State<Arc<AppState>>, form: Submitted) -> UiResult<Markup> {
    let mut roles = BTreeMap::new();
    if !form.field("namespace").is_empty() {
        let role = match form.field("role") {
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            "admin" => Role::Admin,
            other => return Err(UiError::BadForm(format!("no role {other:?}"))),
        };
        roles.insert(form.field("namespace").to_owned(), role);
    }
    let hours: u64 =
        form.field("ttl_hours").parse().map_err(|_| UiError::BadForm("hours must be a whole number".into()))?;
    let body = tokens::CreateToken {
        subject: form.field("subject").trim().to_owned(),
        roles,
        cluster_admin: form.field("cluster_admin") == "true",
        ttl_seconds: Some(hours.saturating_mul(3600)),
        description: form.field("description").trim().to_owned(),
    };
    let (_, Json(new)) = tokens::create(State(state), form.session.caller.clone(), Json(body)).await?;
    let body = html! {
        h1 { "New token for " (new.info.subject) }
        p role="status" { "Copy it now: it is shown this once and stored nowhere." }
        p { label for="new-token" { "Token" } br;
            textarea #new-token readonly rows="6" cols="80" { (new.token) } }
        p { "Id " code { (new.info.jti) } ", expires " (layout::time(&new.info.expires_at)) "." }
        p { a href="/ui/tokens" { "Back to the tokens" } }
    };
    Ok(layout::page("New token", Nav::Tokens, &form.session, body))
}

pub async fn confirm_revoke(session: Session, Path(jti): Path<String>) -> UiResult<Markup> {
    let own = jti == session.caller.0.jti;
    let detail = html! {
        p { "Token " code { (jti) } " will be refused from then on, by the API and mmctl too." }
        @if own { p.error { "It is the token of this session: you will be logged out." } }
    };
    Ok(layout::confirm(&session, Nav::Tokens, "Revoke this token?", detail, "Revoke", "/ui/tokens"))
}

pub async fn revoke_token(State(state): State<Arc<AppState>>, Path(jti): Path<String>, form: Submitted) -> UiResult {
    tokens::revoke(State(state), form.session.caller, Path(jti)).await?;
    Ok(Redirect::to("/ui/tokens").into_response())
}
