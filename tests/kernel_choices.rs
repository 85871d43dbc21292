//! A checkpoint records the kernel choices (tuning cache entries) its run
//! used, and a resumed run takes them over whatever its own machine's cache
//! says: exact resume on another machine. The "other machine" is a tuning
//! cache whose attention choices are flipped (fused <-> unfused), which
//! changes the rounding; without the recorded choices the resumed run differs
//! (checked too, so the test can fail).
mod common;
use clip_wgpu::model::weights::Weights;
use common::cli::{bin, have_gpu, temp};
use std::path::Path;

fn train(out: &Path, cache: &Path, resume: Option<&Path>) {
    let mut cmd = bin();
    cmd.env("CLIP_WGPU_CACHE_DIR", cache).args([
        "train",
        "--demo_train_samples",
        "16",
        "--demo_eval_samples",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--no_progress",
        "--output_dir",
        out.to_str().unwrap(),
    ]);
    if let Some(r) = resume {
        cmd.arg("--resume_from_checkpoint").arg(r);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "train failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A copy of the finished run `full` cut back to its step-2 checkpoint.
fn cut_back(full: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("checkpoint-2")).unwrap();
    for e in std::fs::read_dir(full.join("checkpoint-2")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join("checkpoint-2").join(e.file_name())).unwrap();
    }
    std::fs::copy(full.join("metrics.jsonl"), to.join("metrics.jsonl")).unwrap();
}

fn max_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (Weights::load_dir(a).unwrap(), Weights::load_dir(b).unwrap());
    let mut worst = 0.0f32;
    for (k, t) in &a.tensors {
        for (x, y) in t.data.iter().zip(&b.tensors[k].data) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

#[test]
fn resume_computes_with_the_checkpoints_kernels() {
    if !have_gpu() {
        return;
    }
    let root = temp("kernel-choices");
    let (cache_a, cache_b) = (root.join("cache-a"), root.join("cache-b"));
    let full = root.join("full");
    train(&full, &cache_a, None);

    let recorded: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(full.join("checkpoint-2/kernel_choices.json")).unwrap(),
    )
    .unwrap();
    let choices = recorded["choices"].as_object().unwrap();
    assert!(
        choices.keys().any(|k| k.starts_with("matmul ")),
        "no matmul choice recorded: {recorded}"
    );
    let attention = choices
        .keys()
        .filter(|k| k.starts_with("attention "))
        .count();
    assert!(attention > 0, "no attention choice recorded: {recorded}");

    // The other machine: the same cache with every attention choice flipped.
    std::fs::create_dir_all(&cache_b).unwrap();
    let files: Vec<_> = std::fs::read_dir(&cache_a).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "one tuning cache file expected");
    let mut map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(files[0].path()).unwrap()).unwrap();
    for v in map.values_mut() {
        match v.as_str() {
            Some("fused") => *v = "unfused".into(),
            Some("unfused") => *v = "fused".into(),
            _ => {}
        }
    }
    std::fs::write(
        cache_b.join(files[0].file_name()),
        serde_json::Value::Object(map).to_string(),
    )
    .unwrap();

    let resumed = root.join("resumed");
    cut_back(&full, &resumed);
    train(&resumed, &cache_b, Some(&resumed.join("checkpoint-2")));
    let d = max_difference(&full, &resumed);
    assert_eq!(
        d, 0.0,
        "resumed with the recorded kernels, yet differs by {d}"
    );

    // Control: without the record, the flipped cache decides and the
    // weights differ, so the equality above is the record's doing.
    let unrecorded = root.join("unrecorded");
    cut_back(&full, &unrecorded);
    std::fs::remove_file(unrecorded.join("checkpoint-2/kernel_choices.json")).unwrap();
    train(
        &unrecorded,
        &cache_b,
        Some(&unrecorded.join("checkpoint-2")),
    );
    let d = max_difference(&full, &unrecorded);
    assert!(
        d > 0.0,
        "flipping attention kernels changed nothing: the test proves nothing"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
