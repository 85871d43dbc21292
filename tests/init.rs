//! Random initialisation: every expected tensor, with transformers' per-tensor
//! distributions. tests/fixtures/init/stats.json holds, per parameter of
//! transformers-initialised models (tests/fixtures/init/make.py), the shape,
//! mean, std, min, max and all-zero rows pooled over 40 seeds; we pool the
//! same statistics over 40 of our seeds and compare.
mod common;
use clip_wgpu::model::clip::{Batch, ClipModel};
use clip_wgpu::model::config::ModelConfig;
use clip_wgpu::model::init::{init_spec, init_tensor, init_weights, Init, InitRng};
use clip_wgpu::{Tape, Tensor};
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

const CASES: [&str; 3] = ["clip", "dual_roberta", "dual_clip_text"];
const SEEDS: u64 = 40;

fn fixture(rel: &str) -> PathBuf {
    fixtures().join("init").join(rel)
}

fn config(case: &str) -> ModelConfig {
    ModelConfig::from_file(&fixture(&format!("{case}/config.json"))).unwrap()
}

#[derive(Debug, Default)]
struct Stats {
    shape: Vec<usize>,
    n: f64,
    sum: f64,
    sq: f64,
    min: f64,
    max: f64,
    zero_rows: Option<Vec<usize>>,
}

impl Stats {
    fn mean(&self) -> f64 {
        self.sum / self.n
    }
    fn std(&self) -> f64 {
        (self.sq / self.n - self.mean().powi(2)).max(0.0).sqrt()
    }
}

/// Our statistics, pooled over seeds 0..SEEDS like make.py's.
fn our_stats(cfg: &ModelConfig) -> BTreeMap<String, Stats> {
    let mut out: BTreeMap<String, Stats> = BTreeMap::new();
    for seed in 0..SEEDS {
        let w = init_weights(cfg, seed).unwrap();
        for (name, t) in &w.tensors {
            let s = out.entry(name.clone()).or_insert_with(|| Stats {
                shape: t.shape.clone(),
                min: f64::INFINITY,
                max: f64::NEG_INFINITY,
                ..Default::default()
            });
            for &v in &t.data {
                let v = v as f64;
                s.n += 1.0;
                s.sum += v;
                s.sq += v * v;
                s.min = s.min.min(v);
                s.max = s.max.max(v);
            }
            if t.shape.len() == 2 {
                let c = t.shape[1];
                let zero: Vec<usize> = (0..t.shape[0])
                    .filter(|r| t.data[r * c..(r + 1) * c].iter().all(|&v| v == 0.0))
                    .collect();
                s.zero_rows = Some(match s.zero_rows.take() {
                    None => zero,
                    Some(prev) => prev.into_iter().filter(|r| zero.contains(r)).collect(),
                });
            }
        }
    }
    out
}

#[test]
fn matches_transformers_distributions() {
    let all: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("stats.json")).unwrap()).unwrap();
    assert_eq!(all["seeds"].as_u64(), Some(SEEDS));
    for case in CASES {
        let cfg = config(case);
        let theirs = all["cases"][case].as_object().unwrap();
        let ours = our_stats(&cfg);
        let their_names: Vec<&String> = theirs.keys().collect();
        let our_names: Vec<&String> = ours.keys().collect();
        assert_eq!(
            our_names, their_names,
            "{case}: tensor names differ from transformers' parameters"
        );
        let (mut worst_rel, mut worst_z, mut worst_name) = (0.0f64, 0.0f64, String::new());
        let mut random = 0;
        for (name, t) in theirs {
            let o = &ours[name];
            let shape: Vec<usize> = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            if shape.is_empty() {
                assert_eq!(o.shape, [1], "{case} {name}: a scalar is stored as [1]");
            } else {
                assert_eq!(o.shape, shape, "{case} {name}: shape");
            }
            let (tmin, tmax) = (t["min"].as_f64().unwrap(), t["max"].as_f64().unwrap());
            if tmin == tmax {
                // A constant: LayerNorm 1, bias 0, logit_scale.
                assert!(
                    o.min == o.max && o.min as f32 == tmin as f32,
                    "{case} {name}: transformers sets every element to {tmin}, ours range {}..{}",
                    o.min,
                    o.max
                );
                continue;
            }
            random += 1;
            let tstd = t["std"].as_f64().unwrap();
            let tn = SEEDS as f64 * shape.iter().product::<usize>().max(1) as f64;
            // Standard error of a sample std is ~ std / sqrt(2n).
            let se = tstd * (1.0 / (2.0 * tn) + 1.0 / (2.0 * o.n)).sqrt();
            let z = (o.std() - tstd) / se;
            let rel = (o.std() / tstd - 1.0).abs();
            if rel > worst_rel {
                worst_rel = rel;
                worst_name = name.clone();
            }
            worst_z = worst_z.max(z.abs());
            assert!(
                z.abs() < 5.0 && rel < 0.1,
                "{case} {name}: std {:.5} vs transformers' {tstd:.5} ({:.1} standard errors)",
                o.std(),
                z
            );
            let mean_se = tstd / o.n.sqrt();
            assert!(
                o.mean().abs() < 5.0 * mean_se,
                "{case} {name}: mean {:.2e} (std {tstd:.4})",
                o.mean()
            );
            let tzero: Vec<usize> = t["zero_rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(
                o.zero_rows.clone().unwrap_or_default(),
                tzero,
                "{case} {name}: rows that are zero in every seed"
            );
        }
        eprintln!(
            "{case}: {} tensors ({random} random); largest std difference {:.2}% ({worst_name}), \
             largest |z| {worst_z:.2}",
            theirs.len(),
            worst_rel * 100.0
        );
    }
}

