//! The page shell and the pieces every page shares: navigation, the skip
//! link, the CSRF field, confirmation pages, times and labels.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::session::{CSRF_FIELD, Session};

/// htmx's settings: no `eval` (hx-on, js: expressions) and no inline
/// indicator styles, so the CSP needs neither 'unsafe-eval' nor
/// 'unsafe-inline'; no history cache, which would keep pages (and their
/// CSRF tokens) in localStorage.
const HTMX_CONFIG: &str = r#"{"allowEval":false,"allowScriptTags":false,"includeIndicatorStyles":false,"historyCacheSize":0,"selfRequestsOnly":true}"#;

/// Which navigation entry is the current page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Machines,
    Hosts,
    Namespaces,
    Tokens,
    None,
}

fn shell(title: &str, nav: Nav, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="htmx-config" content=(HTMX_CONFIG);
                title { (title) " · MicroMachines" }
                link rel="stylesheet" href="/ui/assets/style.css";
                script src="/ui/assets/htmx.min.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    span.brand { "MicroMachines" }
                    @if let Some(session) = session {
                        nav aria-label="Main" {
                            ul {
                                (nav_item("/ui/machines", "Machines", nav == Nav::Machines))
                                @if session.caller.0.cluster_admin {
                                    (nav_item("/ui/hosts", "Hosts", nav == Nav::Hosts))
                                }
                                (nav_item("/ui/namespaces", "Namespaces", nav == Nav::Namespaces))
                                (nav_item("/ui/tokens", "Tokens", nav == Nav::Tokens))
                            }
                        }
                        form.logout method="post" action="/ui/logout" {
                            (csrf_field(session))
                            span { "Signed in as " strong { (session.caller.0.sub) } }
                            " "
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main #main tabindex="-1" { (body) }
            }
        }
    }
}

fn nav_item(href: &str, text: &str, current: bool) -> Markup {
    html! {
        li {
            @if current { a href=(href) aria-current="page" { (text) } } @else { a href=(href) { (text) } }
        }
    }
}

/// A page for a logged-in user.
pub fn page(title: &str, nav: Nav, session: &Session, body: Markup) -> Markup {
    shell(title, nav, Some(session), body)
}

/// The hidden field every form that POSTs carries.
pub fn csrf_field(session: &Session) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(session.csrf); }
}

pub fn login_page(error: Option<&str>) -> Markup {
    shell(
        "Log in",
        Nav::None,
        None,
        html! {
            h1 { "Log in" }
            @if let Some(error) = error { p.error role="alert" { (error) } }
            form method="post" action="/ui/login" {
                p {
                    label for="token" { "API token" }
                    br;
                    input #token type="password" name="token" autocomplete="off" required
                        aria-describedby="token-help" size="60";
                }
                p #token-help.help {
                    "The same token the API and mmctl take (" code { "mmctl token create" } "). "
                    "It is kept in an HttpOnly cookie for this site until it expires or you log out."
                }
                button type="submit" { "Log in" }
            }
        },
    )
}

pub fn error_page(status: StatusCode, detail: &str) -> Markup {
    let title = status.canonical_reason().unwrap_or("Error");
    shell(
        title,
        Nav::None,
        None,
        html! {
            h1 { (status.as_u16()) " " (title) }
            p.error role="alert" { (detail) }
            p { a href="/ui/machines" { "Back to the machines" } }
        },
    )
}

/// The confirmation step of an action: its GET shows this form, which
/// POSTs to the same URL. Works without JavaScript, and the button is the
/// first control, so Enter on the page confirms only once it has focus.
pub fn confirm(session: &Session, nav: Nav, question: &str, detail: Markup, button: &str, cancel: &str) -> Markup {
    page(
        question,
        nav,
        session,
        html! {
            h1 { (question) }
            (detail)
            form method="post" {
                (csrf_field(session))
                button.danger type="submit" { (button) }
                " "
                a href=(cancel) { "Cancel" }
            }
        },
    )
}

pub fn time(at: &DateTime<Utc>) -> Markup {
    html! { time datetime=(at.to_rfc3339()) { (at.format("%Y-%m-%d %H:%M:%S")) } }
}

pub fn labels(labels: &BTreeMap<String, String>) -> Markup {
    html! {
        @if labels.is_empty() { span.muted { "none" } }
        @else {
            ul.labels { @for (k, v) in labels { li { code { (k) "=" (v) } } } }
        }
    }
}

/// Megabytes as the largest whole unit that reads well.
pub fn mib(mb: i64) -> String {
    if mb >= 1024 && mb % 1024 == 0 { format!("{} GiB", mb / 1024) } else { format!("{mb} MiB") }
}
