//! The blocking host-side client.
//!
//! [`ExecClient::run`] is the whole exec in one call; [`ExecClient::start`]
//! splits a connection into an [`ExecSender`] (stdin, resize, signals; cheap
//! to clone across threads) and an [`ExecReceiver`] (an iterator over the
//! command's output), for interactive use. [`ExecClient::apply_identity`]
//! uses a connection for a new identity instead of a command, and
//! [`ExecClient::start_workload`] for a waiting guest's workload.

use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::frame::{Frame, ProtocolError, read_frame, write_frame};
use crate::identity::GuestIdentity;
use crate::request::{ExecRequest, ExitStatus};
use crate::workload::Workload;

/// Stdin is forwarded in chunks of this size: far below the frame limit,
/// so one frame never holds up resize or signal frames for long.
const STDIN_CHUNK: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot connect to the vsock socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    /// Nobody listens on the guest port (yet): the agent has not started,
    /// or the guest has no agent. Worth retrying while the guest boots.
    #[error("guest port {port} refused the connection: {answer:?}")]
    Refused { port: u32, answer: String },
    #[error("exec connection: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The agent could not run the command (an error frame), e.g.
    /// "no such command: foo", could not apply (every step of) an
    /// identity, e.g. "hostname: Operation not permitted", or refused a
    /// workload, e.g. "not waiting for a workload".
    #[error("{0}")]
    Remote(String),
    #[error("the guest closed the exec connection before the command's exit status")]
    Disconnected,
    #[error("the guest sent a {0} frame, which only the host may send")]
    Unexpected(&'static str),
    /// The agent answered an identity or a workload (`to`) with something
    /// other than "exited 0" or an error.
    #[error("the guest answered the {to} with {answer}")]
    BadAnswer { to: &'static str, answer: String },
}

/// One connection to the guest agent, before its request.
pub struct ExecClient {
    stream: UnixStream,
}

impl ExecClient {
    /// Connects through a hybrid vsock device's unix socket `uds` to guest
    /// `port` (usually [`crate::EXEC_PORT`]): `CONNECT <port>\n`, then
    /// `OK <hostport>\n`. A closed connection instead of `OK` is
    /// [`ExecError::Refused`].
    pub fn connect_hybrid_vsock(uds: impl AsRef<Path>, port: u32) -> Result<Self, ExecError> {
        let path = uds.as_ref();
        let mut stream =
            UnixStream::connect(path).map_err(|source| ExecError::Connect { path: path.to_path_buf(), source })?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
        // Read the answer byte by byte: whatever follows the newline is
        // already the agent's stream and must stay in the socket.
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while answer.len() < 64 {
            if stream.read(&mut byte)? == 0 {
                break;
            }
            if byte[0] == b'\n' {
                break;
            }
            answer.push(byte[0]);
        }
        let answer = String::from_utf8_lossy(&answer).into_owned();
        if !answer.starts_with("OK ") {
            return Err(ExecError::Refused { port, answer });
        }
        Ok(ExecClient { stream })
    }

    /// Uses an already connected stream (tests, or a socket passed by fd).
    pub fn from_stream(stream: UnixStream) -> Self {
        ExecClient { stream }
    }

    /// The connection, e.g. to set read timeouts before [`Self::start`]
    /// (clones made by `start` share them).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends the request and splits the connection for streaming use.
    pub fn start(self, request: &ExecRequest) -> Result<(ExecSender, ExecReceiver), ExecError> {
        let mut writer = self.stream.try_clone()?;
        write_frame(&mut writer, &Frame::Request(request.clone()))?;
        let sender = ExecSender { stream: Arc::new(Mutex::new(writer)) };
        let receiver = ExecReceiver { reader: BufReader::new(self.stream), done: false };
        Ok((sender, receiver))
    }

    /// Gives the guest a new identity (after a restore from a snapshot) and
    /// waits until it has been applied: `Ok` when every step worked, else
    /// [`ExecError::Remote`] naming each step that failed (the others were
    /// still applied). The guest changes its address and MAC while this
    /// connection is open; vsock does not care. Set a read timeout on
    /// [`Self::stream`] first to bound the wait.
    pub fn apply_identity(self, identity: &GuestIdentity) -> Result<(), ExecError> {
        self.one_answer(&Frame::Identity(identity.clone()))
    }

    /// Hands a guest booted with `mm.wait` (typically restored from the
    /// snapshot taken while it waited) its workload, and waits until PID 1
    /// has started it: `Ok` then. The workload's output goes to the guest's
    /// console and its exit status ends mm-vmm, as for a workload from the
    /// kernel command line; nothing more comes over this connection.
    /// [`ExecError::Remote`] when the guest refused it: `not waiting for a
    /// workload` (not booted with `mm.wait`, or it already has one: one
    /// per boot), a malformed workload (it keeps waiting), or one that
    /// could not start (`cannot run …`: the guest then ends with status 126
    /// or 127, as it would at boot). Give the guest its identity first:
    /// the workload should see the new name, clock and random numbers.
    pub fn start_workload(self, workload: &Workload) -> Result<(), ExecError> {
        self.one_answer(&Frame::Workload(workload.clone()))
    }

    /// Sends `frame` (an identity or a workload), which the agent answers
    /// with one frame: exited 0 for done, or an error frame.
    fn one_answer(self, frame: &Frame) -> Result<(), ExecError> {
        let mut stream = self.stream;
        write_frame(&mut stream, frame)?;
        let bad = |answer| ExecError::BadAnswer { to: frame.name(), answer };
        match read_frame(&mut stream) {
            Ok(Some(Frame::Exit(ExitStatus::Exited(0)))) => Ok(()),
            Ok(Some(Frame::Exit(status))) => Err(bad(format!("an exit frame ({status})"))),
            Ok(Some(Frame::Error(message))) => Err(ExecError::Remote(message)),
            Ok(Some(other)) => Err(bad(format!("a {} frame", other.name()))),
            Ok(None) => Err(ExecError::Disconnected),
            Err(e) => Err(disconnect_or(e)),
        }
    }

    /// Runs `request` to completion: `stdin` is forwarded (then its EOF) from
    /// a detached thread, which is why it must be `'static`: a reader that
    /// blocks forever (a terminal nobody types into) must not keep `run`
    /// from returning once the command has ended. Output goes to `stdout`
    /// and `stderr` (with a tty, everything comes as stdout).
    pub fn run(
        self,
        request: &ExecRequest,
        stdin: impl Read + Send + 'static,
        mut stdout: impl Write,
        mut stderr: impl Write,
    ) -> Result<ExitStatus, ExecError> {
        let (sender, receiver) = self.start(request)?;
        let pump = sender.clone();
        std::thread::spawn(move || {
            // Errors mean the command or the connection ended; nothing to do.
            let _ = pump.copy_stdin(stdin);
        });
        let result = (|| {
            for output in receiver {
                match output? {
                    Output::Stdout(data) => {
                        stdout.write_all(&data)?;
                        stdout.flush()?;
                    }
                    Output::Stderr(data) => {
                        stderr.write_all(&data)?;
                        stderr.flush()?;
                    }
                    Output::Exit(status) => return Ok(status),
                }
            }
            Err(ExecError::Disconnected)
        })();
        // Wakes nobody up by itself, but makes the stdin thread's next
        // write fail so it ends.
        sender.shutdown();
        result
    }
}

/// The host's half of a running exec: stdin, resize and signals. Clones
/// share the connection; each frame is written whole under a lock.
#[derive(Clone)]
pub struct ExecSender {
    stream: Arc<Mutex<UnixStream>>,
}

impl ExecSender {
    fn send(&self, frame: &Frame) -> Result<(), ExecError> {
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *stream, frame)?;
        Ok(())
    }

    /// Sends bytes for the command's stdin (split into frames as needed).
    pub fn stdin(&self, data: &[u8]) -> Result<(), ExecError> {
        for chunk in data.chunks(STDIN_CHUNK) {
            self.send(&Frame::Stdin(chunk.to_vec()))?;
        }
        Ok(())
    }

    /// Closes the command's stdin (with a tty: sends the terminal's EOF
    /// character, ^D).
    pub fn close_stdin(&self) -> Result<(), ExecError> {
        self.send(&Frame::StdinEof)
    }

    /// Changes the terminal size (ignored without a tty).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ExecError> {
        self.send(&Frame::Resize { rows, cols })
    }

    /// Sends signal `signal` to the command (with a tty, to the terminal's
    /// foreground process group).
    pub fn signal(&self, signal: i32) -> Result<(), ExecError> {
        self.send(&Frame::Signal(signal))
    }

    /// Forwards everything from `stdin`, then its EOF.
    pub fn copy_stdin(&self, mut stdin: impl Read) -> Result<(), ExecError> {
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.stdin(&buf[..n])?;
        }
        self.close_stdin()
    }

    /// Stops sending: the guest sees the connection half-closed. The agent
    /// treats a closed connection before the exit as a hang-up (SIGHUP to
    /// the command), so call this only when done.
    pub fn shutdown(&self) {
        let stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let _ = stream.shutdown(Shutdown::Write);
    }
}

