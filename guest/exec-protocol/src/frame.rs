//! Frames: encoding, and decoding that never trusts its input.

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::frame_type as t;
use crate::identity::GuestIdentity;
use crate::request::{ExecRequest, ExitStatus};
use crate::workload::Workload;

/// Largest payload either side accepts (1 MiB). Data frames are sent in far
/// smaller chunks; the bound keeps a hostile length from costing memory.
pub const MAX_PAYLOAD: u32 = 1 << 20;

/// Type byte plus the 32-bit length.
pub(crate) const HEADER: usize = 5;

/// One protocol message. [`Frame::Identity`] takes a request's place as
/// the first frame, for a guest restored from a snapshot ([`GuestIdentity`]),
/// and so does [`Frame::Workload`], for a guest waiting for its workload
/// ([`Workload`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Request(ExecRequest),
    Stdin(Vec<u8>),
    StdinEof,
    Resize { rows: u16, cols: u16 },
    Signal(i32),
    Identity(GuestIdentity),
    Workload(Workload),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("frame payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    #[error("{kind} frame with a malformed {len}-byte payload")]
    BadPayload { kind: &'static str, len: usize },
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("malformed identity: {0}")]
    BadIdentity(String),
    #[error("malformed workload: {0}")]
    BadWorkload(String),
    #[error("error frame is not UTF-8")]
    BadUtf8,
    #[error("the stream ended inside a frame")]
    Truncated,
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

impl Frame {
    /// What the frame is, for error messages about frames out of place.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Frame::Request(_) => "request",
            Frame::Stdin(_) | Frame::StdinEof => "stdin",
            Frame::Resize { .. } => "resize",
            Frame::Signal(_) => "signal",
            Frame::Identity(_) => "identity",
            Frame::Workload(_) => "workload",
            Frame::Stdout(_) => "stdout",
            Frame::Stderr(_) => "stderr",
            Frame::Exit(_) => "exit",
            Frame::Error(_) => "error",
        }
    }

    fn type_byte(&self) -> u8 {
        match self {
            Frame::Request(_) => t::REQUEST,
            Frame::Stdin(_) => t::STDIN,
            Frame::StdinEof => t::STDIN_EOF,
            Frame::Resize { .. } => t::RESIZE,
            Frame::Signal(_) => t::SIGNAL,
            Frame::Identity(_) => t::IDENTITY,
            Frame::Workload(_) => t::WORKLOAD,
            Frame::Stdout(_) => t::STDOUT,
            Frame::Stderr(_) => t::STDERR,
            Frame::Exit(_) => t::EXIT,
            Frame::Error(_) => t::ERROR,
        }
    }

    /// Appends the encoded frame to `out`. Fails only when the payload is
    /// over [`MAX_PAYLOAD`] (a huge request, or data the caller did not
    /// chunk), leaving `out` as it was.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let start = out.len();
        out.push(self.type_byte());
        out.extend_from_slice(&[0; 4]);
        match self {
            Frame::Request(req) => json_into(out, req, ProtocolError::BadRequest)?,
            Frame::Identity(identity) => json_into(out, identity, ProtocolError::BadIdentity)?,
            Frame::Workload(workload) => json_into(out, workload, ProtocolError::BadWorkload)?,
            Frame::Stdin(data) | Frame::Stdout(data) | Frame::Stderr(data) => out.extend_from_slice(data),
            Frame::StdinEof => {}
            Frame::Resize { rows, cols } => {
                out.extend_from_slice(&rows.to_be_bytes());
                out.extend_from_slice(&cols.to_be_bytes());
            }
            Frame::Signal(sig) => out.extend_from_slice(&sig.to_be_bytes()),
            Frame::Exit(status) => {
                let (kind, value) = match status {
                    ExitStatus::Exited(code) => (0u8, *code),
                    ExitStatus::Signaled(sig) => (1u8, *sig),
                };
                out.push(kind);
                out.extend_from_slice(&value.to_be_bytes());
            }
            Frame::Error(message) => out.extend_from_slice(message.as_bytes()),
        }
        let len = out.len() - start - HEADER;
        if len > MAX_PAYLOAD as usize {
            out.truncate(start);
            return Err(ProtocolError::TooLarge(len as u64));
        }
        out[start + 1..start + HEADER].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }

    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    fn parse(kind: u8, payload: &[u8]) -> Result<Frame, ProtocolError> {
        let bad = |kind| ProtocolError::BadPayload { kind, len: payload.len() };
        Ok(match kind {
            t::REQUEST => Frame::Request(json_from(payload, ProtocolError::BadRequest)?),
            t::IDENTITY => Frame::Identity(json_from(payload, ProtocolError::BadIdentity)?),
            t::WORKLOAD => Frame::Workload(json_from(payload, ProtocolError::BadWorkload)?),
            t::STDIN => Frame::Stdin(payload.to_vec()),
            t::STDIN_EOF if payload.is_empty() => Frame::StdinEof,
            t::STDIN_EOF => return Err(bad("stdin EOF")),
            t::RESIZE => match payload {
                [r0, r1, c0, c1] => {
                    Frame::Resize { rows: u16::from_be_bytes([*r0, *r1]), cols: u16::from_be_bytes([*c0, *c1]) }
                }
                _ => return Err(bad("resize")),
            },
            t::SIGNAL => Frame::Signal(i32::from_be_bytes(payload.try_into().map_err(|_| bad("signal"))?)),
            t::STDOUT => Frame::Stdout(payload.to_vec()),
            t::STDERR => Frame::Stderr(payload.to_vec()),
            t::EXIT => match payload {
                [kind, v0, v1, v2, v3] if *kind <= 1 => {
                    let value = i32::from_be_bytes([*v0, *v1, *v2, *v3]);
                    Frame::Exit(if *kind == 0 { ExitStatus::Exited(value) } else { ExitStatus::Signaled(value) })
                }
                _ => return Err(bad("exit")),
            },
            t::ERROR => Frame::Error(String::from_utf8(payload.to_vec()).map_err(|_| ProtocolError::BadUtf8)?),
            other => return Err(ProtocolError::UnknownType(other)),
        })
    }
}

