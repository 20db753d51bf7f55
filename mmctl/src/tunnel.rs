//! Reaching guest TCP ports through the broker (`Vm.connect`), which the
//! host may have no route to: `mmctl proxy` (stdin/stdout, for ssh's
//! `ProxyCommand`), `mmctl port-forward` (a listener on 127.0.0.1), and
//! `mmctl ssh`, which runs the real OpenSSH client over `mmctl proxy`.
//! With `--server` the same verbs go through the controller instead
//! (`remote/tunnel_ws.rs`); the listener and the OpenSSH side are shared.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use mm_protocols::broker_capnp::vm;
use mm_protocols::byte_stream::{WriterSink, copy_into_sink};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::client::{CliError, exit};

/// The guest's SSH server (mm-init's, or the image's own).
pub const SSH_PORT: u16 = 22;

/// Carries one connection between `reader`/`writer` and the guest's
/// `port` until both sides have ended theirs (TCP half-close: a client's
/// end of input does not cut off the guest's answer, nor the other way
/// round; a guest that closes fully makes our next write fail).
pub async fn pump<R, W>(vm: &vm::Client, port: u16, reader: R, writer: W) -> Result<(), CliError>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let (downstream, guest_done) = WriterSink::new(writer);
    let mut request = vm.connect_request();
    request.get().set_port(port);
    request.get().set_to_client(capnp_rpc::new_client(downstream));
    let to_guest = request.send().promise.await?.get()?.get_to_guest()?;
    let upstream = tokio::task::spawn_local(async move {
        copy_into_sink(reader, &to_guest).await;
    });
    let _ = guest_done.await;
    let _ = upstream.await;
    Ok(())
}

/// `mmctl proxy VM PORT`: stdin and stdout to a guest port.
pub async fn proxy(vm: &vm::Client, port: u16) -> Result<i32, CliError> {
    pump(vm, port, tokio::io::stdin(), tokio::io::stdout()).await?;
    Ok(0)
}

/// `mmctl port-forward VM [HOSTPORT:]GUESTPORT`: serves 127.0.0.1:HOSTPORT
/// (0 or none: any free port, printed) until interrupted; `connect`
/// carries each accepted connection to the guest's port.
pub async fn port_forward<F, Fut>(name: &str, spec: &str, connect: F) -> Result<i32, CliError>
where
    F: Fn(u16, OwnedReadHalf, OwnedWriteHalf) -> Fut,
    Fut: Future<Output = Result<(), CliError>> + 'static,
{
    let (host_port, guest_port) = parse_forward(spec).map_err(|e| CliError::new(exit::INVALID, e))?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, host_port)))
        .await
        .map_err(|e| CliError::new(exit::ERROR, format!("cannot listen on 127.0.0.1:{host_port}: {e}")))?;
    let local = listener.local_addr().map_err(|e| CliError::new(exit::ERROR, e.to_string()))?;
    println!("forwarding {local} -> {name}:{guest_port}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted.map_err(|e| CliError::new(exit::ERROR, format!("accept: {e}")))?,
            _ = tokio::signal::ctrl_c() => return Ok(0),
        };
        let (reader, writer) = stream.into_split();
        let carried = connect(guest_port, reader, writer);
        tokio::task::spawn_local(async move {
            if let Err(e) = carried.await {
                eprintln!("mmctl: port-forward {peer}: {}", e.message);
            }
        });
    }
}

/// `HOSTPORT:GUESTPORT` or `GUESTPORT` (any free host port).
fn parse_forward(spec: &str) -> Result<(u16, u16), String> {
    let port = |s: &str| s.parse::<u16>().map_err(|_| format!("{spec:?}: {s:?} is not a port"));
    let (host, guest) = match spec.split_once(':') {
        Some((host, guest)) => (port(host)?, port(guest)?),
        None => (0, port(spec)?),
    };
    if guest == 0 {
        return Err(format!("{spec:?}: the guest port must not be 0"));
    }
    Ok((host, guest))
}

/// Where `mmctl ssh` pins guests' host keys (first use is trusted; each
/// microVM has its own alias, `mm-<id>`, so a new microVM with an old name
/// never trips over an old key).
fn known_hosts() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".config/micromachines/known_hosts")
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A microVM as `mmctl ssh` addresses it.
pub struct SshTarget<'a> {
    pub id: &'a str,
    pub name: &'a str,
    /// Its IP, if known (only for the printed config's `HostName`).
    pub address: &'a str,
}

