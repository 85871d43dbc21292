//! Gradient accumulation and gradient checkpointing.
//! - `--accumulation_loss full`: K micro-batches give the gradients (every
//!   parameter and logit_scale) and the loss of one batch of all their rows.
//! - `--accumulation_loss micro`: the mean of each micro-batch's own
//!   gradients, divided by the micro-batches the group really has.
//! - `--gradient_checkpointing`: the same gradients as without.
//!
//! Both model kinds, with and without frozen towers; and `train` end to end:
//! 3 accumulated steps end at the weights of 3 steps of the whole batch.
mod common;
use clip_wgpu::dist::World;
use clip_wgpu::model::clip::{Batch, ClipModel};
use clip_wgpu::model::weights::Weights;
use clip_wgpu::train::accumulate::{group_grads, AccumulationLoss};
use clip_wgpu::{Gpu, Tape};
use common::cli::{bin, have_gpu, temp, QUICK_RUN};
use common::*;
use std::path::Path;
use std::sync::Arc;

const CASES: [&str; 2] = ["clip", "dual_roberta"];

/// `n` rows of pixels, ids and mask on the host: captions of random
/// lengths (so micro-batches run different text lengths), padded to 16.
struct Rows {
    pixels: Vec<f64>,
    ids: Vec<u32>,
    mask: Vec<f32>,
    len: usize,
    px: usize,
}

fn rows(case: &str, n: usize, s: usize, seed: u64) -> Rows {
    let len = 16;
    let mut r = Rng::new(seed);
    let mut ids = vec![1u32; n * len];
    let mut mask = vec![0f32; n * len];
    for b in 0..n {
        let l = 3 + r.below(len - 3);
        let row = b * len..(b + 1) * len;
        caption(case, &mut ids[row.clone()], &mut mask[row], l, &mut r);
    }
    let px = 3 * s * s;
    Rows {
        pixels: r.vec(n * px, 1.0),
        ids,
        mask,
        len,
        px,
    }
}

impl Rows {
    /// Rows `start..start + n` as a batch on the GPU.
    fn batch(&self, gpu: &Arc<Gpu>, start: usize, n: usize) -> Batch {
        let s = ((self.px / 3) as f64).sqrt() as usize;
        let (l, p) = (self.len, self.px);
        Batch {
            pixels: upload(gpu, &self.pixels[start * p..(start + n) * p], &[n, 3, s, s]),
            ids: self.ids[start * l..(start + n) * l].to_vec(),
            mask: self.mask[start * l..(start + n) * l].to_vec(),
            batch: n,
        }
    }

    /// Micro-batches of the given sizes, in order.
    fn split(&self, gpu: &Arc<Gpu>, sizes: &[usize]) -> Vec<Batch> {
        let mut start = 0;
        sizes
            .iter()
            .map(|&n| {
                let b = self.batch(gpu, start, n);
                start += n;
                b
            })
            .collect()
    }
}

/// Loss and gradients of a group through `group_grads`.
fn grouped(model: &ClipModel, mode: AccumulationLoss, micro: &[Batch]) -> (f64, Vec<Vec<f64>>) {
    let out = group_grads(
        model,
        mode,
        micro.len(),
        |i| {
            let b = &micro[i];
            Ok(Batch {
                pixels: b.pixels.clone(),
                ids: b.ids.clone(),
                mask: b.mask.clone(),
                batch: b.batch,
            })
        },
        &World::single(),
    )
    .unwrap();
    let loss = out
        .losses
        .iter()
        .map(|l| download(l)[0] * out.loss_weight)
        .sum();
    (loss, host_grads(out.grads))
}

/// Attention key biases: their exact gradient is zero (adding one vector
/// to every key shifts each query's scores by a constant, which the softmax
/// removes), so what any run computes for them is rounding noise.
fn key_bias(name: &str) -> bool {
    name.ends_with("k_proj.bias") || name.ends_with("attention.self.key.bias")
}

/// ||got - want|| / ||want|| per tensor, both present or both absent; key
/// biases must instead be noise-sized in both (below 1e-6 of the largest
/// gradient norm).
fn assert_grads_close(
    what: &str,
    model: &ClipModel,
    got: &[Vec<f64>],
    want: &[Vec<f64>],
    tol: f64,
) {
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let largest = want.iter().map(|w| norm(w)).fold(0.0, f64::max);
    let mut worst = 0.0f64;
    for ((p, g), w) in model.params.params.iter().zip(got).zip(want) {
        assert_eq!(
            g.is_empty(),
            w.is_empty(),
            "{what}: {} has a gradient in one run only",
            p.name
        );
        if w.is_empty() {
            continue;
        }
        if key_bias(&p.name) {
            assert!(
                norm(g).max(norm(w)) <= 1e-6 * largest,
                "{what}: {} should have a zero gradient, got norms {:e} and {:e}",
                p.name,
                norm(g),
                norm(w)
            );
            continue;
        }
        let diff: Vec<f64> = g.iter().zip(w).map(|(a, b)| a - b).collect();
        let rel = norm(&diff) / norm(w).max(1e-30);
        worst = worst.max(rel);
        assert!(
            rel <= tol,
            "{what}: gradient of {} off by {rel:e} (relative norm; tolerance {tol:e})",
            p.name
        );
    }
    eprintln!("{what}: worst relative gradient difference {worst:e}");
}

