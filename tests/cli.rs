//! The `clip-wgpu` binary: `embed` against transformers' own outputs, and
//! clear errors for bad input.
mod common;
use common::cli::{bin, have_gpu};
use common::fixtures;

fn matrix(v: &serde_json::Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn embed_matches_transformers() {
    if !have_gpu() {
        return;
    }
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("clip/embed.json")).unwrap())
            .unwrap();
    let mut cmd = bin();
    cmd.arg("embed")
        .arg("--model")
        .arg(fixtures().join("clip/model"));
    for img in reference["images"].as_array().unwrap() {
        cmd.arg("--image")
            .arg(fixtures().join(img.as_str().unwrap()));
    }
    for t in reference["texts"].as_array().unwrap() {
        cmd.arg("--text").arg(t.as_str().unwrap());
    }
    let out_file = std::env::temp_dir().join(format!("clipwgpu-embed-{}.json", std::process::id()));
    let out = cmd.arg("--output").arg(&out_file).output().unwrap();
    assert!(
        out.status.success(),
        "embed failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    std::fs::remove_file(&out_file).ok();
    for key in ["image_embeds", "text_embeds", "logits_per_image"] {
        let (g, r) = (matrix(&got[key]), matrix(&reference[key]));
        assert_eq!(g.len(), r.len(), "{key}: rows");
        let mut worst = 0.0f64;
        for (a, b) in g.iter().zip(&r) {
            assert_eq!(a.len(), b.len(), "{key}: columns");
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs());
            }
        }
        eprintln!("embed {key}: max abs diff vs transformers {worst:.2e}");
        assert!(worst <= 1e-4, "{key}: max abs diff {worst:.2e}");
    }
}

fn fails_with(args: &[&str], needle: &str) {
    fails_with_env(args, &[], needle)
}

fn fails_with_env(args: &[&str], env: &[(&str, &str)], needle: &str) {
    let out = bin().args(args).envs(env.iter().copied()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: error does not mention {needle:?}: {err}"
    );
}

#[test]
fn embed_reports_bad_input_clearly() {
    if !have_gpu() {
        return;
    }
    let model = fixtures().join("clip/model");
    let m = model.to_str().unwrap();
    fails_with(
        &["embed", "--model", "/no/such/dir", "--text", "x"],
        "/no/such/dir",
    );
    fails_with(
        &["embed", "--model", m, "--image", "/no/such.png"],
        "/no/such.png",
    );
    let readme = fixtures().join("README.md");
    fails_with(
        &["embed", "--model", m, "--image", readme.to_str().unwrap()],
        "README.md",
    );
    fails_with(&["embed", "--model", m], "nothing to embed");
    // A folder without a model.
    fails_with(
        &[
            "embed",
            "--model",
            fixtures().join("preprocess").to_str().unwrap(),
            "--text",
            "x",
        ],
        "config.json",
    );
}

#[test]
fn bad_backend_is_an_error() {
    fails_with(&["info", "--backend", "cuda"], "unknown backend");
}

/// A `CLIP_WGPU_*` setting that does not parse stops the command with an
/// error naming the variable and the value (before any GPU work), as do
/// bench's --matmul and --tile.
#[test]
fn bad_settings_are_errors() {
    let bench = ["bench", "--step-only", "--batch", "1", "--reps", "1"];
    for (var, value) in [
        ("CLIP_WGPU_MATMUL", "fast"),
        ("CLIP_WGPU_VEC4_TILE", "big"),
        ("CLIP_WGPU_TUNE", "maybe"),
    ] {
        fails_with_env(&bench, &[(var, value)], &format!("{var}=\"{value}\""));
    }
    fails_with_env(
        &["embed", "--model", "/no/such/dir", "--text", "x"],
        &[("CLIP_WGPU_ROWS", "columns")],
        "CLIP_WGPU_ROWS=\"columns\"",
    );
    fails_with(&["bench", "--matmul", "fast"], "--matmul \"fast\"");
    fails_with(&["bench", "--tile", "3x3"], "--tile \"3x3\"");
}

/// On a headless machine (no display, no XDG_RUNTIME_DIR) listing adapters
/// prints no `error:` lines from display probes (Mesa's device-select layer
/// connecting to Wayland).
#[test]
fn headless_info_prints_no_stray_errors() {
    if !have_gpu() {
        return;
    }
    let o = bin()
        .arg("info")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("DISPLAY")
        .env_remove("NODEVICE_SELECT")
        .output()
        .unwrap();
    assert!(o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    let stray: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert!(stray.is_empty(), "stray error lines: {stray:?}");
}