/// How the `mmctl proxy` that OpenSSH runs reaches the microVM: the global
/// flags it repeats (`--socket PATH`, or `--server URL -n NS`), and for
/// `--server` the token, handed to it in `MM_TOKEN` (not on a command line
/// other users can read).
pub struct ProxyRoute {
    pub flags: Vec<String>,
    pub token: Option<String>,
}

/// The OpenSSH options that reach `target` through `mmctl proxy`.
fn ssh_options(target: &SshTarget, route: &ProxyRoute) -> Result<Vec<(String, String)>, CliError> {
    let me = std::env::current_exe().map_err(|e| CliError::new(exit::ERROR, format!("finding mmctl itself: {e}")))?;
    let mut proxy = shell_quote(&me.to_string_lossy());
    for flag in &route.flags {
        proxy.push(' ');
        proxy.push_str(&shell_quote(flag));
    }
    proxy.push_str(&format!(" proxy {} %p", target.id));
    let known = known_hosts();
    if let Some(dir) = known.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    Ok(vec![
        ("ProxyCommand".into(), proxy),
        ("HostKeyAlias".into(), format!("mm-{}", target.id)),
        ("UserKnownHostsFile".into(), known.to_string_lossy().into_owned()),
        ("StrictHostKeyChecking".into(), "accept-new".into()),
    ])
}

/// `mmctl ssh --print-config`: an `ssh_config` block per microVM, so
/// `ssh -F FILE NAME.mm` works with a plain OpenSSH client (through a
/// controller, with `MM_TOKEN` set where it runs).
fn print_config(targets: &[SshTarget], route: &ProxyRoute) -> Result<i32, CliError> {
    for target in targets {
        println!("Host {}.mm", target.name);
        println!("    HostName {}", if target.address.is_empty() { target.name } else { target.address });
        println!("    User root");
        println!("    Port {SSH_PORT}");
        for (key, value) in ssh_options(target, route)? {
            println!("    {key} {value}");
        }
        println!();
    }
    Ok(0)
}

/// `mmctl ssh`: logs in to the one microVM named (`login`), or prints the
/// config of `targets` (`--print-config`, or no microVM named).
pub fn ssh_verb(
    targets: &[SshTarget],
    login: bool,
    route: &ProxyRoute,
    user: &str,
    identity: Option<&Path>,
    command: &[String],
) -> Result<i32, CliError> {
    match targets {
        [target] if login => Err(ssh(target, route, user, identity, command)),
        _ => print_config(targets, route),
    }
}

/// `mmctl ssh VM [-- CMD…]`: replaces mmctl with `ssh`, so the terminal,
/// signals and the exit status are OpenSSH's own.
fn ssh(target: &SshTarget, route: &ProxyRoute, user: &str, identity: Option<&Path>, command: &[String]) -> CliError {
    use std::os::unix::process::CommandExt;
    let options = match ssh_options(target, route) {
        Ok(options) => options,
        Err(e) => return e,
    };
    let mut cmd = std::process::Command::new("ssh");
    if let Some(token) = &route.token {
        cmd.env("MM_TOKEN", token);
    }
    for (key, value) in options {
        cmd.arg("-o").arg(format!("{key}={value}"));
    }
    if let Some(identity) = identity {
        cmd.arg("-i").arg(identity).args(["-o", "IdentitiesOnly=yes"]);
    }
    cmd.arg(format!("{user}@{}", target.name));
    if !command.is_empty() {
        cmd.arg("--").args(command);
    }
    let e = cmd.exec();
    CliError::new(exit::ERROR, format!("cannot run ssh (apt-get install openssh-client): {e}"))
}

/// The default keys for `mmctl run`: the user's `~/.ssh/id_*.pub`.
pub fn default_ssh_keys() -> Vec<PathBuf> {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let Ok(entries) = std::fs::read_dir(home.join(".ssh")) else {
        return Vec::new();
    };
    let mut keys: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("id_") && n.ends_with(".pub")))
        .collect();
    keys.sort();
    keys
}

/// Reads public key files: one key per non-empty, non-comment line.
pub fn read_ssh_keys(files: &[PathBuf]) -> Result<Vec<String>, CliError> {
    let mut keys = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| CliError::new(exit::INVALID, format!("--ssh-key {}: {e}", file.display())))?;
        keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs() {
        assert_eq!(parse_forward("8080:80"), Ok((8080, 80)));
        assert_eq!(parse_forward("80"), Ok((0, 80)));
        assert!(parse_forward("0").is_err());
        assert!(parse_forward("a:80").is_err());
        assert!(parse_forward("1:2:3").is_err());
        assert!(parse_forward("70000:80").is_err());
    }

    #[test]
    fn quoting_survives_a_shell() {
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }
}
