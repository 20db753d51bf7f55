//! The agent's session handler run on the host as an ordinary process,
//! over a socketpair, with the real client on the other end.

use std::io::{Cursor, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use mm_exec_protocol::{ExecClient, ExecError, ExecRequest, ExitStatus, Frame, GuestIdentity, Output};

use super::{Reaper, serve};

fn connect() -> ExecClient {
    let (host, guest) = UnixStream::pair().unwrap();
    std::thread::spawn(move || serve(OwnedFd::from(guest), Reaper::Direct));
    host.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    ExecClient::from_stream(host)
}

/// Runs `req` with `stdin`: (status, stdout, stderr).
fn run(req: ExecRequest, stdin: &[u8]) -> Result<(ExitStatus, String, String), ExecError> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = connect().run(&req, Cursor::new(stdin.to_vec()), &mut out, &mut err)?;
    Ok((status, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned()))
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

#[test]
fn exit_code_and_stdout() {
    let (status, out, err) = run(sh("echo hi; exit 3"), b"").unwrap();
    assert_eq!((status, out.as_str(), err.as_str()), (ExitStatus::Exited(3), "hi\n", ""));
}

#[test]
fn stdin_is_piped_and_stderr_kept_apart() {
    let input: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (status, out, err) = run(sh("cat; echo oops >&2; exit 5"), &input).unwrap();
    assert_eq!(status, ExitStatus::Exited(5));
    assert_eq!(out.as_bytes(), &input[..]);
    assert_eq!(err, "oops\n");
}

#[test]
fn env_cwd_and_default_path() {
    let req = sh("echo \"$FOO\"; pwd; echo \"$PATH\"").env("FOO", "bar baz").cwd("/tmp");
    let (status, out, _) = run(req, b"").unwrap();
    assert!(status.success());
    assert_eq!(out, format!("bar baz\n/tmp\n{}\n", super::spawn::DEFAULT_PATH));
}

#[test]
fn tty_mode_gives_a_terminal_of_the_requested_size() {
    let req = sh("test -t 0 && test -t 1 && test -t 2 && tty && stty size && echo err >&2").tty(33, 77);
    let (status, out, err) = run(req, b"").unwrap();
    assert!(status.success(), "{status}: {out}");
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("33 77\r\n"), "{out:?}");
    assert!(out.contains("err\r\n"), "stderr merges into stdout on a tty: {out:?}");
    assert_eq!(err, "");
}

#[test]
fn tty_resize_stdin_and_eof() {
    let (tx, rx) = connect().start(&sh("read line; stty size; echo \"got $line\"; cat").tty(24, 80)).unwrap();
    tx.resize(50, 100).unwrap();
    tx.stdin(b"hello\n").unwrap();
    tx.stdin(b"more\n").unwrap();
    tx.close_stdin().unwrap();
    let mut out = Vec::new();
    let mut status = None;
    for output in rx {
        match output.unwrap() {
            Output::Stdout(data) => out.extend(data),
            Output::Stderr(_) => panic!("stderr with a tty"),
            Output::Exit(s) => status = Some(s),
        }
    }
    let out = String::from_utf8_lossy(&out);
    assert_eq!(status, Some(ExitStatus::Exited(0)), "{out}");
    assert!(out.contains("50 100\r\n"), "{out:?}");
    assert!(out.contains("got hello\r\n"), "{out:?}");
    assert!(out.contains("more\r\n"), "{out:?}");
}

#[test]
fn signals_reach_the_command() {
    let (tx, mut rx) = connect().start(&sh("echo ready; exec sleep 100")).unwrap();
    assert_eq!(rx.next_output().unwrap(), Some(Output::Stdout(b"ready\n".to_vec())));
    tx.signal(libc::SIGTERM).unwrap();
    assert_eq!(rx.next_output().unwrap(), Some(Output::Exit(ExitStatus::Signaled(libc::SIGTERM))));
    assert_eq!(rx.next_output().unwrap(), None);
}

