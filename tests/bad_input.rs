//! Bad input through the real binary: every case must exit non-zero with an
//! error that names the culprit (the file, flag or value), never panic, and
//! never hang. The broken inputs are made in temporary folders from the
//! committed fixtures (tests/fixtures/clip/model, tests/fixtures/clip_roberta/model).
mod common;
use clip_wgpu::model::weights::{save_file, HostTensor, Weights};
use common::cli::{bin, have_gpu, picture_csv, temp};
use common::{copy_dir, fixture_model};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A case that takes longer than this is taken for an endless loop.
const TIMEOUT: Duration = Duration::from_secs(180);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The CLIP fixture model copied into `root/model`.
fn model_copy(root: &Path) -> PathBuf {
    let m = root.join("model");
    copy_dir(&fixture_model("clip"), &m);
    m
}

/// Edit the config.json of a model folder.
fn edit_config(model: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = model.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Run the binary with a time limit (an endless loop fails the test).
fn run(args: &[&str]) -> Run {
    let dir = std::env::temp_dir();
    let tag = format!(
        "clipwgpu-bad-out-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    )
    .replace(['(', ')'], "");
    let (out_p, err_p) = (
        dir.join(format!("{tag}.stdout")),
        dir.join(format!("{tag}.stderr")),
    );
    let mut child = bin()
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_p).unwrap())
        .stderr(std::fs::File::create(&err_p).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let err = std::fs::read_to_string(&err_p).unwrap_or_default();
            panic!("{args:?} still running after {TIMEOUT:?} (endless loop?); stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let r = Run {
        ok: status.success(),
        stdout: std::fs::read_to_string(&out_p).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_p).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(&out_p);
    let _ = std::fs::remove_file(&err_p);
    r
}

/// Run, and check: non-zero exit, no panic, every needle in stderr.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let r = run(args);
    assert!(
        !r.ok,
        "{args:?} succeeded; stderr:\n{}\nstdout:\n{}",
        r.stderr, r.stdout
    );
    assert!(
        !r.stderr.contains("panicked") && !r.stderr.contains("RUST_BACKTRACE"),
        "{args:?} panicked:\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("error"),
        "{args:?}: no error message:\n{}",
        r.stderr
    );
    for n in needles {
        assert!(
            r.stderr.contains(n),
            "{args:?}: the error does not mention {n:?}:\n{}",
            r.stderr
        );
    }
    eprintln!("--- {}", last_error(&r.stderr));
    r.stderr
}

/// The `error: ...` part of stderr, for the test log.
fn last_error(stderr: &str) -> &str {
    stderr
        .rfind("error:")
        .map_or(stderr, |i| &stderr[i..])
        .trim()
}

/// `train --do_train` on `train_file` with the model in `model`.
fn train_args<'a>(model: &'a str, train_file: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model_name_or_path",
        model,
        "--train_file",
        train_file,
        "--output_dir",
        out,
        "--do_train",
        "--per_device_train_batch_size",
        "2",
        "--max_steps",
        "1",
        "--no_progress",
    ]
}

/// Train on a 2-picture CSV with a copy of the fixture model broken by
/// `breakit`; the run must fail mentioning `needles`.
fn broken_model_fails(name: &str, breakit: impl FnOnce(&Path), needles: &[&str]) {
    broken_model_fails_in(name, breakit, needles, true)
}

