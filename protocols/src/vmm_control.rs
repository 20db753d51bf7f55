//! The mm-vmm control channel (`vmm.capnp`): typed requests and responses,
//! their Cap'n Proto encoding, and the client the broker (and the tests)
//! use. The transport is [`crate::packet`].

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use capnp::message::Builder;

use crate::device_control::ProcessUsage;
pub use crate::packet::{ControlError, Packet, SeqPacket, SeqPacketListener};
use crate::packet::{encode, reader_options, text};
use crate::vmm_capnp::{snapshot_report, vmm_request, vmm_response, vmm_status};

/// What the broker asks mm-vmm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Device `index` gets the back end whose socket is attached.
    ReconnectDevice(u32),
    Status,
    /// Stop the vCPUs and quiesce the devices.
    Pause,
    /// Let a paused VM run again.
    Resume,
    /// Save the paused VM into the state and memory files attached.
    Snapshot,
    /// Save a running VM (the vCPUs stop only for the cut; the devices stay
    /// quiesced until `Resume`) into the state and memory files attached.
    SnapshotRunning,
}

/// What mm-vmm answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Ok,
    Error(String),
    Status(VmmStatus),
    Snapshotted(SnapshotReport),
}

/// What a snapshot wrote and how long the VM stood still for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotReport {
    pub memory_bytes: u64,
    pub state_bytes: u64,
    pub save_us: u64,
    pub paused_us: u64,
    /// `SnapshotRunning`: pages dirtied while the first copy ran, copied
    /// again while the vCPUs were paused.
    pub dirty_pages: u64,
    /// `SnapshotRunning`: of `dirty_pages`, those the device back ends
    /// wrote during the copy (their vhost-user dirty log).
    pub device_pages: u64,
    /// `SnapshotRunning`: how long after the request the devices were still
    /// serving the guest (they log their writes while the first copy runs,
    /// and are quiesced only for the cut); 0 when they were held from the
    /// start. The broker counts the I/O hold from there.
    pub io_run_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmmStatus {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub uptime_ms: u64,
    pub devices: Vec<DeviceStatus>,
    /// mm-vmm's own usage (the answering process: the jailed half).
    pub usage: ProcessUsage,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    pub kind: String,
    pub reconnects: u32,
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut message = Builder::new_default();
        let mut request = message.init_root::<vmm_request::Builder>();
        match self {
            Request::ReconnectDevice(index) => request.set_reconnect_device(*index),
            Request::Status => request.set_status(()),
            Request::Pause => request.set_pause(()),
            Request::Resume => request.set_resume(()),
            Request::Snapshot => request.set_snapshot(()),
            Request::SnapshotRunning => request.set_snapshot_running(()),
        }
        encode(&message)
    }

    pub fn decode(mut bytes: &[u8]) -> Result<Request, ControlError> {
        let message = capnp::serialize::read_message_from_flat_slice(&mut bytes, reader_options())?;
        let request = message.get_root::<vmm_request::Reader>()?;
        match request.which().map_err(|_| ControlError::UnknownKind)? {
            vmm_request::ReconnectDevice(index) => Ok(Request::ReconnectDevice(index)),
            vmm_request::Status(()) => Ok(Request::Status),
            vmm_request::Pause(()) => Ok(Request::Pause),
            vmm_request::Resume(()) => Ok(Request::Resume),
            vmm_request::Snapshot(()) => Ok(Request::Snapshot),
            vmm_request::SnapshotRunning(()) => Ok(Request::SnapshotRunning),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Request::ReconnectDevice(_) => "reconnectDevice",
            Request::Status => "status",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Snapshot => "snapshot",
            Request::SnapshotRunning => "snapshotRunning",
        }
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        let mut message = Builder::new_default();
        let mut response = message.init_root::<vmm_response::Builder>();
        match self {
            Response::Ok => response.set_ok(()),
            Response::Error(text) => response.set_error(text),
            Response::Status(status) => write_status(status, response.init_status()),
            Response::Snapshotted(report) => write_report(report, response.init_snapshotted()),
        }
        encode(&message)
    }

    pub fn decode(mut bytes: &[u8]) -> Result<Response, ControlError> {
        let message = capnp::serialize::read_message_from_flat_slice(&mut bytes, reader_options())?;
        let response = message.get_root::<vmm_response::Reader>()?;
        match response.which().map_err(|_| ControlError::UnknownKind)? {
            vmm_response::Ok(()) => Ok(Response::Ok),
            vmm_response::Error(text_reader) => Ok(Response::Error(text(text_reader?)?)),
            vmm_response::Status(status) => Ok(Response::Status(read_status(status?)?)),
            vmm_response::Snapshotted(report) => Ok(Response::Snapshotted(read_report(report?))),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Response::Ok => "ok",
            Response::Error(_) => "an error",
            Response::Status(_) => "a status",
            Response::Snapshotted(_) => "a snapshot report",
        }
    }
}

