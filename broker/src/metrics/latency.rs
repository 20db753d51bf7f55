//! Spawn, boot and restore latencies, measured from the audit lines the
//! broker already writes (`Broker.events`): the broker does not time these
//! phases itself, and its audit line times (milliseconds, written as each
//! step happens) are the record of when they happened. A subscriber on the
//! event hub pairs, per microVM, the `state → starting` line with the
//! `spawn` of its `vmm` (spawn latency) and with `state → running` (boot,
//! or restore when the start resumed a snapshot or a warm template).
//! Reading the times from the lines, not the clock at receipt, keeps a
//! busy broker loop from inflating them.

use std::collections::HashMap;
use std::rc::Rc;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use crate::events::Event;

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Seconds, from a fast spawn to a slow emulated boot.
const BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The broker's latency histograms (clones share the series).
#[derive(Debug, Clone)]
pub struct Latencies {
    pub spawn: Histograms,
    pub boot: Histograms,
    pub restore: Histograms,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            spawn: Family::new_with_constructor(histogram),
            boot: Family::new_with_constructor(histogram),
            restore: Family::new_with_constructor(histogram),
        }
    }
}

/// How a start began, learnt at its `starting` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    Boot,
    /// Resumed a warm template's post-boot snapshot.
    Warm,
    /// Resumed a snapshot (`restore`, `fork`, `branch`, a suspended start).
    Snapshot,
}

impl Latencies {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mm_broker_spawn_duration_seconds",
            "From a microVM's start to its mm-vmm spawned.",
            self.spawn.clone(),
        );
        registry.register(
            "mm_broker_boot_duration_seconds",
            "From a microVM's start to running, when it booted.",
            self.boot.clone(),
        );
        registry.register(
            "mm_broker_restore_duration_seconds",
            "From a microVM's start to running, when it resumed a snapshot (source: warm, snapshot).",
            self.restore.clone(),
        );
    }
}

/// Pairs the lines of each microVM's starts.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Per microVM id: when its start began (ms) and how, and whether its
    /// vmm spawn was seen yet.
    pending: HashMap<String, (u64, StartKind, bool)>,
    /// MicroVMs whose next start resumes a snapshot (a `restore`,
    /// `fork` or `branch` line came first).
    restoring: HashMap<String, ()>,
}

impl Tracker {
    /// Feeds one event; `kind_of` tells how a start of that microVM goes
    /// (asked when its `starting` line arrives).
    pub fn observe(
        &mut self,
        latencies: &Latencies,
        host: &str,
        event: &Event,
        kind_of: impl FnOnce(&str) -> StartKind,
    ) {
        if event.vm_id.is_empty() {
            return;
        }
        let Some(at) = parse_ms(&event.time) else { return };
        let detail: Value = serde_json::from_str(&event.detail).unwrap_or(Value::Null);
        let labels = || vec![("host", host.to_owned())];
        match event.kind.as_str() {
            "restore" | "fork" | "branch" => {
                self.restoring.insert(event.vm_id.clone(), ());
            }
            "spawn" if detail["role"] == "vmm" => {
                if let Some((began, _, spawned)) = self.pending.get_mut(&event.vm_id) {
                    if !*spawned {
                        latencies.spawn.get_or_create(&labels()).observe(seconds(*began, at));
                        *spawned = true;
                    }
                }
            }
            "state" => match detail["to"].as_str() {
                Some("starting") => {
                    let kind = if self.restoring.remove(&event.vm_id).is_some() {
                        StartKind::Snapshot
                    } else {
                        kind_of(&event.vm_id)
                    };
                    self.pending.insert(event.vm_id.clone(), (at, kind, false));
                }
                Some("running") => {
                    if let Some((began, kind, _)) = self.pending.remove(&event.vm_id) {
                        let elapsed = seconds(began, at);
                        match kind {
                            StartKind::Boot => latencies.boot.get_or_create(&labels()).observe(elapsed),
                            StartKind::Warm => {
                                let labels = vec![("host", host.to_owned()), ("source", "warm".to_owned())];
                                latencies.restore.get_or_create(&labels).observe(elapsed)
                            }
                            StartKind::Snapshot => {
                                let labels = vec![("host", host.to_owned()), ("source", "snapshot".to_owned())];
                                latencies.restore.get_or_create(&labels).observe(elapsed)
                            }
                        }
                    }
                }
                _ => {
                    self.pending.remove(&event.vm_id);
                }
            },
            "remove" => {
                self.pending.remove(&event.vm_id);
                self.restoring.remove(&event.vm_id);
            }
            _ => {}
        }
    }
}

fn seconds(began_ms: u64, at_ms: u64) -> f64 {
    at_ms.saturating_sub(began_ms) as f64 / 1000.0
}

/// Follows `registry`'s event feed until the broker ends.
pub async fn follow(registry: Rc<crate::registry::Registry>, latencies: Latencies, host: String) {
    let mut events = registry.events.subscribe();
    let mut tracker = Tracker::default();
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        tracker.observe(&latencies, &host, &event, |id| {
            let Some(vm) = registry.list().into_iter().find(|vm| vm.record().id == id) else {
                return StartKind::Boot;
            };
            let record = vm.record();
            if record.resume_from.is_some() {
                StartKind::Snapshot
            } else if record.hand_workload {
                StartKind::Warm
            } else {
                StartKind::Boot
            }
        });
    }
}

/// Milliseconds since the epoch of an audit time (`YYYY-MM-DDThh:mm:ss.mmmZ`).
pub fn parse_ms(time: &str) -> Option<u64> {
    let b = time.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| time.get(range)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let millis = if b[19] == b'.' { num(20..23).unwrap_or(0) } else { 0 };
    // Days from civil (H. Hinnant), the inverse of audit::rfc3339.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + millis;
    u64::try_from(ms).ok()
}
