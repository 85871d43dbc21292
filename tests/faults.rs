//! Faults during `clip-wgpu train`, end to end with the tiny transformers-made
//! CLIP of tests/fixtures/clip/model on a generated CSV data set: SIGTERM and
//! Ctrl-C (checkpoint at the step boundary, exact resume), kill -9 at several
//! moments (before the first checkpoint, in the middle of a save, after the
//! last one), a NaN gradient or loss (stop with names, or skip), GPU out of
//! memory and a lost device (both injected through CLIP_WGPU_FAULTS; the
//! device is really destroyed). After every resume, metrics.jsonl holds each
//! step once.
// Signals (SIGTERM, SIGINT, SIGSTOP, SIGKILL) are Unix's.
#![cfg(unix)]
mod common;
use clip_wgpu::model::weights::Weights;
use clip_wgpu::train::checkpoint;
use clip_wgpu::train::metrics::MetricsLog;
use common::cli::{bin, have_gpu, picture_csv, quick_train, spawn, stderr, temp};
use common::fixture_model;
use std::path::Path;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

/// The training command: 12 examples, batch 2, `steps` steps, a checkpoint
/// every `save` steps.
fn args(csv: &Path, out: &Path, steps: usize, save: usize) -> Vec<String> {
    let (steps, save) = (steps.to_string(), save.to_string());
    quick_train(
        &fixture_model("clip"),
        csv,
        out,
        &[
            "--per_device_train_batch_size",
            "2",
            "--warmup_steps",
            "2",
            "--max_steps",
            &steps,
            "--save_steps",
            &save,
        ],
    )
}

fn run(argv: &[String], faults: Option<&str>) -> Output {
    let mut c = bin();
    c.args(argv);
    if let Some(f) = faults {
        c.env("CLIP_WGPU_FAULTS", f);
    }
    c.output().unwrap()
}

