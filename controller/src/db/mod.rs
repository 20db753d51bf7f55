//! The PostgreSQL connection pool and the embedded migrations.
//!
//! diesel is synchronous. We use diesel's own `r2d2` pool and run each unit
//! of database work on tokio's blocking pool (`Db::run`), rather than
//! `deadpool-diesel`: deadpool's `interact` does the very same
//! `spawn_blocking` underneath, but is one more crate whose diesel version must
//! move in lockstep with ours, and r2d2 ships with diesel. Every closure
//! passed to `run` is one short transaction, so a blocking thread is never
//! held across an `.await`.

pub mod models;
pub mod schema;

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

/// The SQL in `controller/migrations`, compiled into the binary so a
/// controller never runs against a schema it does not know.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Advisory lock keys. Postgres advisory locks live in one 64-bit space per
/// database, so each use gets a fixed, distinct key ("mmctl" in ASCII plus a
/// small suffix makes collisions with other software unlikely).
pub mod lock_keys {
    /// Held (session level) by the one controller that runs the reconcile
    /// loop.
    pub const LEADER: i64 = 0x6d6d_6374_6c00_0001;
    /// Held (transaction level) while reading capacity and writing a
    /// placement, so two controllers never fill the same free space.
    pub const PLACEMENT: i64 = 0x6d6d_6374_6c00_0002;
    /// Held (session level) while applying migrations, so controllers that
    /// start together do not race on the schema.
    pub const MIGRATIONS: i64 = 0x6d6d_6374_6c00_0003;
}

/// A connection from the pool.
pub type Conn = PooledConnection<ConnectionManager<PgConnection>>;

/// Failures below the query level.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot build the connection pool for the database: {0}")]
    Pool(#[source] diesel::r2d2::PoolError),
    #[error("no database connection available: {0}")]
    Checkout(#[source] diesel::r2d2::PoolError),
    #[error("database migration failed: {0}")]
    Migration(String),
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("database task panicked or was cancelled: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Connections of the pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolState {
    pub connections: u32,
    pub idle: u32,
    pub max: u32,
}

/// The pool, cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: Pool<ConnectionManager<PgConnection>>,
    url: String,
}

impl Db {
    /// Connects (failing fast if the database is unreachable) and applies
    /// pending migrations.
    pub fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        let manager = ConnectionManager::<PgConnection>::new(url);
        let pool = Pool::builder()
            .max_size(max_connections)
            // Grow on demand: most controllers idle most of the time.
            .min_idle(Some(2))
            .connection_timeout(Duration::from_secs(10))
            .test_on_check_out(true)
            .build(manager)
            .map_err(DbError::Pool)?;
        let db = Db { pool, url: url.to_owned() };
        db.migrate()?;
        Ok(db)
    }

    fn migrate(&self) -> Result<(), DbError> {
        let mut conn = self.pool.get().map_err(DbError::Checkout)?;
        let lock = format!("SELECT pg_advisory_lock({})", lock_keys::MIGRATIONS);
        conn.batch_execute(&lock)?;
        let result = conn.run_pending_migrations(MIGRATIONS).map(|_| ()).map_err(|e| DbError::Migration(e.to_string()));
        // Unlock even after a failure: the connection goes back to the pool.
        let unlock = format!("SELECT pg_advisory_unlock({})", lock_keys::MIGRATIONS);
        conn.batch_execute(&unlock)?;
        result
    }

    /// The pool's connections now (for the metrics).
    pub fn pool_state(&self) -> PoolState {
        let state = self.pool.state();
        PoolState { connections: state.connections, idle: state.idle_connections, max: self.pool.max_size() }
    }

    /// Runs `work` with a pooled connection on the blocking pool.
    pub async fn run<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: FnOnce(&mut PgConnection) -> Result<T, E> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get().map_err(|e| E::from(DbError::Checkout(e)))?;
            work(&mut conn)
        })
        .await
        .map_err(|e| E::from(DbError::Join(e)))?
    }

    /// A connection outside the pool, for session-level advisory locks: a
    /// pooled connection would go back to the pool still holding the lock.
    pub fn dedicated_connection(&self) -> Result<PgConnection, diesel::ConnectionError> {
        use diesel::Connection;
        PgConnection::establish(&self.url)
    }
}
