//! What to run, and how it ended.

use serde::{Deserialize, Serialize};

/// The first frame of every connection: the command to run and its
/// surroundings. Missing fields take their defaults, so older or simpler
/// hosts may send just `{"argv": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The program and its arguments; `argv[0]` is looked up in `PATH`
    /// unless it holds a `/`.
    pub argv: Vec<String>,
    /// Extra environment, on top of the agent's defaults (`PATH`, `HOME`, …).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; the user's home (or `/`) when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// `name`, `uid` or either followed by `:group`/`:gid`; root when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Run on a pseudo-terminal: stdout and stderr merge into stdout.
    #[serde(default)]
    pub tty: bool,
    /// Initial terminal size (only with `tty`).
    #[serde(default = "default_rows")]
    pub rows: u16,
    #[serde(default = "default_cols")]
    pub cols: u16,
}

fn default_rows() -> u16 {
    24
}

fn default_cols() -> u16 {
    80
}

impl ExecRequest {
    /// A request for `argv` with every other field at its default.
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            user: None,
            tty: false,
            rows: default_rows(),
            cols: default_cols(),
        }
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    pub fn tty(mut self, rows: u16, cols: u16) -> Self {
        self.tty = true;
        self.rows = rows;
        self.cols = cols;
        self
    }
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code (0-255).
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
}

impl ExitStatus {
    /// The exit code, if it exited.
    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Exited(code) => Some(code),
            ExitStatus::Signaled(_) => None,
        }
    }

    pub fn success(self) -> bool {
        self == ExitStatus::Exited(0)
    }

    /// The status a shell would report: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(sig) => 128 + sig,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exited with code {code}"),
            ExitStatus::Signaled(sig) => write!(f, "killed by signal {sig}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_is_the_documented_one() {
        let req = ExecRequest::new(["ls", "-l"]).env("A", "b").cwd("/tmp").user("1000:100").tty(40, 120);
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"argv": ["ls", "-l"], "env": [["A", "b"]], "cwd": "/tmp", "user": "1000:100",
                               "tty": true, "rows": 40, "cols": 120})
        );
    }

    #[test]
    fn missing_fields_take_defaults() {
        let req: ExecRequest = serde_json::from_str(r#"{"argv":["true"]}"#).unwrap();
        assert_eq!(req, ExecRequest::new(["true"]));
    }

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Exited(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signaled(9).shell_code(), 137);
        assert!(ExitStatus::Exited(0).success());
        assert_eq!(ExitStatus::Signaled(9).code(), None);
    }
}
