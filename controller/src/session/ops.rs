//! The REST API's exec and logs, carried out through a host's broker:
//! `Vm.exec` without a terminal, output collected (up to a limit) until the
//! command ends or the timeout passes, and `Vm.logs` without follow. The
//! streaming forms (`Vm.logs` with follow, an interactive exec) are in
//! `streams`.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use mm_protocols::broker_capnp::{byte_sink, exec_output, vm};
use mm_protocols::exec_end::ExecEnd;
use tokio::sync::oneshot;

use super::server::Local;
use super::{Command, SessionError};

/// How long fetching a console log may take.
const LOGS_TIMEOUT: Duration = Duration::from_secs(30);

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
        Command::Exec { host, machine, request, reply } => {
            let result = match local.link(&host) {
                Some(link) => exec(&link.broker, &machine, request).await,
                None => Err(SessionError::NotConnected(host)),
            };
            let _ = reply.send(result);
        }
        Command::Logs { host, machine, max_bytes, reply } => {
            let result = match local.link(&host) {
                Some(link) => logs(&link.broker, &machine, max_bytes).await,
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

/// What an exec has produced so far.
#[derive(Default)]
struct Collected {
    output: ExecOutput,
    /// Set when the command could not run at all.
    error: Option<String>,
}

struct Collector {
    collected: Rc<RefCell<Collected>>,
    max: usize,
    ended: RefCell<Option<oneshot::Sender<()>>>,
}

fn keep(buffer: &mut Vec<u8>, data: &[u8], max: usize, truncated: &mut bool) {
    let room = max.saturating_sub(buffer.len());
    if data.len() > room {
        *truncated = true;
    }
    buffer.extend_from_slice(&data[..data.len().min(room)]);
}

impl exec_output::Server for Collector {
    async fn stdout(
        self: Rc<Self>,
        params: exec_output::StdoutParams,
        _: exec_output::StdoutResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?;
        let collected = &mut *self.collected.borrow_mut();
        keep(&mut collected.output.stdout, data, self.max, &mut collected.output.truncated);
        Ok(())
    }

    async fn stderr(
        self: Rc<Self>,
        params: exec_output::StderrParams,
        _: exec_output::StderrResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?;
        let collected = &mut *self.collected.borrow_mut();
        keep(&mut collected.output.stderr, data, self.max, &mut collected.output.truncated);
        Ok(())
    }

    async fn exit(
        self: Rc<Self>,
        params: exec_output::ExitParams,
        _: exec_output::ExitResults,
    ) -> Result<(), capnp::Error> {
        {
            let mut collected = self.collected.borrow_mut();
            match ExecEnd::read(params.get()?)? {
                ExecEnd::Error(error) => collected.error = Some(error),
                ExecEnd::Signal(signal) => collected.output.signal = Some(signal),
                ExecEnd::Code(code) => collected.output.exit_code = Some(code),
            }
        }
        if let Some(ended) = self.ended.borrow_mut().take() {
            let _ = ended.send(());
        }
        Ok(())
    }
}

async fn exec(
    broker: &mm_protocols::broker_capnp::broker::Client,
    name: &str,
    request: ExecRequest,
) -> Result<ExecOutput, SessionError> {
    let vm = get_vm(broker, name).await?;
    let collected = Rc::new(RefCell::new(Collected::default()));
    let (tx, rx) = oneshot::channel();
    let output: exec_output::Client = capnp_rpc::new_client(Collector {
        collected: Rc::clone(&collected),
        max: request.max_output,
        ended: RefCell::new(Some(tx)),
    });
    let mut call = vm.exec_request();
    mm_protocols::set_exec_command(call.get().init_request(), &request.argv, &request.env);
    call.get().set_output(output);
    let session = call.send().promise.await?.get()?.get_session()?;
    let run = async {
        if !request.stdin.is_empty() {
            let mut write = session.stdin_request();
            write.get().set_data(&request.stdin);
            write.send().promise.await?;
        }
        session.close_stdin_request().send().promise.await?;
        rx.await.map_err(|_| SessionError::Link("the exec session ended without an exit status".into()))
    };
    match tokio::time::timeout(request.timeout, run).await {
        Ok(result) => result?,
        Err(_) => {
            let mut kill = session.signal_request();
            kill.get().set_signal(9);
            let _ = tokio::time::timeout(Duration::from_secs(5), kill.send().promise).await;
            return Err(SessionError::Timeout(request.timeout));
        }
    }
    let collected = std::mem::take(&mut *collected.borrow_mut());
    match collected.error {
        Some(error) => Err(SessionError::Broker { kind: "invalid".into(), message: error }),
        None => Ok(collected.output),
    }
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
