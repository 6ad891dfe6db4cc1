fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/kv_agent.proto");
    tonic_prost_build::configure().compile_protos(&["proto/kv_agent.proto"], &["proto"])?;
    Ok(())
}
