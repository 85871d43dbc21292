//! The dual-encoder preparation step against what transformers writes
//! (tests/fixtures/prepare/make.py): config.json, processor and tokenizer
//! files, which tensor lands where, and the fresh tensors' distributions.
//!
//! `CLIP_WGPU_KEEP_PREPARED=DIR cargo test --test prepare` leaves the
//! prepared folders in DIR/<case> for `make.py --check DIR`.
mod common;
use clip_wgpu::data::{ImageProcessorConfig, TextTokenizer};
use clip_wgpu::model::clip::ClipModel;
use clip_wgpu::model::config::ModelConfig;
use clip_wgpu::model::prepare::prepare_dual_encoder;
use clip_wgpu::model::weights::{save_file, HostTensor, Weights};
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

struct Case {
    name: &'static str,
    vision: PathBuf,
    text: PathBuf,
    projection_dim: Option<usize>,
}

fn cases() -> Vec<Case> {
    let f = fixtures();
    vec![
        Case {
            name: "clip_mlm",
            vision: f.join("clip/model"),
            text: f.join("prepare/roberta_mlm"),
            projection_dim: None,
        },
        Case {
            name: "vision_model",
            vision: f.join("prepare/clip_vision"),
            text: f.join("prepare/roberta_model"),
            projection_dim: Some(16),
        },
    ]
}

