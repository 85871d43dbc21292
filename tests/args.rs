//! `clip-wgpu train` argument parsing: run_clip.py command lines as users
//! paste them, transformers' defaults and step arithmetic (checked against
//! tests/fixtures/schedule/steps.json, written by the Trainer itself).

use clip_wgpu::train::args::{
    parse, usage, wants_help, DataSource, IntervalStrategy, Resume, TrainArgs,
};
use serde_json::Value;
use std::path::PathBuf;

fn argv(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

fn ok(s: &[&str]) -> (TrainArgs, Vec<String>) {
    match parse(&argv(s)) {
        Ok(r) => r,
        Err(e) => panic!("{s:?} should parse: {e:#}"),
    }
}

fn err(s: &[&str]) -> String {
    match parse(&argv(s)) {
        Ok((a, _)) => panic!("{s:?} should fail, parsed as {a:?}"),
        Err(e) => format!("{e:#}"),
    }
}

const DATA: &[&str] = &[
    "--train_file",
    "t.json",
    "--validation_file",
    "v.json",
    "--output_dir",
    "o",
];

fn with_data(extra: &[&str]) -> Vec<&'static str> {
    // Leaks a little in tests only: keeps call sites short.
    let mut v: Vec<&'static str> = DATA.to_vec();
    for e in extra {
        v.push(Box::leak(e.to_string().into_boxed_str()));
    }
    v.push("--do_train");
    v
}

#[test]
fn seed_command_line() {
    // The transformers example's COCO command, as the shell hands it over
    // (quotes already stripped).
    let (a, notes) = ok(&[
        "--output_dir",
        "out",
        "--model_name_or_path",
        "M",
        "--data_dir",
        "D",
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
        "--per_device_train_batch_size=64",
        "--per_device_eval_batch_size=64",
        "--learning_rate=5e-5",
        "--warmup_steps=0",
        "--weight_decay",
        "0.1",
        "--overwrite_output_dir",
    ]);
    assert_eq!(a.output_dir, PathBuf::from("out"));
    assert_eq!(a.model_name_or_path, Some(PathBuf::from("M")));
    assert_eq!(a.data_dir, Some(PathBuf::from("D")));
    assert_eq!(
        a.dataset_name.as_deref(),
        Some("ydshieh/coco_dataset_script")
    );
    assert_eq!(a.dataset_config_name.as_deref(), Some("2017"));
    assert_eq!(a.image_column, "image_path");
    assert_eq!(a.caption_column, "caption");
    assert!(a.do_train && a.do_eval && a.overwrite_output_dir);
    assert_eq!(a.per_device_train_batch_size, 64);
    assert_eq!(a.per_device_eval_batch_size, 64);
    assert_eq!(a.learning_rate, 5e-5);
    assert_eq!(a.warmup_steps, 0.0);
    assert_eq!(a.weight_decay, 0.1);
    // Untouched defaults.
    assert_eq!(a.num_train_epochs, 3.0);
    assert_eq!(a.max_steps, -1);
    assert_eq!(a.lr_scheduler_type, "linear");
    assert_eq!(a.seed, 42);
    assert_eq!(a.max_seq_length, 128);
    assert_eq!(
        a.data_source().unwrap(),
        DataSource::Coco {
            data_dir: PathBuf::from("D"),
            config: "2017".into()
        }
    );
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("--remove_unused_columns has no effect here"),
        "{notes:?}"
    );
}

