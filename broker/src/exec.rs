//! Exec in a guest through its agent in mm-init (vsock port
//! `mm_exec_protocol::EXEC_PORT`, reached through the microVM's hybrid vsock
//! socket), bridged to the client's capabilities: the agent's output frames
//! become `ExecOutput` calls, and the client's `ExecSession` calls become
//! stdin, resize and signal frames.
//!
//! The agent's client is blocking, so the connection's reading side runs on
//! its own thread and hands frames to this (single-threaded, Cap'n Proto)
//! event loop through a channel; each `ExecOutput` call is awaited before
//! the next, which is the flow control back to the guest.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use mm_exec_protocol::{EXEC_PORT, ExecClient, ExecError, ExecRequest, ExecSender, ExitStatus, Output};
use mm_protocols::broker_capnp::{exec_output, exec_session, vm};
use mm_protocols::exec_end::ExecEnd;
use tokio::sync::mpsc;

use crate::rpc::text;

/// The guest may still be booting: how long to retry a refused connection.
const AGENT_WAIT: Duration = Duration::from_secs(5);

fn failed(message: impl std::fmt::Display) -> capnp::Error {
    capnp::Error::failed(format!("internal: {message}"))
}

/// Connects to the guest's exec agent through the microVM's hybrid vsock
/// socket, once. The socket is in the one directory the microVM's uid may
/// write, so it is reached by its inode, never through a link planted in
/// its place (`safe_fs::socket_ref`); errors name the real path.
pub fn connect_agent(dir: &Path) -> Result<ExecClient, ExecError> {
    let mut path = crate::launch::vsock_socket(dir);
    let legacy = crate::launch::legacy_vsock_socket(dir);
    if std::fs::symlink_metadata(&path).is_err() && std::fs::symlink_metadata(&legacy).is_ok() {
        path = legacy;
    }
    let socket =
        crate::safe_fs::socket_ref(&path).map_err(|source| ExecError::Connect { path: path.clone(), source })?;
    ExecClient::connect_hybrid_vsock(&socket.path, EXEC_PORT).map_err(|e| match e {
        ExecError::Connect { source, .. } => ExecError::Connect { path, source },
        other => other,
    })
}

