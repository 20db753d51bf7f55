//! A TCP connection to a port of a guest, made by its broker from inside
//! the microVM network (`Vm.connect`) and carried between the session
//! thread and an API handler as two channels of [`TunnelData`]: what
//! `mmctl --server ssh | proxy | port-forward` ride on.
//!
//! Each direction ends on its own (`End`, TCP's half-close), so a client's
//! end of input does not cut off the guest's answer. Flow control: a
//! guest's `write` waits for room in the bounded channel before it returns,
//! and writes towards the guest are awaited one at a time. When the API
//! side drops its ends (its client went away) the broker's side is
//! released: the guest connection is shut for writing and the next bytes
//! from the guest find nobody, which ends the broker's copy.

use tokio::sync::{mpsc, oneshot};

use super::SessionError;
use super::ops::get_vm;
use super::streams::{BrokerLink, ChannelSink, answer};

/// Bytes one way through a tunnel, then (at most once) its end.
#[derive(Debug, PartialEq, Eq)]
pub enum TunnelData {
    Bytes(Vec<u8>),
    End,
}

/// The API's ends of a tunnel. Dropping both closes the connection.
pub struct Tunnel {
    pub from_guest: mpsc::Receiver<TunnelData>,
    pub to_guest: mpsc::Sender<TunnelData>,
}

/// Connects to `port` of `name`'s guest, answers `reply` once connected
/// (or why not), then writes `to_guest` into the connection until its
/// `End` or until the API side drops it.
pub(super) async fn connect(
    broker: BrokerLink,
    name: &str,
    port: u16,
    from_guest: mpsc::Sender<TunnelData>,
    mut to_guest: mpsc::Receiver<TunnelData>,
    reply: oneshot::Sender<Result<(), SessionError>>,
) {
    let begin = async {
        let vm = get_vm(&broker?, name).await?;
        let mut call = vm.connect_request();
        call.get().set_port(port);
        let sink = ChannelSink::new(from_guest, TunnelData::Bytes, Some(|| TunnelData::End));
        call.get().set_to_client(capnp_rpc::new_client(sink));
        Ok::<_, SessionError>(call.send().promise.await?.get()?.get_to_guest()?)
    };
    let Some((sink, true)) = answer(reply, begin).await else {
        return;
    };
    while let Some(data) = to_guest.recv().await {
        let sent = match data {
            TunnelData::Bytes(bytes) => {
                let mut call = sink.write_request();
                call.get().set_data(&bytes);
                call.send().promise.await
            }
            TunnelData::End => {
                let _ = sink.done_request().send().promise.await;
                return;
            }
        };
        if let Err(e) = sent {
            tracing::debug!(machine = name, port, "tunnel write refused: {e}");
            return;
        }
    }
}
