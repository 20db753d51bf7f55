//! The controller's admin verbs, so that setting up a cluster needs no
//! curl: `namespace create|ls|rm` (`/v1/namespaces`), `token
//! create|ls|revoke` (`/v1/tokens`) and `host ls|cordon|drain|uncordon`
//! (`/v1/hosts`). Each is one call to the route of the same name; the
//! controller decides who may (cluster admin for namespaces and hosts, a
//! namespace's admin for its tokens) and its refusals come back as they
//! do for every verb.
//!
//! Tables for people, `-o json` the controller's own answer; `token
//! create` prints only the new token in table form, so that
//! `TOKEN=$(mmctl --server … token create …)` works.

use std::collections::BTreeMap;

use reqwest::{Method, Url};
use serde_json::{Value, json};

use super::http::{Api, decode};
use crate::client::{CliError, exit};
use crate::output::Format;

#[derive(Debug, clap::Subcommand)]
pub enum NamespaceVerb {
    /// Create namespaces (cluster admin).
    Create {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// List the namespaces the token has a role in (all, for a cluster admin).
    Ls,
    /// Delete namespaces whose machines are all destroyed and that keep no
    /// snapshots (cluster admin).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenVerb {
    /// Mint a token; prints it (shown this once; stored nowhere).
    Create {
        /// Who it is for.
        #[arg(long)]
        subject: String,
        /// NAMESPACE=ROLE (viewer, operator or admin); repeatable. You must
        /// be admin in each namespace named.
        #[arg(long = "role", value_parser = parse_role)]
        roles: Vec<(String, String)>,
        /// Admin everywhere, hosts and namespaces too (needs a cluster admin).
        #[arg(long)]
        cluster_admin: bool,
        /// Lifetime: seconds, or with a suffix m, h, d (default: a day).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the tokens you could have minted, and your own.
    Ls,
    /// Revoke tokens by id (jti); refused from then on.
    Revoke {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum HostVerb {
    /// List hosts: status, room, machines (cluster admin).
    Ls,
    /// Place no new machines on hosts.
    Cordon {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Cordon hosts and move their machines elsewhere.
    Drain {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Place machines on hosts again (ends a drain).
    Uncordon {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn parse_role(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((ns, role)) if !ns.is_empty() && matches!(role, "viewer" | "operator" | "admin") => {
            Ok((ns.to_owned(), role.to_owned()))
        }
        _ => Err(format!("{s:?}: expected NAMESPACE=ROLE with ROLE viewer, operator or admin")),
    }
}

fn parse_ttl(s: &str) -> Result<u64, String> {
    let (digits, factor) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("{s:?} is not a lifetime (e.g. 3600, 90m, 12h, 30d)"))
}

fn pretty(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("serialisable"));
}

/// Runs `each` for every name, printing the name (or the answer with
/// `-o json`, all of them as one list); a failure is reported and the rest
/// go on, as `rm` does; the exit code is the last failure's.
async fn for_each<F, Fut>(names: Vec<String>, format: Format, each: F) -> Result<i32, CliError>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<Value, CliError>>,
{
    let mut failed = None;
    let mut answers = Vec::new();
    for name in names {
        match each(name.clone()).await {
            Ok(answer) if format == Format::Json => answers.push(answer),
            Ok(_) => println!("{name}"),
            Err(e) => {
                eprintln!("mmctl: {}", e.message);
                failed = Some(e.code);
            }
        }
    }
    if format == Format::Json {
        pretty(&Value::Array(answers));
    }
    Ok(failed.unwrap_or(0))
}

/// A request with a JSON body (`body` `None`: none), its JSON answer
/// (`null` for an empty one, as a DELETE's 204).
async fn call(api: &Api, method: Method, url: Url, body: Option<&Value>) -> Result<Value, CliError> {
    let response = api
        .send(false, || {
            let request = api.request(method.clone(), url.clone());
            match body {
                Some(body) => request.json(body),
                None => request,
            }
        })
        .await?;
    if response.status() == reqwest::StatusCode::NO_CONTENT {
        return Ok(Value::Null);
    }
    decode(response).await
}

pub async fn namespace(api: &Api, verb: NamespaceVerb, format: Format) -> Result<i32, CliError> {
    let url = |rest: &[&str]| {
        let mut segments = vec!["v1", "namespaces"];
        segments.extend_from_slice(rest);
        api.url(&segments)
    };
    match verb {
        NamespaceVerb::Create { names } => {
            for_each(names, format, |name| async move {
                call(api, Method::POST, url(&[]), Some(&json!({ "name": name }))).await
            })
            .await
        }
        NamespaceVerb::Rm { names } => {
            for_each(names, format, |name| async move {
                call(api, Method::DELETE, url(&[&name]), None).await.map(|_| json!({ "name": name }))
            })
            .await
        }
        NamespaceVerb::Ls => {
            let list: Value = api.get_json(Method::GET, url(&[])).await?;
            let namespaces = list["namespaces"].as_array().cloned().unwrap_or_default();
            if format == Format::Json {
                pretty(&Value::Array(namespaces));
                return Ok(0);
            }
            println!("{:<32} {:<10} CREATED", "NAME", "ROLE");
            for ns in &namespaces {
                let field = |k: &str| ns[k].as_str().unwrap_or("").to_owned();
                println!("{:<32} {:<10} {}", field("name"), field("role"), field("created_at"));
            }
            Ok(0)
        }
    }
}

pub async fn token(api: &Api, verb: TokenVerb, format: Format) -> Result<i32, CliError> {
    match verb {
        TokenVerb::Create { subject, roles, cluster_admin, ttl, description } => {
            if roles.is_empty() && !cluster_admin {
                return Err(CliError::new(exit::INVALID, "a token needs --role NAMESPACE=ROLE or --cluster-admin"));
            }
            let roles: BTreeMap<String, String> = roles.into_iter().collect();
            let mut body = json!({ "subject": subject, "roles": roles, "cluster_admin": cluster_admin,
                "description": description });
            if let Some(ttl) = ttl {
                body["ttl_seconds"] = json!(ttl);
            }
            let minted = call(api, Method::POST, api.url(&["v1", "tokens"]), Some(&body)).await?;
            match format {
                Format::Json => pretty(&minted),
                Format::Table => println!("{}", minted["token"].as_str().unwrap_or_default()),
            }
            Ok(0)
        }
        TokenVerb::Ls => {
            let list: Value = api.get_json(Method::GET, api.url(&["v1", "tokens"])).await?;
            let tokens = list["tokens"].as_array().cloned().unwrap_or_default();
            if format == Format::Json {
                pretty(&Value::Array(tokens));
                return Ok(0);
            }
            println!("{:<36} {:<16} {:<28} {:<8} {:<21} DESCRIPTION", "ID", "SUBJECT", "ROLES", "REVOKED", "EXPIRES");
            for t in &tokens {
                let field = |k: &str| t[k].as_str().unwrap_or("").to_owned();
                let mut roles: Vec<String> = t["roles"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(ns, role)| format!("{ns}={}", role.as_str().unwrap_or("?")))
                    .collect();
                if t["cluster_admin"] == json!(true) {
                    roles.insert(0, "cluster-admin".into());
                }
                let revoked = if t["revoked"] == json!(true) { "yes" } else { "no" };
                let expires: String = field("expires_at").chars().take(19).collect();
                println!(
                    "{:<36} {:<16} {:<28} {:<8} {:<21} {}",
                    field("jti"),
                    field("subject"),
                    roles.join(","),
                    revoked,
                    expires,
                    field("description")
                );
            }
            Ok(0)
        }
        TokenVerb::Revoke { ids } => {
            for_each(ids, format, |id| async move {
                call(api, Method::DELETE, api.url(&["v1", "tokens", &id]), None).await.map(|_| json!({ "jti": id }))
            })
            .await
        }
    }
}

pub async fn host(api: &Api, verb: HostVerb, format: Format) -> Result<i32, CliError> {
    let (names, action) = match verb {
        HostVerb::Ls => {
            let list: Value = api.get_json(Method::GET, api.url(&["v1", "hosts"])).await?;
            let hosts = list["hosts"].as_array().cloned().unwrap_or_default();
            if format == Format::Json {
                pretty(&Value::Array(hosts));
                return Ok(0);
            }
            println!(
                "{:<20} {:<10} {:>9} {:>15} {:>8} {:<24} LABELS",
                "NAME", "STATUS", "CPUS", "MEMORY", "MACHINES", "ADDRESS"
            );
            for h in &hosts {
                let text = |k: &str| h[k].as_str().unwrap_or("").to_owned();
                let num = |k: &str| h[k].as_i64().unwrap_or(0);
                let labels: Vec<String> = h["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect();
                println!(
                    "{:<20} {:<10} {:>9} {:>15} {:>8} {:<24} {}",
                    text("name"),
                    text("status"),
                    format!("{}/{}", num("used_cpus"), num("cpus")),
                    format!("{}/{}M", num("used_memory_mb"), num("memory_mb")),
                    num("machines"),
                    text("address"),
                    if labels.is_empty() { "-".into() } else { labels.join(",") }
                );
                if let Some(why) = h["drain_blocked"].as_str() {
                    println!("  drain blocked: {why}");
                }
            }
            return Ok(0);
        }
        HostVerb::Cordon { names } => (names, "cordon"),
        HostVerb::Drain { names } => (names, "drain"),
        HostVerb::Uncordon { names } => (names, "uncordon"),
    };
    for_each(names, format, |name| async move {
        call(api, Method::POST, api.url(&["v1", "hosts", &name, action]), None).await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_lifetimes_parse() {
        assert_eq!(parse_role("prod=operator"), Ok(("prod".into(), "operator".into())));
        assert!(parse_role("prod=root").is_err());
        assert!(parse_role("=admin").is_err());
        assert_eq!(parse_ttl("3600"), Ok(3600));
        assert_eq!(parse_ttl("90m"), Ok(5400));
        assert_eq!(parse_ttl("30d"), Ok(30 * 86400));
        assert!(parse_ttl("soon").is_err());
    }
}