/// What the command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The last item: the command ended.
    Exit(ExitStatus),
}

/// The guest's half of a running exec: output until the exit status. An
/// error frame from the agent comes out as [`ExecError::Remote`].
pub struct ExecReceiver {
    reader: BufReader<UnixStream>,
    done: bool,
}

impl ExecReceiver {
    /// The next output, or `Ok(None)` after the exit status.
    pub fn next_output(&mut self) -> Result<Option<Output>, ExecError> {
        if self.done {
            return Ok(None);
        }
        let frame = read_frame(&mut self.reader);
        let output = match frame {
            Ok(Some(Frame::Stdout(data))) => Ok(Output::Stdout(data)),
            Ok(Some(Frame::Stderr(data))) => Ok(Output::Stderr(data)),
            Ok(Some(Frame::Exit(status))) => Ok(Output::Exit(status)),
            Ok(Some(Frame::Error(message))) => Err(ExecError::Remote(message)),
            Ok(Some(
                host_only @ (Frame::Request(_)
                | Frame::Stdin(_)
                | Frame::StdinEof
                | Frame::Resize { .. }
                | Frame::Signal(_)
                | Frame::Identity(_)
                | Frame::Workload(_)),
            )) => Err(ExecError::Unexpected(host_only.name())),
            Ok(None) => Err(ExecError::Disconnected),
            Err(e) => Err(disconnect_or(e)),
        };
        self.done = !matches!(output, Ok(Output::Stdout(_) | Output::Stderr(_)));
        output.map(Some)
    }

