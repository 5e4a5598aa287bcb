//! Compiles the service contracts with a vendored `protoc`, so a fresh machine needs no
//! protobuf install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/muse/v1/muse.proto",
        "proto/majordomo/v1/majordomo.proto",
        "proto/orchestrator/v1/orchestrator.proto",
    ];
    // The enums a configuration file names (the orchestrator's default dream policy) read and
    // write as snake_case words: `render = "draft"`, `schedule = "entropy"`.
    let mut config = tonic_prost_build::configure();
    for e in [
        "muse.v1.LatentMode",
        "muse.v1.Render",
        "muse.v1.Proposal",
        "muse.v1.Framing",
        "orchestrator.v1.Schedule",
    ] {
        config = config.enum_attribute(
            e,
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(rename_all = \"snake_case\")]",
        );
    }
    config
        .file_descriptor_set_path(out.join("descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
