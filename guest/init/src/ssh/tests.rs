//! The server run on the host as an ordinary process, on 127.0.0.1 with an
//! ephemeral port, with the real OpenSSH client (`/usr/bin/ssh`) on the
//! other end.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::{AuthorizedKeys, Logins, Reaper, ServerConfig, bind, hostkey, serve};

/// A fresh directory under the system's temporary directory.
pub fn scratch_dir(what: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("mm-init-ssh-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Makes a client key pair with ssh-keygen: (private key path, public line).
fn client_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test@host", "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    (path, public.trim().to_string())
}

/// A running server and a key it accepts.
struct Server {
    port: u16,
    key: PathBuf,
    dir: PathBuf,
    config: Arc<ServerConfig>,
    logins: Arc<Logins>,
}

impl Server {
    fn start() -> Server {
        let dir = scratch_dir("server");
        let (key, public) = client_key(&dir, "key");
        let (keys, problems) = AuthorizedKeys::parse(&[public]);
        assert!(problems.is_empty(), "{problems:?}");
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = ServerConfig::new(hostkey::generate().unwrap());
        let logins = Logins::new(keys);
        let (serving, checking) = (config.clone(), logins.clone());
        std::thread::spawn(move || serve(listener, serving, checking, Reaper::Direct).unwrap());
        Server { port, key, dir, config, logins }
    }

    /// `ssh` with `key` and `extra` options, `args` as its command line,
    /// `stdin` as its input.
    fn ssh(&self, key: &Path, extra: &[&str], args: &[&str], stdin: &[u8]) -> Output {
        let mut child = self.spawn_ssh(key, extra, args);
        let mut input = child.stdin.take().unwrap();
        let stdin = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&stdin);
        });
        let output = child.wait_with_output().unwrap();
        writer.join().unwrap();
        output
    }

    /// `ssh` as in [`Self::ssh`], its stdio piped, left running.
    fn spawn_ssh(&self, key: &Path, extra: &[&str], args: &[&str]) -> std::process::Child {
        Command::new("/usr/bin/ssh")
            .args(["-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"])
            .args(["-o", "ConnectTimeout=20", "-i"])
            .arg(key)
            .args(["-p", &self.port.to_string()])
            .args(extra)
            .arg("root@127.0.0.1")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.ssh(&self.key, &[], args, stdin)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_command_runs_and_its_output_and_status_come_back() {
    let server = Server::start();
    let out = server.run(&["echo hi; echo oops >&2; echo \"$HOME $PATH\"; pwd; exit 7"], b"");
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    let home = if Path::new("/root").is_dir() { "/root" } else { "/" };
    assert_eq!(text(&out.stdout), format!("hi\n/root {}\n{home}\n", crate::agent::spawn::DEFAULT_PATH));
    assert_eq!(text(&out.stderr), "oops\n");
}

#[test]
fn a_wrong_key_is_refused() {
    let server = Server::start();
    let (other, _) = client_key(&server.dir, "other");
    let out = server.ssh(&other, &[], &["echo should-not-run"], b"");
    assert_eq!(out.status.code(), Some(255));
    assert_eq!(text(&out.stdout), "");
    assert!(text(&out.stderr).contains("Permission denied (publickey)"), "{}", text(&out.stderr));
    // Passwords are not even offered as a method.
    let out =
        server.ssh(&other, &["-o", "PubkeyAuthentication=no", "-o", "PasswordAuthentication=yes"], &["true"], b"");
    assert_eq!(out.status.code(), Some(255));
}

#[test]
fn only_root_may_log_in() {
    let server = Server::start();
    let out = Command::new("/usr/bin/ssh")
        .args(["-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-i"])
        .arg(&server.key)
        .args(["-p", &server.port.to_string(), "alice@127.0.0.1", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
}

#[test]
fn stdin_is_passed_through_and_eof_closes_it() {
    let server = Server::start();
    let out = server.run(&["cat"], b"hi\n");
    assert_eq!((out.status.code(), text(&out.stdout).as_str()), (Some(0), "hi\n"), "{}", text(&out.stderr));
    // More than the pipe and the channel window hold at once.
    let input: Vec<u8> = (0..3_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let out = server.run(&["cat; exit 3"], &input);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(out.stdout == input, "{} bytes back of {}", out.stdout.len(), input.len());
}

#[test]
fn env_requests_reach_the_command() {
    let server = Server::start();
    let out = server.ssh(&server.key, &["-o", "SetEnv=MM_TEST=\"hello world\""], &["echo \"$MM_TEST\""], b"");
    assert_eq!((out.status.code(), text(&out.stdout).as_str()), (Some(0), "hello world\n"), "{}", text(&out.stderr));
}

#[test]
fn a_shell_without_a_terminal_reads_its_script_from_stdin() {
    let server = Server::start();
    let out = server.ssh(&server.key, &["-T"], &[], b"echo from-the-shell\nexit 4\n");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("from-the-shell\n"), "{}", text(&out.stdout));
}

#[test]
fn a_terminal_when_asked_for() {
    let server = Server::start();
    let out = server.ssh(&server.key, &["-tt"], &["tty; echo \"TERM=$TERM\"; exit 5"], b"");
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("/dev/pts/"), "{stdout:?}");
    assert!(stdout.contains("TERM="), "{stdout:?}");
    let out = server.run(&["test -t 0 || echo no-terminal"], b"");
    assert_eq!(text(&out.stdout), "no-terminal\n");
}

#[test]
fn a_killed_command_reports_its_signal() {
    let server = Server::start();
    let out = server.run(&["kill -TERM $$"], b"");
    // OpenSSH exits 255 when the remote command was killed.
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
}

/// The host key a server on `port` offers, `ssh-ed25519 AAAA…`.
fn offered_host_key(port: u16) -> String {
    let out =
        Command::new("ssh-keyscan").args(["-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"]).output().unwrap();
    let lines = text(&out.stdout);
    let line =
        lines.lines().find(|l| !l.starts_with('#')).unwrap_or_else(|| panic!("no key from ssh-keyscan: {out:?}"));
    line.split_whitespace().skip(1).take(2).collect::<Vec<_>>().join(" ")
}

/// `ssh-ed25519 AAAA…` from a `.pub` file (without its comment).
fn public_key_file(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

#[test]
fn a_renewed_host_key_is_stored_and_offered_to_new_connections() {
    let server = Server::start();
    let before = offered_host_key(server.port);
    let path = server.dir.join("etc/ssh/mm_host_ed25519_key");
    let running = Mutex::new(Some(server.config.clone()));
    super::renew_host_key_at(&path, &running).unwrap();
    let after = offered_host_key(server.port);
    assert_ne!(before, after);
    assert_eq!(public_key_file(&path.with_extension("pub")), after);
    let out = server.run(&["echo still here"], b"");
    assert_eq!(text(&out.stdout), "still here\n", "{}", text(&out.stderr));

    // Without a running server only the file changes.
    super::renew_host_key_at(&path, &Mutex::new(None)).unwrap();
    assert_ne!(public_key_file(&path.with_extension("pub")), after);
    assert_eq!(offered_host_key(server.port), after);

    // A key that cannot be stored is an error, but the server uses it.
    std::fs::write(server.dir.join("file"), "").unwrap();
    let result = super::renew_host_key_at(&server.dir.join("file/key"), &running);
    assert!(matches!(result, Err(super::SshError::StoreHostKey { .. })), "{result:?}");
    assert_ne!(offered_host_key(server.port), after);
}

#[test]
fn new_authorized_keys_hold_for_new_connections() {
    let server = Server::start();
    let (other, other_public) = client_key(&server.dir, "other");
    let logs_in = |key: &Path| {
        let out = server.ssh(key, &[], &["echo in"], b"");
        match text(&out.stdout).as_str() {
            "in\n" => true,
            "" if text(&out.stderr).contains("Permission denied (publickey)") => false,
            _ => panic!("neither in nor refused: {out:?}"),
        }
    };
    assert!(logs_in(&server.key) && !logs_in(&other));

    // A session from before the change goes on: it waits for a line.
    let mut before = server.spawn_ssh(&server.key, &[], &["echo ready; read line; echo \"got $line\""]);
    let mut stdout = std::io::BufReader::new(before.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "ready\n");

    let running = Mutex::new(Some(server.logins.clone()));
    let (keys, problems) = AuthorizedKeys::parse(&[format!("# the new run's\n{other_public}")]);
    assert!(problems.is_empty(), "{problems:?}");
    super::set_authorized_keys_in(keys, &running);
    assert!(logs_in(&other) && !logs_in(&server.key));

    before.stdin.take().unwrap().write_all(b"still here\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(rest, "got still here\n");
    assert!(before.wait().unwrap().success());

    // Without a running server nothing changes (for this one).
    super::set_authorized_keys_in(AuthorizedKeys::default(), &Mutex::new(None));
    assert!(logs_in(&other));

    // None at all locks everyone out.
    super::set_authorized_keys_in(AuthorizedKeys::default(), &running);
    assert!(!logs_in(&other) && !logs_in(&server.key));
}

/// What the client of [`with_client`] gets back from a channel.
#[derive(Default, Debug)]
struct Seen {
    stdout: String,
    exit: Option<String>,
}

/// Runs `body` with a logged-in russh client session (OpenSSH's client
/// cannot resize or signal on cue from a test).
fn with_client<F, Fut>(body: F)
where
    F: FnOnce(russh::client::Handle<Client>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let key = hostkey::generate().unwrap();
    let (keys, _) = AuthorizedKeys::parse(&[key.public_key().to_openssh().unwrap()]);
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = ServerConfig::new(hostkey::generate().unwrap());
    std::thread::spawn(move || serve(listener, server, Logins::new(keys), Reaper::Direct).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().unwrap();
    runtime.block_on(async move {
        let config = std::sync::Arc::new(russh::client::Config::default());
        let mut session = russh::client::connect(config, addr, Client).await.unwrap();
        let key = russh::keys::PrivateKeyWithHashAlg::new(std::sync::Arc::new(key), None);
        assert!(session.authenticate_publickey("root", key).await.unwrap().success());
        tokio::time::timeout(std::time::Duration::from_secs(60), body(session)).await.unwrap();
    });
}

struct Client;

impl russh::client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Reads the channel until `until` holds for what came (or it ends).
async fn read_until(channel: &mut russh::Channel<russh::client::Msg>, seen: &mut Seen, until: impl Fn(&Seen) -> bool) {
    while !until(seen) {
        match channel.wait().await {
            None => return,
            Some(russh::ChannelMsg::Data { data }) => seen.stdout.push_str(&text(&data)),
            Some(russh::ChannelMsg::ExitStatus { exit_status }) => seen.exit = Some(format!("status {exit_status}")),
            Some(russh::ChannelMsg::ExitSignal { signal_name, .. }) => seen.exit = Some(format!("{signal_name:?}")),
            Some(_) => {}
        }
    }
}

#[test]
fn a_terminal_follows_window_changes_and_takes_signals() {
    with_client(|session| async move {
        let mut channel = session.channel_open_session().await.unwrap();
        channel.request_pty(true, "xterm-256color", 80, 24, 0, 0, &[]).await.unwrap();
        channel
            .exec(true, "echo \"$TERM\"; stty size; read line; stty size; echo \"got $line\"; sleep 100")
            .await
            .unwrap();
        let mut seen = Seen::default();
        read_until(&mut channel, &mut seen, |s| s.stdout.contains("24 80\r\n")).await;
        assert!(seen.stdout.contains("xterm-256color\r\n"), "{seen:?}");
        channel.window_change(100, 50, 0, 0).await.unwrap();
        channel.data(&b"hello\n"[..]).await.unwrap();
        read_until(&mut channel, &mut seen, |s| s.stdout.contains("got hello\r\n")).await;
        assert!(seen.stdout.contains("50 100\r\n"), "{seen:?}");
        channel.signal(russh::Sig::INT).await.unwrap();
        read_until(&mut channel, &mut seen, |s| s.exit.is_some()).await;
        let exit = seen.exit.unwrap_or_default();
        assert!(exit == "INT" || exit == "status 130", "{exit}");
    });
}

#[test]
fn leaving_hangs_up_on_the_command() {
    with_client(|session| async move {
        let mut channel = session.channel_open_session().await.unwrap();
        channel.exec(true, "echo $$; exec sleep 100").await.unwrap();
        let mut seen = Seen::default();
        read_until(&mut channel, &mut seen, |s| s.stdout.ends_with('\n')).await;
        let pid: i32 = seen.stdout.trim().parse().unwrap();
        drop(channel);
        let _ = session.disconnect(russh::Disconnect::ByApplication, "", "").await;
        drop(session);
        // SIGHUP ends the sleep; its reaper (Reaper::Direct) collects it.
        for _ in 0..200 {
            // SAFETY: kill(2) with signal 0 only checks that the pid exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("pid {pid} still runs after the client left");
    });
}