fn write_report(report: &SnapshotReport, mut builder: snapshot_report::Builder<'_>) {
    builder.set_memory_bytes(report.memory_bytes);
    builder.set_state_bytes(report.state_bytes);
    builder.set_save_us(report.save_us);
    builder.set_paused_us(report.paused_us);
    builder.set_dirty_pages(report.dirty_pages);
    builder.set_device_pages(report.device_pages);
    builder.set_io_run_us(report.io_run_us);
}

fn read_report(reader: snapshot_report::Reader<'_>) -> SnapshotReport {
    SnapshotReport {
        memory_bytes: reader.get_memory_bytes(),
        state_bytes: reader.get_state_bytes(),
        save_us: reader.get_save_us(),
        paused_us: reader.get_paused_us(),
        dirty_pages: reader.get_dirty_pages(),
        device_pages: reader.get_device_pages(),
        io_run_us: reader.get_io_run_us(),
    }
}

fn write_status(status: &VmmStatus, mut builder: vmm_status::Builder<'_>) {
    builder.set_vcpus(status.vcpus);
    builder.set_memory_mib(status.memory_mib);
    builder.set_uptime_ms(status.uptime_ms);
    status.usage.write(builder.reborrow().init_usage());
    let mut devices = builder.init_devices(status.devices.len() as u32);
    for (i, device) in status.devices.iter().enumerate() {
        let mut entry = devices.reborrow().get(i as u32);
        entry.set_index(device.index);
        entry.set_kind(&device.kind);
        entry.set_reconnects(device.reconnects);
    }
}

fn read_status(reader: vmm_status::Reader<'_>) -> Result<VmmStatus, ControlError> {
    let mut devices = Vec::new();
    for device in reader.get_devices()?.iter() {
        devices.push(DeviceStatus {
            index: device.get_index(),
            kind: text(device.get_kind()?)?,
            reconnects: device.get_reconnects(),
        });
    }
    Ok(VmmStatus {
        vcpus: reader.get_vcpus(),
        memory_mib: reader.get_memory_mib(),
        uptime_ms: reader.get_uptime_ms(),
        devices,
        usage: ProcessUsage::read(reader.get_usage()?),
    })
}

/// The broker's (and tests') side of one mm-vmm's control channel.
#[derive(Debug)]
pub struct VmmClient {
    socket: SeqPacket,
}

/// How long mm-vmm may take to answer (a reconnect replays the vhost-user
/// set-up, a few round trips to the new back end).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

impl VmmClient {
    pub fn connect(path: &Path) -> Result<VmmClient, ControlError> {
        let socket = SeqPacket::connect(path)?;
        socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        Ok(VmmClient { socket })
    }

    fn call(&self, request: &Request, fds: &[RawFd]) -> Result<Response, ControlError> {
        self.socket.send(&request.encode(), fds)?;
        let (bytes, _) = self.socket.recv()?.ok_or(ControlError::HungUp)?;
        match Response::decode(&bytes)? {
            Response::Error(e) => Err(ControlError::Refused(e)),
            response => Ok(response),
        }
    }

    /// Hands device `index` a new back end (`backend`: connected to it).
    pub fn reconnect_device(&self, index: u32, backend: &impl AsRawFd) -> Result<(), ControlError> {
        let request = Request::ReconnectDevice(index);
        match self.call(&request, &[backend.as_raw_fd()])? {
            Response::Ok => Ok(()),
            other => Err(ControlError::Unexpected(other.name(), request.name())),
        }
    }

    pub fn status(&self) -> Result<VmmStatus, ControlError> {
        match self.call(&Request::Status, &[])? {
            Response::Status(status) => Ok(status),
            other => Err(ControlError::Unexpected(other.name(), Request::Status.name())),
        }
    }

