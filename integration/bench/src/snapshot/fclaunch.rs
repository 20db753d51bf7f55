//! Starting Firecracker processes and talking to them: directly, or behind
//! Firecracker's own jailer (`--firecracker-jailer`), which is how it runs
//! in production and what mm-vmm's own jail should be compared with; and
//! its REST API over the unix socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::vm::Vm;

/// The unprivileged ids a jailed Firecracker runs as (its jailer's docs
/// advise one per microVM; one for all is enough here).
pub const JAIL_UID: u32 = 52_000;
pub const JAIL_GID: u32 = 52_000;
/// Where Firecracker's jailer puts its cgroups (v1, as on these hosts).
const MEMORY_CGROUP: &str = "/sys/fs/cgroup/memory/firecracker";

/// How Firecracker processes are started.
pub struct Launcher {
    pub binary: PathBuf,
    /// Its jailer: chroot (pivot_root) in a new mount namespace, a memory
    /// cgroup, /dev/kvm made in the chroot, an unprivileged uid/gid, exec.
    pub jailer: Option<PathBuf>,
    /// The memory cgroup's limit, as mm-vmm's jail sets it (RAM + 256 MiB).
    pub memory_limit_bytes: u64,
}

/// Where one Firecracker process's files live on the host and what its API
/// calls them: the chroot's root and `/NAME` when jailed, a plain
/// directory and its full paths when not.
pub struct Place {
    pub dir: PathBuf,
    id: String,
    jailed: bool,
}

impl Place {
    pub fn host(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn api(&self, name: &str) -> String {
        if self.jailed { format!("/{name}") } else { self.host(name).display().to_string() }
    }

    /// Puts `file` into this place as `name`: a hard link (same
    /// filesystem), else a copy. A jailed process sees nothing else.
    pub fn link(&self, file: &Path, name: &str) -> Result<()> {
        let dest = self.host(name);
        if std::fs::hard_link(file, &dest).is_err() {
            std::fs::copy(file, &dest).with_context(|| format!("copying {} to {}", file.display(), dest.display()))?;
        }
        Ok(())
    }

    /// Makes `name` the jailed process's own (a disk it writes).
    pub fn give(&self, name: &str) -> Result<()> {
        if self.jailed {
            std::os::unix::fs::chown(self.host(name), Some(JAIL_UID), Some(JAIL_GID))
                .with_context(|| format!("chown {}", self.host(name).display()))?;
        }
        Ok(())
    }
}

impl Launcher {
    /// The place for process `id` under `run_dir`, created empty.
    pub fn place(&self, run_dir: &Path, id: &str) -> Result<Place> {
        let dir = match self.jailer {
            // The jailer's layout: <base>/<exec file name>/<id>/root.
            Some(_) => run_dir.join("jail/firecracker").join(id).join("root"),
            None => run_dir.join(id),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Place { dir, id: id.to_string(), jailed: self.jailer.is_some() })
    }

    /// Starts Firecracker for `place`, its API socket at `api.sock` there,
    /// filtered by its default seccomp policy (no `--no-seccomp`). Jailed,
    /// the jailer execs Firecracker in its own process (no `--new-pid-ns`,
    /// no `--daemonize`), so the pid and the console pipe stay ours.
    pub fn spawn(&self, place: &Place, name: &str, log: PathBuf) -> Result<Vm> {
        self.spawn_in(place, name, log, None)
    }