/// The RNG itself: normal moments and tail fractions on large tensors, with
/// the std `init_spec` intends.
#[test]
fn large_tensors_follow_the_intended_normal() {
    let cfg = config("dual_roberta");
    let mut checked = 0;
    for (name, _) in ClipModel::expected_tensors(&cfg).unwrap() {
        // (Padding rows need the real 2-D shape; those tensors are covered by
        // the comparison with transformers.)
        let Init::Normal {
            std,
            zero_row: None,
        } = init_spec(&cfg, &name).unwrap()
        else {
            continue;
        };
        // Large enough shapes for tight bounds: repeat the tensor's stream.
        let n = 200_000;
        let t = init_tensor(&cfg, &name, &[n], 123).unwrap();
        let x: Vec<f64> = t.data.iter().map(|&v| v as f64 / std).collect();
        let mean = x.iter().sum::<f64>() / n as f64;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt = x.iter().map(|v| (v - mean).powi(4)).sum::<f64>() / n as f64 / var.powi(2);
        let within = |k: f64| x.iter().filter(|v| v.abs() < k).count() as f64 / n as f64;
        assert!(mean.abs() < 0.015, "{name}: mean {mean}");
        assert!(
            (var.sqrt() - 1.0).abs() < 0.01,
            "{name}: std ratio {}",
            var.sqrt()
        );
        assert!((kurt - 3.0).abs() < 0.1, "{name}: kurtosis {kurt}");
        assert!((within(1.0) - 0.682_689).abs() < 0.005, "{name}: P(|z|<1)");
        assert!((within(2.0) - 0.954_500).abs() < 0.003, "{name}: P(|z|<2)");
        assert!((within(3.0) - 0.997_300).abs() < 0.001, "{name}: P(|z|<3)");
        checked += 1;
        if name.ends_with("mlp.fc1.weight") {
            eprintln!(
                "{name}: mean {mean:.4}, std ratio {:.4}, kurtosis {kurt:.3}",
                var.sqrt()
            );
        }
    }
    assert!(checked > 20);
}