/// Appends the JSON of a frame's payload; `bad` names the frame's kind in
/// the (unlikely: only a failing `Serialize` impl) error.
fn json_into(out: &mut Vec<u8>, value: &impl Serialize, bad: fn(String) -> ProtocolError) -> Result<(), ProtocolError> {
    serde_json::to_writer(out, value).map_err(|e| bad(e.to_string()))
}

/// Parses a JSON payload; `bad` names the frame's kind in the error.
fn json_from<T: DeserializeOwned>(payload: &[u8], bad: fn(String) -> ProtocolError) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))
}

/// Checks a header: a known type and a length within bounds. Done before
/// waiting for (or allocating) the payload.
fn check_header(header: &[u8; HEADER]) -> Result<(u8, usize), ProtocolError> {
    let kind = header[0];
    if !matches!(kind, t::REQUEST..=t::WORKLOAD | t::STDOUT..=t::ERROR) {
        return Err(ProtocolError::UnknownType(kind));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len.into()));
    }
    Ok((kind, len as usize))
}

/// Decodes the first frame in `buf`: `Ok(None)` when more bytes are needed,
/// else the frame and how many bytes it took. For non-blocking readers that
/// keep their own buffer.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
    let Some(header) = buf.first_chunk::<HEADER>() else {
        return Ok(None);
    };
    let (kind, len) = check_header(header)?;
    let Some(payload) = buf[HEADER..].get(..len) else {
        return Ok(None);
    };
    Ok(Some((Frame::parse(kind, payload)?, HEADER + len)))
}

/// Reads one frame from a blocking reader: `Ok(None)` on a clean end of
/// stream between frames, [`ProtocolError::Truncated`] inside one.
pub fn read_frame(reader: &mut impl Read) -> Result<Option<Frame>, ProtocolError> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match reader.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (kind, len) = check_header(&header)?;
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    })?;
    Frame::parse(kind, &payload).map(Some)
}

