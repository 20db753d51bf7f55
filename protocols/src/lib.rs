//! MicroMachines' control-plane schemas (`protocols/*.capnp`), compiled by
//! `capnpc` at build time. See DESIGN.md, "Wire protocols".

#[allow(clippy::all, clippy::pedantic, unused_qualifications, missing_docs)]
pub mod broker_capnp {
    include!(concat!(env!("OUT_DIR"), "/broker_capnp.rs"));
}

#[allow(clippy::all, clippy::pedantic, unused_qualifications, missing_docs)]
pub mod cluster_capnp {
    include!(concat!(env!("OUT_DIR"), "/cluster_capnp.rs"));
}

#[allow(clippy::all, clippy::pedantic, unused_qualifications, missing_docs)]
pub mod device_capnp {
    include!(concat!(env!("OUT_DIR"), "/device_capnp.rs"));
}

#[allow(clippy::all, clippy::pedantic, unused_qualifications, missing_docs)]
pub mod events_capnp {
    include!(concat!(env!("OUT_DIR"), "/events_capnp.rs"));
}

#[allow(clippy::all, clippy::pedantic, unused_qualifications, missing_docs)]
pub mod vmm_capnp {
    include!(concat!(env!("OUT_DIR"), "/vmm_capnp.rs"));
}

pub mod byte_stream;
#[cfg(feature = "cluster-tls")]
pub mod cluster_tls;
pub mod device_control;
pub mod exec_end;
pub mod packet;
pub mod process_stats;
#[cfg(feature = "rpc")]
pub mod rpc;
pub mod snapshot_info;
pub mod socket_path;
pub mod spec_rules;
pub mod vmm_control;

/// The default path of the broker's unix socket.
pub const DEFAULT_BROKER_SOCKET: &str = "/run/micromachines/broker.sock";
/// The environment variable that overrides it for `mmctl`.
pub const BROKER_SOCKET_ENV: &str = "MM_BROKER_SOCKET";

/// Sets an `ExecRequest`'s command and environment (what mmctl and the
/// controller both send to `Vm.exec`).
pub fn set_exec_command(
    mut request: broker_capnp::exec_request::Builder<'_>,
    argv: &[String],
    env: &[(String, String)],
) {
    let mut list = request.reborrow().init_argv(argv.len() as u32);
    for (i, arg) in argv.iter().enumerate() {
        list.set(i as u32, arg);
    }
    let mut vars = request.init_env(env.len() as u32);
    for (i, (name, value)) in env.iter().enumerate() {
        let mut var = vars.reborrow().get(i as u32);
        var.set_name(name);
        var.set_value(value);
    }
}
