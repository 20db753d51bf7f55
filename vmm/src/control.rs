//! mm-vmm's control channel (`protocols/vmm.capnp`): the broker replaces a
//! device back end that died, asks for the VM's status, and pauses,
//! snapshots and resumes the VM (`live.rs`).
//!
//! One Cap'n Proto message per `SOCK_SEQPACKET` packet, request then
//! response, with a new back end's socket attached to its request
//! (SCM_RIGHTS). The thread listens and serves one connection at a time:
//! `--control PATH` binds a listener there (manual use, tests); with
//! `--control fd:N` the broker bound it (at a path in the microVM's
//! directory) and passed it in, so a restarted broker connects again and
//! keeps control of the microVMs it re-adopts. A blocking loop with no RPC
//! runtime keeps the vCPU process small and its policy short.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mm_protocols::device_control::ProcessUsage;
use mm_protocols::socket_path;
use mm_protocols::vmm_control::{
    ControlError, DeviceStatus, Request, Response, SeqPacket, SeqPacketListener, VmmStatus,
};

use crate::devices::Bus;
use crate::endpoint::Endpoint;
use crate::live::LiveVm;

/// What the status answer reports besides the devices.
#[derive(Debug, Clone, Copy)]
pub struct VmFacts {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub started: Instant,
}

/// Binds or takes over the listener, then serves it on its own thread.
pub fn serve(endpoint: &Endpoint, live: Arc<LiveVm>, facts: VmFacts) -> std::io::Result<()> {
    let listener = match endpoint {
        Endpoint::Path(path) => socket_path::bind_listening(path, SeqPacketListener::bind),
        Endpoint::Fd { .. } => SeqPacketListener::from_inherited(endpoint.take()?),
    }
    .map_err(std::io::Error::other)?;
    std::thread::Builder::new().name("control".into()).spawn(move || {
        let mut reconnects = vec![0u32; live.bus().virtio.len()];
        loop {
            match listener.accept() {
                Ok(connection) => {
                    if let Err(e) = handle(&connection, &live, facts, &mut reconnects) {
                        tracing::warn!("control connection: {e}");
                    }
                }
                Err(e) => {
                    tracing::warn!("control socket: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })?;
    Ok(())
}

/// Answers requests until the peer hangs up (or sends what is no packet
/// of ours, which ends this connection, not the listener).
fn handle(connection: &SeqPacket, live: &LiveVm, facts: VmFacts, reconnects: &mut [u32]) -> Result<(), ControlError> {
    while let Some((bytes, fds)) = connection.recv()? {
        let bus = live.bus();
        let mut fds = fds.into_iter();
        let response = match Request::decode(&bytes) {
            Ok(Request::ReconnectDevice(index)) => match reconnect(bus, index as usize, fds.next()) {
                Ok(()) => {
                    reconnects[index as usize] += 1;
                    Response::Ok
                }
                Err(e) => Response::Error(e),
            },
            Ok(Request::Status) => Response::Status(status(bus, facts, reconnects)),
            Ok(Request::Pause) => live.pause().map_or_else(|e| Response::Error(e.to_string()), |()| Response::Ok),
            Ok(Request::Resume) => live.resume().map_or_else(|e| Response::Error(e.to_string()), |()| Response::Ok),
            Ok(Request::Snapshot) => match (fds.next(), fds.next()) {
                (Some(state), Some(memory)) => {
                    live.snapshot(state, memory).map_or_else(|e| Response::Error(e.to_string()), Response::Snapshotted)
                }
                _ => Response::Error("snapshot needs its state and memory files attached (SCM_RIGHTS)".into()),
            },
            Ok(Request::SnapshotRunning) => match (fds.next(), fds.next()) {
                (Some(state), Some(memory)) => live
                    .snapshot_running(state, memory)
                    .map_or_else(|e| Response::Error(e.to_string()), Response::Snapshotted),
                _ => Response::Error("snapshotRunning needs its state and memory files attached (SCM_RIGHTS)".into()),
            },
            Err(e) => Response::Error(e.to_string()),
        };
        connection.send(&response.encode(), &[])?;
    }
    Ok(())
}

fn reconnect(bus: &Bus, index: usize, fd: Option<OwnedFd>) -> Result<(), String> {
    let fd = fd.ok_or("reconnectDevice needs the new back end's socket attached (SCM_RIGHTS)")?;
    let (_, device) = bus.virtio.get(index).ok_or_else(|| format!("no device {index}"))?;
    let mut device = device.lock().map_err(|_| "device lock poisoned".to_string())?;
    device.reconnect(UnixStream::from(fd)).map_err(|e| e.to_string())?;
    tracing::info!(index, kind = device.kind().name(), "device back end replaced");
    Ok(())
}

fn status(bus: &Bus, facts: VmFacts, reconnects: &[u32]) -> VmmStatus {
    let devices = bus
        .virtio
        .iter()
        .enumerate()
        .map(|(index, (_, device))| DeviceStatus {
            index: index as u32,
            kind: device.lock().map_or("unknown", |d| d.kind().name()).to_string(),
            reconnects: reconnects[index],
        })
        .collect();
    VmmStatus {
        vcpus: facts.vcpus,
        memory_mib: facts.memory_mib,
        uptime_ms: facts.started.elapsed().as_millis() as u64,
        devices,
        usage: ProcessUsage::of_self(facts.started),
    }
}
