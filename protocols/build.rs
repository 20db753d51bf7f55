//! Compiles the schemas with the `capnp` tool (Debian package `capnproto`).

fn main() {
    const SCHEMAS: [&str; 5] = ["broker.capnp", "cluster.capnp", "device.capnp", "events.capnp", "vmm.capnp"];
    let mut compiler = capnpc::CompilerCommand::new();
    for schema in SCHEMAS {
        compiler.file(schema);
        println!("cargo:rerun-if-changed={schema}");
    }
    compiler.run().expect("compiling the schemas (is `capnp` installed? apt-get install capnproto)");
}
