//! The exec agent in a real guest, reached through `mm-device vsock`'s
//! hybrid socket with mm-exec-protocol's client: stdout, stdin and exit
//! codes, stderr kept apart, a tty, three execs at once, a missing
//! command; then an exec ends the guest (SIGTERM to PID 1, forwarded to
//! the workload). One boot for all of it: boots are slow on PVM hosts.

use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, Instant};

use mm_exec_protocol::{EXEC_PORT, ExecClient, ExecError, ExecRequest, ExitStatus};
use mm_integration::devices::{DeviceProcess, Scratch};
use mm_integration::guest::{BOOT_TIMEOUT, Boot};
use mm_integration::kvm_available;

/// Generous: each process start in a PVM guest takes up to a second, far
/// more while other guests run; only a hang should fail on time.
const EXEC_TIMEOUT: Duration = Duration::from_secs(300);

fn connect(uds: &Path) -> ExecClient {
    let client = ExecClient::connect_hybrid_vsock(uds, EXEC_PORT).expect("connect to the exec agent");
    client.stream().set_read_timeout(Some(EXEC_TIMEOUT)).unwrap();
    client
}

/// Runs `req` in the guest: (status, stdout, stderr), as bytes.
fn exec_bytes(uds: &Path, req: &ExecRequest, stdin: &[u8]) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), ExecError> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = connect(uds).run(req, Cursor::new(stdin.to_vec()), &mut out, &mut err)?;
    Ok((status, out, err))
}

/// Runs `req` in the guest: (status, stdout, stderr).
fn exec(uds: &Path, req: &ExecRequest, stdin: &[u8]) -> Result<(ExitStatus, String, String), ExecError> {
    let (status, out, err) = exec_bytes(uds, req, stdin)?;
    Ok((status, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned()))
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

#[test]
fn exec_agent_runs_commands_in_a_guest() {
    if !kvm_available("exec_agent_runs_commands_in_a_guest") {
        return;
    }
    let dir = Scratch::new("exec").unwrap();
    let uds = dir.path("vsock.uds");
    let vsock_socket = dir.path("vsock.sock");
    let _vsock_device =
        DeviceProcess::spawn("vsock", &vsock_socket, &["--guest-cid", "3", "--uds", uds.to_str().unwrap()]).unwrap();
    let mut guest = Boot::new(&["sleep", "600"]).device("vsock", &vsock_socket).spawn().unwrap();
    guest.wait_for("exec agent listening on vsock port 1024", BOOT_TIMEOUT).unwrap();

    let started = Instant::now();
    let (status, out, err) = exec(&uds, &ExecRequest::new(["echo", "hello"]), b"").unwrap();
    assert_eq!((status, out.as_str(), err.as_str()), (ExitStatus::Exited(0), "hello\n", ""));
    eprintln!("first exec (echo hello): {:?}", started.elapsed());

    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (status, out, _) = exec_bytes(&uds, &sh("cat; exit 5"), &input).unwrap();
    assert_eq!(status, ExitStatus::Exited(5));
    assert_eq!(out.len(), input.len());
    assert!(out == input, "stdin came back changed");

    let (status, out, err) = exec(&uds, &sh("echo to-out; echo to-err >&2; exit 1"), b"").unwrap();
    assert_eq!((status, out.as_str(), err.as_str()), (ExitStatus::Exited(1), "to-out\n", "to-err\n"));

    let req = sh("test -t 0 && test -t 1 && tty && stty size").env("TERM", "dumb").tty(30, 90);
    let (status, out, err) = exec(&uds, &req, b"").unwrap();
    assert!(status.success(), "tty exec: {status}: {out:?}");
    assert!(out.contains("/dev/pts/") && out.contains("30 90\r\n"), "tty exec printed {out:?}");
    assert_eq!(err, "");

    let req = ExecRequest::new(["no-such-command"]);
    match exec(&uds, &req, b"") {
        Err(ExecError::Remote(message)) => assert_eq!(message, "no such command: no-such-command"),
        other => panic!("a missing command gave {other:?}"),
    }

    // Three at once, each with its own stdin, output and status.
    let started = Instant::now();
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                exec(&uds, &sh(&format!("cat; echo \" from $N\"; exit {}", 10 + i)).env("N", i.to_string()), b"x")
            })
        })
        .collect();
    for (i, handle) in handles.into_iter().enumerate() {
        let (status, out, _) = handle.join().unwrap().unwrap();
        assert_eq!((status, out), (ExitStatus::Exited(10 + i as i32), format!("x from {i}\n")));
    }
    eprintln!("three concurrent execs: {:?}", started.elapsed());

    // End the guest through an exec: SIGTERM to PID 1, which forwards it
    // to the workload (its signals are blocked in every agent thread, so
    // none of them swallows it), then reports 128 + 15 and powers off. The
    // exec itself may or may not report back before the power-off.
    let killer = uds.clone();
    std::thread::spawn(move || exec(&killer, &sh("kill -TERM 1"), b""));
    let run = guest.finish(Duration::from_secs(300)).unwrap();
    assert_eq!(run.status, Some(128 + 15), "console:\n{}\nstderr:\n{}", run.stdout, run.stderr);
}
