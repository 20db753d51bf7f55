//! The REST API's exec and logs, carried out through a host's broker:
//! the exec without a terminal, whose output is collected (up to a limit)
//! from the interactive exec of `streams` until the command ends or the
//! timeout passes, and `Vm.logs` without follow. The streaming forms
//! (`Vm.logs` with follow, the interactive exec) are in `streams`.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use mm_protocols::broker_capnp::{byte_sink, vm};
use mm_protocols::exec_end::ExecEnd;
pub use mm_protocols::process_stats::ProcessStats;

use super::server::Local;
use super::streams::{ExecEvent, ExecInput, ExecStream};
use super::{Command, SessionError};

/// How long fetching a console log may take.
const LOGS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long asking a microVM's processes how they are doing may take (the
/// broker gives each of them 2 s).
const STATS_TIMEOUT: Duration = Duration::from_secs(15);

/// A command to run in a guest.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Written to the command's stdin, which is then closed.
    pub stdin: Vec<u8>,
    pub timeout: Duration,
    /// Bytes kept of stdout and of stderr each; the rest is dropped.
    pub max_output: usize,
}

/// How a command ended, and what it printed.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The exit status, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Some output was dropped (over `max_output`).
    pub truncated: bool,
}

pub(super) async fn handle(local: Rc<Local>, command: Command) {
    match command {
        Command::Connected { host, reply } => {
            let _ = reply.send(local.link(&host).is_some());
        }
        Command::Logs { host, machine, max_bytes, reply } => {
            let result = match local.link(&host) {
                Some(link) => logs(&link.broker, &machine, max_bytes).await,
                None => Err(SessionError::NotConnected(host)),
            };
            let _ = reply.send(result);
        }
        Command::Stats { host, machine, reply } => {
            let result = match local.link(&host) {
                Some(link) => stats(&link.broker, &machine).await,
                None => Err(SessionError::NotConnected(host)),
            };
            let _ = reply.send(result);
        }
        Command::FollowLogs { host, machine, chunks, reply } => match local.link(&host) {
            Some(link) => super::streams::follow_logs(&link.broker, &machine, chunks, reply).await,
            None => {
                let _ = reply.send(Err(SessionError::NotConnected(host)));
            }
        },
        Command::ExecStream { host, machine, start, events, inputs, reply } => match local.link(&host) {
            Some(link) => super::streams::exec_stream(&link.broker, &machine, start, events, inputs, reply).await,
            None => {
                let _ = reply.send(Err(SessionError::NotConnected(host)));
            }
        },
        Command::Connect { host, machine, port, from_guest, to_guest, reply } => match local.link(&host) {
            Some(link) => super::tunnel::connect(&link.broker, &machine, port, from_guest, to_guest, reply).await,
            None => {
                let _ = reply.send(Err(SessionError::NotConnected(host)));
            }
        },
    }
}

pub(super) async fn get_vm(
    broker: &mm_protocols::broker_capnp::broker::Client,
    name: &str,
) -> Result<vm::Client, SessionError> {
    let mut request = broker.get_vm_request();
    request.get().set_name(name);
    Ok(request.send().promise.await?.get()?.get_vm()?)
}

fn keep(buffer: &mut Vec<u8>, data: &[u8], max: usize, truncated: &mut bool) {
    let room = max.saturating_sub(buffer.len());
    if data.len() > room {
        *truncated = true;
    }
    buffer.extend_from_slice(&data[..data.len().min(room)]);
}

/// The non-interactive exec on top of the interactive one (`streams`):
/// writes `stdin`, closes it and collects what the command prints (at most
/// `max` bytes of each stream) until it ends. Past `timeout` the stream is
/// dropped, which kills the command (see [`ExecStream`]), and the answer
/// is `Timeout`.
pub(super) async fn collect(
    stream: ExecStream,
    stdin: Vec<u8>,
    timeout: Duration,
    max: usize,
) -> Result<ExecOutput, SessionError> {
    let ExecStream { mut events, inputs } = stream;
    let run = async move {
        // A command that ends before reading its stdin refuses it; its
        // output and status still arrive below.
        if !stdin.is_empty() {
            let _ = inputs.send(ExecInput::Stdin(stdin)).await;
        }
        let _ = inputs.send(ExecInput::CloseStdin).await;
        let mut output = ExecOutput::default();
        while let Some(event) = events.recv().await {
            match event {
                ExecEvent::Stdout(data) => keep(&mut output.stdout, &data, max, &mut output.truncated),
                ExecEvent::Stderr(data) => keep(&mut output.stderr, &data, max, &mut output.truncated),
                ExecEvent::End(ExecEnd::Code(code)) => {
                    output.exit_code = Some(code);
                    return Ok(output);
                }
                ExecEvent::End(ExecEnd::Signal(signal)) => {
                    output.signal = Some(signal);
                    return Ok(output);
                }
                ExecEvent::End(ExecEnd::Error(message)) => {
                    return Err(SessionError::Broker { kind: "invalid".into(), message });
                }
            }
        }
        Err(SessionError::Link("the exec session ended without an exit status".into()))
    };
    tokio::time::timeout(timeout, run).await.map_err(|_| SessionError::Timeout(timeout))?
}

/// Keeps the last `max` bytes written to it.
struct Tail {
    data: Rc<RefCell<Vec<u8>>>,
    max: usize,
}

impl byte_sink::Server for Tail {
    async fn write(
        self: Rc<Self>,
        params: byte_sink::WriteParams,
        _: byte_sink::WriteResults,
    ) -> Result<(), capnp::Error> {
        let chunk = params.get()?.get_data()?;
        let mut data = self.data.borrow_mut();
        data.extend_from_slice(chunk);
        if data.len() > self.max {
            let excess = data.len() - self.max;
            data.drain(..excess);
        }
        Ok(())
    }

    async fn done(self: Rc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> Result<(), capnp::Error> {
        Ok(())
    }
}

async fn stats(
    broker: &mm_protocols::broker_capnp::broker::Client,
    name: &str,
) -> Result<Vec<ProcessStats>, SessionError> {
    let fetch = async {
        let vm = get_vm(broker, name).await?;
        let reply = vm.stats_request().send().promise.await?;
        let mut processes = Vec::new();
        for p in reply.get()?.get_processes()?.iter() {
            processes.push(ProcessStats::read(p)?);
        }
        Ok(processes)
    };
    tokio::time::timeout(STATS_TIMEOUT, fetch).await.map_err(|_| SessionError::Timeout(STATS_TIMEOUT))?
}

async fn logs(
    broker: &mm_protocols::broker_capnp::broker::Client,
    name: &str,
    max: usize,
) -> Result<Vec<u8>, SessionError> {
    let fetch = async {
        let vm = get_vm(broker, name).await?;
        let data = Rc::new(RefCell::new(Vec::new()));
        let mut call = vm.logs_request();
        call.get().set_follow(false);
        call.get().set_sink(capnp_rpc::new_client(Tail { data: Rc::clone(&data), max }));
        // Without follow the call returns once everything (and `done`) is
        // sent, each write awaited by the broker first.
        call.send().promise.await?;
        let data = std::mem::take(&mut *data.borrow_mut());
        Ok(data)
    };
    tokio::time::timeout(LOGS_TIMEOUT, fetch).await.map_err(|_| SessionError::Timeout(LOGS_TIMEOUT))?
}
