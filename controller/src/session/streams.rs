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

use mm_protocols::broker_capnp::{broker, byte_sink, exec_output, exec_session};
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

/// A `ByteSink` into a channel (a console follow's chunks, a tunnel's bytes
/// from the guest): each `write` waits for room before it returns, which
/// is the flow control; `done` sends the end, if the stream has one, and
/// lets go of the channel.
pub(super) struct ChannelSink<T> {
    out: RefCell<Option<mpsc::Sender<T>>>,
    bytes: fn(Vec<u8>) -> T,
    end: Option<fn() -> T>,
}

impl<T> ChannelSink<T> {
    pub(super) fn new(out: mpsc::Sender<T>, bytes: fn(Vec<u8>) -> T, end: Option<fn() -> T>) -> Self {
        ChannelSink { out: RefCell::new(Some(out)), bytes, end }
    }
}

fn gone() -> capnp::Error {
    capnp::Error::disconnected("the HTTP client went away".into())
}

impl<T: 'static> byte_sink::Server for ChannelSink<T> {
    async fn write(
        self: Rc<Self>,
        params: byte_sink::WriteParams,
        _: byte_sink::WriteResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?.to_vec();
        let out = self.out.borrow().clone().ok_or_else(gone)?;
        out.send((self.bytes)(data)).await.map_err(|_| gone())
    }

    async fn done(self: Rc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> Result<(), capnp::Error> {
        let out = self.out.borrow_mut().take();
        if let (Some(out), Some(end)) = (out, self.end) {
            let _ = out.send(end()).await;
        }
        Ok(())
    }
}

/// The host's broker, or why this controller has none to ask.
pub(super) type BrokerLink = Result<broker::Client, SessionError>;

/// Answers a stream's `reply` with how `begin` went (the stream runs, or
/// why not). On success gives back what `begin` made and whether the API
/// side still waits for the stream (it may have gone meanwhile).
pub(super) async fn answer<T>(
    reply: oneshot::Sender<Result<(), SessionError>>,
    begin: impl Future<Output = Result<T, SessionError>>,
) -> Option<(T, bool)> {
    match begin.await {
        Ok(value) => {
            let waiting = reply.send(Ok(())).is_ok();
            Some((value, waiting))
        }
        Err(e) => {
            let _ = reply.send(Err(e));
            None
        }
    }
}

