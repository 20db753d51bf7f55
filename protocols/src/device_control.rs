//! The mm-device control channel (`device.capnp`): the broker asks a device
//! process how it is doing. The transport is [`crate::packet`]; the server
//! loop is here too, since every device kind answers the same way.

use std::path::Path;
use std::time::{Duration, Instant};

use capnp::message::Builder;

use crate::device_capnp::{device_request, device_response, process_usage, rate_limit};
pub use crate::packet::{ControlError, SeqPacket, SeqPacketListener};
use crate::packet::{encode, reader_options, text};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Status,
    /// Replace the device's rate limits (answered with the status).
    SetRateLimit(RateLimit),
}

/// The most a limit may say: beyond these no device gets anywhere near,
/// so a larger number is a typo (or a unit mix-up), refused rather than
/// silently meaning "unlimited".
pub const MAX_BYTES_PER_SEC: u64 = 100 << 30;
pub const MAX_OPS_PER_SEC: u64 = 10_000_000;

/// A device's rate limits (`device.capnp` RateLimit): 0 = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimit {
    pub bytes_per_sec: u64,
    pub ops_per_sec: u64,
    /// One-time burst of bytes, spent before the bucket (0 = none).
    pub burst_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitError {
    #[error("{what} of {value} is more than the most allowed, {max} (0 means unlimited)")]
    TooLarge { what: &'static str, value: u64, max: u64 },
}

impl RateLimit {
    /// Refuses absurd sizes (0 is fine: unlimited).
    pub fn validate(&self) -> Result<(), RateLimitError> {
        let check = |what, value: u64, max| {
            if value > max { Err(RateLimitError::TooLarge { what, value, max }) } else { Ok(()) }
        };
        check("a bandwidth limit (bytes/s)", self.bytes_per_sec, MAX_BYTES_PER_SEC)?;
        check("an operations limit (ops/s)", self.ops_per_sec, MAX_OPS_PER_SEC)?;
        check("a burst (bytes)", self.burst_bytes, MAX_BYTES_PER_SEC)
    }

    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec == 0 && self.ops_per_sec == 0
    }

    fn write(&self, mut builder: rate_limit::Builder<'_>) {
        builder.set_bytes_per_sec(self.bytes_per_sec);
        builder.set_ops_per_sec(self.ops_per_sec);
        builder.set_burst_bytes(self.burst_bytes);
    }

    fn read(reader: rate_limit::Reader<'_>) -> RateLimit {
        RateLimit {
            bytes_per_sec: reader.get_bytes_per_sec(),
            ops_per_sec: reader.get_ops_per_sec(),
            burst_bytes: reader.get_burst_bytes(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Error(String),
    Status(DeviceStatus),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceStatus {
    pub kind: String,
    pub usage: ProcessUsage,
    pub counters: DeviceCounters,
}

/// What a device counts of its own work (block only, so far: zero for the
/// others).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceCounters {
    /// Block: requests a killed predecessor left in flight that this
    /// process ran again (found in the in-flight table).
    pub resubmitted: u64,
    /// Block: requests taken from the ring and not yet completed, now (a
    /// kill test waits for one before it kills).
    pub in_flight: u64,
    /// The rate limits in force (block and net).
    pub rate_limit: RateLimit,
    /// Requests (block) or frames (net) that had to wait for tokens.
    pub throttled_total: u64,
}

/// What a process has used: `getrusage(RUSAGE_SELF)` and its age.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessUsage {
    pub uptime_ms: u64,
    pub user_cpu_ms: u64,
    pub system_cpu_ms: u64,
    pub max_rss_kib: u64,
}

impl ProcessUsage {
    /// This process's usage; `started` is when it began serving.
    pub fn of_self(started: Instant) -> ProcessUsage {
        // SAFETY: rusage is plain data; getrusage fills it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: RUSAGE_SELF with a pointer to a rusage we own.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        let ms = |tv: libc::timeval| tv.tv_sec as u64 * 1000 + tv.tv_usec as u64 / 1000;
        ProcessUsage {
            uptime_ms: started.elapsed().as_millis() as u64,
            user_cpu_ms: ms(usage.ru_utime),
            system_cpu_ms: ms(usage.ru_stime),
            max_rss_kib: usage.ru_maxrss as u64,
        }
    }

    pub(crate) fn write(&self, mut builder: process_usage::Builder<'_>) {
        builder.set_uptime_ms(self.uptime_ms);
        builder.set_user_cpu_ms(self.user_cpu_ms);
        builder.set_system_cpu_ms(self.system_cpu_ms);
        builder.set_max_rss_kib(self.max_rss_kib);
    }

    pub(crate) fn read(reader: process_usage::Reader<'_>) -> ProcessUsage {
        ProcessUsage {
            uptime_ms: reader.get_uptime_ms(),
            user_cpu_ms: reader.get_user_cpu_ms(),
            system_cpu_ms: reader.get_system_cpu_ms(),
            max_rss_kib: reader.get_max_rss_kib(),
        }
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut message = Builder::new_default();
        let mut request = message.init_root::<device_request::Builder>();
        match self {
            Request::Status => request.set_command(device_request::Command::Status),
            Request::SetRateLimit(limit) => {
                request.set_command(device_request::Command::SetRateLimit);
                limit.write(request.init_rate_limit());
            }
        }
        encode(&message)
    }

    pub fn decode(mut bytes: &[u8]) -> Result<Request, ControlError> {
        let message = capnp::serialize::read_message_from_flat_slice(&mut bytes, reader_options())?;
        let root = message.get_root::<device_request::Reader>()?;
        match root.get_command().map_err(|_| ControlError::UnknownKind)? {
            device_request::Command::Status => Ok(Request::Status),
            device_request::Command::SetRateLimit => Ok(Request::SetRateLimit(RateLimit::read(root.get_rate_limit()?))),
        }
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        let mut message = Builder::new_default();
        let mut response = message.init_root::<device_response::Builder>();
        match self {
            Response::Error(e) => response.set_error(e),
            Response::Status(status) => {
                let mut out = response.init_status();
                out.set_kind(&status.kind);
                out.set_resubmitted(status.counters.resubmitted);
                out.set_in_flight(status.counters.in_flight);
                out.set_throttled_total(status.counters.throttled_total);
                status.counters.rate_limit.write(out.reborrow().init_rate_limit());
                status.usage.write(out.init_usage());
            }
        }
        encode(&message)
    }

    pub fn decode(mut bytes: &[u8]) -> Result<Response, ControlError> {
        let message = capnp::serialize::read_message_from_flat_slice(&mut bytes, reader_options())?;
        match message.get_root::<device_response::Reader>()?.which().map_err(|_| ControlError::UnknownKind)? {
            device_response::Error(e) => Ok(Response::Error(text(e?)?)),
            device_response::Status(status) => {
                let status = status?;
                Ok(Response::Status(DeviceStatus {
                    kind: text(status.get_kind()?)?,
                    usage: ProcessUsage::read(status.get_usage()?),
                    counters: DeviceCounters {
                        resubmitted: status.get_resubmitted(),
                        in_flight: status.get_in_flight(),
                        rate_limit: if status.has_rate_limit() {
                            RateLimit::read(status.get_rate_limit()?)
                        } else {
                            RateLimit::default()
                        },
                        throttled_total: status.get_throttled_total(),
                    },
                }))
            }
        }
    }
}

/// Answers status requests on `listener`, one connection at a time, for
/// ever (a device runs this on a thread of its own); `counters` reads the
/// device's own counts.
pub fn serve(listener: SeqPacketListener, kind: &'static str, started: Instant, counters: fn() -> DeviceCounters) -> ! {
    serve_with(listener, kind, started, counters, |_| Err("this device has no rate limiter".into()))
}

/// [`serve`] for a device with a rate limiter: `set_rate_limit` applies
/// new limits (already validated here) or says why not.
pub fn serve_with(
    listener: SeqPacketListener,
    kind: &'static str,
    started: Instant,
    counters: impl Fn() -> DeviceCounters,
    set_rate_limit: impl Fn(RateLimit) -> Result<(), String>,
) -> ! {
    let status = || {
        Response::Status(DeviceStatus {
            kind: kind.into(),
            usage: ProcessUsage::of_self(started),
            counters: counters(),
        })
    };
    loop {
        let connection = match listener.accept() {
            Ok(connection) => connection,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // A peer that sends what is no packet of ours loses its connection.
        while let Ok(Some((bytes, _))) = connection.recv() {
            let response = match Request::decode(&bytes) {
                Ok(Request::Status) => status(),
                Ok(Request::SetRateLimit(limit)) => {
                    match limit.validate().map_err(|e| e.to_string()).and_then(|()| set_rate_limit(limit)) {
                        Ok(()) => status(),
                        Err(e) => Response::Error(e),
                    }
                }
                Err(e) => Response::Error(e.to_string()),
            };
            if connection.send(&response.encode(), &[]).is_err() {
                break;
            }
        }
    }
}

/// The broker's side.
#[derive(Debug)]
pub struct DeviceClient {
    socket: SeqPacket,
}

impl DeviceClient {
    /// Connects, waiting at most `timeout` for each answer later.
    pub fn connect(path: &Path, timeout: Duration) -> Result<DeviceClient, ControlError> {
        let socket = SeqPacket::connect(path)?;
        socket.set_read_timeout(Some(timeout))?;
        Ok(DeviceClient { socket })
    }

    pub fn status(&self) -> Result<DeviceStatus, ControlError> {
        self.socket.send(&Request::Status.encode(), &[])?;
        let (bytes, _) = self.socket.recv()?.ok_or(ControlError::HungUp)?;
        match Response::decode(&bytes)? {
            Response::Status(status) => Ok(status),
            Response::Error(e) => Err(ControlError::Refused(e)),
        }
    }

    /// Replaces the device's rate limits; answers the status after.
    pub fn set_rate_limit(&self, limit: RateLimit) -> Result<DeviceStatus, ControlError> {
        self.socket.send(&Request::SetRateLimit(limit).encode(), &[])?;
        let (bytes, _) = self.socket.recv()?.ok_or(ControlError::HungUp)?;
        match Response::decode(&bytes)? {
            Response::Status(status) => Ok(status),
            Response::Error(e) => Err(ControlError::Refused(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_answers_its_status_over_a_socket() {
        let dir = std::env::temp_dir().join(format!("mm-device-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let listener = SeqPacketListener::bind(&path).unwrap();
        let started = Instant::now();
        let counters = || DeviceCounters { resubmitted: 7, in_flight: 2, ..Default::default() };
        std::thread::spawn(move || serve(listener, "block", started, counters));
        let client = DeviceClient::connect(&path, Duration::from_secs(5)).unwrap();
        let status = client.status().unwrap();
        assert_eq!(status.kind, "block");
        assert_eq!(status.counters, DeviceCounters { resubmitted: 7, in_flight: 2, ..Default::default() });
        // A device without a limiter refuses new limits, and says so.
        let limit = RateLimit { bytes_per_sec: 1 << 20, ..Default::default() };
        assert!(matches!(client.set_rate_limit(limit), Err(ControlError::Refused(e)) if e.contains("no rate limiter")));
        assert!(status.usage.max_rss_kib > 0);
        // The same connection answers again; a second client waits its turn.
        assert!(client.status().unwrap().usage.uptime_ms >= status.usage.uptime_ms);
        drop(client);
        assert_eq!(DeviceClient::connect(&path, Duration::from_secs(5)).unwrap().status().unwrap().kind, "block");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        assert_eq!(Request::decode(&Request::Status.encode()).unwrap(), Request::Status);
        let status = DeviceStatus {
            kind: "net".into(),
            usage: ProcessUsage { uptime_ms: 1, user_cpu_ms: 2, system_cpu_ms: 3, max_rss_kib: 4 },
            counters: DeviceCounters {
                resubmitted: 5,
                in_flight: 6,
                rate_limit: RateLimit { bytes_per_sec: 7, ops_per_sec: 8, burst_bytes: 9 },
                throttled_total: 10,
            },
        };
        let set = Request::SetRateLimit(RateLimit { bytes_per_sec: 1, ops_per_sec: 2, burst_bytes: 3 });
        assert_eq!(Request::decode(&set.encode()).unwrap(), set);
        for response in [Response::Status(status), Response::Error("x".into())] {
            assert_eq!(Response::decode(&response.encode()).unwrap(), response);
        }
        assert!(RateLimit::default().validate().is_ok());
        assert!(
            RateLimit { bytes_per_sec: MAX_BYTES_PER_SEC, ops_per_sec: MAX_OPS_PER_SEC, burst_bytes: 0 }
                .validate()
                .is_ok()
        );
        let e = RateLimit { bytes_per_sec: MAX_BYTES_PER_SEC + 1, ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("bytes/s"), "{e}");
        assert!(RateLimit { ops_per_sec: u64::MAX, ..Default::default() }.validate().is_err());
        assert!(Request::decode(b"\\x00\\x00\\x00\\x00\\xff\\xff\\xff\\x7f").is_err());
    }
}
