//! `mmctl --server` against the e2e test's controller and its real
//! microVM: exec (stdin, `-it` on a pseudo-terminal), the port tunnel
//! (proxy, port-forward, ssh) and the log follow.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support;

/// `mmctl --server`: exec forwards stdin and exits with the command's
/// code, and `-it` behaves as a terminal; `stats` hears from every
/// process; `proxy`, `port-forward` and `ssh` reach guest ports; `logs -f`
/// prints the console and keeps following.
pub async fn through_the_controller(base: &str, token: &str, name: &str, key: &Path, home: &Path) {
    use std::io::{Read, Write};
    let mmctl = |args: &[&str]| {
        let mut command = Command::new(support::mmctl_binary());
        command.args(["--server", base, "-n", "e2e"]).args(args).env("MM_TOKEN", token);
        command.env_remove("MM_SERVER").env_remove("MM_NAMESPACE");
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        command.spawn().unwrap()
    };
    let mut child = mmctl(&["exec", "-i", name, "--", "sh", "-c", "read x; echo got:$x; echo err >&2; exit 5"]);
    child.stdin.take().unwrap().write_all(b"piped-in\n").unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!((out.status.code(), stdout.as_ref(), stderr.as_ref()), (Some(5), "got:piped-in\n", "err\n"));

    // `stats`: every process of the microVM answers for itself.
    let child = mmctl(&["stats", "-o", "json", name]);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stats: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let roles: Vec<&str> = stats.iter().filter_map(|p| p["role"].as_str()).collect();
    assert!(roles.contains(&"vmm") && roles.len() >= 3, "{stats:#?}");
    for process in &stats {
        assert_eq!(process["error"], "", "{process:#}");
        assert!(process["pid"].as_i64() > Some(0) && process["max_rss_kib"].as_u64() > Some(0), "{process:#}");
    }

    // `proxy`: the machine's echo server on port 7000, through controller
    // -> broker -> guest; our end of input ends the guest's `cat`, whose
    // end ends mmctl.
    let mut child = mmctl(&["proxy", name, "7000"]);
    child.stdin.take().unwrap().write_all(b"through-the-tunnel\n").unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!((out.status.code(), stdout.as_ref()), (Some(0), "through-the-tunnel\n"), "{stderr}");

    // `ssh`: OpenSSH with the machine's key, through `mmctl --server proxy`
    // (its ProxyCommand), given the token in MM_TOKEN.
    std::fs::create_dir_all(home).unwrap();
    let mut ssh = Command::new(support::mmctl_binary());
    ssh.args(["--server", base, "-n", "e2e", "--token", token, "ssh", "-i"]).arg(key);
    ssh.args([name, "--", "echo ssh-through-the-controller; exit 3"]);
    ssh.env("HOME", home).env_remove("MM_TOKEN").env_remove("MM_SERVER").env_remove("MM_NAMESPACE");
    let out = tokio::task::spawn_blocking(move || ssh.stdin(Stdio::null()).output().unwrap()).await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!((out.status.code(), stdout.as_ref()), (Some(3), "ssh-through-the-controller\n"), "{stderr}");

    // `port-forward`: a local port to the same server, two connections.
    let mut child = mmctl(&["port-forward", name, "0:7000"]);
    let mut first_line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    tokio::task::block_in_place(|| std::io::BufRead::read_line(&mut stdout, &mut first_line)).unwrap();
    let local = first_line.split_whitespace().nth(1).unwrap_or_default().to_owned();
    assert!(first_line.starts_with("forwarding 127.0.0.1:"), "{first_line:?}");
    for round in 0..2 {
        let mut conn = tokio::net::TcpStream::connect(&local).await.unwrap();
        let line = format!("forwarded-{round}\n");
        tokio::io::AsyncWriteExt::write_all(&mut conn, line.as_bytes()).await.unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut conn).await.unwrap();
        let mut echoed = String::new();
        let read = tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut echoed);
        tokio::time::timeout(Duration::from_secs(30), read).await.expect("the echo in time").unwrap();
        assert_eq!(echoed, line);
    }
    // SAFETY: kill(2) on the mmctl child this test started, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();

    // `exec -it` on a terminal: raw mode, resizes sent over the WebSocket.
    let mut exec_it = Command::new(support::mmctl_binary());
    exec_it.args(["--server", base, "-n", "e2e", "exec", "-it", name, "--"]).env("MM_TOKEN", token);
    exec_it.env_remove("MM_SERVER").env_remove("MM_NAMESPACE");
    tokio::task::spawn_blocking(move || {
        mm_integration::pty::exec_it_behaves_like_a_terminal(exec_it, Duration::from_secs(60)).unwrap()
    })
    .await
    .unwrap();

    let mut child = mmctl(&["logs", "-f", name]);
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("hello-from-the-machine") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "mmctl logs -f printed nothing useful");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reader.join().unwrap().contains("hello-from-the-machine"));
    // Following, not done: still running while the machine runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(child.try_wait().unwrap().is_none(), "mmctl logs -f ended while the machine runs");
    // SAFETY: kill(2) on the mmctl child this test started, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
}
