//! The brokers' sessions (`protocols/cluster.capnp`) and what the
//! controller does through them.
//!
//! Brokers dial in over mutual TLS (`tls`): the client certificate, signed
//! by the cluster's CA, is the broker's identity and its name the host's.
//! Each connection runs Cap'n Proto two-party RPC with `Cluster` as the
//! bootstrap capability (`server`). A registered broker hands over its
//! `Broker` capability; for as long as the session lives, a driver
//! (`driver`) brings that host's machines to their desired state through
//! it, and the REST API's exec, logs, stats and snapshots go through it
//! (`ops`, `snapshots`).
//!
//! Cap'n Proto capabilities are not `Send`, and the REST API runs on a
//! multi-threaded runtime, so all of this lives on one thread of its own
//! with a single-threaded runtime; the rest of the controller talks to it
//! through a [`Hub`], a cheap `Send` handle that sends commands over a
//! channel and awaits their answers.
//!
//! With several controllers, a broker holds its session with the one it
//! dialled: that controller drives its machines, while the leader (see
//! `leader`) decides, from the heartbeats recorded in Postgres, when a
//! host is lost and re-places its machines. The hosts row names the
//! controller holding the session (its `--advertise-url`), so the others
//! can forward exec and logs there (`api::forward`).

pub mod driver;
pub mod ops;
pub mod server;
pub mod snapshots;
pub mod streams;
pub mod tls;
pub mod tunnel;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::db::Db;
pub use ops::{ExecOutput, ExecRequest, ProcessStats};
pub use snapshots::SnapshotInfo;
pub use streams::{Chunk, ExecEvent, ExecInput, ExecStart, ExecStream};
pub use tls::{TlsError, TlsFiles};
pub use tunnel::{Tunnel, TunnelData};

/// Where brokers dial in.
#[derive(Debug, Clone)]
pub struct BrokerListen {
    pub addr: SocketAddr,
    pub tls: TlsFiles,
}

/// Timing of the sessions.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often brokers are told to heart-beat.
    pub heartbeat: Duration,
    /// How often a driver looks at its host's machines when nothing woke
    /// it earlier.
    pub reconcile: Duration,
}

/// Why something could not be done through a broker.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("host {0:?} has no broker session with this controller")]
    NotConnected(String),
    #[error("this controller does not accept broker sessions (no --broker-listen)")]
    Disabled,
    /// The broker refused: `kind` is its error kind (`not-found`,
    /// `conflict`, `invalid`, `no-memory`, `internal`).
    #[error("the broker says: {message}")]
    Broker { kind: String, message: String },
    #[error("the connection to the broker failed: {0}")]
    Link(String),
    #[error("no answer within {} s", .0.as_secs())]
    Timeout(Duration),
}

