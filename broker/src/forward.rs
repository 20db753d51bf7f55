//! `Vm.connect`: a TCP connection to a guest port, made from inside the
//! microVM network and carried over Cap'n Proto as two `ByteSink`s. It is
//! how `mmctl ssh` and `mmctl port-forward` reach guests that the host has
//! no route to.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use mm_protocols::broker_capnp::byte_sink;
use mm_protocols::byte_stream::{WriterSink, copy_into_sink};

use crate::network::Network;

/// How long the guest may take to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    let (reader, writer) = stream.into_split();
    tokio::task::spawn_local(async move {
        copy_into_sink(reader, &to_client).await;
    });
    // When the client is done, the guest sees end of input (half-close).
    let (to_guest, _) = WriterSink::new(writer);
    Ok(capnp_rpc::new_client(to_guest))
}
