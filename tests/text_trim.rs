//! The text towers run only up to the last position their output depends on
//! (CLIP: the last pooled end-of-text token, attention being causal;
//! RoBERTa: the last attended token), rounded up to a multiple of 8. Loss and every gradient must match a
//! run over the whole padded length (the settings' `full_text`, which
//! `CLIP_WGPU_FULL_TEXT=1` sets). One test in this binary, as it changes the
//! shared GPU's settings.
mod common;
use clip_wgpu::gpu::Settings;
use clip_wgpu::model::clip::{Batch, ClipModel};
use clip_wgpu::model::config::ModelConfig;
use clip_wgpu::model::init::init_weights;
use clip_wgpu::Tape;
use common::*;
use std::path::Path;

/// Loss and gradients (parameters without one as empty) of one step.
fn step(model: &ClipModel, b: &Batch) -> (f64, Vec<Vec<f64>>) {
    let mut tape = Tape::new();
    let vars = model.params.vars(&mut tape);
    let out = model.forward(&mut tape, &vars, b).unwrap();
    let loss = download(out.loss.tensor())[0];
    let mut grads = tape.backward(&out.loss).unwrap();
    let g = model.params.grads(&vars, &mut grads);
    (
        loss,
        g.iter()
            .map(|t| t.as_ref().map_or(Vec::new(), download))
            .collect(),
    )
}

#[test]
fn trimmed_text_matches_the_padded_length() {
    let Some(gpu) = gpu() else { return };
    for case in ["clip", "dual_roberta"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/init");
        let cfg = ModelConfig::from_file(&dir.join(case).join("config.json")).unwrap();
        let w = init_weights(&cfg, 7).unwrap();
        let model = ClipModel::from_weights(&gpu, cfg, &w, case).unwrap();
        let s = model.config.vision.image_size;
        // Rows end by position 9: 16 positions run (a multiple of 8) of 20.
        let (batch, len) = (3, 20);
        let lens = [5, 9, 7];
        let mut r = Rng::new(11);
        let mut ids = vec![1u32; batch * len]; // pad
        let mut mask = vec![0f32; batch * len];
        for (b, &n) in lens.iter().enumerate() {
            for t in 0..n {
                // CLIP's end-of-text (199) ends each row; RoBERTa's rows
                // start with <s> (0) and end with </s> (2).
                ids[b * len + t] = match (case, t) {
                    ("clip", t) if t == n - 1 => 199,
                    ("dual_roberta", 0) => 0,
                    ("dual_roberta", t) if t == n - 1 => 2,
                    _ => 3 + (r.uniform().abs() * 190.0) as u32,
                };
                mask[b * len + t] = 1.0;
            }
        }
        let px: Vec<f64> = r.vec(batch * 3 * s * s, 1.0);
        let b = Batch {
            pixels: upload(&gpu, &px, &[batch, 3, s, s]),
            ids,
            mask,
            batch,
        };
        let full_text = |on: bool| {
            gpu.set_settings(Settings {
                full_text: on,
                ..(*gpu.settings()).clone()
            })
        };
        full_text(false);
        assert_eq!(model.text_run_len(&b), 16, "{case}: trimmed");
        let (loss_t, grads_t) = step(&model, &b);
        full_text(true);
        assert_eq!(model.text_run_len(&b), len, "{case}: full length");
        let (loss_f, grads_f) = step(&model, &b);
        full_text(false);
        assert_close(&format!("{case} loss"), &[loss_t], &[loss_f], 1e-6);
        for ((p, gt), gf) in model.params.params.iter().zip(&grads_t).zip(&grads_f) {
            assert_close(&format!("{case} grad {}", p.name), gt, gf, 1e-6);
        }
    }
}
