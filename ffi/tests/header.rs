//! The committed C header is what cbindgen makes of the sources now: a
//! change to the ABI that forgot the header fails here. `TANDEM_BLESS=1`
//! rewrites it.

use std::path::Path;

#[test]
fn the_committed_header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not read ffi/src")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8 header");
    let path = crate_dir.join("include/tandem_kv.h");
    if std::env::var_os("TANDEM_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("writing the header");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "ffi/include/tandem_kv.h is stale: run `TANDEM_BLESS=1 cargo test -p ffi --test header` and commit it"
    );
    for f in [
        "tandem_kv_version",
        "tandem_kv_last_error",
        "tandem_kv_agent_create",
        "tandem_kv_agent_destroy",
        "tandem_kv_register_memory",
        "tandem_kv_metadata",
        "tandem_kv_transfer_start",
        "tandem_kv_transfer_poll",
        "tandem_kv_transfer_wait",
        "tandem_kv_transfer_wait_us",
        "tandem_kv_hold",
        "tandem_kv_release",
        "tandem_kv_notify",
        "tandem_kv_drain_released",
    ] {
        assert!(
            generated.contains(&format!("{f}(")),
            "{f} missing from the header"
        );
    }
}
