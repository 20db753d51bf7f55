//! Exec in a guest through its agent (vsock port 1024, reached through the
//! microVM's hybrid vsock socket): bridges the agent's frames to the
//! client's `ExecOutput`/`ExecSession` capabilities.

use std::path::{Path, PathBuf};

use mm_protocols::broker_capnp::vm;

pub async fn serve_exec(_dir: PathBuf, _params: vm::ExecParams, _results: vm::ExecResults) -> Result<(), capnp::Error> {
    Err(capnp::Error::failed("internal: exec is not wired yet".into()))
}

pub async fn run_simple(_dir: &Path, _argv: &[&str]) -> Result<i32, String> {
    Err("exec agent not wired yet".into())
}
