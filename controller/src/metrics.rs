//! `GET /metrics` (cluster-admin token, like the other admin routes):
//! Prometheus/OpenMetrics text.
//!
//! HTTP requests are counted and timed by [`track`], a middleware on the
//! whole router, labelled with the *matched route template* (never the
//! raw path, so ids in URLs cannot blow up the series count). The pool,
//! leadership and broker sessions are read at scrape time ([`StateCollector`]).
//! Scheduling decisions and lost hosts happen deep in synchronous store
//! code that has no handle on a controller, so they are process-wide
//! counters ([`SCHEDULING`], [`LOST_HOSTS`], [`SESSIONS`]) that every
//! controller's registry shares (one controller per process in production).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::db::Db;

type Labels = Vec<(&'static str, String)>;

/// Scheduling decisions by outcome (`placed`, `no_fit`).
pub static SCHEDULING: LazyLock<Family<Labels, Counter>> = LazyLock::new(Family::default);
/// Hosts the leader marked lost (no heartbeat within the timeout).
pub static LOST_HOSTS: LazyLock<Counter> = LazyLock::new(Counter::default);
/// Broker sessions held by this process's session thread.
pub static SESSIONS: LazyLock<Gauge> = LazyLock::new(Gauge::default);

/// Counts one scheduling decision.
pub fn scheduled(placed: bool) {
    let outcome = if placed { "placed" } else { "no_fit" };
    SCHEDULING.get_or_create(&vec![("outcome", outcome.to_owned())]).inc();
}

/// Seconds, from a quick GET to a long poll.
const BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// One controller's registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    durations: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    pub fn new(db: Db, leading: Arc<AtomicBool>) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let durations = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        registry.register(
            "mm_controller_http_requests",
            "HTTP requests by matched route, method and status.",
            requests.clone(),
        );
        registry.register(
            "mm_controller_http_request_duration_seconds",
            "HTTP request latency by matched route and method (until the response head).",
            durations.clone(),
        );
        registry.register(
            "mm_controller_scheduling_decisions",
            "Placement decisions by outcome (placed, no_fit).",
            SCHEDULING.clone(),
        );
        registry.register("mm_controller_hosts_lost", "Hosts marked lost for missing heartbeats.", LOST_HOSTS.clone());
        registry.register("mm_controller_broker_sessions", "Brokers connected to this controller.", SESSIONS.clone());
        registry.register_collector(Box::new(StateCollector { db, leading }));
        Metrics { registry, requests, durations }
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Pool and leadership, read when scraped.
struct StateCollector {
    db: Db,
    leading: Arc<AtomicBool>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pool = self.db.pool_state();
        let figures = [
            (
                "mm_controller_leader",
                "1 if this controller runs the reconcile loop.",
                i64::from(self.leading.load(Ordering::SeqCst)),
            ),
            ("mm_controller_db_connections", "Database connections open in the pool.", i64::from(pool.connections)),
            ("mm_controller_db_connections_idle", "Idle database connections in the pool.", i64::from(pool.idle)),
            ("mm_controller_db_connections_max", "The pool's size limit.", i64::from(pool.max)),
        ];
        for (name, help, value) in figures {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// Middleware: counts and times every request by its route template.
pub async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let timed = vec![("route", route.clone()), ("method", method.clone())];
    metrics.durations.get_or_create(&timed).observe(started.elapsed().as_secs_f64());
    let counted = vec![("route", route), ("method", method), ("status", status)];
    metrics.requests.get_or_create(&counted).inc();
    response
}

/// The text, as Prometheus asks for it.
pub fn respond(metrics: &Metrics) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(axum::http::header::CONTENT_TYPE, content_type)], metrics.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduling_counts_by_outcome() {
        scheduled(true);
        scheduled(false);
        let placed = SCHEDULING.get_or_create(&vec![("outcome", "placed".to_owned())]).get();
        assert!(placed >= 1);
    }
}
