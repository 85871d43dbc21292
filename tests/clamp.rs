mod common;
use clip_wgpu::ops::clamp::{clamp_inplace, clamp_ref};
use common::*;

#[test]
fn clamp_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(11);
    for n in [1, 7, 257, 70001] {
        let x = r.vec(n, 8.0);
        let t = upload(&gpu, &x, &[n]);
        clamp_inplace(&t, -1.5, 100f32.ln()).unwrap();
        let want = clamp_ref(&x, -1.5, 100f32.ln() as f64);
        assert_close(&format!("clamp n={n}"), &download(&t), &want, 1e-7);
    }
}
