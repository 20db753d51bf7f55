//! `Vm.stats`: every process of a running microVM, asked over its own
//! control channel: mm-vmm over protocols/vmm.capnp (its usage, and how
//! many back ends each device has had), each device over
//! protocols/device.capnp (its usage, and for block the requests it
//! resubmitted for a killed predecessor).
//!
//! A process that does not answer within [`ANSWER_TIMEOUT`] is reported
//! with the error, not waited for: a stuck device must not stall the
//! broker. Devices are asked on blocking threads; mm-vmm's channel is the
//! one supervision uses, asked in place (it answers from a thread of its
//! own at once).

use std::time::Duration;

use mm_protocols::device_control::{DeviceClient, ProcessUsage};

use crate::BrokerError;
use crate::launch::{self, device_control_socket};
use crate::record::IoLimits;
use crate::vm::Vm;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// One process's figures, or why there are none.
#[derive(Debug, Clone)]
pub struct ProcessStats {
    pub role: String,
    pub pid: i32,
    pub restarts: u32,
    pub usage: Result<ProcessUsage, String>,
    pub reconnects: u32,
    pub resubmitted: u64,
    /// Requests (block) or frames (net) its rate limiter made wait.
    pub throttled_total: u64,
}

pub async fn gather(vm: &Vm) -> Vec<ProcessStats> {
    let record = vm.record();
    let specs = launch::devices_for(vm.config(), &vm.dir, &record);
    let vmm_status = match vm.vmm_control() {
        Some(control) => control.status().map_err(|e| e.to_string()),
        None => Err("no control channel to mm-vmm".to_string()),
    };
    let mut out = Vec::new();
    for process in &record.processes {
        let mut stats = ProcessStats {
            role: process.role.clone(),
            pid: process.pid,
            restarts: process.restarts,
            usage: Err(String::new()),
            reconnects: 0,
            resubmitted: 0,
            throttled_total: 0,
        };
        if process.role == "vmm" {
            stats.usage = vmm_status.as_ref().map(|s| s.usage).map_err(Clone::clone);
        } else {
            let index = specs.iter().position(|s| s.role == process.role);
            if let (Ok(status), Some(index)) = (&vmm_status, index) {
                stats.reconnects = status.devices.get(index).map_or(0, |d| d.reconnects);
            }
            let path = device_control_socket(&vm.dir, &process.role);
            let asked = tokio::task::spawn_blocking(move || {
                DeviceClient::connect(&path, ANSWER_TIMEOUT).and_then(|client| client.status())
            })
            .await;
            stats.usage = match asked {
                Ok(Ok(status)) => {
                    stats.resubmitted = status.counters.resubmitted;
                    stats.throttled_total = status.counters.throttled_total;
                    Ok(status.usage)
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            };
        }
        out.push(stats);
    }
    out
}

/// `Vm.update`: records the new limits first (so a device restarted from
/// now on starts with them), then hands them to each running disk and
/// network device over its control channel, which applies them between
/// two requests. A device that does not take them is an error naming it
/// (it keeps the recorded limits from its next restart on).
pub async fn set_io_limits(vm: &Vm, limits: IoLimits) -> Result<(), BrokerError> {
    vm.set_io_limits(limits);
    if !vm.state().is_live() {
        return Ok(());
    }
    let record = vm.record();
    for spec in launch::devices_for(vm.config(), &vm.dir, &record) {
        let limit = match spec.kind {
            "block" => limits.disk(),
            _ => continue,
        };
        if !record.processes.iter().any(|p| p.role == spec.role) {
            continue;
        }
        let path = device_control_socket(&vm.dir, &spec.role);
        let asked = tokio::task::spawn_blocking(move || {
            DeviceClient::connect(&path, ANSWER_TIMEOUT).and_then(|client| client.set_rate_limit(limit))
        })
        .await;
        let failed = |why: String| BrokerError::Io {
            what: format!("changing the rate limits of {}", spec.role),
            source: std::io::Error::other(why),
        };
        match asked {
            Ok(Ok(status)) if status.counters.rate_limit == limit => {}
            Ok(Ok(status)) => return Err(failed(format!("it reports {:?}", status.counters.rate_limit))),
            Ok(Err(e)) => return Err(failed(e.to_string())),
            Err(e) => return Err(failed(e.to_string())),
        }
    }
    Ok(())
}
