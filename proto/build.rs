//! Compiles proto/*.proto with protox (a pure-Rust protobuf compiler: no system `protoc`) and
//! generates the prost types.

fn main() {
    let protos = [
        "proto/log.proto",
        "proto/channel.proto",
        "proto/witness.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = match protox::compile(protos, ["proto"]) {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("ftvm-proto: cannot compile the .proto schema: {e:?}");
            std::process::exit(1);
        }
    };
    if let Err(e) = prost_build::Config::new()
        // The packed record block is read in place from the received buffer.
        .bytes([".ftvm.log.RecordBatch.packed"])
        .compile_fds(fds)
    {
        eprintln!("ftvm-proto: cannot generate Rust types: {e}");
        std::process::exit(1);
    }
}
