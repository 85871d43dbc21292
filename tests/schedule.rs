//! Learning-rate schedules against torch + transformers
//! (tests/fixtures/schedule/schedules.json, from generate.py beside it):
//! every value must be bit-identical to `scheduler.get_last_lr()`.

mod common;
use clip_wgpu::train::args::{parse, TrainArgs};
use clip_wgpu::train::schedule::{Schedule, SCHEDULER_TYPES};
use serde_json::{Map, Value};
use std::path::PathBuf;

fn fixture() -> Value {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedule/schedules.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

#[test]
fn matches_transformers_bit_for_bit() {
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    let mut names_seen = std::collections::BTreeSet::new();
    let mut values = 0;
    for c in cases {
        let name = c["name"].as_str().unwrap();
        names_seen.insert(name.to_string());
        let lr = c["lr"].as_f64().unwrap();
        let warmup = c["warmup"].as_u64().unwrap();
        let total = c["total"].as_u64().unwrap();
        let kwargs = c["kwargs"].as_object().unwrap();
        let s = Schedule::with_kwargs(name, lr, warmup, total, kwargs).unwrap();
        assert_eq!(s.base_lr(), lr);
        for (step, (bits, num)) in c["lr_bits"]
            .as_array()
            .unwrap()
            .iter()
            .zip(c["lrs"].as_array().unwrap())
            .enumerate()
        {
            let want = f64::from_bits(bits.as_str().unwrap().parse().unwrap());
            assert!(
                (want - num.as_f64().unwrap()).abs() <= 1e-18,
                "fixture self-check"
            );
            let got = s.lr_at(step as u64);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{name} lr {lr} warmup {warmup} total {total} kwargs {kwargs:?} step {step}: got {got:e}, want {want:e}"
            );
            values += 1;
        }
    }
    // Every implemented scheduler is covered.
    for t in SCHEDULER_TYPES {
        assert!(names_seen.contains(*t), "no fixture case for {t}");
    }
    println!(
        "{values} learning rates over {} schedules: all bit-identical",
        cases.len()
    );
}

#[test]
fn from_args_uses_warmup_rule() {
    // --warmup_steps 0.1 of 25 steps -> ceil(2.5) = 3 warmup steps.
    let a = TrainArgs {
        learning_rate: 2e-4,
        warmup_steps: 0.1,
        ..TrainArgs::default()
    };
    let s = Schedule::from_args(&a, 25).unwrap();
    assert_eq!(
        s,
        Schedule::Linear {
            lr: 2e-4,
            warmup: 3,
            total: 25
        }
    );
    assert_eq!(s.lr_at(0), 0.0);
    assert_eq!(s.lr_at(3), 2e-4);
    assert_eq!(s.lr_at(25), 0.0);
    assert_eq!(s.lr_at(1000), 0.0);

    let argv: Vec<String> = [
        "--train_file",
        "t.json",
        "--do_train",
        "--output_dir",
        "o",
        "--lr_scheduler_type",
        "cosine_with_restarts",
        "--lr_scheduler_kwargs",
        r#"{"num_cycles": 3}"#,
        "--warmup_ratio",
        "0.25",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (a, _) = parse(&argv).unwrap();
    let s = Schedule::from_args(&a, 12).unwrap();
    assert_eq!(
        s,
        Schedule::CosineWithRestarts {
            lr: 5e-5,
            warmup: 3,
            total: 12,
            num_cycles: 3.0
        }
    );
}

#[test]
fn state_for_checkpoints() {
    let s = Schedule::new("linear", 1e-3, 2, 10).unwrap();
    let j = s.to_json(4);
    assert_eq!(j["name"], "linear");
    assert_eq!(j["last_epoch"], 4);
    assert_eq!(j["_step_count"], 5);
    assert_eq!(j["num_warmup_steps"], 2);
    assert_eq!(j["num_training_steps"], 10);
    assert_eq!(j["_last_lr"][0].as_f64().unwrap(), s.lr_at(4));
    assert_eq!(j["base_lrs"][0].as_f64().unwrap(), 1e-3);
}

#[test]
fn errors() {
    let e = Schedule::new("triangle", 1e-3, 0, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("triangle") && e.contains("linear"), "{e}");
    let e = Schedule::new("reduce_lr_on_plateau", 1e-3, 0, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not supported"), "{e}");
    let e = Schedule::new("cosine_with_min_lr", 1e-3, 0, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("min_lr"), "{e}");
    let mut kw = Map::new();
    kw.insert("lr_end".into(), Value::from(1.0));
    let e = Schedule::with_kwargs("polynomial", 1e-3, 0, 10, &kw)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lr_end"), "{e}");
    let e = Schedule::with_kwargs("linear", 1e-3, 0, 10, &kw)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lr_end"), "{e}");
}

/// `train` follows `--lr_scheduler_kwargs`: cosine with restarts and
/// num_cycles 2 raises the learning rate again halfway (with the default
/// single cycle it only falls), as transformers' scheduler does.
#[test]
fn train_uses_the_scheduler_kwargs() {
    if !common::cli::have_gpu() {
        return;
    }
    let out = common::cli::temp("schedule-kwargs");
    let o = common::cli::bin()
        .args([
            "train",
            "--demo_train_samples",
            "16",
            "--demo_eval_samples",
            "4",
            "--per_device_train_batch_size",
            "2",
            "--max_steps",
            "8",
            "--warmup_steps",
            "0",
            "--logging_steps",
            "1",
            "--lr_scheduler_type",
            "cosine_with_restarts",
            "--lr_scheduler_kwargs",
            r#"{"num_cycles": 2}"#,
            "--no_progress",
            "--output_dir",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lrs: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("learning_rate").and_then(Value::as_f64))
        .collect();
    assert_eq!(lrs.len(), 8, "learning rates logged: {lrs:?}");
    let rises = lrs.windows(2).filter(|w| w[1] > w[0]).count();
    assert_eq!(rises, 1, "two cycles restart once: {lrs:?}");
    std::fs::remove_dir_all(&out).unwrap();
}
