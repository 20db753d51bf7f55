//! A real `mm-broker` for end-to-end tests, in a scratch state directory
//! with its own socket and its own microVM network namespace, driven
//! through the real `mmctl`. Dropping it removes every microVM it still has
//! (`mmctl rm -f`), ends the broker by its pid and deletes the namespace,
//! so nothing is left behind.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::devices::Scratch;
use crate::{Run, guest_kernel, guest_rootfs, run_with_timeout, workspace_binary};

pub struct TestBroker {
    child: Option<Child>,
    pub dir: Scratch,
    pub socket: PathBuf,
    extra_args: Vec<String>,
    /// The namespace the broker puts its bridge in (deleted on drop).
    pub netns: Option<String>,
    /// A test's namespace the broker itself runs in (its "host"), if any.
    host_netns: Option<String>,
}

impl TestBroker {
    /// Starts a broker; `extra_args` go on its command line. Its microVM
    /// network gets a namespace of its own (`mm-test-PID-NAME`) unless the
    /// arguments choose otherwise.
    pub fn start(name: &str, extra_args: &[&str]) -> Result<TestBroker> {
        Self::start_in(None, name, extra_args)
    }

    /// Starts a broker inside the test's network namespace `host_netns`,
    /// which plays the host's root namespace for it.
    pub fn start_in(host_netns: Option<&str>, name: &str, extra_args: &[&str]) -> Result<TestBroker> {
        let dir = Scratch::new(name)?;
        let socket = dir.path("broker.sock");
        let mut extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let chooses = ["--netns", "--bridge-in-host-netns", "--no-network"];
        let netns = if extra_args.iter().any(|a| chooses.contains(&a.as_str())) {
            extra_args.iter().position(|a| a == "--netns").and_then(|i| extra_args.get(i + 1).cloned())
        } else {
            let netns = format!("mm-test-{}-{name}", std::process::id());
            extra_args.extend(["--netns".to_string(), netns.clone()]);
            Some(netns)
        };
        let mut broker =
            TestBroker { child: None, dir, socket, extra_args, netns, host_netns: host_netns.map(str::to_string) };
        broker.spawn()?;
        Ok(broker)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path("broker.log"))?;
        let mut cmd = Command::new(workspace_binary("mm-broker")?);
        if let Some(netns) = &self.host_netns {
            crate::netns::enter_before_exec(&mut cmd, netns)?;
        }
        let child = cmd
            .arg("--state-dir")
            .arg(self.dir.path("state"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--kernel")
            .arg(guest_kernel()?)
            .arg("--builtin-image")
            .arg(guest_rootfs()?)
            .args(self.warm_cache_args())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning mm-broker")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("mm-broker exited with {status}; log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("mm-broker did not listen within 20 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Every test broker shares one warm cache in the state directory (its
    /// entries are keyed by kernel, image, mm-vmm and shape), so only the
    /// first microVM of a shape in a whole test run boots; the others
    /// restore its post-boot snapshot. A test that chooses otherwise says
    /// `--warm-cache` or `--no-warm-starts` itself.
    fn warm_cache_args(&self) -> Vec<String> {
        let chooses = ["--warm-cache", "--no-warm-starts"];
        if self.extra_args.iter().any(|a| chooses.contains(&a.as_str())) {
            return Vec::new();
        }
        vec!["--warm-cache".into(), crate::state_dir().join("warm-test").display().to_string()]
    }

    /// SIGKILLs the broker (microVMs keep running) and starts a new one on
    /// the same state directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
        self.spawn()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own unreaped child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("broker.log")).unwrap_or_default()
    }

    /// `mmctl --socket SOCKET ARGS`, to run as the caller likes.
    pub fn mmctl_command(&self, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(workspace_binary("mmctl")?);
        cmd.arg("--socket").arg(&self.socket).args(args);
        Ok(cmd)
    }

    /// Runs `mmctl ARGS` against this broker.
    pub fn mmctl(&self, args: &[&str], timeout: Duration) -> Result<Run> {
        run_with_timeout(self.mmctl_command(args)?, timeout)
    }

    /// `mmctl exec VM -- ARGS`, retried while the guest is still booting
    /// (its exec agent not listening yet), for up to `timeout`.
    pub fn exec_when_ready(&self, vm: &str, args: &[&str], timeout: Duration) -> Result<Run> {
        let deadline = Instant::now() + timeout;
        let mut full = vec!["exec", vm, "--"];
        full.extend_from_slice(args);
        loop {
            let run = self.mmctl(&full, Duration::from_secs(120))?;
            let booting = run.stderr.contains("exec agent") && run.status == Some(4);
            if !booting || Instant::now() > deadline {
                return Ok(run);
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// `mmctl inspect -o json VM` as JSON.
    pub fn inspect(&self, vm: &str) -> Result<serde_json::Value> {
        let run = self.mmctl(&["inspect", "-o", "json", vm], Duration::from_secs(30))?;
        if run.status != Some(0) {
            bail!("mmctl inspect {vm} failed: {}", run.stderr);
        }
        Ok(serde_json::from_str(&run.stdout)?)
    }

    /// Polls until `vm`'s console log contains `needle`.
    pub fn wait_for_log(&self, vm: &str, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self.mmctl(&["logs", vm], Duration::from_secs(30))?;
            if run.stdout.contains(needle) {
                return Ok(run.stdout);
            }
            if Instant::now() > deadline {
                bail!("{vm}'s console has no {needle:?} after {timeout:?}:\n{}", run.stdout);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Ok(run) = self.mmctl(&["ps", "-o", "json"], Duration::from_secs(30))
            && let Ok(serde_json::Value::Array(vms)) = serde_json::from_str::<serde_json::Value>(&run.stdout)
        {
            for vm in vms {
                if let Some(id) = vm["id"].as_str() {
                    let _ = self.mmctl(&["rm", "-f", id], Duration::from_secs(60));
                }
            }
        }
        self.kill();
        if let Some(netns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
    }
}
