//! Elementwise add with broadcast and in-place accumulation, on both the
//! scalar kernels and the vec4 ones (taken when the sizes are multiples of
//! 4), against plain CPU arithmetic.
mod common;
use clip_wgpu::ops::elementwise::{add, add_assign};
use common::*;

#[test]
fn add_broadcasts_like_the_reference() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(5);
    // (n, nb): plain, bias over rows (vec4 and not), position-style blocks.
    for (n, nb) in [
        (4096, 4096),
        (12 * 128, 128),
        (7 * 13, 13),
        (12, 3),
        (6 * 20, 20),
        (5, 5),
    ] {
        let (a, b) = (r.vec(n, 1.0), r.vec(nb, 1.0));
        let got = download(&add(&upload(&gpu, &a, &[n]), &upload(&gpu, &b, &[nb])).unwrap());
        let want: Vec<f64> = (0..n)
            .map(|i| (a[i] as f32 + b[i % nb] as f32) as f64)
            .collect();
        assert_eq!(got, want, "add n={n} nb={nb}");
    }
}

#[test]
fn add_assign_accumulates() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(6);
    for n in [4096, 4097, 3, 8] {
        let (a, g) = (r.vec(n, 1.0), r.vec(n, 1.0));
        let acc = upload(&gpu, &a, &[n]);
        add_assign(&acc, &upload(&gpu, &g, &[n])).unwrap();
        let want: Vec<f64> = (0..n).map(|i| (a[i] as f32 + g[i] as f32) as f64).collect();
        assert_eq!(download(&acc), want, "add_assign n={n}");
    }
}
