//! mm-init's SSH server, so that every image can be reached with plain
//! `ssh root@VM`, whatever it has installed.
//!
//! PID 1 calls [`start`] once networking is up. It listens on TCP
//! 0.0.0.0:22 and runs on one thread of its own with a single-threaded
//! tokio runtime (russh is async); PID 1's main thread keeps its own work.
//!
//! * Host key: ed25519, made on first boot and kept in
//!   `/etc/ssh/mm_host_ed25519_key` (hostkey.rs). Its public half is printed
//!   as `mm-init: ssh host key ssh-ed25519 AAAA…` so hosts can pin it. A
//!   guest restored from a snapshot under a new name gets a new one from
//!   the exec agent ([`renew_host_key`]) without restarting the server.
//!   The server reads its configuration per connection, through
//!   [`ServerConfig`], so no thread beyond its own is involved.
//! * Logins: user `root` only, public keys only, checked against the
//!   `mm.ssh=` lines (auth.rs). Every accepted or refused attempt is one
//!   line on stderr. A guest restored from a snapshot gets the keys of its
//!   run from the exec agent ([`set_authorized_keys`]): a snapshot taken
//!   once per image, before any run (a warm start), has none of them on its
//!   command line. Like the host key, they are read per connection
//!   ([`Logins`]).
//! * Sessions: `exec` runs `/bin/sh -c CMD`, `shell` runs `/bin/sh -l`, as
//!   root, on a terminal if the client asked for one (channel.rs). Commands
//!   start through the exec agent's spawner, because PID 1 reaps every child
//!   itself (agent/children.rs). No port forwarding, X11, agent forwarding
//!   or subsystems (so no sftp; `scp -O` works through `exec`).
//!
//! Nothing here may take PID 1 down: every failure is one
//! `mm-init: ssh: …` line on stderr, after which the server is off.

mod auth;
mod channel;
mod handler;
mod hostkey;
#[cfg(test)]
mod tests;

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::server::Config;
use russh::{Disconnect, MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::agent::Reaper;
pub(crate) use auth::AuthorizedKeys;
#[cfg(test)]
pub(crate) use auth::test_key;
use handler::Connection;
use hostkey::Origin;

/// Connections at once; more are closed at once, so a flood cannot
/// exhaust the guest's memory or file descriptors.
const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to log in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the SSH server is off (or, for [`SshError::StoreHostKey`], why its
/// host key lasts only until shutdown).
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot block PID 1's signals for the server's thread: {0}")]
    Signals(nix::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot start the server's thread: {0}")]
    Thread(io::Error),
    #[error("cannot start the server's runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot get random numbers from the kernel for the host key: {0}")]
    Random(io::Error),
    #[error("cannot encode the host key: {0}")]
    KeyEncoding(russh::keys::ssh_key::Error),
    #[error("cannot store the host key in {}: {source}", path.display())]
    StoreHostKey { path: PathBuf, source: io::Error },
}

/// Starts the server on 0.0.0.0:22 for `authorized_keys` (OpenSSH
/// `authorized_keys` lines). With no keys it still runs, refusing every
/// login, so that a client is told "permission denied" rather than
/// "connection refused". Returns at once; never fails PID 1.
pub fn start(authorized_keys: &[String]) {
    if let Err(e) = try_start(authorized_keys) {
        eprintln!("mm-init: ssh: {e}");
    }
}

fn try_start(authorized_keys: &[String]) -> Result<(), SshError> {
    // Threads inherit the signal mask: block PID 1's signals first, so they
    // stay pending for its `sigwait` rather than landing on our thread.
    crate::supervise::block_signals().map_err(SshError::Signals)?;
    let (keys, problems) = AuthorizedKeys::parse(authorized_keys);
    for problem in problems {
        eprintln!("mm-init: ssh: {problem}");
    }
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 22));
    let listener = bind(addr)?;
    let count = count_keys(&keys);
    let logins = Logins::new(keys);
    // Published before the thread starts, so that keys set from now on
    // cannot be overwritten by these.
    *LOGINS.lock().unwrap_or_else(PoisonError::into_inner) = Some(logins.clone());
    std::thread::Builder::new()
        .name("ssh".into())
        .spawn(move || {
            let result = load_host_key().and_then(|server| {
                let _ = writeln!(io::stdout(), "mm-init: ssh listening on {addr} ({count})");
                serve(listener, server, logins, Reaper::Pid1)
            });
            if let Err(e) = result {
                eprintln!("mm-init: ssh: {e}");
            }
        })
        .map_err(SshError::Thread)?;
    Ok(())
}