/// Freeze settings: none, the vision tower, the text tower.
const FREEZE: [(bool, bool); 3] = [(false, false), (true, false), (false, true)];

fn frozen_name(f: (bool, bool)) -> &'static str {
    match f {
        (true, _) => "vision frozen",
        (_, true) => "text frozen",
        _ => "all training",
    }
}

#[test]
fn full_accumulation_equals_one_batch_of_all_rows() {
    let Some(gpu) = gpu() else { return };
    for case in CASES {
        let mut m = init_model(&gpu, case, 5);
        let s = m.config.vision.image_size;
        // K = 2 of 4; K = 3 with a shorter last micro-batch.
        for sizes in [&[4, 4][..], &[4, 4, 2][..]] {
            let n: usize = sizes.iter().sum();
            let data = rows(case, n, s, 3 + n as u64);
            let whole = data.batch(&gpu, 0, n);
            let micro = data.split(&gpu, sizes);
            for f in FREEZE {
                m.freeze(f.0, f.1);
                let what = format!("{case}, micro-batches {sizes:?}, {}", frozen_name(f));
                let (loss_ref, grads_ref) = loss_and_grads(&m, &whole);
                let (loss, grads) = grouped(&m, AccumulationLoss::Full, &micro);
                assert_close(&format!("{what}: loss"), &[loss], &[loss_ref], 1e-6);
                assert!(
                    !grads[m.logit_scale].is_empty(),
                    "{what}: logit_scale got no gradient"
                );
                assert_grads_close(&what, &m, &grads, &grads_ref, 1e-5);
            }
            m.freeze(false, false);
        }
    }
}

/// Not the same thing: the full-batch gradient differs from the mean of the
/// micro-batches' own (so the test above would catch a silent fallback).
#[test]
fn micro_accumulation_is_the_mean_of_micro_batch_gradients() {
    let Some(gpu) = gpu() else { return };
    for case in CASES {
        let m = init_model(&gpu, case, 5);
        let s = m.config.vision.image_size;
        // A group of three (a shorter last group of K = 4 at an epoch's end
        // has three too): divided by 3, not by 4.
        let sizes = [4, 4, 2];
        let data = rows(case, 10, s, 21);
        let micro = data.split(&gpu, &sizes);
        let mut loss_ref = 0.0;
        let mut grads_ref: Vec<Vec<f64>> = Vec::new();
        for b in &micro {
            let (l, g) = loss_and_grads(&m, b);
            loss_ref += l / 3.0;
            if grads_ref.is_empty() {
                grads_ref = vec![Vec::new(); g.len()];
            }
            for (acc, g) in grads_ref.iter_mut().zip(g) {
                if acc.is_empty() {
                    *acc = vec![0.0; g.len()];
                }
                for (a, x) in acc.iter_mut().zip(g) {
                    *a += x / 3.0;
                }
            }
        }
        let what = format!("{case}, micro mode");
        let (loss, grads) = grouped(&m, AccumulationLoss::Micro, &micro);
        assert_close(&format!("{what}: loss"), &[loss], &[loss_ref], 1e-6);
        assert_grads_close(&what, &m, &grads, &grads_ref, 1e-5);
        // The full-batch loss over the same rows is another number.
        let (full, _) = grouped(&m, AccumulationLoss::Full, &micro);
        assert!(
            (full - loss).abs() > 1e-3,
            "{what}: full {full} and micro {loss} losses agree; the modes are not distinct"
        );
    }
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let Some(gpu) = gpu() else { return };
    for case in CASES {
        let mut m = init_model(&gpu, case, 5);
        let s = m.config.vision.image_size;
        let data = rows(case, 6, s, 33);
        let whole = data.batch(&gpu, 0, 6);
        let micro = data.split(&gpu, &[3, 3]);
        for f in FREEZE {
            m.freeze(f.0, f.1);
            m.set_gradient_checkpointing(false);
            let (loss_ref, grads_ref) = loss_and_grads(&m, &whole);
            let (_, acc_ref) = grouped(&m, AccumulationLoss::Full, &micro);
            m.set_gradient_checkpointing(true);
            let what = format!("{case}, checkpointed, {}", frozen_name(f));
            let (loss, grads) = loss_and_grads(&m, &whole);
            assert_close(&format!("{what}: loss"), &[loss], &[loss_ref], 1e-7);
            assert_grads_close(&what, &m, &grads, &grads_ref, 1e-6);
            let (_, acc) = grouped(&m, AccumulationLoss::Full, &micro);
            assert_grads_close(&format!("{what}, accumulated"), &m, &acc, &acc_ref, 1e-6);
        }
        m.set_gradient_checkpointing(false);
        m.freeze(false, false);
    }
}

