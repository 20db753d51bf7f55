//! `mmctl --server quota`: a namespace's usage against its quota (`GET
//! /v1/namespaces/{ns}/quota`), and `quota set` for cluster admins (`PUT`
//! of the same route).
//!
//! The API's PUT replaces every limit (a limit left out is none), which is
//! what makes it idempotent; on the command line that would make `quota set
//! --machines 5` silently lift the memory limit. So `set` reads the quota,
//! changes only the limits named (`none` lifts one, `--clear` all) and puts
//! the whole back.

use reqwest::{Method, Url};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::http::{Api, decode};
use crate::client::{CliError, exit};
use crate::output::Format;

#[derive(Debug, clap::Subcommand)]
pub enum QuotaVerb {
    /// Set the namespace's limits (cluster admin); the others stay.
    /// `none` lifts a limit.
    Set {
        /// Machines that are not destroyed.
        #[arg(long, value_parser = parse_count)]
        machines: Option<Setting>,
        /// vCPUs of those machines, summed.
        #[arg(long, value_parser = parse_count)]
        vcpus: Option<Setting>,
        /// Their guest memory, summed: MiB, or with a suffix M, G, T.
        #[arg(long, value_parser = parse_memory)]
        memory: Option<Setting>,
        /// Space the namespace's snapshots take on their hosts: bytes, or
        /// with a suffix K, M, G, T, P, E (powers of 1024).
        #[arg(long, value_parser = parse_bytes)]
        snapshot_bytes: Option<Setting>,
        /// Lift every limit not given.
        #[arg(long)]
        clear: bool,
    },
}

/// A limit to set, or `none` to lift it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    Limit(i64),
    Unlimited,
}

fn parse_setting(s: &str, what: &str, scale: impl Fn(&str) -> Option<i64>) -> Result<Setting, String> {
    if s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("unlimited") {
        return Ok(Setting::Unlimited);
    }
    scale(s).map(Setting::Limit).ok_or_else(|| format!("{s:?} is not {what}, or none"))
}

fn parse_count(s: &str) -> Result<Setting, String> {
    parse_setting(s, "a number", |s| s.parse().ok())
}

/// `digits` times the factor of its suffix, if any.
fn scaled(s: &str, suffixes: &[(char, i64)], plain: i64) -> Option<i64> {
    let last = s.chars().last()?.to_ascii_uppercase();
    let (digits, factor) = match suffixes.iter().find(|(c, _)| *c == last) {
        Some((_, factor)) => (&s[..s.len() - 1], *factor),
        None => (s, plain),
    };
    digits.parse::<i64>().ok()?.checked_mul(factor)
}

/// Memory in MiB (the API's `memory_mb`, as `run --memory` counts it).
fn parse_memory(s: &str) -> Result<Setting, String> {
    parse_setting(s, "a memory size (e.g. 512M, 64G)", |s| scaled(s, &[('M', 1), ('G', 1 << 10), ('T', 1 << 20)], 1))
}