/// The server's configuration, host key included. Replaceable while the
/// server runs, for [`renew_host_key`]; each connection takes the one
/// current when it is accepted (connections already open keep theirs).
pub(crate) struct ServerConfig(RwLock<Arc<Config>>);

impl ServerConfig {
    fn new(host_key: PrivateKey) -> Arc<Self> {
        Arc::new(ServerConfig(RwLock::new(Arc::new(config(host_key)))))
    }

    fn current(&self) -> Arc<Config> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set_host_key(&self, host_key: PrivateKey) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config(host_key));
    }
}

/// The configuration of the server PID 1 started, once it has its host
/// key. Its lock also orders a renewal against the server's start, which
/// could otherwise load the very key being replaced.
type Running = Mutex<Option<Arc<ServerConfig>>>;
static RUNNING: Running = Mutex::new(None);

/// Loads (or makes) the host key and publishes the server's configuration
/// for [`renew_host_key`].
fn load_host_key() -> Result<Arc<ServerConfig>, SshError> {
    let mut running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
    let (host_key, origin) = hostkey::load_or_create(hostkey::HOST_KEY_PATH.as_ref())?;
    announce(&host_key, &origin);
    let server = ServerConfig::new(host_key);
    *running = Some(server.clone());
    Ok(server)
}

/// Replaces the host key, for a guest restored from a snapshot under a new
/// name: a clone must not be able to pose as its siblings. Makes a new key
/// (from the kernel's random numbers, so reseed them first), stores it in
/// place of the old one, and has the running server offer it to every new
/// connection; its public half goes to the console as at boot. Without a
/// running server (no network at boot) only the file changes. An error
/// means the key could not be stored: a running server still uses it until
/// shutdown, and the old key comes back on the next boot.
pub fn renew_host_key() -> Result<(), SshError> {
    renew_host_key_at(hostkey::HOST_KEY_PATH.as_ref(), &RUNNING)
}

fn renew_host_key_at(path: &Path, running: &Running) -> Result<(), SshError> {
    let running = running.lock().unwrap_or_else(PoisonError::into_inner);
    let host_key = hostkey::generate()?;
    let stored = hostkey::store(&host_key, path);
    let origin = match &stored {
        Ok(()) => Origin::Created { replaced: Some("new identity".into()) },
        Err(e) => Origin::InMemory { reason: e.to_string() },
    };
    if stored.is_ok() || running.is_some() {
        announce(&host_key, &origin);
    }
    if let Some(server) = running.as_ref() {
        server.set_host_key(host_key);
    }
    stored
}

/// Who may log in. Replaceable while the server runs, for
/// [`set_authorized_keys`]; each connection takes the keys current when it
/// is accepted (connections already open keep theirs, like a session of
/// OpenSSH's outlives a change to `authorized_keys`).
pub(crate) struct Logins(RwLock<Arc<AuthorizedKeys>>);

impl Logins {
    fn new(keys: AuthorizedKeys) -> Arc<Self> {
        Arc::new(Logins(RwLock::new(Arc::new(keys))))
    }

    fn current(&self) -> Arc<AuthorizedKeys> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn replace(&self, keys: AuthorizedKeys) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
    }
}

/// The logins of the server PID 1 started, once it listens.
static LOGINS: Mutex<Option<Arc<Logins>>> = Mutex::new(None);

/// Replaces the keys that may log in to the running server with `keys`
/// (for a restored guest: see the module docs), for every connection from
/// now on; one console line says how many there are now. Without a
/// running server (no network at boot) nobody can log in anyway, and
/// nothing changes: that is no failure, as a host sends a run's keys
/// without knowing whether the guest serves SSH.
pub fn set_authorized_keys(keys: AuthorizedKeys) {
    set_authorized_keys_in(keys, &LOGINS)
}

