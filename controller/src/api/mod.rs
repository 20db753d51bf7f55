//! The REST API under `/v1`.
//!
//! Every route is registered through `utoipa_axum::routes!`, which takes
//! the path and method from the handler's `#[utoipa::path]`: the router and
//! the OpenAPI document are built from the same declarations, so the
//! document cannot miss a route (the integration tests check both ways).

pub mod branch;
pub mod document;
pub mod events;
pub mod exec;
pub mod exec_stream;
pub mod extract;
pub mod forward;
pub mod hosts;
pub mod integer;
pub mod leases;
pub mod machines;
pub mod namespaces;
mod paging;
pub mod problem;
pub mod quota;
pub mod snapshots;
pub mod stats;
pub mod tokens;
pub mod tunnel;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::DefaultBodyLimit;
use tokio::sync::watch;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Keys;
use crate::db::Db;
use crate::ratelimit::Limiter;

/// What every handler shares.
pub struct AppState {
    /// The registry `/metrics` serves; the request middleware feeds it.
    pub metrics: Arc<crate::metrics::Metrics>,
    pub db: Db,
    pub keys: Keys,
    pub limiter: Limiter,
    /// Bumped after every machine change this controller makes, so waiters
    /// re-check at once; changes made by other controllers are seen by the
    /// waiters' periodic re-check (`wait_poll`).
    pub changes: watch::Sender<u64>,
    pub wait_poll: Duration,
    /// Set when the controller starts shutting down, so long waits end at
    /// once (with a 503 to retry elsewhere) instead of holding up a
    /// graceful shutdown for minutes.
    pub shutting_down: watch::Sender<bool>,
    /// The brokers' sessions (exec, logs).
    pub hub: crate::session::Hub,
    /// Forwards exec and logs to the controller holding a host's session
    /// when this one does not.
    pub peers: forward::Peers,
}

impl AppState {
    pub fn notify_change(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A watch for the long polls (`wait`, the event feed), made before
    /// their first look so that no change is missed.
    pub fn watch_changes(&self) -> ChangeWatch {
        ChangeWatch {
            changes: self.changes.subscribe(),
            shutting_down: self.shutting_down.subscribe(),
            poll: self.wait_poll,
        }
    }
}

/// What ended a long poll's sleep.
#[derive(Debug, PartialEq, Eq)]
pub enum Woken {
    /// Something may have changed: look again.
    Change,
    Deadline,
    ShuttingDown,
}

/// Sleeps between a long poll's looks at the database: until a change
/// made through this controller, the poll interval (changes made through
/// others), the deadline or the controller's shutdown.
pub struct ChangeWatch {
    changes: watch::Receiver<u64>,
    shutting_down: watch::Receiver<bool>,
    poll: Duration,
}

impl ChangeWatch {
    /// Call before each look: changes until now are what it sees.
    pub fn mark_seen(&mut self) {
        self.changes.borrow_and_update();
    }

    pub async fn sleep(&mut self, deadline: tokio::time::Instant) -> Woken {
        tokio::select! {
            _ = self.changes.changed() => Woken::Change,
            _ = tokio::time::sleep(self.poll) => Woken::Change,
            _ = self.shutting_down.wait_for(|down| *down) => Woken::ShuttingDown,
            _ = tokio::time::sleep_until(deadline) => Woken::Deadline,
        }
    }
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "MicroMachines controller",
        description = "Namespaces, machines, snapshots, hosts and API tokens of a MicroMachines cluster. \
            Errors are RFC 9457 problem documents (application/problem+json) carrying the request id \
            that is also in the X-Request-Id header.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    components(schemas(problem::Problem, exec_stream::ExecStreamRequest, exec_stream::ExecStatus))
)]
struct ApiDoc;

/// Every route, registered with its OpenAPI operation.
fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(namespaces::list, namespaces::create))
        .routes(routes!(namespaces::get, namespaces::delete))
        .routes(routes!(quota::get, quota::set))
        .routes(routes!(machines::list, machines::create))
        .routes(routes!(machines::get, machines::delete))
        .routes(routes!(machines::start))
        .routes(routes!(machines::stop))
        .routes(routes!(machines::suspend))
        .routes(routes!(branch::branch))
        .routes(routes!(snapshots::create, snapshots::list_machine))
        .routes(routes!(snapshots::list))
        .routes(routes!(snapshots::get, snapshots::delete))
        .routes(routes!(snapshots::fork))
        .routes(routes!(machines::wait))
        .routes(routes!(machines::events))
        .routes(routes!(exec::exec))
        .routes(routes!(exec_stream::exec_ws))
        .routes(routes!(exec::logs))
        .routes(routes!(tunnel::connect_ws))
        .routes(routes!(stats::stats))
        .routes(routes!(events::events))
        .routes(routes!(leases::get_lease, leases::acquire_lease, leases::release_lease))
        .routes(routes!(hosts::list, hosts::register))
        .routes(routes!(hosts::get))
        .routes(routes!(hosts::cordon))
        .routes(routes!(hosts::uncordon))
        .routes(routes!(hosts::drain))
        .routes(routes!(hosts::report_state))
        .routes(routes!(tokens::list, tokens::create))
        .routes(routes!(tokens::revoke))
        .routes(routes!(openapi_json))
        .routes(routes!(metrics_text))
}

/// The OpenAPI document, without a database (for `mm-controller openapi`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    document::finish(routes().split_for_parts().1)
}

/// The API's router.
pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> axum::Router {
    let (router, api) = routes().split_for_parts();
    let metrics = Arc::clone(&state.metrics);
    let router = router.with_state(state.clone());
    router
        .layer(axum::Extension(Arc::new(document::finish(api))))
        .fallback(problem::no_route)
        .layer(axum::middleware::from_fn_with_state(metrics, crate::metrics::track))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(problem::request_context))
        .merge(crate::ui::router(state))
}

/// Prometheus/OpenMetrics text: HTTP requests by route, the database
/// pool, leadership, broker sessions, scheduling and lost hosts
/// (controller/README.md, "Metrics"). Cluster admins only, as `/v1/hosts`:
/// give Prometheus a cluster-admin token (`authorization: credentials`).
#[utoipa::path(get, operation_id = "metrics", path = "/metrics", tag = "meta", security(("bearer" = [])),
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text"),
        (status = 401, body = problem::Problem), (status = 403, body = problem::Problem)))]
async fn metrics_text(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    caller: extract::Caller,
) -> Result<axum::response::Response, problem::ApiError> {
    caller.require_cluster_admin()?;
    Ok(crate::metrics::respond(&state.metrics))
}

/// This document. The one route that needs no token: it describes the API,
/// it does not reveal anything in it.
#[utoipa::path(get, operation_id = "openapi_json", path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json(
    axum::Extension(document): axum::Extension<Arc<utoipa::openapi::OpenApi>>,
) -> Json<utoipa::openapi::OpenApi> {
    Json((*document).clone())
}
