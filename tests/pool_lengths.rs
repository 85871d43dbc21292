//! Captions of varied lengths keep the buffer pool bounded: the text towers
//! run a multiple of 8 positions, so after one step at each multiple of 8,
//! steps at every other length allocate no new buffer. Both model kinds;
//! the GPU is this test's own, so no other test's buffers count.
mod common;
use clip_wgpu::model::clip::{Batch, ClipModel};
use clip_wgpu::Tape;
use common::*;

/// A forward and backward at batch 3 whose longest caption has `n` tokens
/// (of `len` padded).
fn step(model: &ClipModel, case: &str, len: usize, n: usize, r: &mut Rng) {
    let gpu = model.params.params[0].tensor.gpu().clone();
    let (batch, s) = (3, model.config.vision.image_size);
    let mut ids = vec![1u32; batch * len];
    let mut mask = vec![0f32; batch * len];
    for b in 0..batch {
        let m = if b == 0 { n } else { 1 + r.below(n) };
        let row = b * len..(b + 1) * len;
        caption(case, &mut ids[row.clone()], &mut mask[row], m, r);
    }
    let b = Batch {
        pixels: upload(&gpu, &r.vec(batch * 3 * s * s, 1.0), &[batch, 3, s, s]),
        ids,
        mask,
        batch,
    };
    let mut tape = Tape::new();
    let vars = model.params.vars(&mut tape);
    let out = model.forward(&mut tape, &vars, &b).unwrap();
    let mut g = tape.backward(&out.loss).unwrap();
    drop(model.params.grads(&vars, &mut g));
    gpu.sync().unwrap();
}

#[test]
fn varied_caption_lengths_allocate_nothing_after_each_multiple_of_8() {
    let Some(gpu) = own_gpu() else { return };
    for (case, len) in [("clip", 20), ("dual_roberta", 28)] {
        let model = init_model(&gpu, case, 3);
        let mut r = Rng::new(5);
        // Each run length once (8, 16, ..., and the padded length), twice
        // so that the second pass sees the pool in its steady state.
        let buckets: Vec<usize> = (8..len).step_by(8).chain([len]).collect();
        for _ in 0..2 {
            for &n in &buckets {
                step(&model, case, len, n, &mut r);
            }
        }
        let before = gpu.pool_stats().allocations;
        for n in (2..=len).rev() {
            step(&model, case, len, n, &mut r);
        }
        let new = gpu.pool_stats().allocations - before;
        eprintln!("{case}: {new} buffers allocated over lengths 2..={len}");
        assert_eq!(
            new, 0,
            "{case}: lengths 2..={len} allocated {new} new buffers"
        );
    }
}