fn set_authorized_keys_in(keys: AuthorizedKeys, running: &Mutex<Option<Arc<Logins>>>) {
    if let Some(logins) = running.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
        let _ = writeln!(io::stdout(), "mm-init: ssh: new logins ({})", count_keys(&keys));
        logins.replace(keys);
    }
}

/// `1 authorized key`, `3 authorized keys`: for the console.
fn count_keys(keys: &AuthorizedKeys) -> String {
    format!("{} authorized key{}", keys.len(), if keys.len() == 1 { "" } else { "s" })
}

/// Binds the listening socket (std sets `SO_REUSEADDR` and close-on-exec).
fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, SshError> {
    let listen_error = |source| SshError::Listen { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(listen_error)?;
    listener.set_nonblocking(true).map_err(listen_error)?;
    Ok(listener)
}

/// The console lines about the host key.
fn announce(host_key: &PrivateKey, origin: &Origin) {
    match origin {
        Origin::Loaded => {}
        Origin::Created { replaced } => {
            if let Some(why) = replaced {
                eprintln!("mm-init: ssh: {why}: replacing it");
            }
            let _ = writeln!(io::stdout(), "mm-init: ssh: made a new host key in {}", hostkey::HOST_KEY_PATH);
        }
        Origin::InMemory { reason } => {
            eprintln!("mm-init: ssh: {reason}; this boot's host key is kept in memory only");
        }
    }
    if let Ok(public) = host_key.public_key().to_openssh() {
        let _ = writeln!(io::stdout(), "mm-init: ssh host key {public}");
    }
}

fn config(host_key: PrivateKey) -> Config {
    Config {
        server_id: russh::SshId::Standard("SSH-2.0-mm-init".into()),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![host_key],
        // Clients probe with "none" first: answer that at once, and every
        // real refusal after a constant second.
        auth_rejection_time: Duration::from_secs(1),
        auth_rejection_time_initial: Some(Duration::ZERO),
        max_auth_attempts: 6,
        // An idle shell stays open, as with OpenSSH; keepalives find
        // clients that are gone.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(60)),
        keepalive_max: 3,
        nodelay: true,
        ..Config::default()
    }
}

/// Serves forever on `listener` (already bound and non-blocking) on the
/// calling thread. Returns only if the runtime cannot start.
fn serve(
    listener: std::net::TcpListener,
    server: Arc<ServerConfig>,
    logins: Arc<Logins>,
    reaper: Reaper,
) -> Result<(), SshError> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().map_err(SshError::Runtime)?;
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener).map_err(SshError::Runtime)?;
        accept_loop(listener, server, logins, reaper).await;
        Ok(())
    })
}

async fn accept_loop(listener: TcpListener, server: Arc<ServerConfig>, logins: Arc<Logins>, reaper: Reaper) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of fds or memory, or an aborted handshake: wait
                // rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            eprintln!("mm-init: ssh: refused {peer}: too many connections");
            continue;
        };
        let connection = Connection::new(peer, logins.current(), reaper);
        let config = server.current();
        tokio::spawn(async move {
            serve_connection(stream, config, connection).await;
            drop(slot);
        });
    }
}

/// Runs one connection to its end, cutting it off if it has not logged in
/// within [`LOGIN_TIMEOUT`].
async fn serve_connection(stream: TcpStream, config: Arc<Config>, connection: Connection) {
    let authenticated = connection.authenticated.clone();
    let peer = connection.peer;
    let Ok(session) = russh::server::run_stream(config, stream, connection).await else {
        return; // the client left or spoke no SSH
    };
    let handle = session.handle();
    tokio::pin!(session);
    tokio::select! {
        _ = &mut session => return,
        _ = tokio::time::sleep(LOGIN_TIMEOUT) => {}
    }
    if !authenticated.load(Ordering::SeqCst) {
        eprintln!("mm-init: ssh: refused {peer}: no login within {} s", LOGIN_TIMEOUT.as_secs());
        let _ = handle.disconnect(Disconnect::ByApplication, "login timed out".into(), String::new()).await;
    }
    let _ = session.await;
}
