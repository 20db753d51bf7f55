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
use mm_protocols::spec_rules;
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

/// One word for /bin/sh (or whichever shell OpenSSH runs a
/// `ProxyCommand` with): single-quoted, a `'` inside closed, escaped and
/// reopened.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// One word of a `ProxyCommand`: shell-quoted, with `%` doubled, since
/// OpenSSH expands `%` tokens (`%p`, `%h`…) in it before the shell sees it.
fn proxy_word(text: &str) -> String {
    shell_quote(text).replace('%', "%%")
}

/// One `ssh_config` argument, double-quoted (OpenSSH splits arguments at
/// blanks, and `"` groups them). A value that quoting cannot carry safely
/// (a `"`, a `\`, a control character such as a newline, which would
/// start a config line of its own) is refused rather than written.
fn config_word(what: &str, text: &str) -> Result<String, CliError> {
    if text.is_empty() || text.contains(['"', '\\']) || text.chars().any(char::is_control) {
        return Err(CliError::new(
            exit::ERROR,
            format!(
                "{what} {text:?} cannot be written into an ssh_config line (quotes, backslashes or control characters)"
            ),
        ));
    }
    Ok(format!("\"{text}\""))
}

/// Whose description of the microVMs `mmctl ssh` uses: their names and ids
/// follow that side's rules (`mm_protocols::spec_rules`), and anything
/// else it sends is refused before it goes near an `ssh_config` line or a
/// command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Describer {
    /// Names as the broker takes them, 12-hex-digit ids, IPv4 addresses.
    Broker,
    /// Lowercase DNS labels, UUIDs (hyphenated, lowercase).
    Controller,
}

impl Describer {
    fn who(self) -> &'static str {
        match self {
            Describer::Broker => "the broker",
            Describer::Controller => "the controller",
        }
    }

    fn valid_name(self, name: &str) -> bool {
        match self {
            Describer::Broker => spec_rules::is_vm_name(name),
            Describer::Controller => spec_rules::is_dns_label(name),
        }
    }

    fn valid_id(self, id: &str) -> bool {
        match self {
            Describer::Broker => spec_rules::is_vm_id(id),
            Describer::Controller => uuid::Uuid::try_parse(id).is_ok_and(|u| u.hyphenated().to_string() == id),
        }
    }
}

/// A microVM as `mmctl ssh` addresses it.
pub struct SshTarget<'a> {
    pub id: &'a str,
    pub name: &'a str,
    /// Its IP, if known (only for the printed config's `HostName`).
    pub address: &'a str,
}

impl SshTarget<'_> {
    /// Refuses a name, id or address that is not what `from` hands out:
    /// a hostile or broken broker or controller must not get a line of its
    /// own into an ssh_config, nor a word into a command line. The value
    /// is shown escaped.
    fn check(&self, from: Describer) -> Result<(), CliError> {
        let refuse = |what: &str, value: &str| {
            CliError::new(
                exit::ERROR,
                format!(
                    "{} sent a microVM {what} {value:?} that is not a valid one: refusing to put it into an ssh_config or a command line",
                    from.who()
                ),
            )
        };
        if !from.valid_name(self.name) {
            return Err(refuse("name", self.name));
        }
        if !from.valid_id(self.id) {
            return Err(refuse("id", self.id));
        }
        if !self.address.is_empty() && self.address.parse::<Ipv4Addr>().is_err() {
            return Err(refuse("address", self.address));
        }
        Ok(())
    }
}

/// How the `mmctl proxy` that OpenSSH runs reaches the microVM: the global
/// flags it repeats (`--socket PATH`, or `--server URL -n NS`), and for
/// `--server` the token, handed to it in `MM_TOKEN` (not on a command line
/// other users can read).
pub struct ProxyRoute {
    pub flags: Vec<String>,
    pub token: Option<String>,
}

/// The OpenSSH options that reach `target` (checked) through `mmctl
/// proxy`, each value as an ssh_config argument.
fn ssh_options(target: &SshTarget, route: &ProxyRoute) -> Result<Vec<(String, String)>, CliError> {
    let me = std::env::current_exe().map_err(|e| CliError::new(exit::ERROR, format!("finding mmctl itself: {e}")))?;
    let me = me.to_string_lossy();
    // Each word alone on one line (a newline would end the config line).
    for word in std::iter::once(&*me).chain(route.flags.iter().map(String::as_str)) {
        if word.chars().any(char::is_control) {
            return Err(CliError::new(
                exit::ERROR,
                format!("{word:?} cannot be written into a ProxyCommand (control characters)"),
            ));
        }
    }
    let mut proxy = proxy_word(&me);
    for flag in &route.flags {
        proxy.push(' ');
        proxy.push_str(&proxy_word(flag));
    }
    // The rest of a ProxyCommand line is the command, quotes and all.
    proxy.push_str(&format!(" proxy {} %p", proxy_word(target.id)));
    let known = known_hosts();
    if let Some(dir) = known.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // UserKnownHostsFile expands `%` tokens and `${VAR}`s.
    let known = known.to_string_lossy();
    if known.contains("${") {
        return Err(CliError::new(
            exit::ERROR,
            format!("{known:?} cannot be an ssh_config UserKnownHostsFile ($HOME)"),
        ));
    }
    Ok(vec![
        ("ProxyCommand".into(), proxy),
        ("HostKeyAlias".into(), config_word("id", &format!("mm-{}", target.id))?),
        ("UserKnownHostsFile".into(), config_word("known hosts file", &known.replace('%', "%%"))?),
        ("StrictHostKeyChecking".into(), "accept-new".into()),
    ])
}

