//! mm-vmm's control channel: a line protocol for replacing a device back
//! end that died.
//!
//! * `reconnect INDEX SOCKET`: connect to a new back end at a path (tests,
//!   manual use; on a `--control PATH` socket);
//! * `reconnect INDEX` with the new back end's connected socket attached to
//!   the same message (SCM_RIGHTS): what the broker sends on its
//!   `--control fd:N` socketpair, so neither side needs a path.
//!
//! Each request gets one reply line, `ok` or `error: ...`. DESIGN.md has
//! Cap'n Proto for this channel; it stays a line protocol until mm-vmm has
//! more to say than this one verb (an RPC runtime would cost the vCPU
//! process memory and syscalls for nothing today).

use std::fs::File;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::devices::Bus;
use crate::endpoint::Endpoint;

/// Most bytes of one request; a client sends a few short lines.
const MAX_MESSAGE: usize = 4096;

/// Serves the control channel on its own thread: a listening socket at a
/// path, or the one inherited connected socket.
pub fn serve(endpoint: &Endpoint, bus: Arc<Bus>) -> std::io::Result<()> {
    let thread = std::thread::Builder::new().name("control".into());
    match endpoint {
        Endpoint::Path(path) => {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)?;
            thread.spawn(move || {
                for stream in listener.incoming().flatten() {
                    if let Err(e) = handle(&stream, &bus) {
                        tracing::warn!("control connection: {e}");
                    }
                }
            })?;
        }
        Endpoint::Fd { .. } => {
            let stream = endpoint.connect()?;
            thread.spawn(move || {
                if let Err(e) = handle(&stream, &bus) {
                    tracing::warn!("control channel: {e}");
                }
            })?;
        }
    }
    Ok(())
}

/// Serves requests until the peer hangs up. Each message is one or more
/// complete lines; an fd, if attached, goes to the first `reconnect` that
/// names no socket.
fn handle(stream: &UnixStream, bus: &Bus) -> std::io::Result<()> {
    let mut pending = String::new();
    loop {
        let mut buf = [0u8; MAX_MESSAGE];
        let (n, mut fd) = stream.recv_with_fd(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        if pending.len() > MAX_MESSAGE {
            writeln!(&*stream, "error: request longer than {MAX_MESSAGE} bytes")?;
            return Ok(());
        }
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let reply = match execute(line.trim(), fd.take(), bus) {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("error: {e}"),
            };
            writeln!(&*stream, "{reply}")?;
        }
    }
}

fn execute(line: &str, fd: Option<File>, bus: &Bus) -> Result<(), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (index, stream) = match (words.as_slice(), fd) {
        (["reconnect", index, socket], _) => {
            (*index, UnixStream::connect(socket).map_err(|e| format!("connect {socket}: {e}"))?)
        }
        (["reconnect", index], Some(fd)) => (*index, UnixStream::from(std::os::fd::OwnedFd::from(fd))),
        (["reconnect", _], None) => return Err("reconnect INDEX needs a socket fd attached (SCM_RIGHTS)".into()),
        _ => return Err(format!("unknown request {line:?} (expected: reconnect INDEX [SOCKET])")),
    };
    let index: usize = index.parse().map_err(|_| format!("bad device index {index:?}"))?;
    let (_, device) = bus.virtio.get(index).ok_or_else(|| format!("no device {index}"))?;
    let mut device = device.lock().map_err(|_| "device lock poisoned".to_string())?;
    device.reconnect(stream).map_err(|e| e.to_string())?;
    tracing::info!(index, kind = device.kind().name(), "device back end replaced");
    Ok(())
}