fn signal(child: &Child, sig: i32) {
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

/// Wait (polling fast) until `cond` holds; false if the child exited first.
fn wait_for(child: &mut Child, what: &str, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return cond();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "waited too long for {what}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn same_weights(a: &Path, b: &Path) {
    let a = Weights::load_dir(a).unwrap();
    let b = Weights::load_dir(b).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    let mut worst = 0.0f32;
    for (k, t) in &a.tensors {
        for (x, y) in t.data.iter().zip(&b.tensors[k].data) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("max abs difference vs the uninterrupted run: {worst:e}");
    assert_eq!(worst, 0.0, "the resumed run differs by {worst}");
}

/// A complete checkpoint: its state, optimizer and weights read back, and the
/// model loads for embedding.
fn assert_loadable(dir: &Path, step: u64) {
    let l = checkpoint::load_checkpoint(dir).unwrap();
    assert_eq!(l.state.global_step, step, "{}", dir.display());
    assert!(l.optimizer.get("step").is_ok());
    let w = Weights::load_dir(dir).unwrap();
    assert!(w
        .tensors
        .values()
        .all(|t| t.data.iter().all(|x| x.is_finite())));
    let e = bin()
        .args([
            "embed",
            "--model",
            dir.to_str().unwrap(),
            "--text",
            "a red picture",
        ])
        .output()
        .unwrap();
    assert!(e.status.success(), "{}", stderr(&e));
}

/// metrics.jsonl of a run logging every step (no evaluation) holds steps
/// 1..=`last`, each once, in order: a resumed run dropped what the killed
/// one logged after its checkpoint.
fn assert_metrics_steps(out: &Path, last: u64) {
    let path = out.join("metrics.jsonl");
    let steps: Vec<u64> = MetricsLog::read(&path)
        .unwrap()
        .iter()
        .filter_map(|r| r.get("step")?.as_u64())
        .collect();
    assert_eq!(
        steps,
        (1..=last).collect::<Vec<_>>(),
        "steps in {}",
        path.display()
    );
}

fn step_of(dir: &Path) -> u64 {
    dir.file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .strip_prefix("checkpoint-")
        .unwrap()
        .parse()
        .unwrap()
}

fn temp_dirs(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(".checkpoint-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sigterm_saves_at_the_step_boundary_and_the_rerun_resumes_exactly() {
    if !have_gpu() {
        return;
    }
    let root = temp("sigterm");
    let csv = picture_csv(&root, 12);
    let full = root.join("full");
    let o = run(&args(&csv, &full, 24, 4), None);
    assert!(o.status.success(), "{}", stderr(&o));

    let out = root.join("term");
    let argv = args(&csv, &out, 24, 4);
    let err = root.join("term.log");
    let mut child = spawn(bin().args(&argv), &err);
    let appeared = wait_for(&mut child, "checkpoint-4", || {
        out.join("checkpoint-4/trainer_state.json").exists()
    });
    assert!(appeared, "{}", std::fs::read_to_string(&err).unwrap());
    signal(&child, libc::SIGTERM);
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(&err).unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{log}");
    assert!(log.contains("interrupted by SIGTERM"), "{log}");
    assert!(log.contains("Run the same command again"), "{log}");
    // The checkpoint of the step it stopped at, named in the message.
    let last = checkpoint::latest_checkpoint(&out).unwrap();
    let step = step_of(&last);
    assert!((4..24).contains(&step), "stopped at {step}");
    assert!(log.contains(&last.display().to_string()), "{log}");
    assert!(temp_dirs(&out).is_empty());
    assert!(!out.join("model.safetensors").exists());
    assert_loadable(&last, step);
    // The same command again resumes there and ends where the full run did.
    let o = run(&argv, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("resumed from {}", last.display())),
        "{e}"
    );
    same_weights(&full, &out);
    assert_metrics_steps(&out, 24);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_second_ctrl_c_stops_at_once() {
    if !have_gpu() {
        return;
    }
    let root = temp("twice");
    let csv = picture_csv(&root, 12);
    let out = root.join("out");
    let argv = args(&csv, &out, 200, 4);
    let err = root.join("log");
    // The run holds at the step boundary after the first signal (a test
    // fault that logs when it does), so the second arrives while the first
    // is being handled, however loaded the machine.
    let mut child = spawn(
        bin()
            .args(&argv)
            .env("CLIP_WGPU_FAULTS", "hold_at_interrupt@0"),
        &err,
    );
    assert!(wait_for(&mut child, "checkpoint-4", || {
        out.join("checkpoint-4/trainer_state.json").exists()
    }));
    signal(&child, libc::SIGINT);
    assert!(wait_for(
        &mut child,
        "the run to hold after the first signal",
        || {
            std::fs::read_to_string(&err).is_ok_and(|l| l.contains("holding at the step boundary"))
        }
    ));
    signal(&child, libc::SIGINT);
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(&err).unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{log}");
    assert!(log.contains("second interrupt"), "{log}");
    // Whatever it was doing, the latest complete checkpoint loads.
    let last = checkpoint::latest_checkpoint(&out).unwrap();
    assert_loadable(&last, step_of(&last));
    std::fs::remove_dir_all(&root).unwrap();
}

/// kill -9 before the first checkpoint, in the middle of a save (the process
/// is frozen with SIGSTOP while its `.checkpoint-N.tmp-PID` folder exists,
/// then killed), and right after the final checkpoint: each time the latest
/// complete checkpoint loads, and the same command resumes (or starts over)
/// and ends with the uninterrupted run's weights.
#[test]
fn kill_9_at_several_moments_leaves_a_resumable_run() {
    if !have_gpu() {
        return;
    }
    let root = temp("kill");
    let csv = picture_csv(&root, 12);
    let full = root.join("full");
    let o = run(&args(&csv, &full, 16, 2), None);
    assert!(o.status.success(), "{}", stderr(&o));

    // 1. Before the first checkpoint: after the first logged step.
    let out = root.join("early");
    let argv = args(&csv, &out, 16, 8);
    let mut child = spawn(bin().args(&argv), &root.join("early.log"));
    let metrics = out.join("metrics.jsonl");
    assert!(wait_for(&mut child, "a logged step", || {
        std::fs::read_to_string(&metrics).is_ok_and(|s| s.contains("\"step\""))
    }));
    child.kill().unwrap();
    child.wait().unwrap();
    if checkpoint::latest_checkpoint(&out).is_none() {
        let o = run(&argv, None);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("starting over"), "{}", stderr(&o));
        same_weights(&full, &out);
        assert_metrics_steps(&out, 16);
    }

    // 2. In the middle of a save, after an earlier complete checkpoint.
    let out = root.join("mid-save");
    let argv = args(&csv, &out, 16, 2);
    let mut caught = None;
    for attempt in 0..3 {
        let _ = std::fs::remove_dir_all(&out);
        let mut child = spawn(bin().args(&argv), &root.join("mid-save.log"));
        let pid = child.id() as libc::pid_t;
        loop {
            let seen = wait_for(&mut child, "a save", || {
                !temp_dirs(&out).is_empty() && checkpoint::latest_checkpoint(&out).is_some()
            });
            if !seen {
                break;
            }
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            let tmp = temp_dirs(&out);
            if let Some(t) = tmp.first() {
                // Frozen mid-save: kill it there.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                child.wait().unwrap();
                caught = Some(t.clone());
                break;
            }
            // The rename won the race: let it go on to the next save.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            std::thread::sleep(Duration::from_micros(100));
        }
        if caught.is_some() {
            break;
        }
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("attempt {attempt}: no save caught in progress, again");
    }
    let tmp = caught.expect("never caught a save in progress");
    eprintln!("killed during the save into {tmp}");
    assert!(out.join(&tmp).is_dir());
    let last = checkpoint::latest_checkpoint(&out).unwrap();
    assert_loadable(&last, step_of(&last));
    let o = run(&argv, None);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("removed") && e.contains(&tmp), "{e}");
    assert!(
        e.contains(&format!("resumed from {}", last.display())),
        "{e}"
    );
    assert!(temp_dirs(&out).is_empty());
    same_weights(&full, &out);
    // The killed run had logged the steps after `last` (at least the one
    // being saved); the rerun dropped them before logging them again.
    assert!(e.contains("dropped") && e.contains("metrics.jsonl"), "{e}");
    assert_metrics_steps(&out, 16);

    // 3. Right after the final checkpoint, before the model is saved.
    let out = root.join("late");
    let argv = args(&csv, &out, 16, 4);
    let mut child = spawn(bin().args(&argv), &root.join("late.log"));
    assert!(wait_for(&mut child, "checkpoint-16", || {
        out.join("checkpoint-16/trainer_state.json").exists()
    }));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_loadable(&out.join("checkpoint-16"), 16);
    let o = run(&argv, None);
    assert!(o.status.success(), "{}", stderr(&o));
    same_weights(&full, &out);
    assert_metrics_steps(&out, 16);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_nan_gradient_stops_with_its_name_or_is_skipped() {
    if !have_gpu() {
        return;
    }
    let root = temp("nan");
    let csv = picture_csv(&root, 12);
    let out = root.join("stop");
    let argv = args(&csv, &out, 12, 3);
    let o = run(&argv, Some("nan_grad:text_projection@5"));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("training step 5"), "{e}");
    assert!(e.contains("text_projection.weight (NaN)"), "{e}");
    assert!(e.contains("--skip_nonfinite_steps"), "{e}");
    // Nothing was saved from the bad step; the last good checkpoint stays.
    let last = checkpoint::latest_checkpoint(&out).unwrap();
    assert_eq!(step_of(&last), 3);
    assert!(e.contains(&last.display().to_string()), "{e}");
    assert_loadable(&last, 3);

    // Skipping: the step is counted and reported, the run finishes.
    let out = root.join("skip");
    let mut argv = args(&csv, &out, 12, 3);
    argv.push("--skip_nonfinite_steps".into());
    let o = run(&argv, Some("nan_grad@5,nan_grad:text_model@9"));
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("step 5: ") && e.contains("skipped"), "{e}");
    assert!(e.contains("skipped 2 optimizer step(s)"), "{e}");
    let tr: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_results.json")).unwrap())
            .unwrap();
    assert_eq!(
        tr["train_skipped_nonfinite_steps"].as_u64(),
        Some(2),
        "{tr}"
    );
    assert!(tr["train_loss"].as_f64().unwrap().is_finite());
    let state = checkpoint::load_checkpoint(&out.join("checkpoint-12")).unwrap();
    assert_eq!(state.state.skipped_nonfinite_steps, 2);
    // torch's step count: only the updates that happened.
    let opt = Weights::load_file(&out.join("checkpoint-12/optimizer.safetensors")).unwrap();
    assert_eq!(opt.get("step").unwrap().data[0], 10.0);
    assert_loadable(&out.join("checkpoint-12"), 12);
    std::fs::remove_dir_all(&root).unwrap();
}

