//! Helpers for tests that run the `clip-wgpu` binary: the command, the
//! fixture models, small picture data sets, quick training flags.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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

/// Start `c` with its stdout discarded and its stderr written to `err`.
pub fn spawn(c: &mut Command, err: &Path) -> Child {
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(err).unwrap())
        .spawn()
        .unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub const COLOURS: [&str; 6] = ["red", "green", "blue", "yellow", "purple", "orange"];

/// A small picture (40 x 34) whose colours depend on `i`.
pub fn write_image(path: &Path, i: usize) {
    let img = image::RgbImage::from_fn(40, 34, |x, y| {
        image::Rgb([
            (i * 60 % 256) as u8,
            ((x as usize * 5 + i * 30) % 256) as u8,
            ((y * 7) % 256) as u8,
        ])
    });
    img.save(path).unwrap();
}

/// `n` such pictures in `root/imgs` and `root/train.csv` listing them with
/// captions ("a red picture number 0", ...).
pub fn picture_csv(root: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(root.join("imgs")).unwrap();
    let mut csv = String::from("image_path,caption\n");
    for i in 0..n {
        write_image(&root.join(format!("imgs/{i}.png")), i);
        csv += &format!("imgs/{i}.png,a {} picture number {i}\n", COLOURS[i % 6]);
    }
    let f = root.join("train.csv");
    std::fs::write(&f, csv).unwrap();
    f
}

/// Flags of a small, quick training run: learning rate 1e-3 with weight
/// decay, text of 16 tokens, a log line every step, no progress bar.
pub const QUICK_RUN: [&str; 9] = [
    "--learning_rate",
    "1e-3",
    "--weight_decay",
    "0.1",
    "--max_seq_length",
    "16",
    "--logging_steps",
    "1",
    "--no_progress",
];

/// `train` of `model` on `train_file` into `out`, with the [`QUICK_RUN`]
/// flags and then `extra`.
pub fn quick_train(model: &Path, train_file: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let paths = [model, train_file, out].map(|p| p.to_str().unwrap().to_string());
    let mut v: Vec<String> = vec!["train".into()];
    for (flag, p) in ["--model_name_or_path", "--train_file", "--output_dir"]
        .iter()
        .zip(paths)
    {
        v.extend([flag.to_string(), p]);
    }
    v.push("--do_train".into());
    v.extend(QUICK_RUN.iter().chain(extra).map(|s| s.to_string()));
    v
}