#[test]
fn intended_stds_follow_the_formulas() {
    // dual_roberta: vision factor 1.5, range 0.04, hidden 48, 3 layers;
    // RoBERTa range 0.05, pad 1.
    let cfg = config("dual_roberta");
    let std = |name: &str| match init_spec(&cfg, name).unwrap() {
        Init::Normal { std, .. } => std,
        other => panic!("{name}: {other:?}"),
    };
    let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    close(
        std("vision_model.embeddings.class_embedding"),
        48f64.powf(-0.5) * 1.5,
    );
    close(
        std("vision_model.embeddings.patch_embedding.weight"),
        0.04 * 1.5,
    );
    close(
        std("vision_model.encoder.layers.2.self_attn.k_proj.weight"),
        48f64.powf(-0.5) * 6f64.powf(-0.5) * 1.5,
    );
    close(
        std("vision_model.encoder.layers.0.mlp.fc1.weight"),
        96f64.powf(-0.5) * 1.5,
    );
    close(std("text_model.pooler.dense.weight"), 0.05);
    close(std("visual_projection.weight"), 0.05);
    close(std("text_projection.weight"), 0.05);
    assert_eq!(
        init_spec(&cfg, "text_model.embeddings.word_embeddings.weight").unwrap(),
        Init::Normal {
            std: 0.05,
            zero_row: Some(1)
        }
    );
    assert_eq!(init_spec(&cfg, "logit_scale").unwrap(), Init::Const(2.6592));
    assert_eq!(
        init_spec(&cfg, "vision_model.pre_layrnorm.weight").unwrap(),
        Init::Const(1.0)
    );
    assert_eq!(
        init_spec(&cfg, "text_model.encoder.layer.1.output.LayerNorm.bias").unwrap(),
        Init::Const(0.0)
    );
    let err = init_spec(&cfg, "lm_head.dense.weight")
        .unwrap_err()
        .to_string();
    assert!(err.contains("lm_head.dense.weight"), "{err}");
    // CLIPModel: projections use the top-level factor (2.0), towers their own (1.0).
    let clip = config("clip");
    let std = |name: &str| match init_spec(&clip, name).unwrap() {
        Init::Normal { std, .. } => std,
        other => panic!("{name}: {other:?}"),
    };
    close(std("visual_projection.weight"), 48f64.powf(-0.5) * 2.0);
    close(std("text_projection.weight"), 40f64.powf(-0.5) * 2.0);
    close(std("text_model.embeddings.token_embedding.weight"), 0.02);
    close(
        std("vision_model.embeddings.position_embedding.weight"),
        0.03,
    );
}

#[test]
fn deterministic_per_seed_and_per_tensor() {
    let cfg = config("dual_roberta");
    let a = init_weights(&cfg, 7).unwrap();
    let b = init_weights(&cfg, 7).unwrap();
    let c = init_weights(&cfg, 8).unwrap();
    assert_eq!(a.tensors, b.tensors);
    let name = "vision_model.encoder.layers.0.mlp.fc1.weight";
    assert_ne!(a.tensors[name], c.tensors[name]);
    // A tensor's stream depends only on (seed, name): the same tensor of
    // another model (same std) is identical.
    let shape = a.tensors[name].shape.clone();
    assert_eq!(init_tensor(&cfg, name, &shape, 7).unwrap(), a.tensors[name]);
    // Different tensors of one model are different streams.
    let q = &a.tensors["vision_model.encoder.layers.0.self_attn.q_proj.weight"].data;
    let k = &a.tensors["vision_model.encoder.layers.0.self_attn.k_proj.weight"].data;
    assert_ne!(q, k);
    // The RoBERTa padding rows are exactly zero.
    let w = &a.tensors["text_model.embeddings.word_embeddings.weight"];
    assert!(w.data[40..80].iter().all(|&v| v == 0.0));
    assert!(w.data[0..40].iter().all(|&v| v != 0.0));
    let mut r = InitRng::new(1);
    let first: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
    let mut r = InitRng::new(1);
    assert_eq!(first, (0..3).map(|_| r.next_u64()).collect::<Vec<_>>());
}

#[test]
fn random_init_loads_and_runs() {
    let Some(gpu) = gpu() else { return };
    for case in CASES {
        let cfg = config(case);
        let w = init_weights(&cfg, 0).unwrap();
        let model = ClipModel::from_weights(&gpu, cfg.clone(), &w, "random init").unwrap();
        for (name, t) in model.params.to_host().unwrap() {
            assert_eq!(t, w.tensors[&name], "{case} {name}");
        }
        let b = 3;
        let mut rng = Rng::new(5);
        let px: Vec<f32> = (0..b * 3 * 32 * 32).map(|_| rng.uniform() as f32).collect();
        let len = 6;
        // Ids inside every fixture vocabulary (200); CLIP's eos (199) ends each row.
        let mut ids: Vec<u32> = (0..b * len).map(|_| 3 + rng.below(190) as u32).collect();
        for r in 0..b {
            ids[r * len] = 0;
            ids[r * len + len - 1] = if matches!(case, "dual_roberta") {
                2
            } else {
                199
            };
        }
        let batch = Batch {
            pixels: Tensor::from_slice(&gpu, &px, &[b, 3, 32, 32]).unwrap(),
            ids,
            mask: vec![1.0; b * len],
            batch: b,
        };
        let mut tape = Tape::new();
        let vars = model.params.vars(&mut tape);
        let out = model.forward(&mut tape, &vars, &batch).unwrap();
        let loss = out.loss.tensor().to_vec().unwrap()[0];
        eprintln!(
            "{case}: random-init loss {loss} (ln {b} = {:.4})",
            (b as f32).ln()
        );
        assert!(loss.is_finite() && loss > 0.0, "{case}: loss {loss}");
    }
}
