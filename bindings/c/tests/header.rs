//! `include/genie.h` is what cbindgen generates from the sources now; a stale header fails here.
//! Regenerate it with `GENIE_BLESS=1 cargo test -p genie-c --test header`.

#[test]
fn header_is_up_to_date() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config =
        cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let path = format!("{dir}/include/genie.h");
    if std::env::var_os("GENIE_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write include/genie.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/genie.h differs from what cbindgen generates: regenerate it with \
         `GENIE_BLESS=1 cargo test -p genie-c --test header` and commit it"
    );
}