    /// [`Launcher::spawn`] in the network namespace `netns` (a name under
    /// /run/netns), where Firecracker opens its TAP by name: joined by the
    /// jailer's `--netns`, or before exec when unjailed.
    pub fn spawn_in(&self, place: &Place, name: &str, log: PathBuf, netns: Option<&str>) -> Result<Vm> {
        let fc_args = ["--api-sock", &place.api("api.sock"), "--level", "Warning"];
        let cmd = match &self.jailer {
            None => {
                let mut cmd = Command::new(&self.binary);
                cmd.args(fc_args).args(["--id", &place.id]);
                if let Some(netns) = netns {
                    mm_integration::netns::enter_before_exec(&mut cmd, netns)?;
                }
                cmd
            }
            Some(jailer) => {
                let base = place.dir.ancestors().nth(3).context("jail layout")?;
                let mut cmd = Command::new(jailer);
                cmd.args(["--id", &place.id])
                    .arg("--exec-file")
                    .arg(&self.binary)
                    .args(["--uid", &JAIL_UID.to_string(), "--gid", &JAIL_GID.to_string()])
                    .arg("--chroot-base-dir")
                    .arg(base)
                    .args(["--cgroup-version", "1"])
                    .arg("--cgroup")
                    .arg(format!("memory.limit_in_bytes={}", self.memory_limit_bytes));
                if let Some(netns) = netns {
                    cmd.arg("--netns").arg(format!("/run/netns/{netns}"));
                }
                cmd.arg("--").args(fc_args);
                cmd
            }
        };
        Vm::spawn(name, cmd, Some(log))
    }

    /// Removes what the jailer leaves once the process is gone: its
    /// cgroup directory.
    pub fn clean_up(&self, place: &Place) {
        if self.jailer.is_some() {
            let _ = std::fs::remove_dir(Path::new(MEMORY_CGROUP).join(&place.id));
            let _ = std::fs::remove_dir(MEMORY_CGROUP);
        }
    }
}

/// Firecracker's REST API over its unix socket: one HTTP/1.1 request per
/// connection, JSON in, status (and error text) out.
pub struct Api(pub PathBuf);

impl Api {
    fn call(&self, method: &str, uri: &str, body: &Value) -> Result<()> {
        let mut stream = UnixStream::connect(&self.0).with_context(|| format!("connecting to {}", self.0.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let body = body.to_string();
        // One write: the request goes out whole.
        let request = format!(
            "{method} {uri} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes())?;
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status)?;
        let mut length = 0;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header == "\r\n" {
                break;
            }
            if let Some((key, value)) = header.split_once(':')
                && key.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut text = vec![0u8; length];
        reader.read_exact(&mut text)?;
        let code: u16 = status.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        if !(200..300).contains(&code) {
            bail!("Firecracker {method} {uri}: {} {}", status.trim(), String::from_utf8_lossy(&text));
        }
        Ok(())
    }

    pub fn put(&self, uri: &str, body: Value) -> Result<()> {
        self.call("PUT", uri, &body)
    }

    pub fn patch(&self, uri: &str, body: Value) -> Result<()> {
        self.call("PATCH", uri, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_name_files_for_the_host_and_the_api() {
        let run_dir = Path::new("/x/run");
        let direct = Place { dir: run_dir.join("boot"), id: "boot".into(), jailed: false };
        assert_eq!(direct.api("api.sock"), "/x/run/boot/api.sock");
        let jailed = Place { dir: run_dir.join("jail/firecracker/boot/root"), id: "boot".into(), jailed: true };
        assert_eq!(jailed.api("api.sock"), "/api.sock");
        assert_eq!(jailed.host("api.sock"), Path::new("/x/run/jail/firecracker/boot/root/api.sock"));
        assert_eq!(jailed.dir.ancestors().nth(3), Some(Path::new("/x/run/jail")));
    }

    #[test]
    fn api_errors_carry_firecrackers_text() {
        let dir = std::env::temp_dir().join(format!("mm-bench-fcapi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for answer in ["HTTP/1.1 204 \r\n\r\n", "HTTP/1.1 400 \r\nContent-Length: 9\r\n\r\n{\"e\":\"x\"}"] {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).unwrap();
                s.write_all(answer.as_bytes()).unwrap();
            }
        });
        let api = Api(path);
        api.put("/vsock", serde_json::json!({})).unwrap();
        let err = api.patch("/vm", serde_json::json!({})).unwrap_err();
        assert!(format!("{err:#}").contains("{\"e\":\"x\"}"), "{err:#}");
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