#[test]
fn defaults_are_transformers() {
    let d = TrainArgs::default();
    assert_eq!(d.per_device_train_batch_size, 8);
    assert_eq!(d.per_device_eval_batch_size, 8);
    assert_eq!(d.learning_rate, 5e-5);
    assert_eq!(d.weight_decay, 0.0);
    assert_eq!(
        (d.adam_beta1, d.adam_beta2, d.adam_epsilon),
        (0.9, 0.999, 1e-8)
    );
    assert_eq!(d.max_grad_norm, 1.0);
    assert_eq!(d.num_train_epochs, 3.0);
    assert_eq!(d.max_steps, -1);
    assert_eq!(d.logging_steps, 500.0);
    assert_eq!(d.save_steps, 500.0);
    assert_eq!(d.save_strategy, IntervalStrategy::Steps);
    assert_eq!(d.eval_strategy, IntervalStrategy::No);
    assert_eq!(d.eval_steps, None);
    assert_eq!(d.gradient_accumulation_steps, 1);
    assert_eq!(d.output_dir, PathBuf::from("trainer_output"));
    assert_eq!(d.image_column, "image_path");
    assert_eq!(d.caption_column, "caption");
}

#[test]
fn hyphens_equals_and_booleans() {
    let (a, notes) = ok(&[
        "--train-file=t.json",
        "--validation-file",
        "v.json",
        "--do-train",
        "--do_eval",
        "true",
        "--per-device-train-batch-size",
        "16",
        "--learning-rate=1e-4",
        "--num-train-epochs",
        "2.5",
        "--freeze_vision_model=1",
        "--freeze-text-model",
        "No",
        "--dataloader_drop_last",
        "T",
        "--lr-scheduler-type",
        "cosine",
        "--max_steps",
        "-1",
        "--output_dir",
        "o",
    ]);
    assert!(notes.is_empty(), "{notes:?}");
    assert!(a.do_train && a.do_eval);
    assert_eq!(a.per_device_train_batch_size, 16);
    assert_eq!(a.learning_rate, 1e-4);
    assert_eq!(a.num_train_epochs, 2.5);
    assert!(a.freeze_vision_model && !a.freeze_text_model && a.dataloader_drop_last);
    assert_eq!(a.lr_scheduler_type, "cosine");
    assert_eq!(
        a.data_source().unwrap(),
        DataSource::Files {
            train: Some("t.json".into()),
            validation: Some("v.json".into())
        }
    );

    // Negated booleans; bad boolean values.
    let (a, notes) = ok(&with_data(&[
        "--no_remove_unused_columns",
        "--do_eval",
        "--no-do-eval",
    ]));
    assert!(!a.do_eval);
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[0].starts_with("--remove_unused_columns has no effect"));
    assert!(notes[1].contains("--do_eval given more than once"));
    let e = err(&with_data(&["--do_eval=maybe"]));
    assert!(e.contains("--do_eval") && e.contains("maybe"), "{e}");
    let e = err(&with_data(&["--no_do_eval=1"]));
    assert!(e.contains("takes no value"), "{e}");
}

#[test]
fn ignored_flags_get_one_note_each() {
    let (a, notes) = ok(&with_data(&[
        "--tf32",
        "--fp16_full_eval",
        "False",
        "--report_to",
        "wandb",
        "tensorboard",
        "--push_to_hub",
        "--hub_model_id=x/y",
        "--tf32=True",
        "--logging_dir",
        "runs",
        "--dataloader_num_workers",
        "4",
        "--optim",
        "adamw_torch",
        "--seed",
        "7",
    ]));
    assert_eq!(a.seed, 7, "values after ignored list flags still parse");
    assert_eq!(a.dataloader_num_workers, 4);
    let want = [
        "--tf32 ",
        "--fp16_full_eval ",
        "--report_to ",
        "--push_to_hub ",
        "--hub_model_id ",
        "--logging_dir ",
    ];
    for w in want {
        assert_eq!(
            notes.iter().filter(|n| n.starts_with(w)).count(),
            1,
            "{w}: {notes:?}"
        );
    }
    assert!(
        notes.iter().all(|n| n.contains("has no effect here")),
        "{notes:?}"
    );
    assert_eq!(notes.len(), want.len(), "{notes:?}");
}