/// Checkpointing records one tape node per encoder layer where the plain
/// forward records a dozen: the activations really are not kept.
#[test]
fn gradient_checkpointing_keeps_only_layer_inputs() {
    let Some(gpu) = gpu() else { return };
    let mut m = init_model(&gpu, "clip", 5);
    let s = m.config.vision.image_size;
    let data = rows("clip", 2, s, 5);
    let b = data.batch(&gpu, 0, 2);
    let nodes = |m: &ClipModel| {
        let mut tape = Tape::new();
        let vars = m.params.vars(&mut tape);
        m.forward(&mut tape, &vars, &b).unwrap();
        tape.len()
    };
    let plain = nodes(&m);
    m.set_gradient_checkpointing(true);
    let ckpt = nodes(&m);
    // 3 vision + 2 text layers; each plain layer records at least 8 nodes.
    assert!(
        ckpt + 5 * 7 <= plain,
        "checkpointed forward records {ckpt} nodes, plain {plain}"
    );
}

/// `train` end to end: 3 steps of 3 accumulated micro-batches of 4 (with
/// gradient checkpointing; the data ends each epoch with a group of two)
/// land on the weights of 3 steps of batch 12.
#[test]
fn accumulated_training_matches_the_whole_batch() {
    if !have_gpu() {
        return;
    }
    let root = temp("accumulate");
    let model = fixture_model("clip");
    let run = |out: &Path, extra: &[&str], host_mib: &str| {
        let o = bin()
            .env("CLIP_WGPU_GROUP_HOST_MIB", host_mib)
            .arg("train")
            .args([
                "--model_name_or_path",
                model.to_str().unwrap(),
                "--output_dir",
                out.to_str().unwrap(),
                "--do_train",
                "--demo_train_samples",
                "20",
                "--max_steps",
                "3",
            ])
            .args(QUICK_RUN)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "train {extra:?} failed: {err}");
        err
    };
    let whole = root.join("whole");
    run(&whole, &["--per_device_train_batch_size", "12"], "1024");
    let acc = root.join("accumulated");
    let log = run(
        &acc,
        &[
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "3",
            "--gradient_checkpointing",
        ],
        "1024",
    );
    assert!(
        log.contains("one contrastive loss over all 12 pairs")
            && log.contains("gradient checkpointing"),
        "{log}"
    );
    let a = Weights::load_dir(&whole).unwrap();
    let b = Weights::load_dir(&acc).unwrap();
    // Per tensor, relative to its norm. The key biases get only rounding
    // noise as gradient (see `key_bias`), which AdamW turns into steps of up
    // to about lr each: the two runs may move them apart by that much.
    let mut worst = 0.0f64;
    for (k, t) in &a.tensors {
        let u = &b.tensors[k].data;
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
        if key_bias(k) {
            let apart = t
                .data
                .iter()
                .zip(u)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(apart <= 2.0 * 3.0 * 1e-3, "{k}: the runs are {apart} apart");
            continue;
        }
        let diff = norm(&mut t.data.iter().zip(u).map(|(x, y)| (x - y) as f64));
        let rel = diff / norm(&mut t.data.iter().map(|&x| x as f64)).max(1e-30);
        worst = worst.max(rel);
        assert!(
            rel <= 1e-5,
            "{k}: accumulated run ends {rel:e} away (relative norm)"
        );
    }
    eprintln!("accumulated vs whole batch: worst relative weight difference {worst:e}");
    // With no host memory for the group, pass 2 decodes the pictures again
    // (a second loader from where they began): the very same run.
    let replayed = root.join("replayed");
    let accumulated = [
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "3",
        "--gradient_checkpointing",
    ];
    run(&replayed, &accumulated, "0");
    let c = Weights::load_dir(&replayed).unwrap();
    for (k, t) in &b.tensors {
        assert!(
            t.data == c.tensors[k].data,
            "{k}: pictures decoded again for pass 2 gave other weights"
        );
    }
    // The logged losses are the whole batch's.
    let losses = |dir: &Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
            .collect()
    };
    let (lw, la) = (losses(&whole), losses(&acc));
    assert_eq!(lw.len(), 3, "{lw:?}");
    assert_close("logged losses", &la, &lw, 1e-5);
    std::fs::remove_dir_all(&root).unwrap();
}