#[test]
fn errors_come_as_error_frames() {
    let remote = |req: ExecRequest| match run(req, b"") {
        Err(ExecError::Remote(message)) => message,
        other => panic!("expected an error frame, got {other:?}"),
    };
    assert_eq!(remote(ExecRequest::new(["no-such-command-xyz"])), "no such command: no-such-command-xyz");
    assert_eq!(remote(ExecRequest::new(["/nonexistent/prog"])), "no such command: /nonexistent/prog");
    assert_eq!(remote(ExecRequest::new(Vec::<String>::new())), "empty command");
    assert!(remote(ExecRequest::new(["true"]).cwd("/nonexistent-dir")).starts_with("cannot change directory"));
    assert_eq!(remote(ExecRequest::new(["true"]).user("no-such-user-xyz")), "no such user: no-such-user-xyz");
    assert!(remote(ExecRequest::new(["a\0b"])).contains("NUL"));
}

#[test]
fn garbage_from_the_host_gets_an_error_and_a_close() {
    for garbage in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0x02, 0, 0, 0, 1, b'x'], &[0x01, 0xff, 0xff, 0xff, 0xff]] {
        let (mut host, guest) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve(OwnedFd::from(guest), Reaper::Direct));
        host.write_all(garbage).unwrap();
        let frame = mm_exec_protocol::read_frame(&mut host).unwrap();
        assert!(matches!(&frame, Some(Frame::Error(m)) if m.starts_with("protocol error")), "{frame:?}");
        drop(host);
        server.join().unwrap();
    }
}

#[test]
fn switches_user_when_root() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("switches_user_when_root: skipped (not root)");
        return;
    }
    let (status, out, _) = run(sh("id -u; id -g; id -G").user("1234:4321").cwd("/"), b"").unwrap();
    assert!(status.success());
    assert_eq!(out, "1234\n4321\n4321\n");
}

#[test]
fn concurrent_sessions() {
    let handles: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || run(sh(&format!("cat; exit {i}")), format!("n{i}").as_bytes())))
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, out, _) = h.join().unwrap().unwrap();
        assert_eq!((status, out), (ExitStatus::Exited(i as i32), format!("n{i}")));
    }
}

#[test]
fn an_invalid_identity_is_refused_whole() {
    let refused = |identity: GuestIdentity| match connect().apply_identity(&identity) {
        Err(ExecError::Remote(message)) => message,
        other => panic!("expected an error frame, got {other:?}"),
    };
    let short = GuestIdentity { hostname: Some("not-applied".into()), ..GuestIdentity::new(&[1; 31]) };
    assert_eq!(refused(short), "invalid identity: 31 bytes of entropy are under the minimum of 32");
    let bad_mac = GuestIdentity { mac: Some("02:6d:0a:64:00".into()), ..GuestIdentity::fresh().unwrap() };
    assert!(refused(bad_mac).starts_with("invalid identity: mac \"02:6d:0a:64:00\": not six"));
}

#[test]
fn an_identity_is_only_a_first_frame() {
    let (mut host, guest) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || serve(OwnedFd::from(guest), Reaper::Direct));
    let identity = GuestIdentity::fresh().unwrap();
    mm_exec_protocol::write_frame(&mut host, &Frame::Request(sh("exec sleep 100"))).unwrap();
    mm_exec_protocol::write_frame(&mut host, &Frame::Identity(identity)).unwrap();
    let frame = mm_exec_protocol::read_frame(&mut host).unwrap();
    assert_eq!(frame, Some(Frame::Error("protocol error: an identity after the request".into())));
    drop(host);
    server.join().unwrap();
}

/// Entropy alone: the one step that is harmless on the machine running the
/// tests, and proves the ioctl numbers right (as root; as anyone else the
/// kernel refuses, which must come back naming the step).
#[test]
fn entropy_reseeds_the_kernel_generator() {
    let result = connect().apply_identity(&GuestIdentity::fresh().unwrap());
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        result.unwrap();
    } else {
        let err = result.unwrap_err();
        assert!(matches!(&err, ExecError::Remote(m) if m.starts_with("random numbers: ")), "{err}");
    }
}
