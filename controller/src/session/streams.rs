//! The streaming forms of exec and logs, run on the session thread:
//! `Vm.logs(follow = true)` into a channel of chunks, and an interactive
//! `Vm.exec` whose output goes into one channel and whose stdin, resizes
//! and close come from another.
//!
//! The API side holds the other ends. When it drops them (its HTTP client
//! went away) the task here notices (`closed()` or `recv()` ending), drops
//! its capnp call (which sends `Finish`, cancelling the broker's side) and
//! ends; an exec is killed first. Nothing outlives the client.
//!
//! Flow control: each `ByteSink.write` / `ExecOutput.stdout` call waits for
//! room in a bounded channel before it returns, and the broker awaits each
//! call before sending the next, so a slow HTTP client slows the guest's
//! output rather than filling the controller's memory.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use mm_protocols::broker_capnp::{broker, byte_sink, exec_output};
use mm_protocols::exec_end::ExecEnd;
use tokio::sync::{mpsc, oneshot};

use super::SessionError;
use super::ops::get_vm;

/// Chunks (or events) in flight between the session thread and an HTTP
/// client, per stream.
pub const STREAM_BUFFER: usize = 16;
/// How long a kill of an abandoned exec may take before it is given up.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// The guest's (Linux) SIGKILL.
const SIGKILL: i32 = 9;

/// What an interactive exec runs (`ExecRequest` in `broker.capnp`).
#[derive(Debug, Clone, Default)]
pub struct ExecStart {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run it on a terminal of `rows` × `cols` (stdout and stderr are then
    /// one stream, stdout).
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
    /// Empty: `/`.
    pub cwd: String,
    /// Empty: root.
    pub user: String,
}

/// Something an interactive exec produced.
#[derive(Debug)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command ended; nothing follows.
    End(ExecEnd),
}

/// Something for an interactive exec.
#[derive(Debug)]
pub enum ExecInput {
    Stdin(Vec<u8>),
    CloseStdin,
    Resize { rows: u16, cols: u16 },
}

/// The API's ends of an interactive exec. Dropping `inputs` kills the
/// command.
pub struct ExecStream {
    pub events: mpsc::Receiver<ExecEvent>,
    pub inputs: mpsc::Sender<ExecInput>,
}

/// A failure of the link part-way through a follow.
pub type Chunk = Result<Vec<u8>, SessionError>;

/// Forwards the console into `chunks`; `done` ends the follow.
struct ChannelSink {
    chunks: mpsc::Sender<Chunk>,
}

fn gone() -> capnp::Error {
    capnp::Error::disconnected("the HTTP client went away".into())
}

impl byte_sink::Server for ChannelSink {
    async fn write(
        self: Rc<Self>,
        params: byte_sink::WriteParams,
        _: byte_sink::WriteResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?.to_vec();
        self.chunks.send(Ok(data)).await.map_err(|_| gone())
    }

    async fn done(self: Rc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> Result<(), capnp::Error> {
        Ok(())
    }
}

/// Follows `name`'s console into `chunks` until the microVM stops (the
/// broker's call returns), the link fails (an `Err` chunk) or the receiver
/// is dropped. `reply` says whether the follow could start at all (the
/// microVM exists there).
pub(super) async fn follow_logs(
    broker: &broker::Client,
    name: &str,
    chunks: mpsc::Sender<Chunk>,
    reply: oneshot::Sender<Result<(), SessionError>>,
) {
    let vm = match get_vm(broker, name).await {
        Ok(vm) => vm,
        Err(e) => {
            let _ = reply.send(Err(e));
            return;
        }
    };
    if reply.send(Ok(())).is_err() {
        return;
    }
    let mut call = vm.logs_request();
    call.get().set_follow(true);
    call.get().set_sink(capnp_rpc::new_client(ChannelSink { chunks: chunks.clone() }));
    tokio::select! {
        result = call.send().promise => {
            if let Err(e) = result {
                let _ = chunks.send(Err(e.into())).await;
            }
        }
        // Dropping the promise sends `Finish`: the broker's follow is
        // cancelled rather than polling the console for nobody.
        () = chunks.closed() => {}
    }
}

/// Passes the command's output on as `ExecEvent`s.
struct EventOutput {
    events: mpsc::Sender<ExecEvent>,
    ended: RefCell<Option<oneshot::Sender<()>>>,
}

impl exec_output::Server for EventOutput {
    async fn stdout(
        self: Rc<Self>,
        params: exec_output::StdoutParams,
        _: exec_output::StdoutResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?.to_vec();
        self.events.send(ExecEvent::Stdout(data)).await.map_err(|_| gone())
    }

