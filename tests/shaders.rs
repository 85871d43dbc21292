//! Every WGSL file parses and validates with naga (no GPU needed), and every
//! shader the crate embeds exists on disk.

use std::fs;

#[test]
fn every_wgsl_file_parses_and_validates() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/shaders");
    let mut n = 0;
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("wgsl") {
            continue;
        }
        let src = fs::read_to_string(&path).unwrap();
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(&src)));
        let mut v = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            // Subgroup operations only where the file enables them (the
            // host uses such shaders only on adapters that have them).
            if src.contains("subgroupBroadcast") {
                naga::valid::Capabilities::SUBGROUP
            } else {
                naga::valid::Capabilities::empty()
            },
        );
        v.validate(&module)
            .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(&src)));
        assert!(
            !module.entry_points.is_empty(),
            "{} has no entry point",
            path.display()
        );
        n += 1;
    }
    assert!(n >= 5, "found only {n} shaders in {dir}");
}

#[test]
fn embedded_shader_names_match_files() {
    // `shader!("name")` in src/ops must name shaders/name.wgsl.
    let src_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/ops");
    for entry in fs::read_dir(src_dir).unwrap() {
        let text = fs::read_to_string(entry.unwrap().path()).unwrap();
        for part in text.split("shader!(\"").skip(1) {
            let name = part.split('"').next().unwrap();
            let p = format!("{}/shaders/{name}.wgsl", env!("CARGO_MANIFEST_DIR"));
            assert!(fs::metadata(&p).is_ok(), "missing {p}");
        }
    }
}
