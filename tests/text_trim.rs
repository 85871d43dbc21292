//! The text towers run only up to the last position their output depends on
//! (CLIP: the last pooled end-of-text token, attention being causal;
//! RoBERTa: the last attended token), rounded up to a multiple of 8. Loss
//! and every gradient must match a run over the whole padded length (the
//! settings' `full_text`, which `CLIP_WGPU_FULL_TEXT=1` sets). One test in
//! this binary, as it changes the shared GPU's settings.
mod common;
use clip_wgpu::gpu::Settings;
use clip_wgpu::model::clip::Batch;
use common::*;

#[test]
fn trimmed_text_matches_the_padded_length() {
    let Some(gpu) = gpu() else { return };
    for case in ["clip", "dual_roberta"] {
        let model = init_model(&gpu, case, 7);
        let s = model.config.vision.image_size;
        // Rows end by position 9: 16 positions run (a multiple of 8) of 20.
        let (batch, len) = (3, 20);
        let lens = [5, 9, 7];
        let mut r = Rng::new(11);
        let mut ids = vec![1u32; batch * len]; // pad
        let mut mask = vec![0f32; batch * len];
        for (b, &n) in lens.iter().enumerate() {
            let row = b * len..(b + 1) * len;
            caption(case, &mut ids[row.clone()], &mut mask[row], n, &mut r);
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
        let (loss_t, grads_t) = loss_and_grads(&model, &b);
        full_text(true);
        assert_eq!(model.text_run_len(&b), len, "{case}: full length");
        let (loss_f, grads_f) = loss_and_grads(&model, &b);
        full_text(false);
        assert_close(&format!("{case} loss"), &[loss_t], &[loss_f], 1e-6);
        for ((p, gt), gf) in model.params.params.iter().zip(&grads_t).zip(&grads_f) {
            assert_close(&format!("{case} grad {}", p.name), gt, gf, 1e-6);
        }
    }
}
