//! Compiles the schemas with the `capnp` tool (Debian package `capnproto`).

fn main() {
    capnpc::CompilerCommand::new()
        .file("broker.capnp")
        .run()
        .expect("compiling broker.capnp (is `capnp` installed? apt-get install capnproto)");
    println!("cargo:rerun-if-changed=broker.capnp");
}