fn parse_bytes(s: &str) -> Result<Setting, String> {
    let units = [('K', 1 << 10), ('M', 1 << 20), ('G', 1 << 30), ('T', 1 << 40), ('P', 1 << 50), ('E', 1 << 60)];
    parse_setting(s, "a size (e.g. 100G)", |s| scaled(s, &units, 1))
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Limits {
    machines: Option<i64>,
    vcpus: Option<i64>,
    memory_mb: Option<i64>,
    snapshot_bytes: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Usage {
    machines: i64,
    vcpus: i64,
    memory_mb: i64,
    snapshot_bytes: i64,
}

/// The controller's answer; what mmctl does not know is kept for `-o json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Quota {
    namespace: String,
    limits: Limits,
    usage: Usage,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

fn quota_url(api: &Api, namespace: &str) -> Url {
    api.url(&["v1", "namespaces", namespace, "quota"])
}

/// `quota [--all]` and `quota set`.
pub async fn run(api: &Api, verb: Option<QuotaVerb>, all: bool, format: Format) -> Result<i32, CliError> {
    let Some(QuotaVerb::Set { machines, vcpus, memory, snapshot_bytes, clear }) = verb else {
        let namespaces = if all { visible_namespaces(api).await? } else { vec![api.namespace.clone()] };
        let mut quotas = Vec::new();
        for namespace in namespaces {
            quotas.push(api.get_json::<Quota>(Method::GET, quota_url(api, &namespace)).await?);
        }
        print(&quotas, format);
        return Ok(0);
    };
    if all {
        return Err(CliError::new(exit::INVALID, "quota set changes one namespace (-n NS), not --all"));
    }
    let url = quota_url(api, &api.namespace);
    let current: Quota = api.get_json(Method::GET, url.clone()).await?;
    let mut limits = if clear { Limits::default() } else { current.limits };
    for (setting, limit) in [
        (machines, &mut limits.machines),
        (vcpus, &mut limits.vcpus),
        (memory, &mut limits.memory_mb),
        (snapshot_bytes, &mut limits.snapshot_bytes),
    ] {
        match setting {
            Some(Setting::Limit(n)) => *limit = Some(n),
            Some(Setting::Unlimited) => *limit = None,
            None => {}
        }
    }
    let response = api.send(false, || api.request(Method::PUT, url.clone()).json(&limits)).await?;
    let quota: Quota = decode(response).await?;
    print(&[quota], format);
    Ok(0)
}

/// Every namespace the token has a role in.
async fn visible_namespaces(api: &Api) -> Result<Vec<String>, CliError> {
    let list: Value = api.get_json(Method::GET, api.url(&["v1", "namespaces"])).await?;
    Ok(list["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["name"].as_str().map(str::to_owned))
        .collect())
}

/// Bytes as `1.5G`, `512M`, `0`.
fn human_bytes(bytes: i64) -> String {
    let units = ["", "K", "M", "G", "T", "P", "E"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value}{}", units[unit])
    } else {
        format!("{value:.1}{}", units[unit])
    }
}

fn print(quotas: &[Quota], format: Format) {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(quotas).expect("serialisable"));
        return;
    }
    println!("{:<20} {:<16} {:>10} {:>10}", "NAMESPACE", "RESOURCE", "USED", "LIMIT");
    for q in quotas {
        let mib = |m: i64| human_bytes(m.saturating_mul(1 << 20));
        let rows = [
            ("machines", q.usage.machines.to_string(), q.limits.machines.map(|n| n.to_string())),
            ("vcpus", q.usage.vcpus.to_string(), q.limits.vcpus.map(|n| n.to_string())),
            ("memory", mib(q.usage.memory_mb), q.limits.memory_mb.map(mib)),
            ("snapshot-bytes", human_bytes(q.usage.snapshot_bytes), q.limits.snapshot_bytes.map(human_bytes)),
        ];
        for (resource, used, limit) in rows {
            let limit = limit.unwrap_or_else(|| "none".into());
            println!("{:<20} {:<16} {:>10} {:>10}", q.namespace, resource, used, limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_settings_parse() {
        assert_eq!(parse_memory("64G"), Ok(Setting::Limit(65536)));
        assert_eq!(parse_memory("512"), Ok(Setting::Limit(512)));
        assert_eq!(parse_bytes("100G"), Ok(Setting::Limit(100 << 30)));
        assert_eq!(parse_bytes("1e"), Ok(Setting::Limit(1 << 60)));
        assert_eq!(parse_count("none"), Ok(Setting::Unlimited));
        assert!(parse_bytes("9E").is_err(), "overflows i64");
        assert!(parse_memory("lots").is_err());
        // 0 and negatives go to the controller, which says what is allowed.
        assert_eq!(parse_count("0"), Ok(Setting::Limit(0)));
    }

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(0), "0");
        assert_eq!(human_bytes(2 << 20), "2M");
        assert_eq!(human_bytes(3 << 29), "1.5G");
        assert_eq!(human_bytes(64 << 30), "64G");
    }
}
