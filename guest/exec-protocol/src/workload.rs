//! The workload of a warm-started guest.
//!
//! Booting a guest costs far more than running most workloads in it, so a
//! host may boot a guest once per image with `mm.wait` on its kernel
//! command line, snapshot it once it waits (mm-init prints
//! `mm-init: waiting for a workload`), and restore that snapshot for every
//! run. The restored guest was never told what to run: the host sends a
//! [`Workload`] as the first frame of a connection (type `0x07`, see the
//! crate documentation), and PID 1 runs it as it would have run `mm.cmd`
//! and `mm.env` from the command line: the console as its stdio, its exit
//! status reported to mm-vmm, then a reset. It is PID 1's one workload,
//! not an exec: nothing of it flows back over the connection.

use serde::{Deserialize, Serialize};

/// What PID 1 runs once, in place of the kernel command line's `mm.cmd`
/// and `mm.env`. Missing JSON fields take their defaults and unknown ones
/// are ignored, as for the command line, where every part is optional.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Workload {
    /// The program and its arguments; `argv[0]` is looked up in `PATH`
    /// unless it holds a `/`. Empty: the default shell, `/bin/sh`, as when
    /// the command line names no command.
    pub argv: Vec<String>,
    /// Environment on top of PID 1's defaults for its workload (`PATH`,
    /// `HOME`, `TERM`), like `mm.env`: an image's `ENV` goes here.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when absent, as for a command-line workload.
    pub cwd: Option<String>,
}

impl Workload {
    /// A workload running `argv` (empty: the default shell) with no extra
    /// environment, in `/`.
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        Workload { argv: argv.into_iter().map(Into::into).collect(), ..Workload::default() }
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_is_the_documented_one() {
        let workload = Workload::new(["nginx", "-g", "daemon off;"]).env("A", "b c").cwd("/srv");
        let json = serde_json::to_value(&workload).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"argv": ["nginx", "-g", "daemon off;"], "env": [["A", "b c"]], "cwd": "/srv"})
        );
        assert_eq!(serde_json::from_value::<Workload>(json).unwrap(), workload);
    }

    #[test]
    fn missing_fields_default_and_unknown_ones_are_ignored() {
        let empty: Workload = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, Workload::default());
        assert!(empty.argv.is_empty(), "no argv: the default shell");
        let workload: Workload = serde_json::from_str(r#"{"argv":["true"],"user":"nobody"}"#).unwrap();
        assert_eq!(workload, Workload::new(["true"]));
    }

    #[test]
    fn garbage_json_is_an_error() {
        for garbage in ["", "null", "[1]", "\"true\"", r#"{"argv":"true"}"#, r#"{"env":{"A":"b"}}"#, r#"{"cwd":1}"#] {
            assert!(serde_json::from_str::<Workload>(garbage).is_err(), "{garbage:?}");
        }
    }
}