/// Writes one frame in a single `write_all`, so frames from threads that
/// share a locked writer never interleave.
pub fn write_frame(writer: &mut impl Write, frame: &Frame) -> Result<(), ProtocolError> {
    let bytes = frame.encode()?;
    writer.write_all(&bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Request(ExecRequest::new(["sh", "-c", "echo 'é'"]).env("K", "V").tty(50, 132)),
            Frame::Stdin(b"abc".to_vec()),
            Frame::Stdin(Vec::new()),
            Frame::StdinEof,
            Frame::Resize { rows: 65535, cols: 1 },
            Frame::Signal(15),
            Frame::Signal(-1),
            Frame::Identity(GuestIdentity::default()),
            Frame::Identity(GuestIdentity {
                hostname: Some("clone-1".into()),
                mac: Some("02:6d:0a:64:00:05".into()),
                address: Some("10.100.0.5/24".into()),
                gateway: Some("10.100.0.1".into()),
                dns: vec!["10.100.0.1".into()],
                realtime_ns: Some(u64::MAX),
                new_ssh_host_key: true,
                ssh_keys: Some(vec!["ssh-ed25519 AAAAC3Nza a@b".into(), "# none left".into()]),
                ..GuestIdentity::new(&[0xff; crate::ENTROPY_BYTES])
            }),
            Frame::Workload(Workload::default()),
            Frame::Workload(Workload::new(["sh", "-c", "echo 'é' \"$X\""]).env("X", "a=b").cwd("/srv/www")),
            Frame::Stdout(vec![0, 255, 10]),
            Frame::Stderr(b"oops\n".to_vec()),
            Frame::Exit(ExitStatus::Exited(3)),
            Frame::Exit(ExitStatus::Signaled(9)),
            Frame::Error("no such command: foo".into()),
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        let mut stream = Vec::new();
        for frame in all_frames() {
            let bytes = frame.encode().unwrap();
            assert_eq!(decode(&bytes).unwrap(), Some((frame.clone(), bytes.len())));
            stream.extend_from_slice(&bytes);
        }
        let mut reader = &stream[..];
        for frame in all_frames() {
            assert_eq!(read_frame(&mut reader).unwrap(), Some(frame));
        }
        assert_eq!(read_frame(&mut reader).unwrap(), None);
    }

    #[test]
    fn documented_bytes() {
        assert_eq!(Frame::Exit(ExitStatus::Signaled(9)).encode().unwrap(), [0x83, 0, 0, 0, 5, 1, 0, 0, 0, 9]);
        assert_eq!(Frame::Resize { rows: 24, cols: 80 }.encode().unwrap(), [0x04, 0, 0, 0, 4, 0, 24, 0, 80]);
        assert_eq!(Frame::StdinEof.encode().unwrap(), [0x03, 0, 0, 0, 0]);
        let identity = Frame::Identity(GuestIdentity { new_ssh_host_key: true, ..GuestIdentity::default() });
        let bytes = identity.encode().unwrap();
        assert_eq!(bytes[0], 0x06);
        assert_eq!(u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize, bytes.len() - HEADER);
        let json: serde_json::Value = serde_json::from_slice(&bytes[HEADER..]).unwrap();
        assert_eq!(json["new_ssh_host_key"], true);
        let bytes = Frame::Workload(Workload::new(["true"])).encode().unwrap();
        assert_eq!(bytes[..HEADER], [0x07, 0, 0, 0, 37]);
        assert_eq!(&bytes[HEADER..], br#"{"argv":["true"],"env":[],"cwd":null}"#);
    }

    #[test]
    fn truncated_input_asks_for_more() {
        let bytes = Frame::Stdout(b"hello".to_vec()).encode().unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]).unwrap(), None, "cut at {cut}");
            let mut reader = &bytes[..cut];
            let result = read_frame(&mut reader);
            if cut == 0 {
                assert!(matches!(result, Ok(None)));
            } else {
                assert!(matches!(result, Err(ProtocolError::Truncated)), "cut at {cut}: {result:?}");
            }
        }
    }

    #[test]
    fn oversized_length_is_refused_before_any_payload() {
        let header = [t::STDOUT, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(decode(&header), Err(ProtocolError::TooLarge(0xffff_ffff))));
        assert!(matches!(read_frame(&mut &header[..]), Err(ProtocolError::TooLarge(_))));
        let just_over = (MAX_PAYLOAD + 1).to_be_bytes();
        let header = [t::STDIN, just_over[0], just_over[1], just_over[2], just_over[3]];
        assert!(matches!(decode(&header), Err(ProtocolError::TooLarge(_))));
        assert!(matches!(Frame::Stdout(vec![0; MAX_PAYLOAD as usize + 1]).encode(), Err(ProtocolError::TooLarge(_))));
        assert!(Frame::Stdout(vec![0; MAX_PAYLOAD as usize]).encode().is_ok());
    }

    #[test]
    fn garbage_is_an_error() {
        let cases: &[&[u8]] = &[
            &[0x00, 0, 0, 0, 0],
            &[0x7f, 0, 0, 0, 0],
            &[0xff, 0, 0, 0, 0],
            &[t::STDIN_EOF, 0, 0, 0, 1, 0],
            &[t::RESIZE, 0, 0, 0, 3, 1, 2, 3],
            &[t::SIGNAL, 0, 0, 0, 2, 1, 2],
            &[t::EXIT, 0, 0, 0, 5, 2, 0, 0, 0, 0],
            &[t::EXIT, 0, 0, 0, 4, 0, 0, 0, 0],
            &[t::ERROR, 0, 0, 0, 2, 0xc3, 0x28],
            &[t::REQUEST, 0, 0, 0, 2, b'{', b'}'],
            &[t::REQUEST, 0, 0, 0, 3, 0xff, 0xfe, 0],
            &[0x08, 0, 0, 0, 0],
            &[0x80, 0, 0, 0, 0],
            &[0x85, 0, 0, 0, 0],
            &[t::IDENTITY, 0, 0, 0, 0],
            &[t::IDENTITY, 0, 0, 0, 2, b'"', b'"'],
            &[t::IDENTITY, 0, 0, 0, 10, b'{', b'"', b'd', b'n', b's', b'"', b':', b'4', b'2', b'}'],
            &[t::IDENTITY, 0, 0, 0, 3, 0xff, 0xfe, 0],
        ];
        let json_cases: &[(u8, &[u8])] = &[
            (t::IDENTITY, br#"{"ssh_keys":""}"#),
            (t::IDENTITY, br#"{"ssh_keys":[1]}"#),
            (t::WORKLOAD, b""),
            (t::WORKLOAD, b"[1]"),
            (t::WORKLOAD, b"{}}"),
            (t::WORKLOAD, &[0xff, 0xfe, 0]),
            (t::WORKLOAD, br#"{"argv":"sh"}"#),
            (t::WORKLOAD, br#"{"argv":["a\u0000b", 1]}"#),
            (t::WORKLOAD, br#"{"env":[["A"]]}"#),
            (t::WORKLOAD, br#"{"cwd":["/"]}"#),
        ];
        let framed = json_cases.iter().map(|(kind, payload)| {
            let mut bytes = vec![*kind];
            bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            bytes.extend_from_slice(payload);
            bytes
        });
        for case in cases.iter().map(|case| case.to_vec()).chain(framed) {
            assert!(decode(&case).is_err(), "{case:?} decoded");
            assert!(read_frame(&mut &case[..]).is_err(), "{case:?} read");
        }
    }

    #[test]
    fn fuzz_entry_point_survives_samples() {
        let mut stream = Vec::new();
        for frame in all_frames() {
            frame.encode_into(&mut stream).unwrap();
        }
        crate::fuzz_decode(&stream);
        for cut in 0..stream.len() {
            crate::fuzz_decode(&stream[cut..]);
        }
        // A deeply nested request, identity or workload must fail cleanly,
        // not blow the stack.
        for kind in [t::REQUEST, t::IDENTITY, t::WORKLOAD] {
            let mut deep = vec![kind, 0, 0, 0, 0];
            let body = if kind == t::REQUEST { "[".repeat(100_000) } else { "{\"x\":".repeat(100_000) };
            deep[1..5].copy_from_slice(&(body.len() as u32).to_be_bytes());
            deep.extend_from_slice(body.as_bytes());
            assert!(decode(&deep).is_err());
            crate::fuzz_decode(&deep);
        }
    }
}