    /// Whether bytes are already buffered (for callers that poll the fd).
    pub fn has_buffered(&self) -> bool {
        !self.reader.buffer().is_empty()
    }
}

/// A peer that closes with our frames unread resets the connection: after
/// its last frame, so that is a disconnect; other errors stay what they are.
fn disconnect_or(e: ProtocolError) -> ExecError {
    match e {
        ProtocolError::Io(e) if e.kind() == io::ErrorKind::ConnectionReset => ExecError::Disconnected,
        e => e.into(),
    }
}

impl Iterator for ExecReceiver {
    type Item = Result<Output, ExecError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_output().transpose()
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;

    use super::*;

    /// A fake agent on the other end of a socketpair.
    fn fake_agent(script: impl FnOnce(&mut UnixStream, ExecRequest) + Send + 'static) -> ExecClient {
        let (host, mut guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let Some(Frame::Request(req)) = read_frame(&mut guest).unwrap() else { panic!("no request") };
            script(&mut guest, req);
        });
        ExecClient::from_stream(host)
    }

    #[test]
    fn run_forwards_stdin_and_splits_output() {
        let client = fake_agent(|s, req| {
            assert_eq!(req.argv, ["cat"]);
            let mut input = Vec::new();
            loop {
                match read_frame(s).unwrap() {
                    Some(Frame::Stdin(data)) => input.extend(data),
                    Some(Frame::StdinEof) => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            write_frame(s, &Frame::Stdout(input)).unwrap();
            write_frame(s, &Frame::Stderr(b"err".to_vec())).unwrap();
            write_frame(s, &Frame::Exit(ExitStatus::Exited(5))).unwrap();
        });
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = client.run(&ExecRequest::new(["cat"]), io::Cursor::new(big.clone()), &mut out, &mut err).unwrap();
        assert_eq!(status, ExitStatus::Exited(5));
        assert_eq!(out, big);
        assert_eq!(err, b"err");
    }

    #[test]
    fn error_frame_and_disconnect() {
        let client = fake_agent(|s, _| write_frame(s, &Frame::Error("no such command: foo".into())).unwrap());
        let err = client.run(&ExecRequest::new(["foo"]), io::empty(), io::sink(), io::sink()).unwrap_err();
        assert!(matches!(&err, ExecError::Remote(m) if m == "no such command: foo"), "{err}");

        let client = fake_agent(|s, _| write_frame(s, &Frame::Stdout(b"x".to_vec())).unwrap());
        let err = client.run(&ExecRequest::new(["x"]), io::empty(), io::sink(), io::sink()).unwrap_err();
        assert!(matches!(err, ExecError::Disconnected), "{err}");
    }

    /// A fake agent that reads one frame (an identity or a workload),
    /// answers with `answer` (nothing: it just closes) and hands back the
    /// frame it read.
    fn fake_answering_agent(answer: Option<Frame>) -> (ExecClient, std::thread::JoinHandle<Option<Frame>>) {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || {
            let first = read_frame(&mut guest).unwrap();
            if let Some(answer) = answer {
                write_frame(&mut guest, &answer).unwrap();
            }
            first
        });
        (ExecClient::from_stream(host), agent)
    }

    /// The answers that are neither success nor an error frame, and what
    /// the client calls them.
    fn bad_answers() -> [(Frame, &'static str); 3] {
        [
            (Frame::Exit(ExitStatus::Exited(1)), "an exit frame (exited with code 1)"),
            (Frame::Stdout(b"x".to_vec()), "a stdout frame"),
            (Frame::Identity(GuestIdentity::default()), "a identity frame"),
        ]
    }

    #[test]
    fn apply_identity_sends_the_frame_and_reads_the_answer() {
        let identity = GuestIdentity {
            hostname: Some("clone-1".into()),
            mac: Some("02:6d:0a:64:00:05".into()),
            ssh_keys: Some(vec!["ssh-ed25519 AAAAC3Nza alice".into()]),
            ..GuestIdentity::fresh().unwrap()
        };
        let (client, agent) = fake_answering_agent(Some(Frame::Exit(ExitStatus::Exited(0))));
        client.apply_identity(&identity).unwrap();
        assert_eq!(agent.join().unwrap(), Some(Frame::Identity(identity.clone())));

        let (client, _) = fake_answering_agent(Some(Frame::Error("hostname: EPERM; /etc/hosts: EROFS".into())));
        let err = client.apply_identity(&identity).unwrap_err();
        assert!(matches!(&err, ExecError::Remote(m) if m == "hostname: EPERM; /etc/hosts: EROFS"), "{err}");

        for (answer, expected) in bad_answers() {
            let (client, _) = fake_answering_agent(Some(answer));
            let err = client.apply_identity(&identity).unwrap_err();
            assert!(matches!(&err, ExecError::BadAnswer { to: "identity", answer } if answer == expected), "{err}");
            assert_eq!(err.to_string(), format!("the guest answered the identity with {expected}"));
        }

        let (client, _) = fake_answering_agent(None);
        assert!(matches!(client.apply_identity(&identity), Err(ExecError::Disconnected)));
    }

    #[test]
    fn start_workload_sends_the_frame_and_reads_the_answer() {
        let workload = Workload::new(["nginx", "-g", "daemon off;"]).env("PORT", "8080").cwd("/srv");
        let (client, agent) = fake_answering_agent(Some(Frame::Exit(ExitStatus::Exited(0))));
        client.start_workload(&workload).unwrap();
        assert_eq!(agent.join().unwrap(), Some(Frame::Workload(workload.clone())));

        let (client, _) = fake_answering_agent(Some(Frame::Error("not waiting for a workload".into())));
        let err = client.start_workload(&workload).unwrap_err();
        assert!(matches!(&err, ExecError::Remote(m) if m == "not waiting for a workload"), "{err}");

        for (answer, expected) in bad_answers() {
            let (client, _) = fake_answering_agent(Some(answer));
            let err = client.start_workload(&workload).unwrap_err();
            assert!(matches!(&err, ExecError::BadAnswer { to: "workload", answer } if answer == expected), "{err}");
        }

        let (client, _) = fake_answering_agent(None);
        assert!(matches!(client.start_workload(&workload), Err(ExecError::Disconnected)));
    }

    #[test]
    fn hybrid_vsock_handshake() {
        let dir = std::env::temp_dir().join(format!("mm-exec-protocol-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for answer in [&b"OK 1073741824\n"[..], b""] {
                let (mut conn, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&mut conn).read_line(&mut line).unwrap();
                assert_eq!(line, "CONNECT 1024\n");
                conn.write_all(answer).unwrap();
                if !answer.is_empty() {
                    // The stream right after OK belongs to the protocol.
                    assert!(matches!(read_frame(&mut conn), Ok(Some(Frame::Request(_)))));
                    write_frame(&mut conn, &Frame::Exit(ExitStatus::Signaled(9))).unwrap();
                }
            }
        });
        let client = ExecClient::connect_hybrid_vsock(&path, crate::EXEC_PORT).unwrap();
        let (_tx, mut rx) = client.start(&ExecRequest::new(["true"])).unwrap();
        assert_eq!(rx.next_output().unwrap(), Some(Output::Exit(ExitStatus::Signaled(9))));
        assert_eq!(rx.next_output().unwrap(), None);
        let refused = ExecClient::connect_hybrid_vsock(&path, crate::EXEC_PORT);
        assert!(matches!(refused, Err(ExecError::Refused { port: 1024, .. })));
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
