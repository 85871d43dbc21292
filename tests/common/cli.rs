//! Helpers for tests that run the `clip-wgpu` binary.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_clip-wgpu"))
}

/// Whether an adapter exists (asked once); under CI=true a missing adapter
/// fails the test instead of skipping it.
pub fn have_gpu() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        bin()
            .arg("info")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if !ok && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but `clip-wgpu info` finds no adapter");
    }
    ok
}

/// A fresh, empty temporary folder for one test of this process.
pub fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("clipwgpu-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