/// A scratch folder, removed on drop unless it is under
/// CLIP_WGPU_KEEP_PREPARED.
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        if let Ok(dir) = std::env::var("CLIP_WGPU_KEEP_PREPARED") {
            let path = PathBuf::from(dir).join(name);
            let _ = std::fs::remove_dir_all(&path);
            return Scratch { path, keep: true };
        }
        let path =
            std::env::temp_dir().join(format!("clipwgpu-prepare-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        Scratch { path, keep: false }
    }
    fn tmp(name: &str) -> Scratch {
        let mut s = Scratch::new(name);
        if s.keep {
            s.path = std::env::temp_dir()
                .join(format!("clipwgpu-prepare-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&s.path);
            s.keep = false;
        }
        s
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn std_of(t: &HostTensor) -> (f64, f64) {
    let n = t.data.len() as f64;
    let mean = t.data.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = t
        .data
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

#[test]
fn matches_transformers_preparation() {
    for case in cases() {
        let out = Scratch::new(case.name);
        prepare_dual_encoder(&case.vision, &case.text, &out.path, case.projection_dim, 0).unwrap();
        let want = read_json(&fixtures().join(format!("prepare/expected/{}.json", case.name)));
        let name = case.name;

        // Files: transformers' set, plus the source's other tokenizer files.
        let mut files: Vec<String> = std::fs::read_dir(&out.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        for f in want["files"].as_array().unwrap() {
            assert!(
                files.contains(&f.as_str().unwrap().to_string()),
                "{name}: no {f}"
            );
        }
        for f in &files {
            let theirs = want["files"].as_array().unwrap().iter().any(|w| w == f);
            assert!(
                theirs || case.text.join(f).is_file(),
                "{name}: unexpected file {f}"
            );
        }

        // config.json: transformers' but for the folder names it records.
        let mut got = read_json(&out.path.join("config.json"));
        let mut exp = want["config"].clone();
        for (sub, dir) in [("vision_config", &case.vision), ("text_config", &case.text)] {
            assert_eq!(
                got[sub]["_name_or_path"].as_str(),
                Some(dir.to_str().unwrap()),
                "{name}: {sub}._name_or_path"
            );
            got[sub].as_object_mut().unwrap().remove("_name_or_path");
            exp[sub].as_object_mut().unwrap().remove("_name_or_path");
        }
        assert_eq!(got, exp, "{name}: config.json differs from transformers'");
        let config = ModelConfig::from_file(&out.path.join("config.json")).unwrap();

        assert_eq!(
            read_json(&out.path.join("processor_config.json")),
            want["processor_config"],
            "{name}: processor_config.json"
        );
        // tokenizer_config.json: the same settings (transformers adds
        // load-time bookkeeping keys, and processor_class, to its copy).
        let mut got = read_json(&out.path.join("tokenizer_config.json"));
        let mut exp = want["tokenizer_config"].clone();
        let copied = case.text.join("tokenizer_config.json").is_file();
        if !copied {
            assert_eq!(got["processor_class"], "VisionTextDualEncoderProcessor");
        }
        for k in ["is_local", "local_files_only", "processor_class"] {
            got.as_object_mut().unwrap().remove(k);
            exp.as_object_mut().unwrap().remove(k);
        }
        if got.get("model_max_length").is_none() {
            // Absent means no limit, transformers' VERY_LARGE_INTEGER.
            assert!(exp["model_max_length"].as_f64().unwrap() >= 1e30);
            exp.as_object_mut().unwrap().remove("model_max_length");
        }
        assert_eq!(got, exp, "{name}: tokenizer_config.json");
        assert!(want["tokenizer_json_equals_source"].as_bool().unwrap());
        assert_eq!(
            std::fs::read(out.path.join("tokenizer.json")).unwrap(),
            std::fs::read(case.text.join("tokenizer.json")).unwrap()
        );

        // Weights: every copied tensor from where transformers took it.
        let w = Weights::load_dir(&out.path).unwrap();
        let vision_src = Weights::load_dir(&case.vision).unwrap();
        let text_src = Weights::load_dir(&case.text).unwrap();
        let copied = want["copied"].as_object().unwrap();
        let fresh = want["fresh"].as_object().unwrap();
        let mut names: Vec<&String> = copied.keys().chain(fresh.keys()).collect();
        names.sort();
        assert_eq!(
            w.tensors.keys().collect::<Vec<_>>(),
            names,
            "{name}: tensor names"
        );
        assert!(w.ints.is_empty());
        for (dst, src) in copied {
            let (side, src) = src.as_str().unwrap().split_once(':').unwrap();
            let s = if side == "vision" {
                &vision_src
            } else {
                &text_src
            };
            assert_eq!(
                w.tensors[dst], s.tensors[src],
                "{name}: {dst} vs {side} {src}"
            );
        }
        // Fresh tensors: transformers' shapes and distributions.
        for (t, f) in fresh {
            let got = &w.tensors[t];
            let shape: Vec<usize> = f["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(got.shape, shape, "{name}: {t} shape");
            if t == "logit_scale" {
                assert_eq!(got.data, [2.6592f32]);
            } else if t.ends_with(".bias") {
                assert!(got.data.iter().all(|&v| v == 0.0), "{name}: {t}");
            } else {
                // transformers: N(0, text_config.initializer_range = 0.02).
                let (mean, std) = std_of(got);
                let n = got.data.len() as f64;
                let tol = 5.0 * 0.02 / (2.0 * n).sqrt();
                eprintln!(
                    "{name}: {t} {shape:?} mean {mean:+.5} std {std:.5} (transformers' draw: {:.5})",
                    f["std"].as_f64().unwrap()
                );
                assert!((std - 0.02).abs() < tol, "{name}: {t} std {std}");
                assert!(
                    mean.abs() < 5.0 * 0.02 / n.sqrt(),
                    "{name}: {t} mean {mean}"
                );
            }
        }

        // The folder serves clip-wgpu: tokenizer, image processor, model.
        let tok = TextTokenizer::from_model_dir(&out.path).unwrap();
        assert_eq!(tok.pad_id(), Some(1));
        let captions: Vec<&str> = want["captions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let (ids, mask) = tok.encode_batch(&captions, 12).unwrap();
        let flat = |k: &str| -> Vec<f64> {
            want["tokenized"][k]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
                .collect()
        };
        assert_eq!(
            ids.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            flat("input_ids"),
            "{name}: token ids"
        );
        assert_eq!(
            mask.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            flat("attention_mask")
        );
        assert_eq!(
            ImageProcessorConfig::from_model_dir(&out.path).unwrap(),
            ImageProcessorConfig::from_model_dir(&case.vision).unwrap()
        );
        assert_eq!(config.projection_dim, case.projection_dim.unwrap_or(512));
        if let Some(gpu) = gpu() {
            let model = ClipModel::load(&gpu, &out.path).unwrap();
            assert_eq!(model.params.params.len(), names.len());
        }
        eprintln!(
            "{name}: {} tensors ({} copied, {} fresh) in {}",
            names.len(),
            copied.len(),
            fresh.len(),
            out.path.display()
        );
    }
}

#[test]
fn fresh_tensors_follow_the_seed() {
    let c = &cases()[1];
    let (a, b, d) = (
        Scratch::tmp("seed-a"),
        Scratch::tmp("seed-b"),
        Scratch::tmp("seed-d"),
    );
    prepare_dual_encoder(&c.vision, &c.text, &a.path, Some(16), 3).unwrap();
    prepare_dual_encoder(&c.vision, &c.text, &b.path, Some(16), 3).unwrap();
    prepare_dual_encoder(&c.vision, &c.text, &d.path, Some(16), 4).unwrap();
    let bytes = |s: &Scratch| std::fs::read(s.path.join("model.safetensors")).unwrap();
    assert_eq!(bytes(&a), bytes(&b));
    let (wa, wd) = (
        Weights::load_dir(&a.path).unwrap(),
        Weights::load_dir(&d.path).unwrap(),
    );
    for (k, t) in &wa.tensors {
        let random = k.ends_with("projection.weight");
        assert_eq!(t != &wd.tensors[k], random, "{k}");
    }
}

fn err(vision: &Path, text: &Path, out: &Path) -> String {
    let e = prepare_dual_encoder(vision, text, out, None, 0).unwrap_err();
    let msg = format!("{e:#}");
    eprintln!("error: {msg}");
    assert!(
        !out.join("model.safetensors").exists(),
        "nothing is written on error"
    );
    msg
}

#[test]
fn errors_name_the_folder_and_what_is_missing() {
    let f = fixtures();
    let (clip, mlm) = (f.join("clip/model"), f.join("prepare/roberta_mlm"));
    let out = Scratch::tmp("errors-out");

    let nowhere = f.join("prepare/no-such-folder");
    let m = err(&nowhere, &mlm, &out.path);
    assert!(
        m.contains("no-such-folder") && m.contains("does not exist"),
        "{m}"
    );
    let m = err(&clip, &clip, &out.path);
    assert!(m.contains("not RoBERTa") && m.contains("clip/model"), "{m}");
    let m = err(&mlm, &mlm, &out.path);
    assert!(
        m.contains("not a CLIP model") && m.contains("roberta_mlm"),
        "{m}"
    );

    // A RoBERTa folder with a tensor missing, and one with a wrong shape.
    let bad = Scratch::tmp("errors-text");
    copy_dir(&mlm, &bad.path);
    let mut w = Weights::load_dir(&mlm).unwrap();
    w.tensors
        .remove("roberta.encoder.layer.1.output.dense.weight")
        .unwrap();
    let mut t = w.tensors["roberta.embeddings.word_embeddings.weight"].clone();
    t.shape[0] -= 1;
    t.data.truncate(t.shape[0] * t.shape[1]);
    w.tensors
        .insert("roberta.embeddings.word_embeddings.weight".into(), t);
    let list: Vec<(String, HostTensor)> = w.tensors.into_iter().collect();
    save_file(&bad.path.join("model.safetensors"), &list).unwrap();
    let m = err(&clip, &bad.path, &out.path);
    assert!(m.contains(&bad.path.display().to_string()), "{m}");
    assert!(m.contains("encoder.layer.1.output.dense.weight"), "{m}");
    assert!(
        m.contains("text_model.embeddings.word_embeddings.weight is [299, 26]"),
        "{m}"
    );

    // Tokenizer: vocab.json/merges.txt only.
    let bad = Scratch::tmp("errors-tok");
    copy_dir(&f.join("prepare/roberta_model"), &bad.path);
    std::fs::remove_file(bad.path.join("tokenizer.json")).unwrap();
    let m = err(&clip, &bad.path, &out.path);
    assert!(
        m.contains("no tokenizer.json") && m.contains("vocab.json and merges.txt"),
        "{m}"
    );

    // A CLIP folder without image processor settings, and one without weights.
    let bad = Scratch::tmp("errors-vision");
    copy_dir(&f.join("prepare/clip_vision"), &bad.path);
    std::fs::remove_file(bad.path.join("preprocessor_config.json")).unwrap();
    let m = err(&bad.path, &mlm, &out.path);
    assert!(
        m.contains("image processor") && m.contains(&bad.path.display().to_string()),
        "{m}"
    );
    std::fs::remove_file(bad.path.join("model.safetensors")).unwrap();
    let m = err(&bad.path, &mlm, &out.path);
    assert!(m.contains("no model.safetensors"), "{m}");

    // A CLIP vision folder whose weights lack a layer.
    copy_dir(&f.join("prepare/clip_vision"), &bad.path);
    let mut w = Weights::load_dir(&bad.path).unwrap();
    w.tensors.retain(|k, _| !k.starts_with("encoder.layers.1."));
    let list: Vec<(String, HostTensor)> = w.tensors.into_iter().collect();
    save_file(&bad.path.join("model.safetensors"), &list).unwrap();
    let m = err(&bad.path, &mlm, &out.path);
    assert!(
        m.contains("vision folder") && m.contains("encoder.layers.1.layer_norm1.bias"),
        "{m}"
    );

    // The output may not overwrite a source folder.
    let src = Scratch::tmp("errors-same");
    copy_dir(&f.join("prepare/clip_vision"), &src.path);
    let before = std::fs::read(src.path.join("model.safetensors")).unwrap();
    let e = prepare_dual_encoder(&src.path, &mlm, &src.path, None, 0).unwrap_err();
    assert!(format!("{e:#}").contains("must differ"), "{e:#}");
    assert_eq!(
        std::fs::read(src.path.join("model.safetensors")).unwrap(),
        before
    );
}

/// A transformers-4 era CLIP config (as on the hub for openai/clip-vit-*):
/// a `vision_config` full of legacy keys plus a `vision_config_dict`, which
/// CLIPConfig applies as a complete config (class defaults for what it lacks).
#[test]
fn legacy_clip_config_dict() {
    let f = fixtures();
    let src = Scratch::tmp("legacy-clip");
    copy_dir(&f.join("clip/model"), &src.path);
    let mut cfg = read_json(&src.path.join("config.json"));
    let v = cfg["vision_config"].as_object_mut().unwrap();
    for (k, val) in [
        ("hidden_size", serde_json::json!(999)),
        ("initializer_factor", serde_json::json!(5.0)),
        ("attention_dropout", serde_json::json!(0.5)),
        ("torch_dtype", Value::Null),
        ("use_bfloat16", serde_json::json!(false)),
        ("transformers_version", serde_json::json!("4.21.0")),
    ] {
        v.insert(k.into(), val);
    }
    cfg["vision_config_dict"] = serde_json::json!({
        "hidden_size": 30, "intermediate_size": 37, "num_attention_heads": 2,
        "num_hidden_layers": 2, "patch_size": 6, "image_size": 30
    });
    std::fs::write(
        src.path.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let out = Scratch::new("legacy_clip");
    prepare_dual_encoder(
        &src.path,
        &f.join("prepare/roberta_mlm"),
        &out.path,
        None,
        0,
    )
    .unwrap();
    let got = read_json(&out.path.join("config.json"));
    let v = &got["vision_config"];
    assert_eq!(v["hidden_size"], 30);
    assert_eq!(
        v["initializer_factor"], 1.0,
        "class default, as transformers"
    );
    assert_eq!(
        v["attention_dropout"], 0.0,
        "class default, as transformers"
    );
    assert_eq!(v["use_bfloat16"], false, "other legacy keys stay");
    assert!(v.get("torch_dtype").is_none() && v.get("transformers_version").is_none());
    let config = ModelConfig::from_file(&out.path.join("config.json")).unwrap();
    assert_eq!(config.vision.hidden_size, 30);
    if let Some(gpu) = gpu() {
        ClipModel::load(&gpu, &out.path).unwrap();
    }
}
