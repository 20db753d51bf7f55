//! A byte stream carried over `ByteSink` capabilities (`broker.capnp`):
//! the broker's guest connections (`Vm.connect`) and mmctl's ends of them.
//!
//! Flow control comes from awaiting each `write` before reading more, and
//! end of stream is `done`, which half-closes the writer behind the sink.

use std::cell::RefCell;
use std::rc::Rc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, oneshot};

use crate::broker_capnp::byte_sink;

/// Bytes per `write` call.
const CHUNK: usize = 64 * 1024;

/// Copies `reader` into `sink` until end of input, then calls `done`.
/// Stops early (returning false) if the sink fails, i.e. its holder went
/// away or closed its end.
pub async fn copy_into_sink<R: AsyncRead + Unpin>(mut reader: R, sink: &byte_sink::Client) -> bool {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut request = sink.write_request();
        request.get().set_data(&buf[..n]);
        if request.send().promise.await.is_err() {
            return false;
        }
    }
    sink.done_request().send().promise.await.is_ok()
}

/// A `ByteSink` that writes into `W`: each `write` has landed (written and
/// flushed) before it returns, and `done` shuts `W` down and tells whoever
/// waits on [`WriterSink::new`]'s receiver.
pub struct WriterSink<W> {
    /// Calls may overlap if a client does not await its writes; tokio's
    /// mutex is FIFO, so they still land in the order they arrived.
    /// `None` once done or broken.
    out: Mutex<Option<W>>,
    finished: RefCell<Option<oneshot::Sender<()>>>,
}

impl<W> WriterSink<W> {
    pub fn new(writer: W) -> (WriterSink<W>, oneshot::Receiver<()>) {
        let (finished, done) = oneshot::channel();
        (WriterSink { out: Mutex::new(Some(writer)), finished: RefCell::new(Some(finished)) }, done)
    }
}

impl<W: AsyncWrite + Unpin + 'static> byte_sink::Server for WriterSink<W> {
    async fn write(
        self: Rc<Self>,
        params: byte_sink::WriteParams,
        _: byte_sink::WriteResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?.to_vec();
        let mut out = self.out.lock().await;
        let Some(writer) = out.as_mut() else {
            return Err(capnp::Error::disconnected("the stream is closed for writing".into()));
        };
        if let Err(e) = writer.write_all(&data).await.and(writer.flush().await) {
            // The far side went away: refuse more, so the sender stops.
            *out = None;
            return Err(capnp::Error::disconnected(format!("the receiving end closed: {e}")));
        }
        Ok(())
    }

    async fn done(self: Rc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> Result<(), capnp::Error> {
        if let Some(mut writer) = self.out.lock().await.take() {
            let _ = writer.shutdown().await;
        }
        if let Some(finished) = self.finished.borrow_mut().take() {
            let _ = finished.send(());
        }
        Ok(())
    }
}
