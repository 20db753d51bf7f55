//! `mm-controller`: serves the REST API; `mm-controller mint-token` prints a
//! token signed with the HS256 secret (how the first cluster admin gets in).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mm_controller::auth::{Claims, Keys, Role};
use mm_controller::ratelimit::RateLimit;
use mm_controller::{Config, Controller};

#[derive(Debug, Parser)]
#[command(
    name = "mm-controller",
    version,
    about = "MicroMachines cluster controller",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// PostgreSQL URL, e.g. postgres://mm@localhost/mm or
    /// postgres:///mm?host=/run/postgresql.
    #[arg(long, env = "MM_DATABASE_URL")]
    database_url: Option<String>,
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The URL other controllers reach this one's API at, e.g.
    /// http://10.0.0.2:8080: they forward exec and logs for the hosts
    /// whose brokers dialled this controller there. Default: http:// and
    /// --listen, unless that is a wildcard address (then none, and the
    /// others answer 503 for those hosts).
    #[arg(long, env = "MM_ADVERTISE_URL")]
    advertise_url: Option<String>,
    #[command(flatten)]
    secret: Secret,
    /// PEM RSA public key for RS256 tokens from an external issuer.
    #[arg(long)]
    jwt_rs256_public_key: Option<PathBuf>,
    /// Sustained requests per second per token.
    #[arg(long, default_value_t = 20.0)]
    rate_limit_per_second: f64,
    /// Burst of requests per token.
    #[arg(long, default_value_t = 40)]
    rate_limit_burst: u32,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    max_body_bytes: usize,
    #[command(flatten)]
    brokers: BrokerArgs,
    /// Log lines as `text` or `json` (one object per line, with the
    /// request id of the request being served).
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Text (colours only on a terminal) or JSON lines on stderr; `RUST_LOG`
/// filters.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
}

/// Where brokers dial in (mutual TLS; scripts/dev-ca.sh makes dev certs).
#[derive(Debug, clap::Args)]
struct BrokerArgs {
    /// Address to accept broker sessions on; without it, none.
    #[arg(long, requires_all = ["tls_cert", "tls_key", "tls_ca"])]
    broker_listen: Option<SocketAddr>,
    /// The controller's certificate (PEM) for brokers.
    #[arg(long, requires = "broker_listen")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "broker_listen")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) that signs brokers' client certificates.
    #[arg(long, requires = "broker_listen")]
    tls_ca: Option<PathBuf>,
    /// Seconds without a heartbeat after which a host is lost and its
    /// machines are re-placed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat_timeout: u64,
}

#[derive(Debug, clap::Args)]
struct Secret {
    /// HS256 secret (at least 32 bytes); prefer the environment variable,
    /// which other users cannot read from the process list.
    #[arg(long, env = "MM_JWT_HS256_SECRET", hide_env_values = true)]
    jwt_hs256_secret: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints the OpenAPI document (for client generators and API
    /// testers; the server also serves it at /v1/openapi.json).
    Openapi,
    /// Prints a token signed with the HS256 secret (not recorded in the
    /// database, but revocable by its id).
    MintToken {
        #[command(flatten)]
        secret: Secret,
        #[arg(long)]
        subject: String,
        /// NAMESPACE=ROLE (admin, operator, viewer); repeatable.
        #[arg(long = "role")]
        roles: Vec<String>,
        #[arg(long)]
        cluster_admin: bool,
        /// Seconds until it expires.
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
    },
}

fn secret(secret: Secret) -> Result<Vec<u8>> {
    Ok(secret.jwt_hs256_secret.context("--jwt-hs256-secret (or MM_JWT_HS256_SECRET) is required")?.into_bytes())
}

fn mint(secret: Vec<u8>, subject: String, roles: Vec<String>, cluster_admin: bool, ttl: i64) -> Result<()> {
    let keys = Keys::new(&secret, None)?;
    let mut map = BTreeMap::new();
    for role in roles {
        let (ns, r) = role.split_once('=').with_context(|| format!("--role {role:?} is not NAMESPACE=ROLE"))?;
        let r: Role = serde_json::from_value(serde_json::Value::String(r.to_owned()))
            .with_context(|| format!("unknown role {r:?} (admin, operator, viewer)"))?;
        map.insert(ns.to_owned(), r);
    }
    if map.is_empty() && !cluster_admin {
        bail!("give at least one --role or --cluster-admin");
    }
    let now = chrono::Utc::now().timestamp();
    let claims = Claims {
        sub: subject,
        jti: uuid::Uuid::new_v4().to_string(),
        exp: now + ttl,
        iat: Some(now),
        roles: map,
        cluster_admin,
    };
    println!("{}", keys.mint(&claims));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    match args.command {
        Some(Command::MintToken { secret: s, subject, roles, cluster_admin, ttl }) => {
            return mint(secret(s)?, subject, roles, cluster_admin, ttl);
        }
        Some(Command::Openapi) => {
            println!("{}", mm_controller::api::openapi().to_pretty_json()?);
            return Ok(());
        }
        None => {}
    }
    let database_url = args.database_url.context("--database-url (or MM_DATABASE_URL) is required")?;
    let mut config = Config::new(database_url, secret(args.secret)?);
    if let Some(path) = &args.jwt_rs256_public_key {
        config.jwt_rs256_public_key_pem =
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    }
    config.rate_limit = RateLimit { per_second: args.rate_limit_per_second, burst: args.rate_limit_burst };
    config.max_body_bytes = args.max_body_bytes;
    config.heartbeat_timeout = std::time::Duration::from_secs(args.brokers.heartbeat_timeout);
    config.advertise_url = args.advertise_url.or_else(|| default_advertise_url(args.listen));
    if config.advertise_url.is_none() && args.brokers.broker_listen.is_some() {
        tracing::warn!(
            listen = %args.listen,
            "no --advertise-url and --listen is a wildcard address: other controllers cannot forward exec and logs here"
        );
    }
    if let Some(addr) = args.brokers.broker_listen {
        let tls = mm_controller::session::TlsFiles {
            cert: args.brokers.tls_cert.context("--tls-cert")?,
            key: args.brokers.tls_key.context("--tls-key")?,
            ca: args.brokers.tls_ca.context("--tls-ca")?,
        };
        config.broker_listen = Some(mm_controller::session::BrokerListen { addr, tls });
    }
    let controller = Controller::start(config).await.context("starting the controller")?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, brokers = ?controller.broker_addr(), "mm-controller serving /v1");
    controller.serve(listener, shutdown_signal()).await.context("serving HTTP")?;
    Ok(())
}

/// `http://` + the listening address, when peers can dial that address
/// (a wildcard such as 0.0.0.0 names no interface).
fn default_advertise_url(listen: SocketAddr) -> Option<String> {
    (!listen.ip().is_unspecified()).then(|| format!("http://{listen}"))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
