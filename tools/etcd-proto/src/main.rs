//! Generates the etcd v3 API client code tower-sd checks in, or checks that it is current.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The generated modules tower-sd uses (the others only carry options).
const KEEP: [&str; 3] = ["etcdserverpb.rs", "mvccpb.rs", "authpb.rs"];

fn main() -> ExitCode {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = here.join("../../src/registry/etcd/proto");
    let check = std::env::args().any(|arg| arg == "--check");
    let scratch = std::env::temp_dir().join(format!("tower-sd-etcd-proto-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("a scratch directory");
    generate(&here.join("proto"), &scratch);
    let mut stale = Vec::new();
    for name in KEEP {
        let fresh = std::fs::read_to_string(scratch.join(name)).expect("generated");
        let path: PathBuf = target.join(name);
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(fresh.as_str()) {
                stale.push(path.display().to_string());
            }
        } else {
            std::fs::write(&path, fresh).expect("write the generated file");
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if stale.is_empty() {
        println!("etcd API code is {}", if check { "up to date" } else { "regenerated" });
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "out of date (run `cargo run --manifest-path tools/etcd-proto/Cargo.toml`): {}",
            stale.join(", ")
        );
        ExitCode::FAILURE
    }
}

fn generate(protos: &Path, out: &Path) {
    let files = [
        "etcd/api/etcdserverpb/rpc.proto",
        "etcd/api/mvccpb/kv.proto",
        "etcd/api/authpb/auth.proto",
    ];
    let descriptors = protox::compile(files, [protos]).expect("the protos compile");
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .out_dir(out)
        .compile_fds(descriptors)
        .expect("code generation");
}
