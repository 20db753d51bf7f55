//! `mm-controller`: the cluster's control plane.
//!
//! Desired state lives in PostgreSQL (through diesel, migrations embedded
//! and applied at start), so a controller keeps nothing that a restart could
//! lose and several controllers can serve one database. The REST API
//! (`api`) authenticates JWTs and enforces namespace-scoped roles on every
//! route; the scheduler (`scheduler`) is a pure function the create path
//! calls under a placement lock; one controller at a time (`leader`) runs
//! the reconcile loop.
//!
//! Brokers dial in over mutual TLS and hold a Cap'n Proto session
//! (`session`): they register their capacity, heart-beat and report what
//! they observe, and the controller holding a broker's session drives that
//! host's machines through the broker's own capability (and runs exec and
//! logs through it; the other controllers forward theirs to it, see
//! `api::forward`). The leader marks hosts whose broker went silent lost
//! and re-places their machines.

pub mod api;
pub mod auth;
pub mod db;
pub mod leader;
pub mod machine;
pub mod metrics;
pub mod ratelimit;
pub mod scheduler;
pub mod session;
pub mod store;
pub mod ui;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::AppState;
use crate::auth::{KeyError, Keys};
use crate::db::{Db, DbError};
use crate::leader::Leader;
use crate::ratelimit::{Limiter, RateLimit};
use crate::session::{BrokerListen, Hub, Timing};

/// Everything a controller needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    /// At least 32 bytes.
    pub jwt_hs256_secret: Vec<u8>,
    /// PEM, for tokens minted by an external issuer.
    pub jwt_rs256_public_key_pem: Option<Vec<u8>>,
    pub rate_limit: RateLimit,
    pub max_body_bytes: usize,
    pub max_connections: u32,
    /// How often the leader reconciles (and others try to lead).
    pub reconcile_interval: Duration,
    /// How often a waiter re-reads the database for changes made by other
    /// controllers.
    pub wait_poll_interval: Duration,
    /// Where brokers dial in over mutual TLS; none: no broker sessions on
    /// this controller.
    pub broker_listen: Option<BrokerListen>,
    /// A host whose broker has not heart-beaten for this long is lost and
    /// its machines are re-placed. Brokers are told to heart-beat four
    /// times as often.
    pub heartbeat_timeout: Duration,
    /// The base URL other controllers reach this one's API at
    /// (`http://10.0.0.2:8080`); recorded with every broker session held
    /// here, so they can forward exec and logs. None: they cannot, and
    /// answer 503 for this controller's hosts.
    pub advertise_url: Option<String>,
}

impl Config {
    /// A configuration with the defaults the binary uses.
    pub fn new(database_url: impl Into<String>, jwt_hs256_secret: impl Into<Vec<u8>>) -> Config {
        Config {
            database_url: database_url.into(),
            jwt_hs256_secret: jwt_hs256_secret.into(),
            jwt_rs256_public_key_pem: None,
            rate_limit: RateLimit { per_second: 20.0, burst: 40 },
            max_body_bytes: 64 * 1024,
            max_connections: 16,
            reconcile_interval: Duration::from_secs(1),
            wait_poll_interval: Duration::from_millis(500),
            broker_listen: None,
            heartbeat_timeout: Duration::from_secs(30),
            advertise_url: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("starting the database connection task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("broker sessions: {0}")]
    Sessions(#[from] session::StartError),
    #[error(transparent)]
    Forward(#[from] api::forward::ForwardError),
}

/// A started controller: the database is migrated and the reconcile loop
/// runs. Dropping it stops the loop (and gives up leadership).
pub struct Controller {
    state: Arc<AppState>,
    max_body_bytes: usize,
    leader: Leader,
    /// Ends the session thread when the controller is dropped.
    sessions_shutdown: watch::Sender<bool>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.sessions_shutdown.send_replace(true);
    }
}

impl Controller {
    pub async fn start(config: Config) -> Result<Controller, StartError> {
        let keys = Keys::new(&config.jwt_hs256_secret, config.jwt_rs256_public_key_pem.as_deref())?;
        let advertise_url = config.advertise_url.as_deref().map(api::forward::advertise_url).transpose()?;
        let peers = api::forward::Peers::new(advertise_url.clone())?;
        let (url, max) = (config.database_url.clone(), config.max_connections);
        let db = tokio::task::spawn_blocking(move || Db::connect(&url, max)).await??;
        let (changes, _) = watch::channel(0);
        let (sessions_shutdown, shutdown) = watch::channel(false);
        let hub = match &config.broker_listen {
            Some(listen) => {
                let heartbeat =
                    (config.heartbeat_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
                let timing = Timing { heartbeat, reconcile: config.reconcile_interval };
                Hub::start(listen, db.clone(), changes.clone(), timing, advertise_url, shutdown)?
            }
            None => Hub::disabled(),
        };
        let leader = Leader::spawn(db.clone(), config.reconcile_interval, config.heartbeat_timeout, changes.clone());
        let metrics = Arc::new(metrics::Metrics::new(db.clone(), leader.flag()));
        let state = Arc::new(AppState {
            metrics,
            db,
            keys,
            limiter: Limiter::new(config.rate_limit),
            changes,
            wait_poll: config.wait_poll_interval,
            shutting_down: watch::channel(false).0,
            hub,
            peers,
        });
        Ok(Controller { state, max_body_bytes: config.max_body_bytes, leader, sessions_shutdown })
    }

    /// Where brokers dial in, if this controller accepts them.
    pub fn broker_addr(&self) -> Option<std::net::SocketAddr> {
        self.state.hub.local_addr()
    }

    /// The HTTP API.
    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone(), self.max_body_bytes)
    }

    /// The OpenAPI document the router serves.
    pub fn openapi(&self) -> utoipa::openapi::OpenApi {
        api::openapi()
    }

    pub fn is_leader(&self) -> bool {
        self.leader.is_leader()
    }

    /// Serves the API until `shutdown` resolves, then lets requests in
    /// flight finish (waits end at once with a 503).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let shutdown = async move {
            shutdown.await;
            state.shutting_down.send_replace(true);
        };
        axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await
    }
}