    /// Stops the vCPUs and quiesces the devices (see `vmm.capnp`).
    pub fn pause(&self) -> Result<(), ControlError> {
        self.expect_ok(&Request::Pause, &[])
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        self.expect_ok(&Request::Resume, &[])
    }

    /// Saves the paused VM into `state` and `memory` (both open for writing).
    pub fn snapshot(&self, state: &impl AsRawFd, memory: &impl AsRawFd) -> Result<SnapshotReport, ControlError> {
        match self.call(&Request::Snapshot, &[state.as_raw_fd(), memory.as_raw_fd()])? {
            Response::Snapshotted(report) => Ok(report),
            other => Err(ControlError::Unexpected(other.name(), Request::Snapshot.name())),
        }
    }

    /// Saves the running VM into `state` and `memory` with only a short
    /// vCPU pause; its devices stay quiesced until [`Self::resume`] (see
    /// `vmm.capnp`, `snapshotRunning`).
    pub fn snapshot_running(
        &self,
        state: &impl AsRawFd,
        memory: &impl AsRawFd,
    ) -> Result<SnapshotReport, ControlError> {
        match self.call(&Request::SnapshotRunning, &[state.as_raw_fd(), memory.as_raw_fd()])? {
            Response::Snapshotted(report) => Ok(report),
            other => Err(ControlError::Unexpected(other.name(), Request::SnapshotRunning.name())),
        }
    }

    fn expect_ok(&self, request: &Request, fds: &[RawFd]) -> Result<(), ControlError> {
        match self.call(request, fds)? {
            Response::Ok => Ok(()),
            other => Err(ControlError::Unexpected(other.name(), request.name())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        for request in [
            Request::ReconnectDevice(3),
            Request::Status,
            Request::Pause,
            Request::Resume,
            Request::Snapshot,
            Request::SnapshotRunning,
        ] {
            assert_eq!(Request::decode(&request.encode()).unwrap(), request);
        }
        let status = VmmStatus {
            vcpus: 2,
            memory_mib: 256,
            uptime_ms: 1234,
            devices: vec![DeviceStatus { index: 0, kind: "block".into(), reconnects: 5 }],
            usage: ProcessUsage { uptime_ms: 9, user_cpu_ms: 8, system_cpu_ms: 7, max_rss_kib: 6 },
        };
        let report = SnapshotReport {
            memory_bytes: 1 << 20,
            state_bytes: 4096,
            save_us: 3,
            paused_us: 4,
            dirty_pages: 5,
            device_pages: 6,
            io_run_us: 7,
        };
        for response in [
            Response::Ok,
            Response::Error("no device 9".into()),
            Response::Status(status),
            Response::Snapshotted(report),
        ] {
            assert_eq!(Response::decode(&response.encode()).unwrap(), response);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&b""[..], b"garbage!", &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f], &[0u8; 64]] {
            let _ = Request::decode(bytes);
            let _ = Response::decode(bytes);
        }
        assert!(Request::decode(b"garbage!").is_err());
    }

    #[test]
    fn packets_carry_bytes_and_fds_and_report_hang_up() {
        let (a, b) = SeqPacket::pair().unwrap();
        let (x, _y) = SeqPacket::pair().unwrap();
        a.send(&Request::ReconnectDevice(1).encode(), &[std::os::fd::AsFd::as_fd(&x).as_raw_fd()]).unwrap();
        let (bytes, fds) = b.recv().unwrap().unwrap();
        assert_eq!(Request::decode(&bytes).unwrap(), Request::ReconnectDevice(1));
        assert_eq!(fds.len(), 1);
        let (m, _n) = SeqPacket::pair().unwrap();
        use std::os::fd::AsFd;
        let two = [x.as_fd().as_raw_fd(), m.as_fd().as_raw_fd()];
        a.send(&Request::Snapshot.encode(), &two).unwrap();
        let (bytes, fds) = b.recv().unwrap().unwrap();
        assert_eq!(Request::decode(&bytes).unwrap(), Request::Snapshot);
        assert_eq!(fds.len(), 2, "both files arrive, in order");
        a.send(&Request::Status.encode(), &[]).unwrap();
        let (bytes, fds) = b.recv().unwrap().unwrap();
        assert_eq!(Request::decode(&bytes).unwrap(), Request::Status);
        assert!(fds.is_empty());
        assert!(a.send(b"x", &[two[0]; 5]).is_err(), "more than MAX_FDS is refused");
        drop(a);
        assert!(b.recv().unwrap().is_none());
    }
}
