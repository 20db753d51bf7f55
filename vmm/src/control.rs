//! mm-vmm's control socket: a line protocol on a unix socket, for replacing
//! a device back end that died (`reconnect INDEX SOCKET`). The broker will
//! speak Cap'n Proto here (issue 5); until then this is how a supervisor or
//! a test hands mm-vmm a fresh back end.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use crate::devices::Bus;

/// Most bytes read from one control connection; a client sends a few
/// short lines, so anything beyond this is cut off.
const MAX_LINE: u64 = 4096;

/// Serves the control socket at `path` on its own thread.
pub fn serve(path: &Path, bus: Arc<Bus>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new().name("control".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Err(e) = handle(stream, &bus) {
                tracing::warn!("control connection: {e}");
            }
        }
    })?;
    Ok(())
}

fn handle(stream: UnixStream, bus: &Bus) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?.take(MAX_LINE));
    let mut writer = stream;
    let mut line = String::new();
    while {
        line.clear();
        reader.read_line(&mut line)? > 0
    } {
        let reply = match execute(line.trim(), bus) {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("error: {e}"),
        };
        writeln!(writer, "{reply}")?;
    }
    Ok(())
}

fn execute(line: &str, bus: &Bus) -> Result<(), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["reconnect", index, socket] => {
            let index: usize = index.parse().map_err(|_| format!("bad device index {index:?}"))?;
            let (_, device) = bus.virtio.get(index).ok_or_else(|| format!("no device {index}"))?;
            let stream = UnixStream::connect(socket).map_err(|e| format!("connect {socket}: {e}"))?;
            let mut device = device.lock().expect("virtio lock");
            device.reconnect(stream).map_err(|e| e.to_string())?;
            tracing::info!(index, kind = device.kind().name(), "device back end replaced");
            Ok(())
        }
        _ => Err(format!("unknown request {line:?} (expected: reconnect INDEX SOCKET)")),
    }
}
