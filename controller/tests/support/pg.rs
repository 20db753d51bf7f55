//! A throw-away PostgreSQL 15 cluster for one test binary.
//!
//! Tests talk to a real server (never a mock): the advisory locks, row locks,
//! JSONB containment and unique indexes the controller relies on are exactly
//! what a mock would get wrong. One cluster per test binary (initdb costs a
//! second or two of CPU); one fresh database per test, so tests run in
//! parallel without seeing each other's rows.
//!
//! The cluster listens on a unix socket in its own temporary directory only
//! (`listen_addresses = ''`), so it needs no free port and nothing outside
//! this machine can reach it. Postgres refuses to run as root, so when the
//! tests run as root (CI does) initdb and pg_ctl run as `postgres` through
//! `runuser`. The cluster is stopped and its directory removed when the test
//! binary exits (an `atexit` hook) and, should the binary be killed, by a
//! detached watchdog that notices the test process is gone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use diesel::{Connection, PgConnection, RunQueryDsl};

pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
}

static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// The binary's cluster, started on first use.
pub fn cluster() -> &'static PgCluster {
    CLUSTER.get_or_init(PgCluster::start)
}

/// A new, empty database on the cluster; returns its URL.
pub fn fresh_database() -> String {
    cluster().create_database()
}

fn pg_bin() -> PathBuf {
    std::env::var_os("MM_PG_BIN").map(PathBuf::from).unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into())
}

fn run(mut command: Command, what: &str) {
    let output = command.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl PgCluster {
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn start() -> PgCluster {
        let bin = pg_bin();
        assert!(
            bin.join("initdb").exists(),
            "PostgreSQL 15 binaries not found in {} (scripts/setup.sh installs them)",
            bin.display()
        );
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        // /tmp rather than $TMPDIR: the postgres user must be able to reach
        // it (a TMPDIR under /root would not do), and the socket path must
        // stay under the 107-byte limit.
        let base = if as_postgres { PathBuf::from("/tmp") } else { std::env::temp_dir() };
        let dir = base.join(format!(
            "mm-controller-pg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir(&dir).expect("creating the cluster directory");
        if as_postgres {
            chown_to_postgres(&dir);
        }
        let cluster = PgCluster { dir, bin, as_postgres };
        let data = cluster.dir.join("data");
        let mut initdb = cluster.command("initdb");
        initdb.arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"]);
        run(initdb, "initdb");
        let options = format!(
            "-c listen_addresses='' -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c max_connections=300",
            cluster.dir.display()
        );
        let mut pg_ctl = cluster.command("pg_ctl");
        pg_ctl.arg("-D").arg(&data).arg("-l").arg(cluster.dir.join("log")).args(["-w", "-o", &options, "start"]);
        run(pg_ctl, "pg_ctl start");
        cluster.spawn_watchdog();
        // SAFETY: `stop_at_exit` is an `extern "C" fn()` that stays valid for
        // the life of the process, as atexit(3) requires.
        unsafe { libc::atexit(stop_at_exit) };
        cluster
    }

    /// Stops the cluster once this process is gone, however it ended.
    // Never waited for on purpose: it outlives this process by design.
    #[allow(clippy::zombie_processes)]
    fn spawn_watchdog(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.dir.join("data");
        let runuser = if self.as_postgres { "runuser -u postgres -- " } else { "" };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             [ -d '{data}' ] && {runuser}'{pg_ctl}' -D '{data}' -m immediate stop; rm -rf '{dir}'",
            pid = std::process::id(),
            data = data.display(),
            pg_ctl = pg_ctl.display(),
            dir = self.dir.display(),
        );
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning the cluster watchdog");
    }

    fn stop(&self) {
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = pg_ctl.status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@/{database}?host={}", self.dir.display())
    }

    /// The socket directory (for tests that want to connect themselves).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    fn create_database(&self) -> String {
        let name = format!("t{}_{}", std::process::id(), DATABASES.fetch_add(1, Ordering::SeqCst));
        let mut admin = PgConnection::establish(&self.url("postgres")).expect("connecting to the test cluster");
        diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut admin).expect("CREATE DATABASE");
        self.url(&name)
    }
}

extern "C" fn stop_at_exit() {
    if let Some(cluster) = CLUSTER.get() {
        cluster.stop();
    }
}

fn chown_to_postgres(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let user = c"postgres";
    // SAFETY: `user` is NUL-terminated; the result is checked for null
    // before use and read at once, before another getpw* call can reuse it.
    let pw = unsafe { libc::getpwnam(user.as_ptr()) };
    assert!(!pw.is_null(), "no 'postgres' user: install Debian's postgresql package (scripts/setup.sh)");
    // SAFETY: `pw` was checked to be non-null just above.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let chowned = unsafe { libc::chown(path.as_ptr(), uid, gid) };
    assert_eq!(chowned, 0, "chown {}", dir.display());
}