/// With --skip_nonfinite_steps, a run where every step is non-finite stops
/// after --max_consecutive_nonfinite_steps (default 10) skips in a row instead
/// of going on doing nothing, naming the step and keeping the checkpoints
/// (whose weights are the last good ones); a finite step resets the count.
#[test]
fn skipping_stops_after_too_many_nonfinite_steps_in_a_row() {
    if !have_gpu() {
        return;
    }
    let root = temp("nan-streak");
    let csv = picture_csv(&root, 12);
    let out = root.join("default");
    let mut argv = args(&csv, &out, 24, 3);
    argv.push("--skip_nonfinite_steps".into());
    // Every step from 4 on.
    let every: Vec<String> = (4..=24).map(|s| format!("nan_grad@{s}")).collect();
    let o = run(&argv, Some(&every.join(",")));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("training step 13: "), "{e}");
    assert!(e.contains("10 non-finite steps in a row"), "{e}");
    assert!(e.contains("steps 4-13"), "{e}");
    assert!(e.contains("--max_consecutive_nonfinite_steps 10"), "{e}");
    assert!(!e.contains("step 14: "), "{e}");
    // The checkpoints saved during the streak hold the weights of step 3,
    // finite and loadable; no final model, no save left half-done.
    let last = checkpoint::latest_checkpoint(&out).unwrap();
    assert_eq!(step_of(&last), 12, "{e}");
    assert!(
        e.contains(&format!(
            "the latest checkpoint, {}, is intact",
            last.display()
        )),
        "{e}"
    );
    assert_loadable(&last, 12);
    assert_loadable(&out.join("checkpoint-3"), 3);
    same_weights(&out.join("checkpoint-3"), &last);
    assert!(!out.join("model.safetensors").exists());
    assert!(temp_dirs(&out).is_empty());

    // A smaller limit, and a finite step in between starts the count again:
    // 2 is skipped, 3 trains, 4 and 5 are skipped and make 2 in a row.
    let out = root.join("two");
    let mut argv = args(&csv, &out, 12, 3);
    argv.extend(
        [
            "--skip_nonfinite_steps",
            "--max_consecutive_nonfinite_steps",
            "2",
        ]
        .map(String::from),
    );
    let o = run(&argv, Some("nan_grad@2,nan_grad@4,nan_grad@5"));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("step 2: ") && e.contains("skipped"), "{e}");
    assert!(e.contains("training step 5: "), "{e}");
    assert!(e.contains("2 non-finite steps in a row (steps 4-5"), "{e}");
    let last = checkpoint::latest_checkpoint(&out).unwrap();
    assert_eq!(step_of(&last), 3, "{e}");
    assert_loadable(&last, 3);
    std::fs::remove_dir_all(&root).unwrap();
}

