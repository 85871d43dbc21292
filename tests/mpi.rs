//! Data-parallel training under `mpirun -n 2` (cargo feature `mpi`; needs
//! `apt-get install libopenmpi-dev openmpi-bin libclang-dev`). Both ranks
//! share the one adapter here, as on CI. Checked against one process:
//! - 2 ranks x batch 8 train to the weights of 1 process x batch 16, for
//!   both model kinds, with and without accumulation, with the whole loss
//!   on every rank or the local loss (and with an epoch's short last
//!   global batch, split 4 + 4);
//! - SIGTERM of the job: a checkpoint at an agreed step, and the rerun
//!   resumes to the weights of an uninterrupted 2-rank run;
//! - one rank failing (its pictures missing, or killed): the job ends with
//!   an error naming the rank, bounded by a timeout, never a hang;
//! - sharded evaluation: the recall@K of one process.
//! - `--fp16`: a NaN gradient on one rank makes every rank skip the step and
//!   back off the loss scale together.
#![cfg(unix)]
mod common;
use clip_wgpu::model::weights::Weights;
use clip_wgpu::train::checkpoint;
use common::cli::{bin, have_gpu, quick_train, spawn, stderr, temp, COLOURS};
use common::{fixture_model, fixtures};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn mpirun(n: usize) -> Command {
    let mut c = Command::new("mpirun");
    // As root in a container; more ranks than cores; no pinning (the ranks
    // share the CPU adapter's threads).
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
    ]);
    c.args(["-n", &n.to_string()]);
    c.arg(env!("CARGO_BIN_EXE_clip-wgpu"));
    c
}

/// A 2-rank job whose ranks have their own command lines (MPMD), rank 1
/// with `env1` (`NAME=value`) set too.
fn mpmd(rank0: &[String], rank1: &[String], env1: Option<&str>) -> Command {
    let mut c = mpirun(1);
    c.args(rank0);
    c.args([":", "-n", "1"]);
    if let Some(e) = env1 {
        c.args(["-x", e]);
    }
    c.arg(env!("CARGO_BIN_EXE_clip-wgpu"));
    c.args(rank1);
    c
}

/// `n` small pictures with captions in `root/train.csv`.
fn csv(root: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(root.join("imgs")).unwrap();
    let mut csv = String::from("image_path,caption\n");
    for i in 0..n {
        let img = image::RgbImage::from_fn(40, 34, |x, y| {
            image::Rgb([
                (i * 37 % 256) as u8,
                ((x as usize * 5 + i * 30) % 256) as u8,
                ((y as usize * 7 + i * 11) % 256) as u8,
            ])
        });
        img.save(root.join(format!("imgs/{i}.png"))).unwrap();
        csv += &format!("imgs/{i}.png,a {} picture number {i}\n", COLOURS[i % 6]);
    }
    let f = root.join("train.csv");
    std::fs::write(&f, csv).unwrap();
    f
}

/// A VisionTextDualEncoder (CLIP vision + RoBERTa text) made from the tiny
/// fixtures, as a user makes one.
fn dual_encoder(root: &Path) -> PathBuf {
    let fx = fixtures();
    let out = root.join("dual");
    ok(
        bin()
            .args(["prepare-dual-encoder", "--vision"])
            .arg(fx.join("clip/model"))
            .arg("--text")
            .arg(fx.join("prepare/roberta_model"))
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap(),
        "prepare-dual-encoder",
    );
    out
}

