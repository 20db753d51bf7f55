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
use crate::vmm_capnp::{vmm_request, vmm_response, vmm_status};

/// What the broker asks mm-vmm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Device `index` gets the back end whose socket is attached.
    ReconnectDevice(u32),
    Status,
}

/// What mm-vmm answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Ok,
    Error(String),
    Status(VmmStatus),
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
        }
        encode(&message)
    }

    pub fn decode(mut bytes: &[u8]) -> Result<Request, ControlError> {
        let message = capnp::serialize::read_message_from_flat_slice(&mut bytes, reader_options())?;
        let request = message.get_root::<vmm_request::Reader>()?;
        match request.which().map_err(|_| ControlError::UnknownKind)? {
            vmm_request::ReconnectDevice(index) => Ok(Request::ReconnectDevice(index)),
            vmm_request::Status(()) => Ok(Request::Status),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Request::ReconnectDevice(_) => "reconnectDevice",
            Request::Status => "status",
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
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Response::Ok => "ok",
            Response::Error(_) => "an error",
            Response::Status(_) => "a status",
        }
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

    fn call(&self, request: &Request, fd: Option<RawFd>) -> Result<Response, ControlError> {
        self.socket.send(&request.encode(), fd)?;
        let (bytes, _) = self.socket.recv()?.ok_or(ControlError::HungUp)?;
        match Response::decode(&bytes)? {
            Response::Error(e) => Err(ControlError::Refused(e)),
            response => Ok(response),
        }
    }

    /// Hands device `index` a new back end (`backend`: connected to it).
    pub fn reconnect_device(&self, index: u32, backend: &impl AsRawFd) -> Result<(), ControlError> {
        let request = Request::ReconnectDevice(index);
        match self.call(&request, Some(backend.as_raw_fd()))? {
            Response::Ok => Ok(()),
            other => Err(ControlError::Unexpected(other.name(), request.name())),
        }
    }

    pub fn status(&self) -> Result<VmmStatus, ControlError> {
        match self.call(&Request::Status, None)? {
            Response::Status(status) => Ok(status),
            other => Err(ControlError::Unexpected(other.name(), Request::Status.name())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        for request in [Request::ReconnectDevice(3), Request::Status] {
            assert_eq!(Request::decode(&request.encode()).unwrap(), request);
        }
        let status = VmmStatus {
            vcpus: 2,
            memory_mib: 256,
            uptime_ms: 1234,
            devices: vec![DeviceStatus { index: 0, kind: "block".into(), reconnects: 5 }],
            usage: ProcessUsage { uptime_ms: 9, user_cpu_ms: 8, system_cpu_ms: 7, max_rss_kib: 6 },
        };
        for response in [Response::Ok, Response::Error("no device 9".into()), Response::Status(status)] {
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
        a.send(&Request::ReconnectDevice(1).encode(), Some(std::os::fd::AsFd::as_fd(&x).as_raw_fd())).unwrap();
        let (bytes, fd) = b.recv().unwrap().unwrap();
        assert_eq!(Request::decode(&bytes).unwrap(), Request::ReconnectDevice(1));
        assert!(fd.is_some());
        a.send(&Request::Status.encode(), None).unwrap();
        let (bytes, fd) = b.recv().unwrap().unwrap();
        assert_eq!(Request::decode(&bytes).unwrap(), Request::Status);
        assert!(fd.is_none());
        drop(a);
        assert!(b.recv().unwrap().is_none());
    }
}