#[test]
fn unknown_flags_suggest() {
    // An unambiguous prefix is accepted (argparse's allow_abbrev).
    let (a, notes) = ok(&with_data(&["--learning_rat", "1e-4"]));
    assert_eq!(a.learning_rate, 1e-4);
    assert!(
        notes.iter().any(|n| n.contains("taken as --learning_rate")),
        "{notes:?}"
    );

    let e = err(&with_data(&["--learnig_rate", "1e-4"]));
    assert!(
        e.contains("unknown flag --learnig_rate") && e.contains("--learning_rate"),
        "{e}"
    );
    let e = err(&with_data(&["--epochs", "3"]));
    assert!(e.contains("--num_train_epochs"), "{e}");
    let e = err(&with_data(&["--batch_size", "3"]));
    assert!(e.contains("--per_device_train_batch_size"), "{e}");
    let e = err(&with_data(&["--per_device", "3"]));
    assert!(e.contains("ambiguous"), "{e}");
    let e = err(&with_data(&["oops"]));
    assert!(e.contains("'oops'"), "{e}");
}

#[test]
fn bad_values_name_flag_and_value() {
    for (args, flag, bad) in [
        (vec!["--learning_rate", "abc"], "--learning_rate", "abc"),
        (
            vec!["--per_device_train_batch_size", "0"],
            "--per_device_train_batch_size",
            "0",
        ),
        (
            vec!["--per_device_train_batch_size", "8.5"],
            "--per_device_train_batch_size",
            "8.5",
        ),
        (vec!["--num_train_epochs=-1"], "--num_train_epochs", "-1"),
        (vec!["--seed", "-3"], "--seed", "-3"),
        (vec!["--learning_rate", "nan"], "--learning_rate", "nan"),
        (vec!["--adam_beta2", "1.0"], "--adam_beta2", "1"),
        (
            vec!["--gradient_accumulation_steps", "0"],
            "--gradient_accumulation_steps",
            "0",
        ),
        (
            vec!["--eval_strategy", "sometimes"],
            "--eval_strategy",
            "sometimes",
        ),
        (
            vec!["--lr_scheduler_type", "triangle"],
            "--lr_scheduler_type",
            "triangle",
        ),
        (vec!["--warmup_steps", "-5"], "--warmup_steps", "-5"),
        (vec!["--logging_steps", "2.5"], "--logging_steps", "2.5"),
        (vec!["--optim", "adafactor"], "--optim", "adafactor"),
        (vec!["--max_train_samples", "0"], "--max_train_samples", "0"),
        (vec!["--workers", "0"], "--workers", "0"),
    ] {
        let e = err(&with_data(&args));
        assert!(e.contains(flag) && e.contains(bad), "{args:?}: {e}");
    }
    let e = err(&with_data(&["--learning_rate"]));
    assert!(e.contains("--learning_rate needs a value"), "{e}");
    let e = err(&with_data(&["--learning_rate", "--do_eval"]));
    assert!(e.contains("--learning_rate needs a value"), "{e}");
    let e = err(&with_data(&["--load_best_model_at_end"]));
    assert!(e.contains("--load_best_model_at_end"), "{e}");
    let e = err(&with_data(&["--save_strategy", "best"]));
    assert!(e.contains("--save_strategy"), "{e}");
    let e = err(&with_data(&[
        "--lr_scheduler_type",
        "cosine",
        "--lr_scheduler_kwargs",
        "{\"power\": 2}",
    ]));
    assert!(e.contains("power"), "{e}");
}