    async fn stderr(
        self: Rc<Self>,
        params: exec_output::StderrParams,
        _: exec_output::StderrResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?.to_vec();
        self.events.send(ExecEvent::Stderr(data)).await.map_err(|_| gone())
    }

    async fn exit(
        self: Rc<Self>,
        params: exec_output::ExitParams,
        _: exec_output::ExitResults,
    ) -> Result<(), capnp::Error> {
        let end = ExecEnd::read(params.get()?)?;
        let sent = self.events.send(ExecEvent::End(end)).await;
        if let Some(ended) = self.ended.borrow_mut().take() {
            let _ = ended.send(());
        }
        sent.map_err(|_| gone())
    }
}

/// Starts `start` in `name`'s guest, answers `reply` once it runs (or why
/// it cannot), then passes `inputs` to it until it ends. If `inputs` ends
/// first (the client went away) the command is killed.
pub(super) async fn exec_stream(
    broker: &broker::Client,
    name: &str,
    start: ExecStart,
    events: mpsc::Sender<ExecEvent>,
    mut inputs: mpsc::Receiver<ExecInput>,
    reply: oneshot::Sender<Result<(), SessionError>>,
) {
    let (ended_tx, mut ended) = oneshot::channel();
    let begin = async {
        let vm = get_vm(broker, name).await?;
        let output: exec_output::Client =
            capnp_rpc::new_client(EventOutput { events, ended: RefCell::new(Some(ended_tx)) });
        let mut call = vm.exec_request();
        {
            let mut request = call.get().init_request();
            request.set_tty(start.tty);
            request.set_rows(start.rows);
            request.set_cols(start.cols);
            request.set_cwd(&start.cwd);
            request.set_user(&start.user);
            mm_protocols::set_exec_command(request, &start.argv, &start.env);
        }
        call.get().set_output(output);
        Ok::<_, SessionError>(call.send().promise.await?.get()?.get_session()?)
    };
    let session = match begin.await {
        Ok(session) => session,
        Err(e) => {
            let _ = reply.send(Err(e));
            return;
        }
    };
    if reply.send(Ok(())).is_err() {
        inputs.close();
    }
    loop {
        let input = tokio::select! {
            input = inputs.recv() => input,
            _ = &mut ended => return,
        };
        let sent = match input {
            Some(ExecInput::Stdin(data)) => {
                let mut call = session.stdin_request();
                call.get().set_data(&data);
                call.send().promise.await.map(drop)
            }
            Some(ExecInput::CloseStdin) => session.close_stdin_request().send().promise.await.map(drop),
            Some(ExecInput::Resize { rows, cols }) => {
                let mut call = session.resize_request();
                call.get().set_rows(rows);
                call.get().set_cols(cols);
                call.send().promise.await.map(drop)
            }
            None => {
                // The client went away mid-command: end it rather than leave
                // it running unattended (the broker would kill it at its next
                // output; a quiet command would linger).
                let mut kill = session.signal_request();
                kill.get().set_signal(SIGKILL);
                let _ = tokio::time::timeout(KILL_TIMEOUT, kill.send().promise).await;
                return;
            }
        };
        if let Err(e) = sent {
            // Typically "the exec has ended" racing its exit event; the
            // exit (or the link's failure) reaches the client by `events`.
            tracing::debug!(machine = name, "exec input not delivered: {e}");
        }
    }
}