/// `mmctl ssh --print-config`: an `ssh_config` block per microVM, so
/// `ssh -F FILE NAME.mm` works with a plain OpenSSH client (through a
/// controller, with `MM_TOKEN` set where it runs). Written whole or not
/// at all.
fn config_text(targets: &[SshTarget], route: &ProxyRoute) -> Result<String, CliError> {
    use std::fmt::Write;
    let mut text = String::new();
    for target in targets {
        let host = if target.address.is_empty() { target.name } else { target.address };
        let _ = writeln!(text, "Host {}", config_word("name", &format!("{}.mm", target.name))?);
        let _ = writeln!(text, "    HostName {}", config_word("address", host)?);
        let _ = writeln!(text, "    User root");
        let _ = writeln!(text, "    Port {SSH_PORT}");
        for (key, value) in ssh_options(target, route)? {
            let _ = writeln!(text, "    {key} {value}");
        }
        let _ = writeln!(text);
    }
    Ok(text)
}

/// `mmctl ssh`: logs in to the one microVM named (`login`), or prints the
/// config of `targets` (`--print-config`, or no microVM named); `from`
/// described them, and every one is checked first.
pub fn ssh_verb(
    targets: &[SshTarget],
    from: Describer,
    login: bool,
    route: &ProxyRoute,
    user: &str,
    identity: Option<&Path>,
    command: &[String],
) -> Result<i32, CliError> {
    for target in targets {
        target.check(from)?;
    }
    match targets {
        [target] if login => Err(ssh(target, route, user, identity, command)),
        _ => {
            print!("{}", config_text(targets, route)?);
            Ok(0)
        }
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

/// Reads public key files: one key per non-empty, non-comment line, each
/// an OpenSSH public key line. A file that holds anything else (a private
/// key, /etc/shadow…) is refused by its name and line number: its content
/// is never shown, nor sent anywhere.
pub fn read_ssh_keys(files: &[PathBuf]) -> Result<Vec<String>, CliError> {
    let mut keys = Vec::new();
    for file in files {
        let bad = |why: String| CliError::new(exit::INVALID, format!("--ssh-key {}: {why}", file.display()));
        let bytes = std::fs::read(file).map_err(|e| bad(e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|_| bad("not a public key file (not text)".into()))?;
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if !spec_rules::is_ssh_public_key(line) {
                return Err(bad(format!(
                    "line {} is not an SSH public key (expected a .pub file, lines such as \"ssh-ed25519 AAAA… comment\")",
                    index + 1
                )));
            }
            keys.push(line.to_string());
        }
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
        assert_eq!(proxy_word("50%p"), "'50%%p'");
        assert_eq!(config_word("v", "a b").unwrap(), "\"a b\"");
        for bad in ["", "a\"b", "a\\b", "a\nb", "a\rb"] {
            assert!(config_word("v", bad).is_err(), "{bad:?}");
        }
    }

    const WEB: SshTarget<'static> = SshTarget { id: "0123456789ab", name: "web-1", address: "10.100.0.2" };
    const HOSTILE: [&str; 9] = [
        "x\nProxyCommand touch /tmp/pwned",
        "a;touch /tmp/pwned",
        "$(touch /tmp/pwned)",
        "`touch /tmp/pwned`",
        "a b",
        "-oProxyCommand=x",
        "\"q\"",
        "web.mm",
        "",
    ];

    /// Names, ids and addresses are what their describer hands out, or
    /// refused, shown escaped (one line, no raw newline).
    #[test]
    fn hostile_names_ids_and_addresses_are_refused() {
        assert!(WEB.check(Describer::Broker).is_ok());
        let refused = |target: SshTarget, from, value: &str| {
            let e = target.check(from).expect_err(value);
            assert!(e.message.contains(&format!("{value:?}")) && !e.message.contains('\n'), "{}", e.message);
        };
        for bad in HOSTILE {
            refused(SshTarget { name: bad, ..WEB }, Describer::Broker, bad);
            refused(SshTarget { id: bad, ..WEB }, Describer::Broker, bad);
            if !bad.is_empty() {
                // (No address is fine: the name is the HostName then.)
                refused(SshTarget { address: bad, ..WEB }, Describer::Broker, bad);
            }
        }
        for bad in ["ABCDEF", "0123456789ag", "0e5c2a4e-3b7a-4a43-9a7e-0c1f6a1d2b3c"] {
            refused(SshTarget { id: bad, ..WEB }, Describer::Broker, bad);
        }
        refused(SshTarget { address: "10.0.0.256", ..WEB }, Describer::Broker, "10.0.0.256");

        let remote = SshTarget { id: "0e5c2a4e-3b7a-4a43-9a7e-0c1f6a1d2b3c", name: "web-1", address: "" };
        assert!(remote.check(Describer::Controller).is_ok());
        for bad in HOSTILE.iter().copied().chain(["Web", "web_1", "-web"]) {
            refused(SshTarget { name: bad, ..remote }, Describer::Controller, bad);
        }
        for bad in HOSTILE.iter().copied().chain([
            "0123456789ab",
            "0E5C2A4E-3B7A-4A43-9A7E-0C1F6A1D2B3C",
            "{0e5c2a4e-3b7a-4a43-9a7e-0c1f6a1d2b3c}",
            "0e5c2a4e3b7a4a439a7e0c1f6a1d2b3c",
        ]) {
            refused(SshTarget { id: bad, ..remote }, Describer::Controller, bad);
        }
    }

    /// OpenSSH's own expansion of a ProxyCommand's `%` tokens, left to right.
    fn expand_tokens(command: &str, port: &str) -> String {
        let mut out = String::new();
        let mut chars = command.chars();
        while let Some(c) = chars.next() {
            match (c, c == '%') {
                (_, false) => out.push(c),
                (_, true) => match chars.next() {
                    Some('%') => out.push('%'),
                    Some('p') => out.push_str(port),
                    other => panic!("unexpected token %{other:?} in {command}"),
                },
            }
        }
        out
    }

    /// The printed config says what was meant, also for a socket path with
    /// blanks, quotes, `$( )` and `%`: OpenSSH reads it back as written,
    /// and the shell it runs the ProxyCommand with sees exactly our words.
    #[test]
    fn the_config_reads_back_as_written() {
        let socket = "/tmp/a b/it's $(touch /tmp/pwned) 100%p.sock";
        let route = ProxyRoute { flags: vec!["--socket".into(), socket.into()], token: None };
        let text = config_text(&[WEB], &route).unwrap();
        assert_eq!(text.lines().filter(|l| !l.trim().is_empty()).count(), 8, "{text}");
        let proxy = text.lines().find_map(|l| l.trim().strip_prefix("ProxyCommand ")).unwrap();
        let script = format!("printf '[%s]\\n' {}", expand_tokens(proxy, "22"));
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
        let me = std::env::current_exe().unwrap().to_string_lossy().into_owned();
        let expected: String = [me.as_str(), "--socket", socket, "proxy", "0123456789ab", "22"]
            .iter()
            .map(|w| format!("[{w}]\n"))
            .collect();
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);

        // OpenSSH's parser, where there is one (ssh -G connects nowhere).
        let dir = std::env::temp_dir().join(format!("mmctl-ssh-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config");
        std::fs::write(&file, &text).unwrap();
        let parsed = std::process::Command::new("ssh").arg("-G").arg("-F").arg(&file).arg("web-1.mm").output();
        let _ = std::fs::remove_dir_all(&dir);
        let Ok(parsed) = parsed else {
            eprintln!("no ssh: OpenSSH's reading of the config not checked");
            return;
        };
        let parsed = String::from_utf8_lossy(&parsed.stdout).into_owned();
        let value = |key: &str| parsed.lines().find_map(|l| l.strip_prefix(&format!("{key} "))).map(str::to_owned);
        assert_eq!(value("hostname").as_deref(), Some("10.100.0.2"), "{parsed}");
        assert_eq!(value("hostkeyalias").as_deref(), Some("mm-0123456789ab"));
        assert_eq!(value("proxycommand").as_deref(), Some(proxy));
        assert_eq!(value("userknownhostsfile"), Some(known_hosts().to_string_lossy().into_owned()));
    }

    /// `--ssh-key /etc/shadow` names the file and the line, never what it
    /// holds.
    #[test]
    fn a_file_that_is_not_a_key_is_named_not_shown() {
        let dir = std::env::temp_dir().join(format!("mmctl-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.pub");
        std::fs::write(&good, "# mine\n\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGs= me@host\n").unwrap();
        let shadow = dir.join("shadow");
        std::fs::write(&shadow, "# ok\nroot:$6$s3cr3tSalt$hashhashhash:19000:0:99999:7:::\n").unwrap();
        let private = dir.join("id_ed25519");
        std::fs::write(&private, "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n").unwrap();
        let binary = dir.join("binary");
        std::fs::write(&binary, b"s3cr3t\xff\xfe").unwrap();
        assert_eq!(
            read_ssh_keys(std::slice::from_ref(&good)).unwrap(),
            ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGs= me@host"]
        );
        for (file, line) in [(&shadow, "line 2"), (&private, "line 1"), (&binary, "not text")] {
            let e = read_ssh_keys(&[good.clone(), file.clone()]).unwrap_err();
            assert_eq!(e.code, exit::INVALID);
            assert!(e.message.contains(&file.display().to_string()) && e.message.contains(line), "{}", e.message);
            for secret in ["s3cr3t", "root", "BEGIN", "b3Bl"] {
                assert!(!e.message.contains(secret), "{}", e.message);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