#[test]
fn data_source_rules() {
    // Another hub dataset, no local files: no Hub access.
    let e = err(&["--dataset_name", "nlphuji/flickr30k", "--do_train"]);
    assert!(e.contains("no Hugging Face Hub access"), "{e}");
    // ... with local files: the files, with a note.
    let (a, notes) = ok(&with_data(&["--dataset_name", "nlphuji/flickr30k"]));
    assert!(matches!(a.data_source().unwrap(), DataSource::Files { .. }));
    assert!(notes.iter().any(|n| n.contains("flickr30k")), "{notes:?}");
    // COCO script without --data_dir; other configs.
    let e = err(&[
        "--dataset_name",
        "ydshieh/coco_dataset_script",
        "--do_train",
    ]);
    assert!(e.contains("--data_dir"), "{e}");
    let e = err(&[
        "--dataset_name",
        "./coco_dataset_script.py",
        "--dataset_config_name",
        "2014",
        "--data_dir",
        "D",
        "--do_train",
    ]);
    assert!(e.contains("2017"), "{e}");
    // --data_dir with files and no dataset name: two data sets.
    let e = err(&with_data(&["--data_dir", "D"]));
    assert!(
        e.contains("--data_dir") && e.contains("--train_file"),
        "{e}"
    );
    // --data_dir alone: a captioned picture folder.
    let (a, _) = ok(&["--data_dir", "pics", "--do_train"]);
    assert_eq!(
        a.data_source().unwrap(),
        DataSource::Folder { dir: "pics".into() }
    );
    // Files without the split the task needs.
    let e = err(&["--train_file", "t.csv", "--do_train", "--do_eval"]);
    assert!(e.contains("--validation_file"), "{e}");
    let e = err(&["--train_file", "t.txt", "--do_train"]);
    assert!(e.contains("csv or a json"), "{e}");
    let e = err(&["--train_file", "t.csv"]);
    assert!(e.contains("nothing to do"), "{e}");
}

#[test]
fn demo_defaults() {
    let (a, notes) = ok(&[]);
    assert_eq!(a.data_source().unwrap(), DataSource::Demo);
    assert!(a.do_train && a.do_eval);
    assert_eq!(a.output_dir, PathBuf::from("out/demo"));
    assert!(notes.iter().any(|n| n.contains("demo")), "{notes:?}");
    let (a, _) = ok(&[
        "--do_eval",
        "--output_dir",
        "x",
        "--demo_train_samples",
        "64",
        "--no_progress",
    ]);
    assert!(!a.do_train && a.do_eval && a.no_progress);
    assert_eq!(a.demo_train_samples, 64);
    assert_eq!(a.output_dir, PathBuf::from("x"));
    let (a, notes) = ok(&["--train_file", "t.csv", "--do_train"]);
    assert_eq!(a.output_dir, PathBuf::from("trainer_output"));
    assert!(
        notes.iter().any(|n| n.contains("trainer_output")),
        "{notes:?}"
    );
}

#[test]
fn aliases_and_transformers4_names() {
    let (a, _) = ok(&with_data(&[
        "--evaluation_strategy",
        "steps",
        "--logging_steps",
        "50",
        "--feature_extractor_name",
        "P",
        "--per_gpu_train_batch_size",
        "4",
        "--disable_tqdm",
        "True",
    ]));
    assert_eq!(a.eval_strategy, IntervalStrategy::Steps);
    assert_eq!(
        a.eval_steps,
        Some(50.0),
        "eval_steps falls back to logging_steps"
    );
    assert_eq!(a.image_processor_name, Some(PathBuf::from("P")));
    assert_eq!(a.per_device_train_batch_size, 4);
    assert!(a.no_progress);

    // eval_strategy != no turns on do_eval, as TrainingArguments does.
    let (a, _) = ok(&with_data(&["--eval_strategy=epoch"]));
    assert!(a.do_eval);

    // warmup_ratio (transformers 4) and warmup_steps.
    let (a, notes) = ok(&with_data(&["--warmup_ratio", "0.1"]));
    assert_eq!(a.warmup_steps_for(95), 10);
    assert!(notes.is_empty() || !notes.iter().any(|n| n.contains("warmup")));
    let (a, notes) = ok(&with_data(&[
        "--warmup_ratio",
        "0.1",
        "--warmup_steps",
        "3",
    ]));
    assert_eq!(a.warmup_steps_for(95), 3);
    assert!(
        notes.iter().any(|n| n.contains("--warmup_steps wins")),
        "{notes:?}"
    );

    // Repeated: last wins, with a note.
    let (a, notes) = ok(&with_data(&["--seed", "1", "--seed=2"]));
    assert_eq!(a.seed, 2);
    assert!(
        notes.iter().any(|n| n.contains("more than once")),
        "{notes:?}"
    );
}