/// Connects to the agent, retrying while nobody listens yet.
fn connect(dir: &Path) -> Result<ExecClient, ExecError> {
    let deadline = std::time::Instant::now() + AGENT_WAIT;
    loop {
        match connect_agent(dir) {
            Err(ExecError::Refused { .. } | ExecError::Connect { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

fn read_request(params: &vm::ExecParams) -> Result<(ExecRequest, exec_output::Client), capnp::Error> {
    let params = params.get()?;
    let request = params.get_request()?;
    let mut argv = Vec::new();
    for arg in request.get_argv()?.iter() {
        argv.push(text(arg?)?);
    }
    if argv.is_empty() {
        return Err(capnp::Error::failed("invalid: exec needs a command".into()));
    }
    let mut exec = ExecRequest::new(argv);
    for var in request.get_env()?.iter() {
        exec = exec.env(text(var.get_name()?)?, text(var.get_value()?)?);
    }
    let cwd = text(request.get_cwd()?)?;
    if !cwd.is_empty() {
        exec = exec.cwd(cwd);
    }
    let user = text(request.get_user()?)?;
    if !user.is_empty() {
        exec = exec.user(user);
    }
    if request.get_tty() {
        exec = exec.tty(request.get_rows().max(1), request.get_cols().max(1));
    }
    Ok((exec, params.get_output()?))
}

/// `Vm.exec`: starts the command and returns its session at once; output
/// and the exit status follow on `output`.
pub async fn serve_exec(
    dir: PathBuf,
    params: vm::ExecParams,
    mut results: vm::ExecResults,
) -> Result<(), capnp::Error> {
    let (request, output) = read_request(&params)?;
    let started = tokio::task::spawn_blocking(move || connect(&dir)?.start(&request))
        .await
        .map_err(failed)?
        .map_err(|e| capnp::Error::failed(format!("conflict: cannot reach the guest's exec agent: {e}")))?;
    let (sender, receiver) = started;
    let (tx, mut rx) = mpsc::channel::<Result<Output, ExecError>>(16);
    std::thread::Builder::new()
        .name("exec-reader".into())
        .spawn(move || {
            for item in receiver {
                if tx.blocking_send(item).is_err() {
                    return; // the client went away
                }
            }
        })
        .map_err(failed)?;
    let pump_sender = sender.clone();
    tokio::task::spawn_local(async move {
        while let Some(item) = rx.recv().await {
            let delivered = match item {
                Ok(Output::Stdout(data)) => {
                    let mut call = output.stdout_request();
                    call.get().set_data(&data);
                    call.send().promise.await.map(|_| ())
                }
                Ok(Output::Stderr(data)) => {
                    let mut call = output.stderr_request();
                    call.get().set_data(&data);
                    call.send().promise.await.map(|_| ())
                }
                Ok(Output::Exit(status)) => {
                    let end = match status {
                        ExitStatus::Exited(code) => ExecEnd::Code(code),
                        ExitStatus::Signaled(signal) => ExecEnd::Signal(signal),
                    };
                    let mut call = output.exit_request();
                    end.write(call.get());
                    let _ = call.send().promise.await;
                    break;
                }
                Err(e) => {
                    let mut call = output.exit_request();
                    ExecEnd::Error(e.to_string()).write(call.get());
                    let _ = call.send().promise.await;
                    break;
                }
            };
            if delivered.is_err() {
                // The client is gone: end the command rather than leave it
                // running unattended.
                let _ = pump_sender.signal(libc::SIGKILL);
                break;
            }
        }
        pump_sender.shutdown();
    });
    results.get().set_session(capnp_rpc::new_client(Session { sender: Rc::new(sender) }));
    Ok(())
}

/// The client's handle on a running exec.
struct Session {
    sender: Rc<ExecSender>,
}

impl Session {
    /// Runs a (short, blocking) send on the blocking pool.
    async fn send(
        &self,
        op: impl FnOnce(&ExecSender) -> Result<(), ExecError> + Send + 'static,
    ) -> Result<(), capnp::Error> {
        let sender = ExecSender::clone(&self.sender);
        tokio::task::spawn_blocking(move || op(&sender))
            .await
            .map_err(failed)?
            .map_err(|e| capnp::Error::failed(format!("conflict: the exec has ended: {e}")))
    }
}

impl exec_session::Server for Session {
    async fn stdin(
        self: Rc<Self>,
        params: exec_session::StdinParams,
        _: exec_session::StdinResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?.to_vec();
        self.send(move |s| s.stdin(&data)).await
    }

    async fn close_stdin(
        self: Rc<Self>,
        _: exec_session::CloseStdinParams,
        _: exec_session::CloseStdinResults,
    ) -> Result<(), capnp::Error> {
        self.send(|s| s.close_stdin()).await
    }

    async fn resize(
        self: Rc<Self>,
        params: exec_session::ResizeParams,
        _: exec_session::ResizeResults,
    ) -> Result<(), capnp::Error> {
        let (rows, cols) = (params.get()?.get_rows(), params.get()?.get_cols());
        self.send(move |s| s.resize(rows, cols)).await
    }

    async fn signal(
        self: Rc<Self>,
        params: exec_session::SignalParams,
        _: exec_session::SignalResults,
    ) -> Result<(), capnp::Error> {
        let signal = params.get()?.get_signal();
        self.send(move |s| s.signal(signal)).await
    }
}

/// How a broker-side exec went.
#[derive(Debug)]
pub enum SimpleExec {
    /// It ran; its shell-style exit code.
    Exited(i32),
    /// The request reached the agent but the connection ended first: the
    /// command may have run (e.g. `kill -TERM 1` takes the guest down).
    Interrupted(String),
    /// The agent could not be reached (no guest, not booted, no agent).
    Unreachable(String),
}

/// Runs `argv` in the guest with no stdin and discards its output. For the
/// broker's own use (stop).
pub async fn run_simple(dir: &Path, argv: &[&str]) -> SimpleExec {
    let dir = dir.to_path_buf();
    let request = ExecRequest::new(argv.iter().map(|s| s.to_string()));
    let outcome = tokio::task::spawn_blocking(move || {
        let client = match connect(&dir) {
            Ok(client) => client,
            Err(e) => return SimpleExec::Unreachable(e.to_string()),
        };
        match client.run(&request, std::io::empty(), std::io::sink(), std::io::sink()) {
            Ok(status) => SimpleExec::Exited(status.shell_code()),
            Err(e) => SimpleExec::Interrupted(e.to_string()),
        }
    })
    .await;
    outcome.unwrap_or_else(|e| SimpleExec::Unreachable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::{VSOCK_DIR, legacy_vsock_socket, vsock_socket};
    use crate::safe_fs::testing::Scratch;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A hybrid vsock socket that answers one CONNECT with OK.
    fn agent(path: &Path) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            stream.write_all(b"OK 1\n").unwrap();
            line
        })
    }

    #[test]
    fn the_agent_is_reached_in_the_vsock_directory_or_where_an_older_layout_put_it() {
        let scratch = Scratch::new("exec-connect");
        std::fs::create_dir(scratch.0.join(VSOCK_DIR)).unwrap();
        let answered = agent(&vsock_socket(&scratch.0));
        connect_agent(&scratch.0).unwrap();
        assert_eq!(answered.join().unwrap(), format!("CONNECT {EXEC_PORT}\n"));
        std::fs::remove_file(vsock_socket(&scratch.0)).unwrap();
        let answered = agent(&legacy_vsock_socket(&scratch.0));
        connect_agent(&scratch.0).unwrap();
        assert_eq!(answered.join().unwrap(), format!("CONNECT {EXEC_PORT}\n"));
    }

    #[test]
    fn a_link_in_place_of_the_vsock_socket_leads_nowhere() {
        let scratch = Scratch::new("exec-link");
        std::fs::create_dir(scratch.0.join(VSOCK_DIR)).unwrap();
        // Another socket of the host (another microVM's agent, say).
        let other = UnixListener::bind(scratch.0.join("other.sock")).unwrap();
        other.set_nonblocking(true).unwrap();
        let link = vsock_socket(&scratch.0);
        std::os::unix::fs::symlink(scratch.0.join("other.sock"), &link).unwrap();
        let Err(ExecError::Connect { path, source }) = connect_agent(&scratch.0) else {
            panic!("the link was followed")
        };
        assert_eq!(path, link);
        assert!(source.to_string().contains("symbolic link"), "{source}");
        let accepted = other.accept();
        assert!(accepted.is_err(), "the other socket was connected to");
    }
}
