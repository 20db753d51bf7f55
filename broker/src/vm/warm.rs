//! What follows the start of a microVM that was not simply booted with its
//! workload (see `crate::warm`): a resumed guest takes its identity; a warm
//! template, once mm-init waits, becomes its key's warm snapshot; and a
//! guest that waits is handed its workload through the exec agent.

use std::rc::Rc;
use std::time::{Duration, Instant};

use mm_exec_protocol::{ExecClient, ExecError, Workload};
use serde_json::json;

use super::Vm;
use crate::launch::CONSOLE_LOG;
use crate::record::VmState;
use crate::snapshot::{self, SnapshotKind};
use crate::warm::WarmCache;

/// mm-init's console line once it waits for its workload (`mm.wait`).
const WAITING_LINE: &str = "mm-init: waiting for a workload";
/// A cold boot on a loaded PVM host can take minutes.
const TEMPLATE_BOOT_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long an agent that is up may take to accept the workload.
const HAND_TIMEOUT: Duration = Duration::from_secs(60);

impl Vm {
    /// One request to the guest's exec agent, retried for up to `timeout`
    /// while the agent is not reachable yet or the connection is cut by
    /// the guest's vsock transport reset: a resumed guest may accept a
    /// connection and only then handle the reset event, which resets it
    /// (seen as the guest closing before its answer). Every request sent
    /// this way (identity, workload) is safe to repeat; how many were cut
    /// is counted for the caller ([`Vm::had_cut_attempt`]).
    pub(super) async fn with_agent(
        &self,
        timeout: Duration,
        call: impl Fn(ExecClient) -> Result<(), ExecError> + Send + Sync + Clone + 'static,
    ) -> Result<(), ExecError> {
        let began = Instant::now();
        loop {
            let (dir, call) = (self.dir.clone(), call.clone());
            let attempt = tokio::task::spawn_blocking(move || call(crate::exec::connect_agent(&dir)?))
                .await
                .unwrap_or_else(|e| Err(ExecError::Io(std::io::Error::other(e.to_string()))));
            let retry = match &attempt {
                Ok(()) => return Ok(()),
                Err(ExecError::Refused { .. } | ExecError::Connect { .. }) => true,
                Err(ExecError::Disconnected | ExecError::Io(_)) => {
                    self.cut_attempts.set(self.cut_attempts.get() + 1);
                    true
                }
                Err(_) => false,
            };
            if !retry || began.elapsed() > timeout || self.state() != VmState::Running {
                return attempt;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether an agent request of this start was cut after it was sent.
    fn had_cut_attempt(&self) -> bool {
        self.cut_attempts.get() > 0
    }

    /// `console_start`: the console log's length before this start.
    pub(super) async fn after_start(self: Rc<Vm>, console_start: u64) {
        if !self.take_identity().await {
            return;
        }
        let record = self.record();
        if let Some(key) = record.warm_template.clone() {
            if !self.wait_for_console(WAITING_LINE, console_start, TEMPLATE_BOOT_TIMEOUT).await {
                return; // it ended (the reason is in its state) or never came up
            }
            self.make_warm_snapshot(&key);
        }
        if record.hand_workload {
            self.hand_workload().await;
        }
    }

    /// Polls the console log for `line`, printed after this start (the log
    /// goes on across restarts), while the microVM runs.
    async fn wait_for_console(&self, line: &str, console_start: u64, timeout: Duration) -> bool {
        let path = self.dir.join(CONSOLE_LOG);
        let mut skip = console_start as usize;
        let began = Instant::now();
        while self.state() == VmState::Running {
            let log = crate::safe_fs::read(&path).unwrap_or_default();
            // Rotated (vm/console.rs) since: the new log is all new.
            if log.len() < skip {
                skip = 0;
            }
            if log.get(skip..).is_some_and(|new| String::from_utf8_lossy(new).contains(line)) {
                return true;
            }
            if began.elapsed() > timeout {
                self.kill("mm-init did not come up to wait for its workload");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// Snapshots the waiting guest into the warm cache. A failure costs
    /// only the cache entry: this microVM goes on to its workload.
    fn make_warm_snapshot(&self, key: &str) {
        let (Some(dir), Some(control)) = (self.config.warm_cache.clone(), self.vmm_control()) else { return };
        let cache = WarmCache::new(dir);
        let record = self.record();
        let tmp = cache.temporary_dir(key, &record.id);
        let manifest = snapshot::manifest_for(
            &record,
            key.to_string(),
            String::new(),
            SnapshotKind::Snapshot,
            &self.config.builtin_image,
        );
        let made = cache
            .ensure()
            .map_err(crate::BrokerError::io("creating the warm cache"))
            .and_then(|()| snapshot::take(&control, &self.dir, &tmp, manifest))
            .and_then(|m| cache.commit(key, &tmp).map(|()| m).map_err(crate::BrokerError::io("publishing")));
        match made {
            Ok(m) => self.audit.record("warm-snapshot", json!({ "key": key, "pause_us": m.pause_us })),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                self.audit.record("warm-snapshot-failed", json!({ "key": key, "error": e.to_string() }));
            }
        }
    }

    /// Hands the waiting guest its workload (command and environment), as
    /// the kernel command line does for a cold boot.
    async fn hand_workload(&self) {
        let record = self.record();
        let workload = Workload { argv: record.command.clone(), env: record.env.clone(), cwd: None };
        self.cut_attempts.set(0);
        let began = Instant::now();
        let result = match self.with_agent(HAND_TIMEOUT, move |client| client.start_workload(&workload)).await {
            // An earlier attempt was cut after the guest took the workload
            // (its vsock reset), so this one finds it no longer waiting.
            Err(ExecError::Remote(e)) if e.contains("not waiting") && self.had_cut_attempt() => Ok(()),
            other => other,
        };
        match result {
            Ok(()) => {
                self.audit.record("workload", json!({ "after_ms": began.elapsed().as_millis() as u64 }));
                self.update(|r| {
                    r.hand_workload = false;
                    r.warm_template = None;
                });
            }
            Err(e) => {
                self.audit.record("workload-failed", json!({ "error": e.to_string() }));
                self.kill("the guest did not take its workload");
            }
        }
    }
}