/// Follows `name`'s console into `chunks` until the microVM stops (the
/// broker's call returns), the link fails (an `Err` chunk) or the receiver
/// is dropped. `reply` says whether the follow could start at all (the
/// microVM exists there).
pub(super) async fn follow_logs(
    broker: BrokerLink,
    name: &str,
    chunks: mpsc::Sender<Chunk>,
    reply: oneshot::Sender<Result<(), SessionError>>,
) {
    let Some((vm, true)) = answer(reply, async { get_vm(&broker?, name).await }).await else {
        return;
    };
    let mut call = vm.logs_request();
    call.get().set_follow(true);
    call.get().set_sink(capnp_rpc::new_client(ChannelSink::new(chunks.clone(), Ok, None)));
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

/// SIGKILLs an exec's command (an error means it has ended already).
async fn kill(session: &exec_session::Client) {
    let mut kill = session.signal_request();
    kill.get().set_signal(SIGKILL);
    let _ = tokio::time::timeout(KILL_TIMEOUT, kill.send().promise).await;
}

/// Starts `start` in `name`'s guest, answers `reply` once it runs (or why
/// it cannot), then passes `inputs` to it until it ends. If `inputs` ends
/// first (the client went away) the command is killed.
pub(super) async fn exec_stream(
    broker: BrokerLink,
    name: &str,
    start: ExecStart,
    events: mpsc::Sender<ExecEvent>,
    mut inputs: mpsc::Receiver<ExecInput>,
    reply: oneshot::Sender<Result<(), SessionError>>,
) {
    let (ended_tx, mut ended) = oneshot::channel();
    let begin = async {
        let vm = get_vm(&broker?, name).await?;
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
    let Some((session, waiting)) = answer(reply, begin).await else {
        return;
    };
    if !waiting {
        inputs.close();
    }
    loop {
        let input = tokio::select! {
            input = inputs.recv() => input,
            exited = &mut ended => {
                if exited.is_err() {
                    // `output` was released without an exit status (the
                    // broker's pump gave up): the command may still run.
                    kill(&session).await;
                }
                return;
            }
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
                kill(&session).await;
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

#[cfg(test)]
mod tests {
    //! Against a stand-in broker over a real two-party connection (so a
    //! dropped call travels as `Finish`, as it does to a real broker).

    use std::cell::Cell;

    use capnp_rpc::RpcSystem;
    use capnp_rpc::rpc_twoparty_capnp::Side;
    use mm_protocols::broker_capnp::vm;
    use mm_protocols::rpc::vat_network;

    use super::*;

    /// Set when dropped: the broker-side call's future is gone.
    struct Guard(Rc<Cell<bool>>);

    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.set(true);
        }
    }

    #[derive(Default)]
    struct Seen {
        follow_ended: Rc<Cell<bool>>,
        stdin: Rc<RefCell<Vec<u8>>>,
        signals: Rc<RefCell<Vec<i32>>>,
        /// Held like the broker holds it, until the command ends.
        output: RefCell<Option<exec_output::Client>>,
    }

    struct FakeVm(Rc<Seen>);

    impl vm::Server for FakeVm {
        async fn logs(self: Rc<Self>, params: vm::LogsParams, _: vm::LogsResults) -> Result<(), capnp::Error> {
            let _guard = Guard(Rc::clone(&self.0.follow_ended));
            let sink = params.get()?.get_sink()?;
            let mut write = sink.write_request();
            write.get().set_data(b"boot\n");
            write.send().promise.await?;
            // Then a console with nothing new: only a cancellation ends it.
            futures::future::pending::<()>().await;
            Ok(())
        }

        async fn exec(
            self: Rc<Self>,
            params: vm::ExecParams,
            mut results: vm::ExecResults,
        ) -> Result<(), capnp::Error> {
            let output = params.get()?.get_output()?;
            *self.0.output.borrow_mut() = Some(output.clone());
            tokio::task::spawn_local(async move {
                let mut call = output.stdout_request();
                call.get().set_data(b"hi");
                let _ = call.send().promise.await;
            });
            results.get().set_session(capnp_rpc::new_client(FakeSession(Rc::clone(&self.0))));
            Ok(())
        }
    }

    struct FakeSession(Rc<Seen>);

    impl exec_session::Server for FakeSession {
        async fn stdin(
            self: Rc<Self>,
            params: exec_session::StdinParams,
            _: exec_session::StdinResults,
        ) -> Result<(), capnp::Error> {
            self.0.stdin.borrow_mut().extend_from_slice(params.get()?.get_data()?);
            Ok(())
        }

        async fn signal(
            self: Rc<Self>,
            params: exec_session::SignalParams,
            _: exec_session::SignalResults,
        ) -> Result<(), capnp::Error> {
            self.0.signals.borrow_mut().push(params.get()?.get_signal());
            Ok(())
        }
    }

    struct FakeBroker(vm::Client);

    impl broker::Server for FakeBroker {
        async fn get_vm(
            self: Rc<Self>,
            _: broker::GetVmParams,
            mut results: broker::GetVmResults,
        ) -> Result<(), capnp::Error> {
            results.get().set_vm(self.0.clone());
            Ok(())
        }
    }

    /// The controller's end of a connection to a stand-in broker.
    fn connect(seen: &Rc<Seen>) -> broker::Client {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let (far_read, far_write) = tokio::io::split(far);
        let vm: vm::Client = capnp_rpc::new_client(FakeVm(Rc::clone(seen)));
        let served: broker::Client = capnp_rpc::new_client(FakeBroker(vm));
        let network = vat_network(far_read, far_write, Side::Server, None);
        tokio::task::spawn_local(RpcSystem::new(Box::new(network), Some(served.client)));
        let (near_read, near_write) = tokio::io::split(near);
        let mut system = RpcSystem::new(Box::new(vat_network(near_read, near_write, Side::Client, None)), None);
        let broker: broker::Client = system.bootstrap(Side::Server);
        tokio::task::spawn_local(system);
        broker
    }

    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_dropped_follow_cancels_the_brokers_call() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let seen = Rc::new(Seen::default());
                let broker = connect(&seen);
                let (chunks, mut received) = mpsc::channel(STREAM_BUFFER);
                let (reply, replied) = oneshot::channel();
                let task = tokio::task::spawn_local(async move { follow_logs(Ok(broker), "vm", chunks, reply).await });
                replied.await.unwrap().unwrap();
                assert_eq!(received.recv().await.unwrap().unwrap(), b"boot\n");
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert!(!seen.follow_ended.get(), "the follow goes on while its client listens");
                drop(received);
                tokio::time::timeout(Duration::from_secs(5), task).await.expect("the follow task ends").unwrap();
                eventually("the broker's follow was not cancelled", || seen.follow_ended.get()).await;
            })
            .await;
    }

    /// `cat` started through the stand-in broker: the API's ends of its
    /// stream and the session task, once the start was answered.
    async fn started_exec(seen: &Rc<Seen>) -> (ExecStream, tokio::task::JoinHandle<()>) {
        let broker = connect(seen);
        let (events, events_rx) = mpsc::channel(STREAM_BUFFER);
        let (inputs, inputs_rx) = mpsc::channel(STREAM_BUFFER);
        let (reply, replied) = oneshot::channel();
        let start = ExecStart { argv: vec!["cat".into()], ..ExecStart::default() };
        let task = tokio::task::spawn_local(async move {
            exec_stream(Ok(broker), "vm", start, events, inputs_rx, reply).await;
        });
        replied.await.unwrap().unwrap();
        (ExecStream { events: events_rx, inputs }, task)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_abandoned_exec_is_killed() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let seen = Rc::new(Seen::default());
                let (ExecStream { events: mut received, inputs }, task) = started_exec(&seen).await;
                assert!(matches!(received.recv().await, Some(ExecEvent::Stdout(data)) if data == b"hi"));
                inputs.send(ExecInput::Stdin(b"typed".to_vec())).await.unwrap();
                eventually("stdin did not arrive", || seen.stdin.borrow().as_slice() == b"typed").await;
                assert!(seen.signals.borrow().is_empty());
                drop(inputs);
                tokio::time::timeout(Duration::from_secs(5), task).await.expect("the exec task ends").unwrap();
                assert_eq!(*seen.signals.borrow(), [SIGKILL]);
            })
            .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_collected_exec_gets_its_stdin_and_is_killed_at_its_timeout() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let seen = Rc::new(Seen::default());
                let (stream, task) = started_exec(&seen).await;
                // The stand-in prints "hi" and never ends.
                let timeout = Duration::from_millis(300);
                let collected = super::super::ops::collect(stream, b"typed".to_vec(), timeout, 1).await;
                assert!(matches!(collected, Err(SessionError::Timeout(t)) if t == timeout), "{collected:?}");
                assert_eq!(seen.stdin.borrow().as_slice(), b"typed");
                tokio::time::timeout(Duration::from_secs(5), task).await.expect("the exec task ends").unwrap();
                assert_eq!(*seen.signals.borrow(), [SIGKILL]);
            })
            .await;
    }
}
