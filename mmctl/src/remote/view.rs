//! Machines as the controller describes them, printed like local microVMs
//! (`-o table|json`). The controller's shape differs from the broker's (a
//! host and a namespace, no IP or processes), so it has its own view
//! rather than being squeezed into `output::VmInfo`.
//!
//! Fields mmctl does not know are kept (`rest`), so `-o json` shows
//! everything the controller said, also what a newer controller adds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::output::Format;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Guest {
    pub cpus: i64,
    pub memory_mb: i64,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineConfig {
    pub image: String,
    pub guest: Guest,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Only from controllers that take a command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub state: String,
    #[serde(default)]
    pub previous_state: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    pub config: MachineConfig,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created_at: String,
    #[serde(default)]
    pub updated_at: String,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl Machine {
    fn command(&self) -> String {
        self.config.command.as_deref().unwrap_or_default().join(" ")
    }
}

/// A page of `GET .../machines`.
#[derive(Debug, Deserialize)]
pub struct MachineList {
    pub machines: Vec<Machine>,
    #[serde(default)]
    pub next_page_token: Option<String>,
}

fn json<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("serialisable"));
}

/// `mmctl ps`.
pub fn print_list(machines: &[Machine], format: Format) {
    match format {
        Format::Json => json(&machines),
        Format::Table => {
            println!(
                "{:<36} {:<20} {:<10} {:>4} {:>7} {:<16} {:<24} COMMAND",
                "ID", "NAME", "STATE", "CPUS", "MEM", "HOST", "CREATED"
            );
            for m in machines {
                println!(
                    "{:<36} {:<20} {:<10} {:>4} {:>7} {:<16} {:<24} {}",
                    m.id,
                    m.name,
                    m.state,
                    m.config.guest.cpus,
                    format!("{}M", m.config.guest.memory_mb),
                    m.host.as_deref().unwrap_or("-"),
                    m.created_at,
                    m.command()
                );
            }
        }
    }
}

/// `mmctl inspect`, and what `run -d`, `stop` and `start` print with `-o json`.
pub fn print_one(m: &Machine, format: Format) {
    if format == Format::Json {
        return json(m);
    }
    let pairs = |map: &BTreeMap<String, String>| {
        if map.is_empty() {
            "-".to_string()
        } else {
            map.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        }
    };
    println!("id:        {}", m.id);
    println!("name:      {}", m.name);
    println!("namespace: {}", m.namespace);
    println!("image:     {}", m.config.image);
    match &m.previous_state {
        Some(previous) => println!("state:     {} (was {previous})", m.state),
        None => println!("state:     {}", m.state),
    }
    println!("cpus:      {}", m.config.guest.cpus);
    println!("memory:    {} MiB", m.config.guest.memory_mb);
    println!("host:      {}", m.host.as_deref().unwrap_or("-"));
    println!("labels:    {}", pairs(&m.labels));
    println!("env:       {}", pairs(&m.config.env));
    if let Some(lease) = m.rest.get("lease").and_then(Value::as_object) {
        let field = |k: &str| lease.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        println!("lease:     held by {} until {} {}", field("owner"), field("expires_at"), field("description"));
    }
    println!("created:   {}", m.created_at);
    println!("updated:   {}", m.updated_at);
    println!("command:   {}", m.command());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_it_does_not_know() {
        let doc = serde_json::json!({
            "id": "8b0c", "name": "web", "namespace": "prod", "state": "started", "previous_state": "starting",
            "host": "h1", "config": {"image": "alpine", "guest": {"cpus": 1, "memory_mb": 256}, "env": {},
                "kernel_args": "x"},
            "labels": {"app": "web"}, "placement": {"host_labels": {}}, "lease": null,
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:01Z", "future": 1
        });
        let m: Machine = serde_json::from_value(doc.clone()).unwrap();
        assert_eq!((m.state.as_str(), m.config.guest.memory_mb, m.command()), ("started", 256, String::new()));
        assert_eq!(serde_json::to_value(&m).unwrap(), doc);
    }
}