/// [`broken_model_fails`], through `embed` too when `embed` (which reads the
/// image processor only for images).
fn broken_model_fails_in(name: &str, breakit: impl FnOnce(&Path), needles: &[&str], embed: bool) {
    if !have_gpu() {
        return;
    }
    let root = temp(name);
    let model = model_copy(&root);
    breakit(&model);
    let csv = picture_csv(&root, 2);
    let out = root.join("out");
    fails(&train_args(s(&model), s(&csv), s(&out)), needles);
    // The same model through `embed`.
    if embed {
        fails(&["embed", "--model", s(&model), "--text", "a cat"], needles);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

// ---------------------------------------------------------------- model folder

#[test]
fn missing_model_folder() {
    if !have_gpu() {
        return;
    }
    let root = temp("nomodel");
    let csv = picture_csv(&root, 2);
    let model = root.join("no-such-model");
    let out = root.join("out");
    fails(
        &train_args(s(&model), s(&csv), s(&out)),
        &["--model_name_or_path", s(&model)],
    );
    fails(
        &["embed", "--model", s(&model), "--text", "x"],
        &[s(&model)],
    );
    // Hub-style names get a hint that nothing is downloaded.
    fails(
        &train_args("openai/clip-vit-base-patch32", s(&csv), s(&out)),
        &["openai/clip-vit-base-patch32", "download"],
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn folder_that_is_not_a_model() {
    broken_model_fails(
        "noconfig",
        |m| std::fs::remove_file(m.join("config.json")).unwrap(),
        &["config.json", "not a Hugging Face model folder"],
    );
}

#[test]
fn config_is_not_json() {
    broken_model_fails(
        "configjson",
        |m| std::fs::write(m.join("config.json"), "{\"model_type\": \"clip\",,}").unwrap(),
        &["config.json", "not valid JSON", "line 1"],
    );
}

#[test]
fn config_value_of_the_wrong_type() {
    broken_model_fails(
        "configtype",
        |m| edit_config(m, |v| v["vision_config"]["hidden_size"] = "abc".into()),
        &["config.json", "vision_config.hidden_size", "\"abc\""],
    );
}

#[test]
fn config_without_model_type() {
    broken_model_fails(
        "configincomplete",
        |m| {
            edit_config(m, |v| {
                v.as_object_mut().unwrap().remove("model_type");
            })
        },
        &["config.json", "model_type"],
    );
}

#[test]
fn config_with_unsupported_model_type() {
    broken_model_fails(
        "configbert",
        |m| edit_config(m, |v| v["model_type"] = "bert".into()),
        &["config.json", "\"bert\"", "not supported"],
    );
}

#[test]
fn config_with_impossible_sizes() {
    // Heads that do not divide the width.
    broken_model_fails(
        "configheads",
        |m| edit_config(m, |v| v["text_config"]["num_attention_heads"] = 5.into()),
        &["text_config", "num_attention_heads 5"],
    );
    // A size so large that the arithmetic on it would overflow.
    broken_model_fails(
        "confighuge",
        |m| {
            edit_config(m, |v| {
                v["vision_config"]["image_size"] = serde_json::json!(1u64 << 40);
                v["vision_config"]["patch_size"] = 1.into();
            })
        },
        &["vision_config.image_size"],
    );
}

#[test]
fn roberta_config_with_too_few_positions() {
    // RoBERTa's positions start after padding_idx: max_position_embeddings
    // must exceed pad_token_id + 1.
    if !have_gpu() {
        return;
    }
    let root = temp("robertapos");
    let model = root.join("model");
    copy_dir(&fixture_model("clip_roberta"), &model);
    edit_config(&model, |v| {
        v["text_config"]["max_position_embeddings"] = 2.into();
    });
    fails(
        &["embed", "--model", s(&model), "--text", "a cat"],
        &["text_config", "max_position_embeddings"],
    );
    // A random initialisation from the config alone (no weights to
    // disagree with): this used to underflow computing the text positions.
    edit_config(&model, |v| {
        v["text_config"]["max_position_embeddings"] = 1.into();
    });
    let csv = picture_csv(&root, 2);
    let cfg = model.join("config.json");
    let out = root.join("out");
    fails(
        &[
            "train",
            "--config_name",
            s(&cfg),
            "--tokenizer_name",
            s(&fixture_model("clip")),
            "--image_processor_name",
            s(&fixture_model("clip")),
            "--train_file",
            s(&csv),
            "--output_dir",
            s(&out),
            "--do_train",
            "--no_progress",
        ],
        &["config.json", "text_config.max_position_embeddings"],
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn config_name_too_large_to_build() {
    // Random initialisation of an absurd config: refused up front, not an
    // allocation failure.
    if !have_gpu() {
        return;
    }
    let root = temp("cfghuge");
    let model = model_copy(&root);
    edit_config(&model, |v| {
        v["text_config"]["vocab_size"] = serde_json::json!(1 << 24);
        v["text_config"]["hidden_size"] = serde_json::json!(1 << 16);
    });
    let csv = picture_csv(&root, 2);
    let cfg = model.join("config.json");
    let out = root.join("out");
    fails(
        &[
            "train",
            "--config_name",
            s(&cfg),
            "--train_file",
            s(&csv),
            "--output_dir",
            s(&out),
            "--do_train",
            "--no_progress",
        ],
        &["config.json", "parameters"],
    );
    std::fs::remove_dir_all(&root).unwrap();
}

// ---------------------------------------------------------------- safetensors

fn weights_of(model: &Path) -> Vec<(String, HostTensor)> {
    let w = Weights::load_file(&model.join("model.safetensors")).unwrap();
    w.tensors.into_iter().collect()
}

#[test]
fn safetensors_truncated() {
    broken_model_fails(
        "sttrunc",
        |m| {
            let p = m.join("model.safetensors");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() * 2 / 3]).unwrap();
        },
        &["model.safetensors"],
    );
}

#[test]
fn safetensors_header_is_garbage() {
    broken_model_fails(
        "stgarbage",
        |m| {
            let p = m.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            // Keep the length, scribble over the JSON.
            for x in &mut b[8..40] {
                *x = b'#';
            }
            std::fs::write(&p, b).unwrap();
        },
        &["model.safetensors", "header"],
    );
}

#[test]
fn safetensors_header_longer_than_the_file() {
    broken_model_fails(
        "stlen",
        |m| {
            let p = m.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            let n = (b.len() as u64 + 1000).to_le_bytes();
            b[..8].copy_from_slice(&n);
            std::fs::write(&p, b).unwrap();
        },
        &["model.safetensors", "header"],
    );
}

#[test]
fn safetensors_empty_file() {
    broken_model_fails(
        "stempty",
        |m| std::fs::write(m.join("model.safetensors"), b"").unwrap(),
        &["model.safetensors"],
    );
}

#[test]
fn safetensors_integer_weight() {
    const NAME: &str = "visual_projection.weight";
    for (dtype, needle) in [
        (safetensors::Dtype::I8, "I8"),
        (safetensors::Dtype::I64, "integers"),
    ] {
        broken_model_fails(
            &format!("stdtype{needle}"),
            |m| {
                let p = m.join("model.safetensors");
                let tensors = weights_of(m);
                let size = dtype.bitsize() / 8;
                let bytes: Vec<Vec<u8>> = tensors
                    .iter()
                    .map(|(n, t)| {
                        if n == NAME {
                            vec![1u8; t.data.len() * size]
                        } else {
                            bytemuck::cast_slice(&t.data).to_vec()
                        }
                    })
                    .collect();
                let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
                    .iter()
                    .zip(&bytes)
                    .map(|((n, t), b)| {
                        let dt = if n == NAME {
                            dtype
                        } else {
                            safetensors::Dtype::F32
                        };
                        (
                            n.clone(),
                            safetensors::tensor::TensorView::new(dt, t.shape.clone(), b).unwrap(),
                        )
                    })
                    .collect();
                std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
            },
            &[NAME, needle],
        );
    }
}

#[test]
fn safetensors_wrong_shape() {
    broken_model_fails(
        "stshape",
        |m| {
            let mut tensors = weights_of(m);
            for (n, t) in &mut tensors {
                if n == "text_projection.weight" {
                    t.shape = vec![t.shape[1], t.shape[0]];
                }
            }
            save_file(&m.join("model.safetensors"), &tensors).unwrap();
        },
        &["text_projection.weight", "wrong shape"],
    );
}

#[test]
fn safetensors_missing_tensor() {
    broken_model_fails(
        "stmissing",
        |m| {
            let tensors: Vec<_> = weights_of(m)
                .into_iter()
                .filter(|(n, _)| n != "text_model.final_layer_norm.bias")
                .collect();
            save_file(&m.join("model.safetensors"), &tensors).unwrap();
        },
        &["text_model.final_layer_norm.bias", "missing"],
    );
}

#[test]
fn safetensors_absent() {
    broken_model_fails(
        "stabsent",
        |m| std::fs::remove_file(m.join("model.safetensors")).unwrap(),
        &["model.safetensors"],
    );
}

// ---------------------------------------------------------------- tokenizer

#[test]
fn tokenizer_missing() {
    broken_model_fails(
        "toknone",
        |m| std::fs::remove_file(m.join("tokenizer.json")).unwrap(),
        &["tokenizer.json"],
    );
}

#[test]
fn tokenizer_broken() {
    broken_model_fails(
        "tokbroken",
        |m| {
            let p = m.join("tokenizer.json");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() / 2]).unwrap();
        },
        &["tokenizer.json"],
    );
    broken_model_fails(
        "tokwrong",
        |m| std::fs::write(m.join("tokenizer.json"), "{\"version\": \"1.0\"}").unwrap(),
        &["tokenizer.json"],
    );
    // A syntax error inside the "decoder" object: the tokenizers library
    // panics on it (an `expect` in its deserializer), which must come out
    // as an error naming the file.
    broken_model_fails(
        "tokdecoder",
        |m| {
            let p = m.join("tokenizer.json");
            let t = std::fs::read_to_string(&p).unwrap();
            let at = t.find("\"decoder\"").unwrap();
            let brace = at + t[at..].find('{').unwrap();
            let t = format!("{}{{\"x\": nul, {}", &t[..brace], &t[brace + 1..]);
            std::fs::write(&p, t).unwrap();
        },
        &["tokenizer.json", "malformed"],
    );
}

#[test]
fn max_seq_length_shorter_than_the_special_tokens() {
    // CLIP adds <|startoftext|> and <|endoftext|>: 1 token leaves no room.
    if !have_gpu() {
        return;
    }
    let root = temp("maxlen");
    let csv = picture_csv(&root, 2);
    let model = fixture_model("clip");
    let out = root.join("out");
    let mut a = train_args(s(&model), s(&csv), s(&out));
    a.extend(["--max_seq_length", "1"]);
    fails(&a, &["--max_seq_length", "2 special"]);
    // 2 is enough (an empty caption between the two).
    let out2 = root.join("out2");
    let mut a = train_args(s(&model), s(&csv), s(&out2));
    a.extend(["--max_seq_length", "2"]);
    let r = run(&a);
    assert!(r.ok, "{}", r.stderr);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn tokenizer_of_another_model() {
    // The CLIP tokenizer (49,408 tokens) with a RoBERTa tower of 300.
    if !have_gpu() {
        return;
    }
    let root = temp("tokvocab");
    let model = root.join("model");
    copy_dir(&fixture_model("clip_roberta"), &model);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
    ] {
        std::fs::copy(fixture_model("clip").join(f), model.join(f)).unwrap();
    }
    let csv = picture_csv(&root, 2);
    let out = root.join("out");
    // The id that does not fit and the table size are named. (Checking the
    // tokenizer against the model when both are loaded, naming the
    // tokenizer file, belongs in the trainer's setup.)
    fails(&train_args(s(&model), s(&csv), s(&out)), &["49406", "300"]);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn processor_config_broken() {
    broken_model_fails_in(
        "procjson",
        |m| std::fs::write(m.join("processor_config.json"), "{\"image_processor\": {").unwrap(),
        &["processor_config.json"],
        false,
    );
    broken_model_fails_in(
        "proccrop",
        |m| {
            let p = m.join("processor_config.json");
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            v["image_processor"]["crop_size"] = serde_json::json!({"height": 0, "width": 30});
            std::fs::write(&p, v.to_string()).unwrap();
        },
        &["processor_config.json", "crop_size.height"],
        false,
    );
    broken_model_fails_in(
        "procstd",
        |m| {
            let p = m.join("processor_config.json");
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            v["image_processor"]["image_std"] = serde_json::json!([0.2, 0.0, 0.2]);
            std::fs::write(&p, v.to_string()).unwrap();
        },
        &["processor_config.json", "image_std", "non-zero"],
        false,
    );
}

// ---------------------------------------------------------------- data sets

/// Train on `file` (contents `text`) next to 2 good pictures.
fn bad_table(name: &str, file_name: &str, text: &str, needles: &[&str]) {
    if !have_gpu() {
        return;
    }
    let root = temp(name);
    picture_csv(&root, 2);
    let f = root.join(file_name);
    std::fs::write(&f, text).unwrap();
    let out = root.join("out");
    let model = fixture_model("clip");
    fails(&train_args(s(&model), s(&f), s(&out)), needles);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn table_missing_column() {
    bad_table(
        "nocol",
        "t.csv",
        "image_path,text\nimgs/0.png,a picture\n",
        &["t.csv", "no column \"caption\"", "\"text\""],
    );
    bad_table(
        "nocoljson",
        "t.jsonl",
        "{\"image\": \"imgs/0.png\", \"caption\": \"x\"}\n",
        &["t.jsonl", "no column \"image_path\"", "\"image\""],
    );
}

#[test]
fn jsonl_malformed_line() {
    bad_table(
        "badjsonl",
        "t.jsonl",
        "{\"image_path\": \"imgs/0.png\", \"caption\": \"x\"}\n{\"image_path\": \"imgs/1.png\", \n",
        &["t.jsonl:2", "JSON"],
    );
    bad_table(
        "jsonlarray",
        "t.jsonl",
        "{\"image_path\": \"imgs/0.png\", \"caption\": \"x\"}\n[1, 2]\n",
        &["t.jsonl:2", "not a JSON object"],
    );
}

#[test]
fn csv_wrong_field_count() {
    bad_table(
        "csvfields",
        "t.csv",
        "image_path,caption\nimgs/0.png,a picture\nimgs/1.png,a red, round picture\n",
        &["t.csv:3", "3 fields", "header has 2"],
    );
    bad_table(
        "csvquote",
        "t.csv",
        "image_path,caption\nimgs/0.png,\"a picture\nimgs/1.png,x\n",
        &["t.csv:2", "never closed"],
    );
}

#[test]
fn table_not_utf8() {
    if !have_gpu() {
        return;
    }
    let root = temp("csvlatin1");
    picture_csv(&root, 1);
    let f = root.join("t.csv");
    std::fs::write(&f, b"image_path,caption\nimgs/0.png,caf\xe9\n").unwrap();
    let out = root.join("out");
    let model = fixture_model("clip");
    fails(
        &train_args(s(&model), s(&f), s(&out)),
        &["t.csv:2", "UTF-8"],
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn table_with_no_rows() {
    bad_table(
        "csvempty",
        "t.csv",
        "image_path,caption\n",
        &["no examples"],
    );
}

/// A COCO layout in `root` with train2017/ left out.
fn coco_without_images(root: &Path) {
    std::fs::create_dir_all(root.join("annotations")).unwrap();
    std::fs::create_dir_all(root.join("val2017")).unwrap();
    let doc = serde_json::json!({
        "images": [{"id": 1, "file_name": "000000000001.png"}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "a picture"}],
    });
    for split in ["train", "val"] {
        std::fs::write(
            root.join(format!("annotations/captions_{split}2017.json")),
            doc.to_string(),
        )
        .unwrap();
    }
}

#[test]
fn coco_without_image_folder() {
    if !have_gpu() {
        return;
    }
    let root = temp("coco");
    let data = root.join("coco");
    coco_without_images(&data);
    let out = root.join("out");
    let model = fixture_model("clip");
    let coco_args = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--model_name_or_path",
            s(&model),
            "--output_dir",
            s(&out),
            "--data_dir",
            s(&data),
            "--dataset_name",
            "ydshieh/coco_dataset_script",
            "--dataset_config_name=2017",
            "--no_progress",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let a = coco_args(&["--do_train"]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    fails(&a, &["train2017", "does not exist"]);
    // Annotations missing too.
    std::fs::remove_file(data.join("annotations/captions_val2017.json")).unwrap();
    let a = coco_args(&["--do_eval"]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    fails(&a, &["captions_val2017.json", "does not exist"]);
    // A captions file that is not COCO's.
    std::fs::write(
        data.join("annotations/captions_val2017.json"),
        "{\"data\": []}",
    )
    .unwrap();
    let a = coco_args(&["--do_eval"]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    fails(&a, &["captions_val2017.json", "no \"images\""]);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn no_usable_images() {
    if !have_gpu() {
        return;
    }
    let root = temp("noimages");
    let model = fixture_model("clip");
    let out = root.join("out");
    // A few pictures, none readable: missing files and a text file.
    std::fs::write(root.join("corrupt.png"), "not a picture").unwrap();
    let f = root.join("few.csv");
    std::fs::write(
        &f,
        "image_path,caption\nmissing1.png,a\ncorrupt.png,b\nmissing2.jpg,c\n",
    )
    .unwrap();
    fails(
        &train_args(s(&model), s(&f), s(&out)),
        &["could be loaded", "missing1.png"],
    );
    // Many more than the loader tries before giving up.
    let mut csv = String::from("image_path,caption\n");
    for i in 0..200 {
        csv += &format!("gone/{i}.png,picture {i}\n");
    }
    let f = root.join("many.csv");
    std::fs::write(&f, csv).unwrap();
    // (A failed run leaves metrics.jsonl in its output_dir, so each run
    // gets its own.)
    let out = root.join("out2");
    fails(
        &train_args(s(&model), s(&f), s(&out)),
        &["could be loaded", "none of the 32", "/gone/"],
    );
    // The same for evaluation.
    let out = root.join("out3");
    let mut a = vec![
        "eval",
        "--model_name_or_path",
        s(&model),
        "--validation_file",
        s(&f),
        "--output_dir",
        s(&out),
        "--no_progress",
    ];
    fails(&a, &["could be loaded"]);
    // And for a folder of pictures with captions whose pictures are broken.
    let dir = root.join("folder");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..3 {
        std::fs::write(dir.join(format!("{i}.png")), "junk").unwrap();
        std::fs::write(dir.join(format!("{i}.txt")), "a caption").unwrap();
    }
    let out = root.join("out4");
    a = vec![
        "train",
        "--model_name_or_path",
        s(&model),
        "--data_dir",
        s(&dir),
        "--output_dir",
        s(&out),
        "--do_train",
        "--no_progress",
    ];
    fails(&a, &["could be loaded"]);
    std::fs::remove_dir_all(&root).unwrap();
}

// ---------------------------------------------------------------- flags

#[test]
fn batch_size_zero() {
    // Rejected while parsing the flags: no adapter needed.
    for flag in [
        "--per_device_train_batch_size",
        "--per_device_eval_batch_size",
    ] {
        fails(
            &["train", flag, "0", "--do_train"],
            &[flag.trim_start_matches('-'), "at least 1"],
        );
    }
    fails(
        &["train", "--per_device_train_batch_size", "-4"],
        &["per_device_train_batch_size", "-4"],
    );
    fails(
        &["train", "--per_device_train_batch_size", "many"],
        &["per_device_train_batch_size", "many"],
    );
}

#[test]
fn batch_larger_than_the_dataset() {
    if !have_gpu() {
        return;
    }
    let root = temp("bigbatch");
    let csv = picture_csv(&root, 3);
    let model = fixture_model("clip");
    let out = root.join("out");
    // As the Trainer: one smaller batch per epoch.
    let r = run(&[
        "train",
        "--model_name_or_path",
        s(&model),
        "--train_file",
        s(&csv),
        "--validation_file",
        s(&csv),
        "--output_dir",
        s(&out),
        "--do_train",
        "--do_eval",
        "--per_device_train_batch_size",
        "64",
        "--per_device_eval_batch_size",
        "64",
        "--num_train_epochs",
        "2",
        "--no_progress",
    ]);
    assert!(r.ok, "failed:\n{}", r.stderr);
    assert!(!r.stderr.contains("panicked"));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["global_step"], 2, "one step per epoch: {state}");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
            .unwrap();
    assert!(all["eval_loss"].as_f64().unwrap().is_finite(), "{all}");
    // With --dataloader_drop_last the only batch is dropped: nothing could
    // ever be trained, which must be an error, not an endless loop.
    fails(
        &[
            "train",
            "--model_name_or_path",
            s(&model),
            "--train_file",
            s(&csv),
            "--output_dir",
            s(&root.join("out2")),
            "--do_train",
            "--per_device_train_batch_size",
            "64",
            "--dataloader_drop_last",
            "--no_progress",
        ],
        &["64", "drop_last"],
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn drop_last_with_too_few_readable_images() {
    // 4 rows fill a batch of 4 on paper, but one picture is unreadable.
    if !have_gpu() {
        return;
    }
    let root = temp("droplast");
    picture_csv(&root, 3);
    let f = root.join("t.csv");
    std::fs::write(
        &f,
        "image_path,caption\nimgs/0.png,a\nimgs/1.png,b\nimgs/gone.png,c\nimgs/2.png,d\n",
    )
    .unwrap();
    let model = fixture_model("clip");
    let out = root.join("out");
    fails(
        &[
            "train",
            "--model_name_or_path",
            s(&model),
            "--train_file",
            s(&f),
            "--output_dir",
            s(&out),
            "--do_train",
            "--per_device_train_batch_size",
            "4",
            "--dataloader_drop_last",
            "--no_progress",
        ],
        &["drop_last", "gone.png"],
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn output_dir_with_a_previous_run() {
    if !have_gpu() {
        return;
    }
    let root = temp("outdir");
    let csv = picture_csv(&root, 2);
    let model = fixture_model("clip");
    let out = root.join("out");
    // A folder holding a previous run's files but no checkpoint.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("all_results.json"), "{}").unwrap();
    std::fs::write(out.join("config.json"), "{}").unwrap();
    fails(
        &train_args(s(&model), s(&csv), s(&out)),
        &[
            "Output directory",
            s(&out),
            "already exists and is not empty",
            "--overwrite_output_dir",
        ],
    );
    // With --overwrite_output_dir it trains.
    let mut a = train_args(s(&model), s(&csv), s(&out));
    a.push("--overwrite_output_dir");
    let r = run(&a);
    assert!(r.ok, "{}", r.stderr);
    // An output_dir that is a file.
    let file = root.join("a-file");
    std::fs::write(&file, "x").unwrap();
    fails(
        &train_args(s(&model), s(&csv), s(&file)),
        &["--output_dir", s(&file), "not a folder"],
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn conflicting_flags() {
    // Data flags are checked while parsing: no adapter needed.
    let root = temp("conflict");
    let csv = root.join("t.csv");
    std::fs::write(&csv, "image_path,caption\n").unwrap();
    fails(
        &[
            "train",
            "--data_dir",
            s(&root),
            "--train_file",
            s(&csv),
            "--do_train",
        ],
        &["--data_dir", "--train_file"],
    );
    fails(
        &["train", "--train_file", s(&csv), "--do_eval"],
        &["--do_eval", "--validation_file"],
    );
    fails(
        &[
            "train",
            "--dataset_name",
            "ydshieh/coco_dataset_script",
            "--do_train",
        ],
        &["--dataset_name", "--data_dir"],
    );
    fails(
        &[
            "train",
            "--train_file",
            s(&root.join("t.txt")),
            "--do_train",
        ],
        &["--train_file", "t.txt", "csv"],
    );
    fails(
        &["train", "--max_steps", "0", "--do_train"],
        &["--max_steps 0"],
    );
    fails(
        &["train", "--do_train", "--do_train=maybe"],
        &["do_train", "maybe"],
    );
    fails(
        &["train", "--per_device_train_batch_size"],
        &["per_device_train_batch_size"],
    );
    std::fs::remove_dir_all(&root).unwrap();
}
