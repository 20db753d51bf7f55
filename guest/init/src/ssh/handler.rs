//! One SSH connection: who may log in, and which channel requests we take.
//!
//! russh calls these methods from the connection's own task. They only
//! decide and reply; each session channel's work (the command, its streams)
//! runs in a task of its own (channel.rs), fed by the same requests through
//! the channel's message queue.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use russh::keys::{HashAlg, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId};

use super::auth::AuthorizedKeys;
use crate::agent::Reaper;

/// The only account: every command runs as root (see the module docs).
const USER: &str = "root";

/// The server side of one connection.
pub struct Connection {
    pub peer: SocketAddr,
    authorized: Arc<AuthorizedKeys>,
    reaper: Reaper,
    /// Set once a login succeeds; the accept loop ends connections that
    /// stay unauthenticated too long.
    pub authenticated: Arc<AtomicBool>,
    /// Channels that already run a command: a second `exec`/`shell` (or a
    /// late `pty-req`) on them is refused.
    started: HashSet<ChannelId>,
}

impl Connection {
    pub fn new(peer: SocketAddr, authorized: Arc<AuthorizedKeys>, reaper: Reaper) -> Self {
        Connection { peer, authorized, reaper, authenticated: Arc::default(), started: HashSet::new() }
    }

    /// Why `user` may not log in with `key`, if not.
    fn refusal(&self, user: &str, key: &PublicKey) -> Option<&'static str> {
        if user != USER {
            Some("only root may log in")
        } else if !self.authorized.contains(key) {
            Some("key not authorized")
        } else {
            None
        }
    }

    fn log_refused(&self, user: &str, what: &str, why: &str) {
        eprintln!("mm-init: ssh: refused {user}@{} ({what}): {why}", self.peer);
    }
}

/// `ED25519 SHA256:…`, as OpenSSH logs keys.
fn describe(key: &PublicKey) -> String {
    format!(
        "{} {}",
        key.algorithm().as_str().trim_start_matches("ssh-").to_uppercase(),
        key.fingerprint(HashAlg::Sha256)
    )
}

/// Names the agent's spawner accepts (it refuses empty names and `=`);
/// anything else is refused here, where the client can be told.
pub fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('=') && !name.contains('\0')
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        // Every client probes with "none" first: not worth a log line.
        Ok(Auth::reject())
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        self.log_refused(user, "password", "only public keys are accepted");
        Ok(Auth::reject())
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        self.log_refused(user, "keyboard-interactive", "only public keys are accepted");
        Ok(Auth::reject())
    }

    async fn auth_publickey_offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        // Refused keys are logged here (the client never signs with them);
        // accepted ones once the signature is checked, below.
        match self.refusal(user, offer.public_key) {
            None => Ok(Auth::Accept),
            Some(why) => {
                self.log_refused(user, &describe(offer.public_key), why);
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        match self.refusal(user, key.public_key) {
            None => {
                self.authenticated.store(true, Ordering::SeqCst);
                eprintln!("mm-init: ssh: accepted {user}@{} ({})", self.peer, describe(key.public_key));
                Ok(Auth::Accept)
            }
            Some(why) => {
                self.log_refused(user, &describe(key.public_key), why);
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        tokio::spawn(super::channel::run(channel, session.handle(), self.reaper));
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.started.remove(&channel);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Terminal modes are not applied: the terminal starts with the
        // kernel's defaults, which the client's own raw mode makes moot.
        reply(session, channel, !self.started.contains(&channel))
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply(session, channel, valid_env_name(name) && !self.started.contains(&channel))
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        let first = self.started.insert(channel);
        reply(session, channel, first)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let first = self.started.insert(channel);
        reply(session, channel, first)
    }

    // The client pairs replies with its requests in order, so requests we
    // do not serve must get a failure rather than silence.
    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply(session, channel, false)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply(session, channel, false)
    }
}

/// Answers a channel request (russh sends nothing unless the client asked
/// for a reply).
fn reply(session: &mut Session, channel: ChannelId, ok: bool) -> Result<(), russh::Error> {
    if ok { session.channel_success(channel) } else { session.channel_failure(channel) }
}
