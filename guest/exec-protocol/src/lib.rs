//! The exec agent's wire protocol, shared by the guest (mm-init's agent) and
//! the host (the broker, through [`ExecClient`]).
//!
//! The agent listens on vsock port [`EXEC_PORT`]. Each connection runs one
//! command: the host sends one [`Frame::Request`], then both sides send
//! frames until the guest sends [`Frame::Exit`] (or [`Frame::Error`]) and
//! closes.
//!
//! Or, instead of a request, the first frame is a [`Frame::Identity`]: a
//! guest restored from a snapshot under a new name takes on a new identity
//! ([`GuestIdentity`]: fresh kernel random numbers, the clock, hostname,
//! MAC, address, route, name servers, SSH host key) without a reboot. The
//! guest applies it and answers with one frame, [`Frame::Exit`] with code 0
//! when every step worked, or [`Frame::Error`] naming each step that failed
//! (`step: reason`, `; ` between steps), then closes; no other frames flow
//! on that connection. [`ExecClient::apply_identity`] is the host's side.
//! An agent older than the identity frame answers it with an error frame
//! (`protocol error: unknown frame type 0x06`).
//!
//! Or the first frame is a [`Frame::Workload`], for a warm start: a guest
//! booted with `mm.wait` on its kernel command line does everything it does
//! at boot but, instead of running the command line's workload, waits for
//! one from the host, so that the host can snapshot it once (it prints
//! `mm-init: waiting for a workload`) and restore that snapshot for every
//! run instead of booting. The [`Workload`] takes the place of `mm.cmd` and
//! `mm.env`: PID 1 runs it with the console as its stdio and reports its
//! exit status to mm-vmm, exactly as a command-line workload, so none of
//! it flows back over this connection. The guest answers with one frame,
//! [`Frame::Exit`] with code 0 once the workload has started, or
//! [`Frame::Error`]: `not waiting for a workload` when the guest was not
//! booted with `mm.wait` or already has its one workload; a workload that
//! can never start (a NUL byte, an environment name that is empty or holds
//! `=`, a working directory that is not one), and the guest waits on for a
//! good one; or why it could not start (`cannot run …`), and the guest
//! ends as a command-line workload that cannot start would, with status
//! 127 (not found) or 126. Then it closes. An agent older than the workload
//! frame answers `protocol error: unknown frame type 0x07`.
//! [`ExecClient::start_workload`] is the host's side.
//!
//! A frame is
//!
//! ```text
//! [type: u8][len: u32 big-endian][payload: len bytes]
//! ```
//!
//! with `len` at most [`MAX_PAYLOAD`]; a longer length is a protocol error,
//! never an allocation, since either side may be hostile or broken.
//!
//! | type | direction | name | payload |
//! |---|---|---|---|
//! | `0x01` | host → guest | request | JSON [`ExecRequest`] (first frame only) |
//! | `0x02` | host → guest | stdin | bytes |
//! | `0x03` | host → guest | stdin EOF | empty |
//! | `0x04` | host → guest | resize | rows u16 BE, cols u16 BE |
//! | `0x05` | host → guest | signal | signal number i32 BE |
//! | `0x06` | host → guest | identity | JSON [`GuestIdentity`] (first frame only, instead of a request) |
//! | `0x07` | host → guest | workload | JSON [`Workload`] (first frame only, instead of a request) |
//! | `0x81` | guest → host | stdout | bytes (with a tty: the terminal's output) |
//! | `0x82` | guest → host | stderr | bytes (never with a tty) |
//! | `0x83` | guest → host | exit | kind u8 (0 exited, 1 killed by a signal), code or signal i32 BE; after an identity: exited 0, all applied; after a workload: exited 0, started |
//! | `0x84` | guest → host | error | UTF-8 message; the guest closes after it |

mod client;
mod frame;
mod identity;
mod request;
mod workload;

pub use client::{ExecClient, ExecError, ExecReceiver, ExecSender, Output};
pub use frame::{Frame, MAX_PAYLOAD, ProtocolError, decode, read_frame, write_frame};
pub use identity::{ENTROPY_BYTES, GuestIdentity, IdentityError, MIN_ENTROPY_BYTES};
pub use request::{ExecRequest, ExitStatus};
pub use workload::Workload;

/// The vsock port the guest agent listens on.
pub const EXEC_PORT: u32 = 1024;

/// Frame type bytes (see the table in the crate documentation).
pub mod frame_type {
    pub const REQUEST: u8 = 0x01;
    pub const STDIN: u8 = 0x02;
    pub const STDIN_EOF: u8 = 0x03;
    pub const RESIZE: u8 = 0x04;
    pub const SIGNAL: u8 = 0x05;
    pub const IDENTITY: u8 = 0x06;
    pub const WORKLOAD: u8 = 0x07;
    pub const STDOUT: u8 = 0x81;
    pub const STDERR: u8 = 0x82;
    pub const EXIT: u8 = 0x83;
    pub const ERROR: u8 = 0x84;
}

/// Fuzzing entry point (see `fuzz/`): decodes frames from arbitrary bytes,
/// which must never panic, and re-encodes every frame that decoded, which
/// must give back the same bytes' meaning.
#[doc(hidden)]
pub fn fuzz_decode(mut data: &[u8]) {
    while let Ok(Some((frame, used))) = decode(data) {
        assert!(used >= frame::HEADER && used <= data.len());
        let mut again = Vec::new();
        frame.encode_into(&mut again).expect("a decoded frame re-encodes");
        let (back, n) = decode(&again).expect("re-encoded frame decodes").expect("complete");
        assert_eq!(n, again.len());
        assert_eq!(back, frame);
        data = &data[used..];
    }
}