impl From<capnp::Error> for SessionError {
    /// The broker sends `"<kind>: <message>"`, which capnp-rpc may prefix
    /// with "remote exception: ".
    fn from(e: capnp::Error) -> Self {
        let text = e.extra.trim_start_matches("remote exception: ");
        const KINDS: [&str; 5] = ["not-found", "conflict", "invalid", "no-memory", "internal"];
        match text.split_once(": ") {
            Some((kind, message)) if KINDS.contains(&kind) => {
                SessionError::Broker { kind: kind.to_owned(), message: message.to_owned() }
            }
            _ => SessionError::Link(text.to_owned()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen for brokers on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the session thread: {0}")]
    Thread(std::io::Error),
}

/// Work for the session thread.
pub(crate) enum Command {
    Connected {
        host: String,
        reply: oneshot::Sender<bool>,
    },
    Logs {
        host: String,
        machine: String,
        max_bytes: usize,
        reply: oneshot::Sender<Result<Vec<u8>, SessionError>>,
    },
    Stats {
        host: String,
        machine: String,
        reply: oneshot::Sender<Result<Vec<ProcessStats>, SessionError>>,
    },
    Snapshot {
        host: String,
        machine: String,
        reply: oneshot::Sender<Result<SnapshotInfo, SessionError>>,
    },
    RemoveSnapshot {
        host: String,
        id: String,
        reply: oneshot::Sender<Result<(), SessionError>>,
    },
    FollowLogs {
        host: String,
        machine: String,
        chunks: mpsc::Sender<Chunk>,
        reply: oneshot::Sender<Result<(), SessionError>>,
    },
    ExecStream {
        host: String,
        machine: String,
        start: ExecStart,
        events: mpsc::Sender<ExecEvent>,
        inputs: mpsc::Receiver<ExecInput>,
        reply: oneshot::Sender<Result<(), SessionError>>,
    },
    Connect {
        host: String,
        machine: String,
        port: u16,
        from_guest: mpsc::Sender<TunnelData>,
        to_guest: mpsc::Receiver<TunnelData>,
        reply: oneshot::Sender<Result<(), SessionError>>,
    },
}

/// The handle the rest of the controller uses; clones share one thread.
#[derive(Clone)]
pub struct Hub {
    commands: Option<mpsc::UnboundedSender<Command>>,
    local_addr: Option<SocketAddr>,
}

impl Hub {
    /// A hub with no sessions (no `--broker-listen`): every call fails.
    pub fn disabled() -> Hub {
        Hub { commands: None, local_addr: None }
    }

    /// Binds `listen` and starts the session thread. The thread ends when
    /// `shutdown` turns true or every clone of the hub is gone.
    pub fn start(
        listen: &BrokerListen,
        db: Db,
        changes: watch::Sender<u64>,
        timing: Timing,
        advertise_url: Option<String>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Hub, StartError> {
        let acceptor = tls::acceptor(&listen.tls)?;
        let bind = |source| StartError::Bind { addr: listen.addr, source };
        let listener = std::net::TcpListener::bind(listen.addr).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        let local_addr = listener.local_addr().map_err(bind)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = server::Shared { db, changes, timing, advertise_url };
        std::thread::Builder::new()
            .name("mm-controller-sessions".into())
            .spawn(move || server::run(listener, acceptor, shared, rx, shutdown))
            .map_err(StartError::Thread)?;
        Ok(Hub { commands: Some(tx), local_addr: Some(local_addr) })
    }

    /// Where brokers dial in (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Whether `host`'s broker holds its session with this controller
    /// (where exec and logs are then served, not forwarded).
    pub async fn is_connected(&self, host: &str) -> bool {
        let Some(commands) = &self.commands else { return false };
        let (reply, answer) = oneshot::channel();
        let host = host.to_owned();
        commands.send(Command::Connected { host, reply }).is_ok() && answer.await.unwrap_or(false)
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, SessionError>>) -> Command,
    ) -> Result<T, SessionError> {
        let commands = self.commands.as_ref().ok_or(SessionError::Disabled)?;
        let (tx, rx) = oneshot::channel();
        commands.send(command(tx)).map_err(|_| SessionError::Link("the session thread is gone".into()))?;
        rx.await.map_err(|_| SessionError::Link("the session thread dropped the request".into()))?
    }

    /// Runs a command in machine `machine`'s microVM on `host`, collecting
    /// its output (non-interactive): the interactive exec without a
    /// terminal, read to its end by [`ops::collect`].
    pub async fn exec(&self, host: &str, machine: &str, request: ExecRequest) -> Result<ExecOutput, SessionError> {
        let ExecRequest { argv, env, stdin, timeout, max_output } = request;
        let start = ExecStart { argv, env, ..ExecStart::default() };
        let stream = self.exec_stream(host, machine, start).await?;
        ops::collect(stream, stdin, timeout, max_output).await
    }

    /// The console log of `machine`'s microVM on `host` (its last
    /// `max_bytes`).
    pub async fn logs(&self, host: &str, machine: &str, max_bytes: usize) -> Result<Vec<u8>, SessionError> {
        let (host, machine) = (host.to_owned(), machine.to_owned());
        self.ask(|reply| Command::Logs { host, machine, max_bytes, reply }).await
    }

    /// How each process of `machine`'s microVM on `host` is doing.
    pub async fn stats(&self, host: &str, machine: &str) -> Result<Vec<ProcessStats>, SessionError> {
        let (host, machine) = (host.to_owned(), machine.to_owned());
        self.ask(|reply| Command::Stats { host, machine, reply }).await
    }

    /// Snapshots `machine`'s running microVM on `host` (it runs on).
    pub async fn snapshot(&self, host: &str, machine: &str) -> Result<SnapshotInfo, SessionError> {
        let (host, machine) = (host.to_owned(), machine.to_owned());
        self.ask(|reply| Command::Snapshot { host, machine, reply }).await
    }

    /// Deletes snapshot `id` on `host` (one the broker lacks counts as
    /// deleted).
    pub async fn remove_snapshot(&self, host: &str, id: &str) -> Result<(), SessionError> {
        let (host, id) = (host.to_owned(), id.to_owned());
        self.ask(|reply| Command::RemoveSnapshot { host, id, reply }).await
    }

    /// Follows the console of `machine`'s microVM on `host` from its start
    /// until the microVM stops: chunks arrive on the receiver, which ends
    /// after the last (or after an `Err` when the link failed). Dropping
    /// the receiver stops the follow on the broker too.
    pub async fn follow_logs(&self, host: &str, machine: &str) -> Result<mpsc::Receiver<Chunk>, SessionError> {
        let (host, machine) = (host.to_owned(), machine.to_owned());
        let (chunks, rx) = mpsc::channel(streams::STREAM_BUFFER);
        self.ask(|reply| Command::FollowLogs { host, machine, chunks, reply }).await?;
        Ok(rx)
    }

    /// Starts an interactive command in `machine`'s microVM on `host`;
    /// answers once it runs. Dropping the returned `inputs` kills it.
    pub async fn exec_stream(&self, host: &str, machine: &str, start: ExecStart) -> Result<ExecStream, SessionError> {
        let (host, machine) = (host.to_owned(), machine.to_owned());
        let (events, events_rx) = mpsc::channel(streams::STREAM_BUFFER);
        let (inputs, inputs_rx) = mpsc::channel(streams::STREAM_BUFFER);
        self.ask(|reply| Command::ExecStream { host, machine, start, events, inputs: inputs_rx, reply }).await?;
        Ok(ExecStream { events: events_rx, inputs })
    }

    /// Opens a TCP connection to `port` of `machine`'s guest on `host`,
    /// made by its broker; answers once connected.
    pub async fn connect(&self, host: &str, machine: &str, port: u16) -> Result<Tunnel, SessionError> {
        let (host, machine) = (host.to_owned(), machine.to_owned());
        let (from_guest_tx, from_guest) = mpsc::channel(streams::STREAM_BUFFER);
        let (to_guest, to_guest_rx) = mpsc::channel(streams::STREAM_BUFFER);
        self.ask(|reply| Command::Connect {
            host,
            machine,
            port,
            from_guest: from_guest_tx,
            to_guest: to_guest_rx,
            reply,
        })
        .await?;
        Ok(Tunnel { from_guest, to_guest })
    }
}
