//! `clip-wgpu train` end to end on small generated data sets, with the tiny
//! transformers-made CLIP of tests/fixtures/clip/model: COCO layout, CSV and
//! JSON lines, skipped bad images, the saved model, and exact resume after a
//! kill.
mod common;
use clip_wgpu::model::weights::Weights;
use clip_wgpu::train::metrics::{loss_chart, ChartData, MetricsLog};
use common::cli::{bin, have_gpu, temp, write_image, COLOURS};
use common::fixture_model;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

fn mini_coco(root: &Path) {
    std::fs::create_dir_all(root.join("annotations")).unwrap();
    for (split, n) in [("train", 6), ("val", 3)] {
        let dir = root.join(format!("{split}2017"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut images = Vec::new();
        let mut anns = Vec::new();
        for i in 0..n {
            let file = format!("{:012}.png", i + 1);
            write_image(&dir.join(&file), i);
            images.push(
                serde_json::json!({"id": i + 1, "file_name": file, "width": 40, "height": 34}),
            );
            for c in 0..2 {
                anns.push(serde_json::json!({
                    "id": i * 2 + c, "image_id": i + 1,
                    "caption": format!("a {} picture, take {c}", COLOURS[i % 6]),
                }));
            }
        }
        let doc = serde_json::json!({"images": images, "annotations": anns});
        std::fs::write(
            root.join(format!("annotations/captions_{split}2017.json")),
            doc.to_string(),
        )
        .unwrap();
    }
}

/// The chart series of a run's metrics.jsonl, after checking that its
/// loss_curve.png is exactly the chart of them (losses and learning rates).
fn check_chart(out: &Path) -> ChartData {
    let records = MetricsLog::read(&out.join("metrics.jsonl")).unwrap();
    let data = ChartData::from_records(&records);
    assert!(!data.train_loss.is_empty(), "no training loss logged");
    assert_eq!(data.learning_rate.len(), data.train_loss.len());
    let png = image::open(out.join("loss_curve.png")).unwrap().to_rgb8();
    assert!(
        png == loss_chart(&data).unwrap().image,
        "loss_curve.png is not the chart of metrics.jsonl"
    );
    data
}

fn run(args: &[&str]) -> Output {
    let out = bin().arg("train").args(args).output().unwrap();
    if !out.status.success() {
        panic!(
            "train {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn common<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "--model_name_or_path",
        model,
        "--output_dir",
        out,
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--no_progress",
    ]
}

#[test]
fn coco_layout_with_the_seed_command_line() {
    if !have_gpu() {
        return;
    }
    let root = temp("coco");
    let data = root.join("coco");
    mini_coco(&data);
    let out = root.join("out");
    let model = fixture_model("clip");
    // The seed's command line, pointed at local folders.
    let o = run(&[
        "--output_dir",
        out.to_str().unwrap(),
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--data_dir",
        data.to_str().unwrap(),
        "--dataset_name",
        "ydshieh/coco_dataset_script",
        "--dataset_config_name=2017",
        "--image_column",
        "image_path",
        "--caption_column",
        "caption",
        "--remove_unused_columns=False",
        "--do_train",
        "--do_eval",
        "--per_device_train_batch_size=4",
        "--per_device_eval_batch_size=4",
        "--learning_rate=5e-5",
        "--warmup_steps=0",
        "--weight_decay",
        "0.1",
        "--overwrite_output_dir",
        "--num_train_epochs",
        "1",
        "--no_progress",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("remove_unused_columns"),
        "a note for the ignored flag: {stderr}"
    );
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "processor_config.json",
        "train_results.json",
        "eval_results.json",
        "all_results.json",
        "trainer_state.json",
        "metrics.jsonl",
        "loss_curve.png",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    // 12 captions / batch 4 = 3 steps; logged at the last (logging_steps
    // is 500 by default).
    let chart = check_chart(&out);
    assert_eq!(
        chart.train_loss.iter().map(|p| p.0).collect::<Vec<_>>(),
        [3.0]
    );
    assert!(out.join("checkpoint-3/optimizer.safetensors").is_file());
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
            .unwrap();
    for k in [
        "train_loss",
        "eval_loss",
        "eval_i2t_recall@1",
        "eval_t2i_recall@5",
    ] {
        assert!(all[k].as_f64().is_some_and(f64::is_finite), "{k} in {all}");
    }
    // 3 validation images with 2 captions each: recall@5 covers everything.
    assert_eq!(all["eval_i2t_recall@5"].as_f64(), Some(1.0));
    // The saved model is the final checkpoint's and reloads for embedding.
    let a = Weights::load_dir(&out).unwrap();
    let b = Weights::load_dir(&out.join("checkpoint-3")).unwrap();
    assert_eq!(a.tensors, b.tensors);
    let e = bin()
        .args([
            "embed",
            "--model",
            out.to_str().unwrap(),
            "--text",
            "a red picture",
        ])
        .output()
        .unwrap();
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    // A second run into the same folder without --overwrite_output_dir resumes
    // from its checkpoint (run_clip.py's rule) instead of starting over.
    let o = run(&[
        "--output_dir",
        out.to_str().unwrap(),
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--data_dir",
        data.to_str().unwrap(),
        "--dataset_name",
        "ydshieh/coco_dataset_script",
        "--do_train",
        "--per_device_train_batch_size=4",
        "--num_train_epochs",
        "1",
        "--no_progress",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("resuming training at"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn csv_and_jsonl_with_bad_images_skipped_and_reported() {
    if !have_gpu() {
        return;
    }
    let root = temp("tables");
    let imgs = root.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for i in 0..8 {
        write_image(&imgs.join(format!("{i}.png")), i);
    }
    std::fs::write(imgs.join("corrupt.png"), b"this is not a png").unwrap();
    let mut csv = String::from("image_path,caption\n");
    for i in 0..8 {
        csv += &format!("imgs/{i}.png,\"a {}, colourful picture\"\n", COLOURS[i % 6]);
    }
    csv += "imgs/corrupt.png,broken\nimgs/missing.png,gone\n";
    std::fs::write(root.join("train.csv"), csv).unwrap();
    let mut jsonl = String::new();
    for (i, colour) in COLOURS.iter().enumerate().take(4) {
        jsonl += &serde_json::json!({"file": format!("imgs/{i}.png"), "text": format!("a {colour} picture")}).to_string();
        jsonl += "\n";
    }
    std::fs::write(root.join("val.jsonl"), jsonl).unwrap();
    let out = root.join("out");
    let model = fixture_model("clip");
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    let mut args = common(m, o);
    let train = root.join("train.csv");
    let val = root.join("val.jsonl");
    args.extend([
        "--train_file",
        train.to_str().unwrap(),
        "--validation_file",
        val.to_str().unwrap(),
        "--image_column",
        "file",
        "--caption_column",
        "text",
        "--do_train",
        "--do_eval",
        "--max_steps",
        "2",
    ]);
    // The columns differ between the two files: the CSV has image_path/caption.
    let err = bin().arg("train").args(&args).output().unwrap();
    assert!(!err.status.success());
    let msg = String::from_utf8_lossy(&err.stderr);
    assert!(msg.contains("train.csv") && msg.contains("file"), "{msg}");
    // Same columns in both files.
    let mut jsonl = String::new();
    for (i, colour) in COLOURS.iter().enumerate().take(4) {
        jsonl += &serde_json::json!({"image_path": format!("imgs/{i}.png"), "caption": format!("a {colour} picture")}).to_string();
        jsonl += "\n";
    }
    std::fs::write(&val, jsonl).unwrap();
    let mut args = common(m, o);
    args.extend([
        "--train_file",
        train.to_str().unwrap(),
        "--validation_file",
        val.to_str().unwrap(),
    ]);
    args.extend([
        "--do_train",
        "--do_eval",
        "--num_train_epochs",
        "1",
        "--overwrite_output_dir",
    ]);
    let o = run(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("corrupt.png"),
        "corrupt image reported: {stderr}"
    );
    assert!(
        stderr.contains("missing.png"),
        "missing image reported: {stderr}"
    );
    let tr: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_results.json")).unwrap())
            .unwrap();
    assert_eq!(tr["train_skipped_images"].as_u64(), Some(2), "{tr}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Final weights of a run killed (SIGKILL) after its first checkpoint and
/// resumed equal those of an uninterrupted run.
#[test]
fn resume_after_kill_matches_uninterrupted_run() {
    if !have_gpu() {
        return;
    }
    let root = temp("resume");
    let data = root.join("coco");
    mini_coco(&data);
    let model = fixture_model("clip");
    let args = |out: &Path| -> Vec<String> {
        [
            "--model_name_or_path",
            model.to_str().unwrap(),
            "--output_dir",
            out.to_str().unwrap(),
            "--data_dir",
            data.to_str().unwrap(),
            "--dataset_name",
            "ydshieh/coco_dataset_script",
            "--do_train",
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--learning_rate",
            "1e-3",
            "--weight_decay",
            "0.1",
            "--warmup_steps",
            "2",
            "--max_steps",
            "8",
            "--save_steps",
            "2",
            "--logging_steps",
            "1",
            "--no_progress",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let full = root.join("full");
    let o = bin().arg("train").args(args(&full)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let killed = root.join("killed");
    let mut child = bin()
        .arg("train")
        .args(args(&killed))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !killed.join("checkpoint-4/trainer_state.json").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        if child.try_wait().unwrap().is_some() {
            break; // finished before we could kill it: still a valid (trivial) check
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    // Remove everything past the latest complete checkpoint, as a kill at
    // that moment would have left it.
    for f in [
        "model.safetensors",
        "all_results.json",
        "train_results.json",
    ] {
        let _ = std::fs::remove_file(killed.join(f));
    }
    for c in ["checkpoint-6", "checkpoint-8"] {
        let _ = std::fs::remove_dir_all(killed.join(c));
    }
    // Rerun the same command: it resumes from the latest checkpoint.
    let o = bin().arg("train").args(args(&killed)).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("resum"), "did not resume: {stderr}");
    let a = Weights::load_dir(&full).unwrap();
    let b = Weights::load_dir(&killed).unwrap();
    let mut worst = 0.0f32;
    for (k, t) in &a.tensors {
        let u = &b.tensors[k];
        for (x, y) in t.data.iter().zip(&u.data) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("resume: max abs difference vs the uninterrupted run {worst:e}");
    assert!(worst <= 1e-6, "resumed run differs by {worst}");
    // The resumed run's chart has the steps from before the kill too, under
    // the same schedule.
    let (a, b) = (check_chart(&full), check_chart(&killed));
    let steps: Vec<f64> = (1..=8).map(f64::from).collect();
    assert_eq!(b.train_loss.iter().map(|p| p.0).collect::<Vec<_>>(), steps);
    assert_eq!(a.learning_rate, b.learning_rate);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn output_dir_rules_and_bad_flags() {
    let root = temp("rules");
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("something.txt"), "x").unwrap();
    let model = fixture_model("clip");
    let o = bin()
        .args([
            "train",
            "--model_name_or_path",
            model.to_str().unwrap(),
            "--output_dir",
            out.to_str().unwrap(),
        ])
        .args([
            "--do_train",
            "--train_file",
            "/no/such.csv",
            "--no_progress",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("/no/such.csv"), "{e}");
    let o = bin()
        .args(["train", "--learning_rate", "fast"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("learning_rate"));
    let o = bin()
        .args(["train", "--lerning_rate", "1e-3"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("learning_rate"),
        "suggests the right flag"
    );
    if have_gpu() {
        let csv = root.join("t.csv");
        let img = root.join("a.png");
        write_image(&img, 1);
        std::fs::write(&csv, "image_path,caption\na.png,a picture\n").unwrap();
        let o = bin()
            .args([
                "train",
                "--model_name_or_path",
                model.to_str().unwrap(),
                "--output_dir",
                out.to_str().unwrap(),
            ])
            .args([
                "--do_train",
                "--train_file",
                csv.to_str().unwrap(),
                "--no_progress",
            ])
            .output()
            .unwrap();
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("overwrite_output_dir"), "{e}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}