/// A learning rate far too large makes the loss NaN for real.
#[test]
fn a_nan_loss_from_a_huge_learning_rate_stops_the_run() {
    if !have_gpu() {
        return;
    }
    let root = temp("lr");
    let csv = picture_csv(&root, 12);
    let out = root.join("out");
    let mut argv = args(&csv, &out, 12, 3);
    argv.extend(
        [
            "--learning_rate",
            "1e30",
            "--warmup_steps",
            "0",
            "--max_grad_norm",
            "0",
        ]
        .map(String::from),
    );
    let o = run(&argv, None);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("the loss is NaN"), "{e}");
    assert!(e.contains("training step 2"), "{e}");
    assert!(e.contains("no checkpoint has been saved"), "{e}");
    assert!(checkpoint::latest_checkpoint(&out).is_none());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn out_of_memory_names_the_batch_size() {
    if !have_gpu() {
        return;
    }
    let root = temp("oom");
    let csv = picture_csv(&root, 12);
    let out = root.join("out");
    let o = run(&args(&csv, &out, 12, 3), Some("oom@5"));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("--per_device_train_batch_size 2"), "{e}");
    assert!(
        e.contains("--per_device_train_batch_size 1 with --gradient_accumulation_steps 2: the contrastive loss stays one loss over all 2 pairs"),
        "{e}"
    );
    assert!(e.contains("--gradient_checkpointing"), "{e}");
    assert!(e.contains("during training step 5"), "{e}");
    assert_loadable(&checkpoint::latest_checkpoint(&out).unwrap(), 3);
    std::fs::remove_dir_all(&root).unwrap();
}

