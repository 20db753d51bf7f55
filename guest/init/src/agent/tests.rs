//! The agent's session handler run on the host as an ordinary process,
//! over a socketpair, with the real client on the other end.

use std::io::{Cursor, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use mm_exec_protocol::{ExecClient, ExecError, ExecRequest, ExitStatus, Frame, GuestIdentity, Output, Workload};

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
    let good = crate::ssh::test_key(1).to_openssh().unwrap();
    let bad_keys = GuestIdentity { ssh_keys: Some(vec![good, "not a key".into()]), ..GuestIdentity::new(&[1; 32]) };
    assert_eq!(refused(bad_keys), "invalid identity: ssh_keys: no public key in authorized key line \"not a key\"");
}

/// An identity with new SSH keys is taken whole: outside a guest no SSH
/// server runs, which is no failure (a host sends a run's keys without
/// knowing whether the guest serves SSH); only the reseed may fail, when
/// not root.
#[test]
fn ssh_keys_without_a_server_are_no_failure() {
    let keys = vec![crate::ssh::test_key(1).to_openssh().unwrap()];
    // No clock, no network: entropy (harmless, see below) and the keys.
    let identity = GuestIdentity { ssh_keys: Some(keys), ..GuestIdentity::new(&[7; 64]) };
    let result = connect().apply_identity(&identity);
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        result.unwrap();
    } else {
        let err = result.unwrap_err();
        assert!(matches!(&err, ExecError::Remote(m) if m.starts_with("random numbers: ") && !m.contains(';')), "{err}");
    }
}

#[test]
fn an_identity_or_a_workload_is_only_a_first_frame() {
    for (late, what) in [
        (Frame::Identity(GuestIdentity::fresh().unwrap()), "an identity"),
        (Frame::Workload(Workload::new(["true"])), "a workload"),
    ] {
        let (mut host, guest) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve(OwnedFd::from(guest), Reaper::Direct));
        mm_exec_protocol::write_frame(&mut host, &Frame::Request(sh("exec sleep 100"))).unwrap();
        mm_exec_protocol::write_frame(&mut host, &late).unwrap();
        let frame = mm_exec_protocol::read_frame(&mut host).unwrap();
        assert_eq!(frame, Some(Frame::Error(format!("protocol error: {what} after the request"))));
        drop(host);
        server.join().unwrap();
    }
}

/// PID 1's one hand-over, end to end through a session: refused while
/// nothing waits; once a stand-in for PID 1's main thread waits, a
/// malformed workload is refused and a good one reaches it; after that,
/// refused again. One test, since the hand-over is the process's only one.
#[test]
fn a_workload_goes_to_the_waiting_pid1_once() {
    use crate::workload::handover::{HANDOVER, NOT_WAITING, tests::waiter};
    let refused = |workload: &Workload| match connect().start_workload(workload) {
        Err(ExecError::Remote(message)) => message,
        other => panic!("expected an error frame, got {other:?}"),
    };
    let workload = Workload::new(["sh", "-c", "exit 4"]).env("MM_RUN", "1").cwd("/tmp");
    assert_eq!(refused(&workload), NOT_WAITING);

    let pid1 = waiter(&HANDOVER, |offer| {
        let workload = offer.workload.clone();
        offer.answer.send(Ok(()));
        workload
    });
    assert_eq!(
        refused(&Workload::new(["sh"]).cwd("/nonexistent-mm-dir")).split(':').next(),
        Some("cannot change directory to /nonexistent-mm-dir")
    );
    connect().start_workload(&workload).unwrap();
    assert_eq!(pid1.join().unwrap(), Some(workload.clone()), "the workload did not reach PID 1");
    assert_eq!(refused(&workload), NOT_WAITING);
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
