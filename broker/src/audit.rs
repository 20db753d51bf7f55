//! The per-microVM audit log: one JSON object per line in
//! `vms/<id>/audit.jsonl`, appended and never rewritten. It records every
//! process spawn, exit (code or signal; for SIGSYS the forbidden syscall),
//! restart, and every control call with its caller. It is the broker's
//! (0600), opened without following a link (`safe_fs`).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::events::{Event, EventHub};

#[derive(Debug, Clone)]
pub struct AuditLog {
    path: PathBuf,
    /// Where each line is also published, and as whose.
    publish: Option<Publish>,
}

#[derive(Debug, Clone)]
struct Publish {
    hub: EventHub,
    vm_id: String,
    vm_name: String,
}

impl AuditLog {
    /// A log that only writes (tests).
    pub fn new(dir: &Path) -> Self {
        AuditLog { path: dir.join("audit.jsonl"), publish: None }
    }

    /// A log whose lines also go to `hub`'s subscribers (`Broker.events`),
    /// as the microVM's (empty id and name: the broker's own).
    pub fn published(dir: &Path, hub: &EventHub, vm_id: &str, vm_name: &str) -> Self {
        let publish = Publish { hub: hub.clone(), vm_id: vm_id.into(), vm_name: vm_name.into() };
        AuditLog { path: dir.join("audit.jsonl"), publish: Some(publish) }
    }

    /// Appends `{"time": ..., "event": event, ...fields}`. A failure to
    /// write is logged, not returned: losing an audit line must not stop
    /// supervision, but it must be visible.
    pub fn record(&self, event: &str, fields: Value) {
        let time = now_rfc3339();
        let mut line = Map::new();
        line.insert("time".into(), Value::String(time.clone()));
        line.insert("event".into(), Value::String(event.into()));
        if let Value::Object(fields) = fields {
            line.extend(fields);
        }
        let text = Value::Object(line).to_string();
        let written = crate::safe_fs::open_append(&self.path).and_then(|mut file| writeln!(file, "{text}"));
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), "cannot append to the audit log: {e}: {text}");
        }
        if let Some(publish) = &self.publish {
            publish.hub.publish(Event {
                time,
                vm_id: publish.vm_id.clone(),
                vm_name: publish.vm_name.clone(),
                kind: event.into(),
                detail: text,
            });
        }
    }

    /// Every line so far.
    pub fn lines(&self) -> std::io::Result<Vec<String>> {
        match crate::safe_fs::read_to_string(&self.path) {
            Ok(text) => Ok(text.lines().map(str::to_string).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}

/// The current UTC time as RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_millis())
}

/// Formats a Unix time (UTC) as `YYYY-MM-DDThh:mm:ss.mmmZ` (civil-from-days,
/// H. Hinnant's algorithm: exact for the proleptic Gregorian calendar).
fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_795_910_400 + 3_723, 999), "2026-11-29T01:02:03.999Z");
    }

    #[test]
    fn appends_json_lines() {
        let dir = std::env::temp_dir().join(format!("mm-audit-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = AuditLog::new(&dir);
        log.record("spawn", serde_json::json!({"role": "vmm", "pid": 42}));
        log.record("exit", serde_json::json!({"role": "vmm", "code": 0}));
        let lines = log.lines().unwrap();
        assert_eq!(lines.len(), 2);
        let first: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["event"], "spawn");
        assert_eq!(first["pid"], 42);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_linked_audit_log_is_neither_appended_to_nor_read() {
        use crate::safe_fs::testing::{Scratch, Target, assert_refused, planted};
        let scratch = Scratch::new("audit-links");
        let target = Target::new(&scratch);
        let link = planted(&scratch, "audit.jsonl", &target.path);
        let log = AuditLog::new(&scratch.0.join("vm"));
        log.record("spawn", serde_json::json!({"role": "vmm", "pid": 42}));
        target.untouched();
        assert_refused(log.lines(), &link);
    }
}