/// The device is destroyed (wgpu reports it lost) in a step, and in the
/// middle of a save: the run stops with the latest checkpoint intact, and the
/// same command resumes from it to the uninterrupted run's weights.
#[test]
fn a_lost_device_stops_cleanly_and_the_run_resumes() {
    if !have_gpu() {
        return;
    }
    let root = temp("lost");
    let csv = picture_csv(&root, 12);
    let full = root.join("full");
    let o = run(&args(&csv, &full, 12, 3), None);
    assert!(o.status.success(), "{}", stderr(&o));
    for (fault, when) in [
        ("device_lost@5", "during training step 5"),
        (
            "device_lost_at_save@6",
            "while saving the checkpoint of step 6",
        ),
    ] {
        let out = root.join(fault.replace('@', "-"));
        let argv = args(&csv, &out, 12, 3);
        let o = run(&argv, Some(fault));
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(e.contains("GPU device was lost") && e.contains(when), "{e}");
        let last = checkpoint::latest_checkpoint(&out).unwrap();
        assert_eq!(step_of(&last), 3, "{e}");
        assert!(e.contains(&last.display().to_string()), "{e}");
        assert_loadable(&last, 3);
        let o = run(&argv, None);
        assert!(o.status.success(), "{}", stderr(&o));
        same_weights(&full, &out);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// Resume refuses a checkpoint whose run read the data in another order
/// (another global batch or number of examples), naming both values;
/// `--ignore_data_skip` takes its weights and optimizer anyway and reads
/// the epoch from its start.
#[test]
fn resume_refuses_a_checkpoint_of_another_batch() {
    if !have_gpu() {
        return;
    }
    let root = temp("resume-batch");
    let csv = picture_csv(&root, 12);
    let out = root.join("out");
    let o = run(&args(&csv, &out, 2, 2), None);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut other = args(&csv, &out, 4, 2);
    let at = other
        .iter()
        .position(|a| a == "--per_device_train_batch_size")
        .unwrap();
    other[at + 1] = "3".into();
    let o = run(&other, None);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("checkpoint-2")
            && e.contains("had 2 examples per global batch, this one has 3")
            && e.contains("--ignore_data_skip"),
        "{e}"
    );
    other.push("--ignore_data_skip".into());
    let o = run(&other, None);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("resumed from") && e.contains("--ignore_data_skip"),
        "{e}"
    );
    assert_loadable(&out.join("checkpoint-4"), 4);
    std::fs::remove_dir_all(&root).unwrap();
}
