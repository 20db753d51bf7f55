//! A guest TCP port through the controller (`GET .../machines/{id}/ports/
//! {port}/ws`, framing in the controller's `api/tunnel.rs`): our bytes go
//! out on channel 0 and their end as 5; the guest's arrive on 1, its end
//! as 5. What `mmctl --server proxy | port-forward | ssh` ride on, as the
//! local verbs ride on the broker's `Vm.connect`.

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::exec_ws::{CHUNK, framed, open, transport};
use super::http::{Api, ApiError, Problem};
use crate::client::{CliError, exit};

const TO_GUEST: u8 = 0;
const FROM_GUEST: u8 = 1;
const END: u8 = 5;

/// A close other than the normal one: the refusal it stands for (4000 +
/// HTTP status; after the upgrade each status has one problem kind, see
/// the controller's `api/tunnel.rs`), or the code and reason as they are.
fn closed_with(code: u16, reason: String) -> CliError {
    if (4100..4600).contains(&code) {
        let status = code - 4000;
        let kind = match status {
            400 => "bad-request",
            409 => "invalid-state",
            503 => "host-unavailable",
            _ => "broker-error",
        };
        let kind = format!("urn:micromachines:problem:{kind}");
        return ApiError::Problem(Problem { status, kind, detail: reason, ..Problem::default() }).into();
    }
    CliError::new(exit::ERROR, format!("the tunnel closed with {code}: {reason}"))
}

/// Carries one connection between `reader`/`writer` and the guest's
/// `port` until both sides have ended theirs (TCP half-close both ways).
pub async fn pump<R, W>(api: &Api, id: &str, port: u16, mut reader: R, mut writer: W) -> Result<(), CliError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let what = "a port tunnel";
    let socket = open(api, &[id, "ports", &port.to_string(), "ws"], what).await?;
    let (mut out, mut incoming) = socket.split();
    let mut buf = vec![0u8; CHUNK];
    let mut ours_open = true;
    loop {
        tokio::select! {
            read = reader.read(&mut buf), if ours_open => {
                let frame = match read {
                    Ok(0) | Err(_) => {
                        ours_open = false;
                        framed(END, &[])
                    }
                    Ok(n) => framed(TO_GUEST, &buf[..n]),
                };
                // A failed send: the tunnel is gone; its close is read below.
                if out.send(frame).await.is_err() {
                    ours_open = false;
                }
            }
            message = incoming.next() => match message {
                Some(Ok(Message::Binary(data))) => {
                    let delivered = match data.split_first() {
                        Some((&FROM_GUEST, rest)) => writer.write_all(rest).await.and(writer.flush().await).is_ok(),
                        Some((&END, [])) => {
                            let _ = writer.shutdown().await;
                            true
                        }
                        _ => true,
                    };
                    if !delivered {
                        // Nobody reads the guest's answer any more.
                        let _ = out.close().await;
                        return Ok(());
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return match frame {
                        Some(frame) if frame.code != CloseCode::Normal => {
                            Err(closed_with(u16::from(frame.code), frame.reason.to_string()))
                        }
                        _ => Ok(()),
                    };
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(transport(api, what, e)),
                None => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_keep_their_meaning() {
        assert_eq!(closed_with(4409, "booting".into()).code, exit::CONFLICT);
        assert_eq!(closed_with(4404, "gone".into()).code, exit::NOT_FOUND);
        assert_eq!(closed_with(4503, "no session".into()).code, exit::NO_BROKER);
        let e = closed_with(1011, "broke".into());
        assert_eq!(e.code, exit::ERROR);
        assert!(e.message.contains("1011: broke"), "{}", e.message);
    }
}
