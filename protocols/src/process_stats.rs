//! `ProcessStats` (`broker.capnp`) as a plain struct: how one process of a
//! microVM is doing, as it answered for itself over its control channel.
//! Read by `mmctl stats` (local) and the controller's `GET .../stats`.

use serde::{Deserialize, Serialize};

use crate::broker_capnp::process_stats;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStats {
    /// `vmm`, or the device's role (`block-rw`, `net`, `vsock`).
    pub role: String,
    pub pid: i32,
    /// Times the broker restarted it.
    pub restarts: u32,
    /// Why the process did not answer; empty if it did.
    #[serde(default)]
    pub error: String,
    pub uptime_ms: u64,
    pub user_cpu_ms: u64,
    pub system_cpu_ms: u64,
    pub max_rss_kib: u64,
    /// For a device: back ends mm-vmm was handed for it after the first.
    pub reconnects: u32,
    /// For a block device: requests its killed predecessor left in flight
    /// that this process ran again.
    #[serde(default)]
    pub resubmitted: u64,
}

impl ProcessStats {
    pub fn read(p: process_stats::Reader<'_>) -> capnp::Result<ProcessStats> {
        let text = |t: capnp::Result<capnp::text::Reader<'_>>| -> capnp::Result<String> {
            Ok(t?.to_string().unwrap_or_default())
        };
        Ok(ProcessStats {
            role: text(p.get_role())?,
            pid: p.get_pid(),
            restarts: p.get_restarts(),
            error: text(p.get_error())?,
            uptime_ms: p.get_uptime_ms(),
            user_cpu_ms: p.get_user_cpu_ms(),
            system_cpu_ms: p.get_system_cpu_ms(),
            max_rss_kib: p.get_max_rss_kib(),
            reconnects: p.get_reconnects(),
            resubmitted: p.get_resubmitted(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reads_back_whole() {
        let mut message = capnp::message::Builder::new_default();
        let mut p = message.init_root::<process_stats::Builder>();
        p.set_role("block-rw");
        p.set_pid(42);
        p.set_restarts(1);
        p.set_uptime_ms(5);
        p.set_user_cpu_ms(6);
        p.set_system_cpu_ms(7);
        p.set_max_rss_kib(8);
        p.set_reconnects(2);
        p.set_resubmitted(3);
        let read = ProcessStats::read(p.into_reader()).unwrap();
        let want = ProcessStats {
            role: "block-rw".into(),
            pid: 42,
            restarts: 1,
            error: String::new(),
            uptime_ms: 5,
            user_cpu_ms: 6,
            system_cpu_ms: 7,
            max_rss_kib: 8,
            reconnects: 2,
            resubmitted: 3,
        };
        assert_eq!(read, want);
    }
}
