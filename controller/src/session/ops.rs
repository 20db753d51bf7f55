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
use super::streams::{BrokerLink, ExecEvent, ExecInput, ExecStream};
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
    let broker = |host: String| -> BrokerLink {
        local.link(&host).map(|link| link.broker.clone()).ok_or(SessionError::NotConnected(host))
    };
    match command {
        Command::Connected { host, reply } => {
            let _ = reply.send(local.link(&host).is_some());
        }
        Command::Logs { host, machine, max_bytes, reply } => {
            let _ = reply.send(async { logs(&broker(host)?, &machine, max_bytes).await }.await);
        }
        Command::Stats { host, machine, reply } => {
            let _ = reply.send(async { stats(&broker(host)?, &machine).await }.await);
        }
        Command::Snapshot { host, machine, reply } => {
            let _ = reply.send(async { super::snapshots::snapshot(&broker(host)?, &machine).await }.await);
        }
        Command::RemoveSnapshot { host, id, reply } => {
            let _ = reply.send(async { super::snapshots::remove(&broker(host)?, &id).await }.await);
        }
        Command::FollowLogs { host, machine, chunks, reply } => {
            super::streams::follow_logs(broker(host), &machine, chunks, reply).await;
        }
        Command::ExecStream { host, machine, start, events, inputs, reply } => {
            super::streams::exec_stream(broker(host), &machine, start, events, inputs, reply).await;
        }
        Command::Connect { host, machine, port, from_guest, to_guest, reply } => {
            super::tunnel::connect(broker(host), &machine, port, from_guest, to_guest, reply).await;
        }
    }
}

/// `work`, or `Timeout` once `limit` has passed.
pub(super) async fn within<T>(
    limit: Duration,
    work: impl Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
    tokio::time::timeout(limit, work).await.map_err(|_| SessionError::Timeout(limit))?
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
    within(timeout, run).await
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
    within(STATS_TIMEOUT, fetch).await
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
    within(LOGS_TIMEOUT, fetch).await
}
