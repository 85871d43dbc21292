//! `train`, `embed` and `bench` run on the backend the environment asks for
//! (CI runs this file once on Vulkan and once with CLIP_WGPU_BACKEND=gl);
//! train and bench say so in their adapter line. (embed's numbers are
//! checked against transformers by tests/cli.rs, which CI also runs on GL.)
mod common;
use common::cli::{bin, have_gpu, temp};
use common::fixture_model;

/// The backend the adapter line names must be the one asked for.
fn check_adapter_line(what: &str, output: &str) {
    let line = output
        .lines()
        .find(|l| l.contains("adapter:"))
        .unwrap_or_else(|| panic!("{what}: no adapter line in\n{output}"));
    if let Ok(want) = std::env::var("CLIP_WGPU_BACKEND") {
        let want = want.to_lowercase();
        if want != "all" && !want.is_empty() {
            assert!(
                line.to_lowercase().contains(&format!("({want},")),
                "{what} ran on another backend than {want}: {line}"
            );
        }
    }
}

/// Run `cmd`; `names_adapter`: it prints the adapter line (embed prints
/// only its JSON).
fn ok(what: &str, names_adapter: bool, cmd: &mut std::process::Command) -> String {
    let o = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{what} failed:\n{stderr}");
    if names_adapter {
        check_adapter_line(what, &format!("{stderr}\n{stdout}"));
    }
    stdout
}

#[test]
fn train_embed_and_bench_run_on_the_requested_backend() {
    if !have_gpu() {
        return;
    }
    let out = temp("backend-cli");
    ok(
        "train",
        true,
        bin()
            .args([
                "train",
                "--demo_train_samples",
                "8",
                "--demo_eval_samples",
                "4",
                "--per_device_train_batch_size",
                "4",
                "--max_steps",
                "2",
                "--no_progress",
                "--output_dir",
            ])
            .arg(&out),
    );
    assert!(
        out.join("model.safetensors").is_file(),
        "train saved no model"
    );
    let model = fixture_model("clip");
    let json = ok(
        "embed",
        false,
        bin()
            .args(["embed", "--model"])
            .arg(&model)
            .args(["--text", "a photo of a cat"]),
    );
    assert!(json.contains("text_embeds"), "embed printed {json}");
    let table = ok(
        "bench",
        true,
        bin().args([
            "bench",
            "--config",
            "tiny",
            "--batch",
            "2",
            "--step-only",
            "--reps",
            "1",
        ]),
    );
    assert!(table.contains("training step"), "bench printed {table}");
    std::fs::remove_dir_all(&out).unwrap();
}