fn train_args(model: &Path, csv: &Path, out: &Path, batch: usize, extra: &[&str]) -> Vec<String> {
    let batch = batch.to_string();
    let mut v = quick_train(
        model,
        csv,
        out,
        &[
            "--warmup_steps",
            "1",
            "--per_device_train_batch_size",
            &batch,
        ],
    );
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn ok(o: Output, what: &str) -> Output {
    assert!(o.status.success(), "{what} failed:\n{}", stderr(&o));
    o
}

/// Attention's key bias: softmax over keys is unchanged when every key's
/// logit q.(k + b) moves by the same q.b, so its true gradient is zero and
/// what it gets is rounding noise, which Adam scales up to steps of about
/// the learning rate. Two correct runs differ there by noise, so these are
/// held to that instead: each element within 2 x steps x lr.
const ZERO_GRADIENT: [&str; 2] = ["self_attn.k_proj.bias", "attention.self.key.bias"];

/// Every tensor of `a` within `tol` of `b`'s in relative L2 norm (those
/// named like `noise` within 2 x 4 steps x lr 1e-3 per element); the worst.
fn relative_diff(a: &Path, b: &Path, tol: f64, noise: &[&str]) -> f64 {
    let a = Weights::load_dir(a).unwrap();
    let b = Weights::load_dir(b).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    let mut worst = 0.0f64;
    for (k, t) in &a.tensors {
        let u = &b.tensors[k].data;
        let (mut d, mut n) = (0.0f64, 0.0f64);
        for (x, y) in t.data.iter().zip(u) {
            d += ((x - y) as f64).powi(2);
            n += (*y as f64).powi(2);
        }
        let r = d.sqrt() / n.sqrt().max(1e-30);
        if noise.iter().any(|n| k.contains(n)) {
            let most = t
                .data
                .iter()
                .zip(u)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(most <= 8e-3, "{k}: differs by {most} per element");
            continue;
        }
        assert!(r <= tol, "{k}: relative difference {r:e} > {tol:e}");
        worst = worst.max(r);
    }
    worst
}

/// Wait for `child` at most `secs` seconds; kill it and fail past that.
fn wait_bounded(child: &mut Child, secs: u64, what: &str) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("{what}: the job still runs after {secs} s (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until `file` holds `needle` (the job's stderr); false if the job
/// ended first.
fn wait_for_line(child: &mut Child, file: &Path, needle: &str) -> bool {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return std::fs::read_to_string(file)
                .unwrap_or_default()
                .contains(needle);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "waited too long for {needle:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn two_ranks_train_as_one_process_with_twice_the_batch() {
    if !have_gpu() {
        return;
    }
    let root = temp("mpi-same");
    // 40 examples: global batches of 16, 16 and a short 8 (4 per rank).
    let data = csv(&root, 40);
    let dual = dual_encoder(&root);
    for (kind, accum, loss, local) in [
        ("clip", 1usize, "full", false),
        ("clip", 2, "full", false),
        ("clip", 2, "micro", false),
        ("clip_roberta", 1, "full", false),
        ("clip_roberta", 2, "full", false),
        ("clip", 1, "full", true),
        ("clip", 2, "full", true),
        ("clip_roberta", 2, "micro", true),
    ] {
        {
            let model = if kind == "clip" {
                fixture_model(kind)
            } else {
                dual.clone()
            };
            let a = accum.to_string();
            let common = [
                "--max_steps",
                "4",
                "--gradient_accumulation_steps",
                &a,
                "--accumulation_loss",
                loss,
                "--sync_check_steps",
                "1",
                "--local_loss",
                if local { "true" } else { "false" },
            ];
            let one = root.join(format!("{kind}-{accum}-{loss}-{local}-one"));
            let two = root.join(format!("{kind}-{accum}-{loss}-{local}-two"));
            ok(
                bin()
                    .args(train_args(&model, &data, &one, 16, &common))
                    .output()
                    .unwrap(),
                "1 process",
            );
            let o = ok(
                mpirun(2)
                    .args(&train_args(&model, &data, &two, 8, &common)[..])
                    .output()
                    .unwrap(),
                "2 ranks",
            );
            let err = stderr(&o);
            assert!(err.contains("global batch"), "{err}");
            let worst = relative_diff(&two, &one, 1e-5, &ZERO_GRADIENT);
            eprintln!(
                "{kind}, accumulation {accum} ({loss}{}): worst relative difference {worst:e}",
                if local { ", local loss" } else { "" }
            );
            // Rank 0 alone wrote: one metrics line per step, one checkpoint.
            let m = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
            assert_eq!(m.lines().count(), 4, "{m}");
            assert!(m.contains("mpi_seconds_per_step"));
            // The logged loss is the global batch's (a local loss summed).
            let losses = |d: &Path| -> Vec<f64> {
                std::fs::read_to_string(d.join("metrics.jsonl"))
                    .unwrap()
                    .lines()
                    .map(|l| {
                        serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                            .as_f64()
                            .unwrap()
                    })
                    .collect()
            };
            for (a, b) in losses(&two).iter().zip(losses(&one)) {
                assert!((a - b).abs() <= 1e-5 * b.abs(), "loss {a} vs {b}");
            }
        }
    }
}

#[test]
fn sigterm_of_the_job_resumes_to_the_uninterrupted_weights() {
    if !have_gpu() {
        return;
    }
    let root = temp("mpi-term");
    let data = csv(&root, 24);
    let model = fixture_model("clip");
    let extra = ["--max_steps", "6", "--save_steps", "2"];
    let full = root.join("full");
    ok(
        mpirun(2)
            .args(&train_args(&model, &data, &full, 4, &extra)[..])
            .output()
            .unwrap(),
        "uninterrupted",
    );
    let out = root.join("cut");
    let args = train_args(&model, &data, &out, 4, &extra);
    let err = root.join("cut.err");
    let mut c = mpirun(2);
    c.args(&args[..])
        .env("CLIP_WGPU_FAULTS", "wait_for_signal@3");
    let mut job = spawn(&mut c, &err);
    assert!(
        wait_for_line(&mut job, &err, "waiting for a signal after step 3"),
        "{}",
        std::fs::read_to_string(&err).unwrap()
    );
    assert_eq!(
        unsafe { libc::kill(job.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let status = wait_bounded(&mut job, 300, "SIGTERM");
    let text = std::fs::read_to_string(&err).unwrap();
    assert!(!status.success(), "{text}");
    // Both ranks stopped after the same step: the one after the signal.
    assert!(text.contains("interrupted by SIGTERM"), "{text}");
    let latest = checkpoint::latest_checkpoint(&out).unwrap();
    assert!(latest.ends_with("checkpoint-4"), "{}", latest.display());
    assert!(!out.join("model.safetensors").exists());
    let o = ok(
        mpirun(2).args(&args[..]).output().unwrap(),
        "the resumed run",
    );
    assert!(stderr(&o).contains("resumed from"), "{}", stderr(&o));
    let worst = relative_diff(&out, &full, 0.0, &[]);
    assert_eq!(worst, 0.0);
}

#[test]
fn a_failing_rank_ends_the_job_naming_it() {
    if !have_gpu() {
        return;
    }
    let root = temp("mpi-fail");
    let data = csv(&root, 24);
    let model = fixture_model("clip");
    // Rank 1's copy of the table has no picture folder beside it.
    let other = root.join("elsewhere");
    std::fs::create_dir_all(&other).unwrap();
    let bad = other.join("train.csv");
    std::fs::copy(&data, &bad).unwrap();
    // Rank 1 (MPMD: its own command line or environment) without its
    // pictures, with an adapter that does not exist, out of memory at step 2.
    let extra = ["--max_steps", "50"];
    let cases: [(&str, Vec<String>, Option<&str>, &str); 3] = [
        (
            "missing",
            train_args(&model, &bad, &root.join("missing"), 4, &extra),
            None,
            "imgs/",
        ),
        (
            "adapter",
            ["--adapter".to_string(), "99".to_string()]
                .into_iter()
                .chain(train_args(&model, &data, &root.join("adapter"), 4, &extra))
                .collect(),
            None,
            "adapter index 99",
        ),
        (
            "oom",
            train_args(&model, &data, &root.join("oom"), 4, &extra),
            Some("CLIP_WGPU_FAULTS=oom@2"),
            "ran out of memory",
        ),
    ];
    for (name, rank1, env, says) in cases {
        let rank0 = train_args(&model, &data, &root.join(name), 4, &extra);
        let mut c = mpmd(&rank0, &rank1, env);
        let err = root.join(format!("{name}.err"));
        let mut job = spawn(&mut c, &err);
        let status = wait_bounded(&mut job, 300, name);
        let text = std::fs::read_to_string(&err).unwrap();
        assert!(!status.success(), "{name}: {text}");
        assert!(text.contains("error on rank 1 of 2"), "{name}: {text}");
        assert!(text.contains(says), "{name}: {text}");
    }

    // A NaN gradient on rank 1 alone: the summed gradient is NaN on both,
    // so both stop at that step, naming it (no rank waits for the other).
    let both = train_args(&model, &data, &root.join("nan"), 4, &extra);
    let mut c = mpmd(&both, &both, Some("CLIP_WGPU_FAULTS=nan_grad@2"));
    let err = root.join("nan.err");
    let mut job = spawn(&mut c, &err);
    let status = wait_bounded(&mut job, 300, "a NaN on one rank");
    let text = std::fs::read_to_string(&err).unwrap();
    assert!(!status.success(), "{text}");
    assert!(text.contains("training step 2: "), "{text}");
    assert!(text.contains("NaN"), "{text}");

    // A rank killed mid-run: mpirun ends the job and names it.
    let extra = ["--max_steps", "50"];
    let out = root.join("killed");
    let err = root.join("killed.err");
    let mut job = spawn(
        mpirun(2).args(&train_args(&model, &data, &out, 4, &extra)[..]),
        &err,
    );
    assert!(wait_for_line(&mut job, &err, "step 1/"));
    let text = std::fs::read_to_string(&err).unwrap();
    let pid: i32 = text
        .lines()
        .find_map(|l| {
            l.split("rank 1 of 2 (local rank 1, pid ")
                .nth(1)?
                .split(')')
                .next()?
                .parse()
                .ok()
        })
        .expect("rank 1's pid in the log");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = wait_bounded(&mut job, 300, "a killed rank");
    let text = std::fs::read_to_string(&err).unwrap();
    assert!(!status.success(), "{text}");
    assert!(text.contains("rank 1"), "{text}");
}

#[test]
fn sharded_evaluation_gives_the_recall_of_one_process() {
    if !have_gpu() {
        return;
    }
    let root = temp("mpi-eval");
    // 13 examples: shards of 6 and 7, in batches of 4.
    let data = csv(&root, 13);
    let model = fixture_model("clip");
    let run = |mut c: Command, out: &Path| -> serde_json::Value {
        c.args([
            "eval",
            "--model_name_or_path",
            model.to_str().unwrap(),
            "--validation_file",
            data.to_str().unwrap(),
            "--output_dir",
            out.to_str().unwrap(),
            "--max_seq_length",
            "16",
            "--per_device_eval_batch_size",
            "4",
        ]);
        ok(c.output().unwrap(), "eval");
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_results.json")).unwrap())
            .unwrap()
    };
    let one = run(bin(), &root.join("one"));
    let two = run(mpirun(2), &root.join("two"));
    for k in [
        "i2t_recall@1",
        "i2t_recall@5",
        "t2i_recall@1",
        "t2i_recall@5",
    ] {
        let key = format!("eval_{k}");
        assert_eq!(one[&key], two[&key], "{key}: {one} vs {two}");
    }
    let (a, b) = (
        one["eval_loss"].as_f64().unwrap(),
        two["eval_loss"].as_f64().unwrap(),
    );
    assert!(a.is_finite() && b.is_finite());
}

/// WebDataset shards of `sizes[s]` samples each in `root/shards`, and the
/// brace pattern naming them.
fn wds_shards(root: &Path, sizes: &[usize]) -> String {
    let dir = root.join("shards");
    std::fs::create_dir_all(&dir).unwrap();
    let mut g = 0usize;
    for (s, &n) in sizes.iter().enumerate() {
        let mut b =
            tar::Builder::new(std::fs::File::create(dir.join(format!("{s:03}.tar"))).unwrap());
        for _ in 0..n {
            let img = image::RgbImage::from_fn(40, 34, |x, y| {
                image::Rgb([
                    (g * 37 % 256) as u8,
                    ((x as usize * 5 + g * 30) % 256) as u8,
                    ((y as usize * 7 + g * 11) % 256) as u8,
                ])
            });
            let mut png = std::io::Cursor::new(Vec::new());
            img.write_to(&mut png, image::ImageFormat::Png).unwrap();
            let cap = format!("a {} picture number {g}", COLOURS[g % 6]);
            for (ext, data) in [("png", png.into_inner()), ("txt", cap.into_bytes())] {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                b.append_data(&mut h, format!("k.{s}/{g:05}.{ext}"), data.as_slice())
                    .unwrap();
            }
            g += 1;
        }
        b.into_inner().unwrap();
    }
    format!("{}/{{000..{:03}}}.tar", dir.display(), sizes.len() - 1)
}

/// Two ranks stream WebDataset shards dealt between them (of unequal
/// sizes: an epoch ends for both when either runs out); the checkpoint holds
/// both ranks' stream states, and a job resumed from a mid-epoch checkpoint
/// ends with the weights of the uninterrupted job.
#[test]
fn two_ranks_stream_their_own_shards_and_resume_exactly() {
    if !have_gpu() {
        return;
    }
    let root = temp("mpi-wds");
    let spec = wds_shards(&root, &[4, 5, 6, 3, 4]);
    let model = fixture_model("clip");
    let args = |out: &Path| -> Vec<String> {
        quick_train(
            &model,
            Path::new(&spec),
            out,
            &[
                "--warmup_steps",
                "1",
                "--per_device_train_batch_size",
                "2",
                "--max_steps",
                "9",
                "--save_steps",
                "4",
                "--shuffle_buffer",
                "3",
            ],
        )
    };
    let full = root.join("full");
    let o = ok(
        mpirun(2)
            .args(&args(&full)[..])
            .env("CLIP_WGPU_WDS_SNAPSHOT_EVERY", "3")
            .output()
            .unwrap(),
        "uninterrupted",
    );
    assert!(
        stderr(&o).contains("5 WebDataset shard(s)"),
        "{}",
        stderr(&o)
    );
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(full.join("checkpoint-4/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let ds = state["clip_wgpu"]["data_stream"].as_array().unwrap();
    assert_eq!(ds.len(), 2, "{ds:?}");
    for (r, p) in ds.iter().enumerate() {
        assert_eq!(p["rank"].as_u64(), Some(r as u64), "{p}");
        assert_eq!(p["epoch"], ds[0]["epoch"], "{p}");
    }
    let resumed = root.join("resumed");
    common::copy_dir(&full.join("checkpoint-4"), &resumed.join("checkpoint-4"));
    let o = ok(
        mpirun(2)
            .args(&args(&resumed)[..])
            .env("CLIP_WGPU_WDS_SNAPSHOT_EVERY", "3")
            .output()
            .unwrap(),
        "resumed",
    );
    assert!(stderr(&o).contains("resumed from"), "{}", stderr(&o));
    assert_eq!(relative_diff(&resumed, &full, 0.0, &[]), 0.0);
    // One process cannot take the two ranks' stream states.
    let o = bin()
        .args(&args(&resumed)[..])
        .arg("--max_steps")
        .arg("12")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("rank"), "{}", stderr(&o));
}

#[test]
fn sharded_evaluation_with_several_captions_per_picture() {
    if !have_gpu() {
        return;
    }
    let root = temp("mpi-eval-captions");
    std::fs::create_dir_all(root.join("imgs")).unwrap();
    // 15 examples of 8 pictures, the shards 0..7 and 7..15: picture 4's
    // captions straddle the boundary, pictures 1, 2 and 5 have captions in
    // both shards, picture 7 cannot be read.
    let pictures = [0, 1, 2, 0, 3, 4, 4, 4, 5, 2, 6, 6, 7, 1, 5];
    for i in 0..8 {
        let p = root.join(format!("imgs/{i}.png"));
        if i == 7 {
            std::fs::write(&p, b"not a picture").unwrap();
        } else {
            common::cli::write_image(&p, i);
        }
    }
    let mut csv = String::from("image_path,caption\n");
    for (row, i) in pictures.iter().enumerate() {
        csv += &format!(
            "imgs/{i}.png,a {} picture caption {row}\n",
            COLOURS[(i + row) % 6]
        );
    }
    let data = root.join("val.csv");
    std::fs::write(&data, csv).unwrap();
    let model = fixture_model("clip");
    let run = |mut c: Command, out: &Path| -> serde_json::Value {
        c.args([
            "eval",
            "--model_name_or_path",
            model.to_str().unwrap(),
            "--validation_file",
            data.to_str().unwrap(),
            "--output_dir",
            out.to_str().unwrap(),
            "--max_seq_length",
            "16",
            "--per_device_eval_batch_size",
            "3",
        ]);
        let o = ok(c.output().unwrap(), "eval");
        // One process reports the unreadable picture (rank 1, which reads
        // it in the job, is quiet).
        if out.ends_with("one") {
            assert!(stderr(&o).contains("imgs/7.png"), "{}", stderr(&o));
        }
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_results.json")).unwrap())
            .unwrap()
    };
    let one = run(bin(), &root.join("one"));
    let two = run(mpirun(2), &root.join("two"));
    for k in ["i2t", "t2i"] {
        for at in [1, 5, 10] {
            let key = format!("eval_{k}_recall@{at}");
            assert_eq!(one[&key], two[&key], "{key}: {one} vs {two}");
        }
    }
    assert!(one["eval_loss"].as_f64().unwrap().is_finite());
    assert!(two["eval_loss"].as_f64().unwrap().is_finite());
}

/// `--fp16` across ranks: a NaN gradient on rank 1 alone (injected there
/// only) makes both ranks skip that step and halve the loss scale (the
/// decision comes from the norm of the summed gradients); the ranks stay
/// identical step by step (--sync_check_steps 1) and end at the weights of
/// one process with the same skip.
#[test]
fn fp16_ranks_skip_an_overflowing_step_together() {
    if !have_gpu() {
        return;
    }
    let root = temp("mpi-fp16");
    let data = csv(&root, 32);
    let model = fixture_model("clip");
    let common = [
        "--max_steps",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--sync_check_steps",
        "1",
        "--fp16",
    ];
    let one = root.join("one");
    ok(
        bin()
            .args(train_args(&model, &data, &one, 8, &common))
            .env("CLIP_WGPU_FAULTS", "nan_grad@2")
            .output()
            .unwrap(),
        "1 process",
    );
    let two = root.join("two");
    let argv = train_args(&model, &data, &two, 4, &common);
    let o = ok(
        mpmd(&argv[..], &argv[..], Some("CLIP_WGPU_FAULTS=nan_grad@2"))
            .output()
            .unwrap(),
        "2 ranks",
    );
    let err = stderr(&o);
    assert!(
        err.contains("at loss scale 65536: skipped (fp16 loss scaling)")
            && err.contains("loss scale 65536 -> 32768"),
        "{err}"
    );
    let scales = |d: &Path| -> Vec<f64> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss_scale"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(scales(&two), [65536.0, 32768.0, 32768.0, 32768.0]);
    assert_eq!(scales(&one), scales(&two));
    // f16 activations: the ranks' half-batches sum some products in another
    // order, and an f32 difference of one unit can move a value to the
    // neighbouring f16 (a 1e-3 relative step) before AdamW: one f16 unit
    // bounds it (1.8e-5 measured on lavapipe).
    let worst = relative_diff(&two, &one, 1e-3, &ZERO_GRADIENT);
    eprintln!("fp16, 2 ranks vs 1 process: worst relative difference {worst:e}");
    std::fs::remove_dir_all(&root).unwrap();
}
