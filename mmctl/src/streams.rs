//! The streaming verbs: console logs into stdout (a `ByteSink` we serve),
//! and exec (an `ExecOutput` we serve, stdin sent to the `ExecSession`).

use std::cell::RefCell;
use std::io::Write;
use std::rc::Rc;

use mm_protocols::broker_capnp::{byte_sink, exec_output, vm};
use mm_protocols::exec_end::ExecEnd;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

use crate::client::{CliError, exit};
use crate::terminal::{self, RawTerminal, WindowChanges};

/// Writes what the broker sends to our stdout; `done` ends the wait.
struct StdoutSink {
    done: RefCell<Option<oneshot::Sender<()>>>,
}

impl byte_sink::Server for StdoutSink {
    async fn write(
        self: Rc<Self>,
        params: byte_sink::WriteParams,
        _: byte_sink::WriteResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?;
        let mut out = std::io::stdout().lock();
        // A closed stdout (`mmctl logs | head`) ends the stream quietly.
        if out.write_all(data).and_then(|()| out.flush()).is_err() {
            std::process::exit(0);
        }
        Ok(())
    }

    async fn done(self: Rc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> Result<(), capnp::Error> {
        if let Some(done) = self.done.borrow_mut().take() {
            let _ = done.send(());
        }
        Ok(())
    }
}

/// Prints the console; with `follow`, until the microVM stops.
pub async fn print_logs(vm: &vm::Client, follow: bool) -> Result<(), CliError> {
    let (tx, rx) = oneshot::channel();
    let sink: byte_sink::Client = capnp_rpc::new_client(StdoutSink { done: RefCell::new(Some(tx)) });
    let mut request = vm.logs_request();
    request.get().set_follow(follow);
    request.get().set_sink(sink);
    request.send().promise.await?;
    let _ = rx.await;
    Ok(())
}

pub struct ExecOptions {
    pub interactive: bool,
    pub tty: bool,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub command: Vec<String>,
}

/// Receives the command's output and its end.
struct Output {
    ended: RefCell<Option<oneshot::Sender<ExecEnd>>>,
}

impl Output {
    fn finish(&self, ended: ExecEnd) {
        if let Some(tx) = self.ended.borrow_mut().take() {
            let _ = tx.send(ended);
        }
    }
}

impl exec_output::Server for Output {
    async fn stdout(
        self: Rc<Self>,
        params: exec_output::StdoutParams,
        _: exec_output::StdoutResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(data).and_then(|()| out.flush());
        Ok(())
    }

    async fn stderr(
        self: Rc<Self>,
        params: exec_output::StderrParams,
        _: exec_output::StderrResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?;
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(data).and_then(|()| err.flush());
        Ok(())
    }

    async fn exit(
        self: Rc<Self>,
        params: exec_output::ExitParams,
        _: exec_output::ExitResults,
    ) -> Result<(), capnp::Error> {
        self.finish(ExecEnd::read(params.get()?)?);
        Ok(())
    }
}

/// Runs a command in the guest; returns its exit code (128+N for a signal).
pub async fn exec(vm: &vm::Client, options: ExecOptions) -> Result<i32, CliError> {
    let (tx, rx) = oneshot::channel();
    let output: exec_output::Client = capnp_rpc::new_client(Output { ended: RefCell::new(Some(tx)) });
    let mut request = vm.exec_request();
    {
        let mut req = request.get().init_request();
        req.set_tty(options.tty);
        req.set_cwd(options.workdir.as_deref().unwrap_or(""));
        req.set_user(options.user.as_deref().unwrap_or(""));
        let (rows, cols) = terminal::window_size().unwrap_or((24, 80));
        req.set_rows(rows);
        req.set_cols(cols);
        mm_protocols::set_exec_command(req, &options.command, &options.env);
    }
    request.get().set_output(output);
    let reply = request.send().promise.await?;
    let session = reply.get()?.get_session()?;
    // Raw only while the command runs: dropped (restored) on every return.
    let _raw = if options.tty && options.interactive { RawTerminal::for_stdin()? } else { None };
    if options.tty {
        let mut changes = WindowChanges::new()?;
        let session = session.clone();
        tokio::task::spawn_local(async move {
            while let Some((rows, cols)) = changes.next().await {
                let mut request = session.resize_request();
                request.get().set_rows(rows);
                request.get().set_cols(cols);
                if request.send().promise.await.is_err() {
                    return;
                }
            }
        });
    }
    if options.interactive {
        tokio::task::spawn_local(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut request = session.stdin_request();
                        request.get().set_data(&buf[..n]);
                        if request.send().promise.await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = session.close_stdin_request().send().promise.await;
        });
    } else {
        let _ = session.close_stdin_request().send().promise.await;
    }
    match rx.await {
        Ok(ExecEnd::Error(message)) => Err(CliError::new(126, message)),
        Ok(end) => Ok(end.shell_code().unwrap_or(exit::ERROR)),
        Err(_) => Err(CliError::new(exit::ERROR, "the exec session ended without an exit status")),
    }
}

/// Prints each pushed event: one JSON object per line (`-o json`: the
/// audit line with `vm_id` and `vm_name` added) or `TIME VM KIND DETAIL`.
struct EventPrinter {
    format: crate::output::Format,
}

impl mm_protocols::events_capnp::event_sink::Server for EventPrinter {
    async fn push(
        self: Rc<Self>,
        params: mm_protocols::events_capnp::event_sink::PushParams,
        _: mm_protocols::events_capnp::event_sink::PushResults,
    ) -> Result<(), capnp::Error> {
        let event = params.get()?.get_event()?;
        let text = |t: capnp::Result<capnp::text::Reader<'_>>| t.map(|t| t.to_string().unwrap_or_default());
        let detail = text(event.get_detail())?;
        let line = match self.format {
            crate::output::Format::Json => {
                let mut object = match serde_json::from_str::<serde_json::Value>(&detail) {
                    Ok(serde_json::Value::Object(object)) => object,
                    _ => serde_json::Map::from_iter([("detail".to_string(), serde_json::Value::String(detail))]),
                };
                for (key, value) in [("vm_id", event.get_vm_id()), ("vm_name", event.get_vm_name())] {
                    let value = text(value)?;
                    if !value.is_empty() {
                        object.insert(key.into(), value.into());
                    }
                }
                serde_json::Value::Object(object).to_string()
            }
            crate::output::Format::Table => {
                let name = text(event.get_vm_name())?;
                format!(
                    "{}  {:<16} {:<12} {detail}",
                    text(event.get_time())?,
                    if name.is_empty() { "(broker)" } else { &name },
                    text(event.get_kind())?
                )
            }
        };
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            std::process::exit(0);
        }
        Ok(())
    }
}

/// `mmctl events`: streams every microVM's events until interrupted or the
/// broker goes away.
pub async fn follow_events(
    broker: &mm_protocols::broker_capnp::broker::Client,
    format: crate::output::Format,
) -> Result<i32, CliError> {
    let mut request = broker.events_request();
    request.get().set_sink(capnp_rpc::new_client(EventPrinter { format }));
    // Held for as long as we want events; dropping it would end them.
    let _subscription = request.send().promise.await?.get()?.get_subscription()?;
    // Said once the broker holds our sink, so a script (or a test) knows
    // from here on that nothing it does is missed.
    eprintln!("mmctl: following events; Ctrl-C to stop");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(0),
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {
                // A broker that went away would otherwise leave us waiting forever.
                broker.version_request().send().promise.await?;
            }
        }
    }
}
