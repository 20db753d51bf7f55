//! `Broker.events` (protocols/events.capnp): every audit line of every
//! microVM, published as it is written, to whoever subscribed.
//!
//! The audit log stays the record; this is its live feed. A broadcast
//! channel decouples writers from subscribers: recording never waits for a
//! client, and a subscriber that falls more than [`BACKLOG`] events behind
//! is told how many it missed (`lagged`) instead of slowing the broker.

use mm_protocols::events_capnp::{event_sink, subscription};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::oneshot;

/// Events kept for a slow subscriber before it lags.
const BACKLOG: usize = 1024;

/// One audit line, for subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub time: String,
    /// Empty for broker-wide events.
    pub vm_id: String,
    pub vm_name: String,
    pub kind: String,
    /// The whole audit line (a JSON object).
    pub detail: String,
}

/// Where audit lines are published.
#[derive(Debug, Clone)]
pub struct EventHub(broadcast::Sender<Event>);

impl Default for EventHub {
    fn default() -> Self {
        EventHub(broadcast::channel(BACKLOG).0)
    }
}

impl EventHub {
    /// Publishes `event`; with no subscriber it goes nowhere, by design.
    pub fn publish(&self, event: Event) {
        let _ = self.0.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.0.subscribe()
    }
}

/// Pushes events from `hub` to `sink` until the subscription is dropped or
/// the sink stops answering; returns the subscription to hand the client.
pub fn serve_subscription(hub: &EventHub, sink: event_sink::Client) -> subscription::Client {
    let mut events = hub.subscribe();
    let (cancel, mut cancelled) = oneshot::channel::<()>();
    tokio::task::spawn_local(async move {
        loop {
            let event = tokio::select! {
                _ = &mut cancelled => break,
                received = events.recv() => match received {
                    Ok(event) => event,
                    Err(RecvError::Lagged(missed)) => lagged(missed),
                    Err(RecvError::Closed) => break,
                },
            };
            let mut request = sink.push_request();
            let mut out = request.get().init_event();
            out.set_time(&event.time);
            out.set_vm_id(&event.vm_id);
            out.set_vm_name(&event.vm_name);
            out.set_kind(&event.kind);
            out.set_detail(&event.detail);
            if request.send().promise.await.is_err() {
                break;
            }
        }
    });
    capnp_rpc::new_client(Subscription { _cancel: cancel })
}

fn lagged(missed: u64) -> Event {
    let time = crate::audit::now_rfc3339();
    let detail = serde_json::json!({ "time": time, "event": "lagged", "missed": missed }).to_string();
    Event { time, vm_id: String::new(), vm_name: String::new(), kind: "lagged".into(), detail }
}

/// Dropping it (the client released its capability) ends the stream.
struct Subscription {
    _cancel: oneshot::Sender<()>,
}

impl subscription::Server for Subscription {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_get_what_is_published_after_they_subscribe_and_lag_is_reported() {
        let hub = EventHub::default();
        let event = |kind: &str| Event {
            time: "t".into(),
            vm_id: "id".into(),
            vm_name: "vm".into(),
            kind: kind.into(),
            detail: "{}".into(),
        };
        hub.publish(event("before"));
        let mut rx = hub.subscribe();
        hub.publish(event("after"));
        assert_eq!(rx.recv().await.unwrap().kind, "after");
        for _ in 0..BACKLOG + 5 {
            hub.publish(event("flood"));
        }
        assert!(matches!(rx.recv().await, Err(RecvError::Lagged(5))));
    }
}