#[test]
fn resume_from_checkpoint() {
    let (a, _) = ok(&with_data(&["--resume_from_checkpoint", "True"]));
    assert_eq!(a.resume(), Some(Resume::Latest));
    let (a, _) = ok(&with_data(&["--resume_from_checkpoint=out/checkpoint-500"]));
    assert_eq!(a.resume(), Some(Resume::Path("out/checkpoint-500".into())));
    let (a, _) = ok(&with_data(&["--resume_from_checkpoint", "false"]));
    assert_eq!(a.resume(), None);
    assert_eq!(a.resume_from_checkpoint, None);
}

#[test]
fn json_file_argument() {
    let dir = std::env::temp_dir().join(format!("clip-wgpu-args-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("args.json");
    std::fs::write(
        &f,
        r#"{"output_dir": "o", "train_file": "t.json", "do_train": true, "learning_rate": 0.001,
            "report_to": ["none"], "lr_scheduler_type": "cosine_with_restarts",
            "lr_scheduler_kwargs": {"num_cycles": 2}, "max_train_samples": null}"#,
    )
    .unwrap();
    let (a, notes) = ok(&[f.to_str().unwrap()]);
    assert!(a.do_train);
    assert_eq!(a.learning_rate, 0.001);
    assert_eq!(
        a.lr_scheduler_kwargs.get("num_cycles"),
        Some(&Value::from(2))
    );
    assert_eq!(a.max_train_samples, None);
    assert!(
        notes.iter().any(|n| n.starts_with("--report_to")),
        "{notes:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn help() {
    assert!(wants_help(&argv(&["--do_train", "--help"])));
    assert!(!wants_help(&argv(&["--do_train"])));
    let u = usage();
    println!("{u}");
    for f in [
        "--per_device_train_batch_size",
        "--lr_scheduler_type",
        "--demo_train_samples",
    ] {
        assert!(u.contains(f), "{f}");
    }
    assert!(u.contains("--fp16\n") && u.contains("--save_dtype <value>"));
    assert!(!u.contains("--tf32"));
}

/// --fp16 / --bf16 are HF's booleans, one at most; --save_dtype names a
/// format; both are kept in the run's record of its arguments.
#[test]
fn precision_flags() {
    use clip_wgpu::precision::Precision;
    let (a, notes) = ok(&with_data(&[]));
    assert_eq!(
        (a.precision, a.save_dtype),
        (Precision::F32, Precision::F32)
    );
    assert!(notes.is_empty(), "{notes:?}");
    for (flags, want) in [
        (&["--fp16"][..], Precision::F16),
        (&["--fp16", "True"][..], Precision::F16),
        (&["--bf16=true"][..], Precision::Bf16),
        (&["--fp16", "--no_fp16", "--bf16", "1"][..], Precision::Bf16),
        (&["--fp16", "False", "--bf16", "False"][..], Precision::F32),
    ] {
        let (a, _) = ok(&with_data(flags));
        assert_eq!(a.precision, want, "{flags:?}");
        assert_eq!(a.to_json()["precision"], want.name(), "{flags:?}");
    }
    let e = err(&with_data(&["--fp16", "--bf16"]));
    assert!(e.contains("--fp16 and --bf16 both given"), "{e}");
    let e = err(&with_data(&["--fp16", "maybe"]));
    assert!(e.contains("--fp16 maybe"), "{e}");
    for (v, want) in [
        ("f16", Precision::F16),
        ("bfloat16", Precision::Bf16),
        ("f32", Precision::F32),
    ] {
        let (a, _) = ok(&with_data(&["--save_dtype", v]));
        assert_eq!(a.save_dtype, want);
        assert_eq!(a.to_json()["save_dtype"], want.name());
    }
    let e = err(&with_data(&["--save_dtype", "int8"]));
    assert!(
        e.contains("--save_dtype int8") && e.contains("f32, f16 or bf16"),
        "{e}"
    );
}

#[test]
fn check_paths_explains_no_hub() {
    let (a, _) = ok(&with_data(&[
        "--model_name_or_path",
        "openai/clip-vit-base-patch32",
    ]));
    let e = format!("{:#}", a.check_paths().unwrap_err());
    assert!(e.contains("no Hugging Face Hub access"), "{e}");
}

fn fixture(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/schedule")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// Step counts as Trainer.set_initial_training_values and
/// TrainerState.compute_steps compute them.
#[test]
fn step_arithmetic_matches_trainer() {
    let fx = fixture("steps.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let n = c["n"].as_u64().unwrap() as usize;
        let a = TrainArgs {
            per_device_train_batch_size: c["batch"].as_u64().unwrap() as usize,
            dataloader_drop_last: c["drop_last"].as_bool().unwrap(),
            num_train_epochs: c["epochs"].as_f64().unwrap(),
            max_steps: c["max_steps"].as_i64().unwrap(),
            gradient_accumulation_steps: c["grad_accum"].as_u64().unwrap() as usize,
            ..TrainArgs::default()
        };
        let batches = a.batches_per_epoch(n);
        assert_eq!(
            batches as u64,
            c["batches_per_epoch"].as_u64().unwrap(),
            "{c}"
        );
        assert_eq!(
            a.update_steps_per_epoch(batches) as u64,
            c["update_steps_per_epoch"].as_u64().unwrap(),
            "{c}"
        );
        let total = a.total_steps(batches);
        assert_eq!(total as u64, c["total_steps"].as_u64().unwrap(), "{c}");
        assert_eq!(
            a.num_epochs(batches) as u64,
            c["num_train_epochs"].as_u64().unwrap(),
            "{c}"
        );
        for (frac, want) in c["ratio_steps"].as_object().unwrap() {
            let f: f64 = frac.parse().unwrap();
            let r = TrainArgs {
                logging_steps: f,
                eval_steps: Some(f),
                save_steps: f,
                ..a.clone()
            };
            let got = [
                r.logging_steps_for(total),
                r.eval_steps_for(total),
                r.save_steps_for(total),
            ];
            let want: Vec<usize> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(got.to_vec(), want, "{c} ratio {frac}");
        }
    }
}

/// TrainingArguments.get_warmup_steps, for integer and ratio --warmup_steps.
#[test]
fn warmup_matches_transformers() {
    let fx = fixture("schedules.json");
    for c in fx["cases"].as_array().unwrap() {
        let a = TrainArgs {
            warmup_steps: c["warmup_steps_arg"].as_f64().unwrap(),
            ..TrainArgs::default()
        };
        let total = c["total"].as_u64().unwrap() as usize;
        assert_eq!(
            a.warmup_steps_for(total) as u64,
            c["warmup"].as_u64().unwrap(),
            "{c}"
        );
    }
}

#[test]
fn nonfinite_step_limit() {
    let (a, _) = ok(&with_data(&[]));
    assert!(!a.skip_nonfinite_steps);
    assert_eq!(a.max_consecutive_nonfinite_steps, 10);
    let (a, _) = ok(&with_data(&[
        "--skip_nonfinite_steps",
        "--max-consecutive-nonfinite-steps",
        "3",
    ]));
    assert!(a.skip_nonfinite_steps);
    assert_eq!(a.max_consecutive_nonfinite_steps, 3);
    // 0: no limit.
    let (a, _) = ok(&with_data(&["--max_consecutive_nonfinite_steps=0"]));
    assert_eq!(a.max_consecutive_nonfinite_steps, 0);
    for bad in ["-1", "2.5", "many"] {
        let flag = format!("--max_consecutive_nonfinite_steps={bad}");
        let e = err(&with_data(&[flag.as_str()]));
        assert!(
            e.contains("--max_consecutive_nonfinite_steps") && e.contains(bad),
            "{bad}: {e}"
        );
    }
    assert!(usage().contains("--max_consecutive_nonfinite_steps <value>"));
}
