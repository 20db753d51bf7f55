//! `Vm.connect`: a TCP connection to a guest port, made from inside the
//! microVM network and carried over Cap'n Proto as two `ByteSink`s. It is
//! how `mmctl ssh` and `mmctl port-forward` reach guests that the host has
//! no route to.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::rc::Rc;
use std::time::Duration;

use mm_protocols::broker_capnp::byte_sink;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;

use crate::network::Network;

/// How long the guest may take to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes per `write` toward the client.
const CHUNK: usize = 64 * 1024;

/// Connects to `ip:port` in the microVM network; bytes from the guest go
/// to `to_client`, and the returned sink takes the client's bytes.
pub async fn connect(
    network: &Network,
    ip: Ipv4Addr,
    port: u16,
    to_client: byte_sink::Client,
) -> Result<byte_sink::Client, capnp::Error> {
    let namespace = network.namespace().clone();
    let addr = SocketAddrV4::new(ip, port);
    let connected = tokio::task::spawn_blocking(move || namespace.connect(addr, CONNECT_TIMEOUT))
        .await
        .map_err(|e| capnp::Error::failed(format!("internal: {e}")))?;
    let stream = connected
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .and_then(tokio::net::TcpStream::from_std)
        .map_err(|e| capnp::Error::failed(format!("internal: cannot connect to {addr} in the microVM network: {e}")))?;
    let (mut reader, writer) = stream.into_split();
    tokio::task::spawn_local(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut request = to_client.write_request();
            request.get().set_data(&buf[..n]);
            // A client that went away ends the connection.
            if request.send().promise.await.is_err() {
                return;
            }
        }
        let _ = to_client.done_request().send().promise.await;
    });
    Ok(capnp_rpc::new_client(ToGuest { writer: tokio::sync::Mutex::new(Some(writer)) }))
}

/// The client's half: each `write` lands on the socket before it returns.
struct ToGuest {
    /// Calls may overlap if a client does not await its writes; tokio's
    /// mutex is FIFO, so they still land in the order they arrived.
    /// `None` once done.
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
}

impl byte_sink::Server for ToGuest {
    async fn write(
        self: Rc<Self>,
        params: byte_sink::WriteParams,
        _: byte_sink::WriteResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?.to_vec();
        let mut writer = self.writer.lock().await;
        let Some(writer) = writer.as_mut() else {
            return Err(capnp::Error::failed("invalid: the connection is closed for writing".into()));
        };
        writer.write_all(&data).await.map_err(|e| capnp::Error::failed(format!("internal: writing to the guest: {e}")))
    }

    async fn done(self: Rc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> Result<(), capnp::Error> {
        if let Some(mut writer) = self.writer.lock().await.take() {
            let _ = writer.shutdown().await;
        }
        Ok(())
    }
}
